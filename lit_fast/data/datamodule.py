"""DataModule: local files -> records -> the task's codec -> length-bucketed batches, sharded per rank.

What a row *means* (tokenization, labels, collation) is the task's codec (tasks/codecs.py), which the DataModule
takes from the task in `setup`; this file owns reading, validating, splitting and the loaders; batching.py makes
the batches. Where the task trains on packed rows (`task.packed_batches()`), training, validation and test batches
are planned by a real-token budget (training.TokenBudgetPlan) and packed by the codec in the loader workers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from lit_fast.data.batching import (ArrowRows, Batches, EpochLoader, EpochPlan, PredictBatches, as_tensors,
                                    loader_workers, make_batches, predict_loader, predict_max_tokens, predict_plan)
from lit_fast.data.progress import token_count
from lit_fast.data.readers import check_texts, read_table
from lit_fast.errors import ConfigError, InputDataError
from lit_fast.models import sharding
from lit_fast.training.packing import TokenBudgetPlan

log = logging.getLogger(__name__)


@dataclass
class Split:
    records: list[dict[str, Any]]
    source: str


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: Optional[str] = None,
        text_column: str = "text",
        pair_column: Optional[str] = None,
        negative_column: Optional[str] = None,
        label_column: Optional[str] = None,
        target_column: Optional[str] = None,
        id_column: Optional[str] = None,
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        keep_labels: Optional[list[str]] = None,
        max_rows: Optional[int] = None,
        allow_empty_text: bool = False,
        batch_size: int = 32,
        max_tokens: Union[int, Literal["auto"], None] = None,
        num_workers: Union[int, Literal["auto"]] = 0,
        seed: int = 0,
    ):
        """Local text data for every task.

        Args:
            path: input file (.jsonl, .csv, .parquet, .txt: one text per line). For training, the training rows;
                `package:NAME/rel/path` names a file shipped inside an installed Python package; a Hugging Face
                dataset: a save_to_disk folder, or hf:NAME[:CONFIG][@SPLIT] from the hub (docs/TRAINING.md).
            text_column: the column with the text (prompts, for generation; queries, for a reranker; anchors, for
                embedder training).
            pair_column: the column with each row's second text: the passage a reranker scores against the query,
                the positive an embedder learns to put near the anchor.
            negative_column: embedder training: a hard negative for each anchor (a text or a list of texts).
            label_column: the column with class labels (classification training/evaluation).
            target_column: the column with target text (completions for causal LM, outputs for seq2seq).
            id_column: an optional column copied to every output row as "id".
            val_path: validation file; without it, `val_fraction` of `path` is held out (seeded).
            test_path: test file; without it, `test_fraction` of `path` is held out (seeded).
            val_fraction: share of `path` held out for validation when `val_path` is not given.
            test_fraction: share of `path` held out for testing when `test_path` is not given.
            keep_labels: keep only rows whose label is one of these (the others are skipped and counted in the log);
                also fixes the label order.
            max_rows: use at most this many rows of `path` (after label filtering; a seeded random subset).
            allow_empty_text: accept empty or missing texts (they are encoded as empty strings) instead of
                stopping with an error that names the row.
            batch_size: rows per batch (at most).
            max_tokens: cap on tokens per batch. Padded batches (predict; training with model.packing off): padded
                tokens, rows x longest row, so long rows get smaller batches. Packed training, validation and test
                (model.packing): real tokens, each batch filled to about this many (first-fit over a seeded shuffle
                per epoch, batch_size still the most examples a batch holds); a row longer than this is an error.
                Unset there: batch_size examples per batch. "auto": predict batches of 65536 tokens on a GPU and
                4096 on a CPU (measured fastest on each); no cap in training.
            num_workers: DataLoader worker processes (they tokenize, one thread each); "auto": the CPU cores
                this process may use, shared by the ranks of this machine, less one for the rank itself (at most 16).
            seed: seed for splits, subsets and shuffling.
        """
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens != "auto" and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ConfigError(f"data.max_tokens must be >= 1 (tokens per batch), auto, or null for no cap; got "
                              f"{max_tokens!r}")
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= fraction < 1:
                raise ConfigError(f"data.{name} must be at least 0 and below 1, got {fraction}")
        if max_rows is not None and max_rows < 1:
            raise ConfigError(f"data.max_rows must be >= 1, got {max_rows}")
        self.save_hyperparameters()
        self.splits: dict[str, Split] = {}
        self.examples: dict[str, list[dict]] = {}
        self._ids = None  # the id column (Arrow), predict only
        self.num_rows: dict[str, int] = {}
        self.evaluate_only = False  # `lit-fast validate|test`: every row of the file is evaluated, none trained on
        self.packed = False  # train/val/test batches are packed rows (the task's choice, asked in setup)
        self.list_roles: tuple[str, ...] = ()  # roles whose cells may be lists (the task's `list_roles`, in setup)

    # ---- reading -------------------------------------------------------------------------------------------
    def _records(self, path: str, *, need_label: bool, need_target: bool) -> Split:
        hp = self.hparams
        used = {"text": hp.text_column, "pair": hp.pair_column, "negative": hp.negative_column,
                "label": hp.label_column if need_label else None,
                "target": hp.target_column if need_target else None, "id": hp.id_column}
        table, file = read_table(path, used, list_roles=self.list_roles)
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        texts = columns[hp.text_column]
        pairs = columns[hp.pair_column] if hp.pair_column else None
        negatives = columns[hp.negative_column] if hp.negative_column else None
        n = len(texts)
        labels = columns[hp.label_column] if need_label else None
        targets = columns[hp.target_column] if need_target else None
        ids = columns[hp.id_column] if hp.id_column else None
        keep = set(hp.keep_labels) if (hp.keep_labels and labels is not None) else None
        records = []
        for i in range(n):
            if keep is not None and str(labels[i]) not in keep:
                continue  # rows of other labels are not used at all (counted in the log below)
            text = texts[i]
            if isinstance(text, list) and "text" in self.list_roles:
                pass  # words of a token-classification row, messages of a chat: the task's codec checks them
            elif text is None or (isinstance(text, str) and not text.strip()):
                if not hp.allow_empty_text:
                    raise InputDataError(
                        f"{file}: row {i} (0-based) has an empty '{hp.text_column}'; fix the row or pass "
                        "--data.allow_empty_text true"
                    )
                text = "" if text is None else text
            if not isinstance(text, (str, list) if "text" in self.list_roles else str):
                raise InputDataError(
                    f"{file}: row {i} (0-based): '{hp.text_column}' is a {type(text).__name__}, expected text"
                )
            record: dict[str, Any] = {"index": i, "text": text}
            if pairs is not None:
                if not isinstance(pairs[i], str) or not pairs[i].strip():
                    raise InputDataError(f"{file}: row {i} (0-based) has no text in '{hp.pair_column}' (the pair "
                                         "column); every row needs one")
                record["pair"] = pairs[i]
            if negatives is not None:
                record["negative"] = _negatives(negatives[i], file, i, hp.negative_column)
            if labels is not None:
                if labels[i] is None or str(labels[i]) == "":
                    raise InputDataError(f"{file}: row {i} (0-based) has no label in '{hp.label_column}'")
                record["label"] = labels[i] if isinstance(labels[i], list) and "label" in self.list_roles else str(
                    labels[i])
            if targets is not None:
                if not isinstance(targets[i], str):
                    raise InputDataError(
                        f"{file}: row {i} (0-based): '{hp.target_column}' must be text, got {type(targets[i]).__name__}"
                    )
                record["target"] = targets[i]
            if ids is not None:
                record["id"] = ids[i]
            records.append(record)
        if keep is not None:
            log.info("%s: kept %d of %d rows whose label is one of %s", file, len(records), n, hp.keep_labels)
            if not records:
                raise InputDataError(f"{file}: no row has a label in {hp.keep_labels} (column '{hp.label_column}')")
        return Split(records, str(file))

    def _check_columns(self, task, stage: str) -> None:
        """The columns a task needs, asked for before any file is read."""
        name = type(task).__name__
        if stage != "predict" and getattr(task, "needs_label", False) and not self.hparams.label_column:
            raise ConfigError(f"{name} learns from labelled rows: set --data.label_column to the column with the "
                              "labels")
        if getattr(task, "needs_pair", False) and not self.hparams.pair_column:
            raise ConfigError(f"{name} reads two texts per row: set --data.pair_column (and --data.text_column)")

    def _evaluation_split(self, task, name: str) -> None:
        """`lit-fast validate|test`: the val/test file if one is set, else every row of data.path."""
        hp = self.hparams
        path = (hp.val_path if name == "val" else hp.test_path) or hp.path
        if not path:
            raise ConfigError(f"no rows to evaluate: set --data.path (or --data.{name}_path)")
        need_target = getattr(task, "needs_target", False) and hp.target_column is not None
        split = self._records(path, need_label=getattr(task, "needs_label", False), need_target=need_target)
        self.splits[name] = split
        log.info("%s: evaluating all %d rows", split.source, len(split.records))

    def _fit_splits(self, need_label: bool, need_target: bool) -> None:
        hp = self.hparams
        if not hp.path:
            raise ConfigError("no training data: set --data.path")
        train = self._records(hp.path, need_label=need_label, need_target=need_target)
        records = list(train.records)
        rng = random.Random(hp.seed)
        rng.shuffle(records)
        if hp.max_rows:
            records = records[: hp.max_rows]
        held: dict[str, list] = {}
        total = len(records)  # fractions are of all rows, so 0.1/0.1 of 3,750 rows leaves 3,000 to train on
        for name, other, fraction in (("test", hp.test_path, hp.test_fraction), ("val", hp.val_path, hp.val_fraction)):
            if other:
                held[name] = self._records(other, need_label=need_label, need_target=need_target).records
            elif fraction > 0:
                if not 0 < fraction < 1:
                    raise ConfigError(f"data.{name}_fraction must be between 0 and 1, got {fraction}")
                k = max(1, int(round(total * fraction)))
                held[name], records = records[:k], records[k:]
        if not records:
            raise InputDataError(f"{train.source}: no training rows left after holding out validation/test rows")
        self.splits["fit"] = Split(records, train.source)
        for name, other in (("val", hp.val_path), ("test", hp.test_path)):
            if name in held:
                self.splits[name] = Split(held[name], other or train.source)
        log.info("rows: train %d, val %d, test %d", len(records), len(held.get("val", [])), len(held.get("test", [])))

    # ---- Lightning hooks -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        task = self.trainer.lightning_module
        hp = self.hparams
        self._check_columns(task, stage)
        self.list_roles = tuple(getattr(task, "list_roles", ()))
        if stage == "predict":
            self._predict_table()
            self.codec = task.codec()
            return
        if self.evaluate_only and stage in ("validate", "test"):
            self._evaluation_split(task, "val" if stage == "validate" else "test")
        elif "fit" not in self.splits:
            need_target = getattr(task, "needs_target", False) and hp.target_column is not None
            self._fit_splits(getattr(task, "needs_label", False), need_target)
        task.prepare_data_splits({k: v.records for k, v in self.splits.items()})  # e.g. a classifier's labels
        self.codec = task.codec()
        for name, split in self.splits.items():
            if name not in self.examples:
                self.examples[name] = self.codec.encode(split.records, name)
        packed = getattr(task, "packed_batches", None)
        self.packed = bool(packed()) if packed is not None else False
        if self.packed:
            for name in self.examples:
                self._check_packed_budget(name)

    def _check_packed_budget(self, name: str) -> None:
        """Every row of a packed split fits data.max_tokens: said here, before any weights load."""
        limit = self._train_max_tokens
        if limit is None:
            return
        for example in self.examples[name]:
            if example["length"] > limit:
                raise ConfigError(f"{self.splits[name].source}: row {example['index']} has {example['length']} "
                                  f"tokens, more than data.max_tokens={limit} real tokens a packed batch may hold; "
                                  f"raise data.max_tokens to at least model.max_length")

    def _predict_table(self) -> None:
        """Keep the input as Arrow (memory-mapped for Parquet): millions of rows need not become Python objects."""
        import pyarrow as pa
        import pyarrow.compute as pc

        hp = self.hparams
        if not hp.path:
            raise ConfigError("no input: set --data.path")
        table, file = read_table(hp.path, {"text": hp.text_column, "pair": hp.pair_column, "id": hp.id_column},
                                 list_roles=self.list_roles)
        texts = table.column(hp.text_column)
        lists = "text" in self.list_roles and (pa.types.is_list(texts.type) or pa.types.is_large_list(texts.type))
        if not lists:
            check_texts(texts, file, hp.text_column, hp.allow_empty_text)
        self._pairs = table.column(hp.pair_column) if hp.pair_column else None
        if self._pairs is not None:
            check_texts(self._pairs, file, hp.pair_column, hp.allow_empty_text)
        self._ids = ArrowRows(table.column(hp.id_column)) if hp.id_column else None
        self._texts = texts
        self.num_rows["predict"] = table.num_rows
        if lists:  # words or messages: their count stands in for the length
            chars = pc.fill_null(pc.list_value_length(texts), 0).to_numpy()
        else:
            chars = pc.fill_null(pc.utf8_length(texts.cast("string")), 0).to_numpy()
        if self._pairs is not None:
            chars = chars + pc.fill_null(pc.utf8_length(self._pairs.cast("string")), 0).to_numpy()
        device = self._device_type() or ("cuda" if torch.cuda.is_available() else "cpu")
        self._predict_max_tokens = predict_max_tokens(hp.max_tokens, device)
        self._plan = predict_plan(chars, hp.batch_size, self._predict_max_tokens)
        log.info("%s: %d rows in %d batches", file, table.num_rows, len(self._plan))

    def ids_for(self, indices: list[int]) -> Optional[list[Any]]:
        """The id column's values of these input rows (None without --data.id_column)."""
        if self._ids is None:
            return None
        return self._ids.take(indices).to_pylist()

    def _loader(self, name: str, *, shuffle: bool) -> DataLoader:
        """Train/val/test batches of this rank (batching.EpochPlan; packed: training.TokenBudgetPlan), collated
        (or packed) by the codec in loader workers."""
        examples = self.examples[name]
        hp = self.hparams
        trainer = self.trainer
        rank, world = sharding.data_parallel_rank(trainer.strategy)
        if len(examples) < world:
            raise InputDataError(f"{name} split has {len(examples)} rows, fewer than the {world} ranks; add rows")
        lengths = tuple(e["length"] for e in examples)
        if self.packed:
            # without a token budget a packed batch holds batch_size examples, as a padded one would
            budget = self._train_max_tokens or hp.batch_size * max(lengths)
            plan = TokenBudgetPlan(lengths, budget, hp.seed, rank, world, shuffle, max_examples=hp.batch_size)
            collate = self.codec.pack
        else:
            plan = EpochPlan(lengths, hp.batch_size, self._train_max_tokens, hp.seed, rank, world, shuffle)
            collate = self.codec.collate
        epoch = (lambda: trainer.current_epoch) if shuffle else (lambda: 0)
        return EpochLoader(Batches(examples, plan(epoch()), collate), plan, epoch, num_workers=self._num_workers())

    @property
    def _train_max_tokens(self) -> Optional[int]:
        return None if self.hparams.max_tokens == "auto" else self.hparams.max_tokens

    def _device_type(self) -> Optional[str]:
        """"cpu" when the Trainer computes on the CPU, "cuda" on an accelerator, None without a Trainer."""
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is None:
            return None
        return "cpu" if type(accelerator).__name__ == "CPUAccelerator" else "cuda"

    def _num_workers(self) -> int:
        workers = self.hparams.num_workers
        if workers != "auto":
            if not isinstance(workers, int) or workers < 0:
                raise ConfigError(f"data.num_workers must be a number >= 0 or auto, got {workers!r}")
            return workers
        if self._device_type() == "cpu":
            return 0  # the model's threads have every core already; a tokenizing worker would only take one away
        return loader_workers(getattr(self.trainer, "num_devices", None) or 1)  # the ranks on this machine

    def train_dataloader(self) -> DataLoader:
        return self._loader("fit", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.splits:
            raise ConfigError("no test rows: set --data.test_path or --data.test_fraction")
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        rank, world = sharding.data_parallel_rank(self.trainer.strategy)
        dataset = PredictBatches(self._texts, self._plan, self.codec, self._predict_max_tokens, rank, world,
                                 pairs=self._pairs)
        return predict_loader(dataset, num_workers=self._num_workers())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = as_tensors(batch)  # predict workers send arrays (batching.predict_loader)
        if self._predicting() and isinstance(batch, dict):
            batch["num_tokens"] = token_count(batch)  # on the host: counting on the GPU would wait for it
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # a predict batch's row indices stay on the host, where its rows are written: reading them back from the GPU
        # would wait for the batch to be computed
        if self._predicting() and isinstance(batch, dict) and "index" in batch:
            index = batch["index"]
            moved = super().transfer_batch_to_device({k: v for k, v in batch.items() if k != "index"}, device,
                                                     dataloader_idx)
            return {**moved, "index": index}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _predicting(self) -> bool:
        return self.trainer is not None and self.trainer.predicting


def _negatives(value: Any, file: Any, row: int, column: str) -> list[str]:
    """A row's hard negatives: one text or a list of texts (never empty ones)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InputDataError(f"{file}: row {row} (0-based): '{column}' must be a text or a list of texts, got "
                             f"{value!r:.60}")
    return list(texts)
