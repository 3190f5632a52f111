"""DataModule: local files -> records -> the task's tokenization -> length-bucketed batches, sharded per rank.

What a row *means* (tokenization, labels, collation) belongs to the task module (`model.encode`,
`model.collate`); this file owns reading, validating, splitting, ordering and batching.

Batches are made here, not by Lightning's samplers: each rank takes every world_size-th batch of one shared,
seeded list of batches, so no row is duplicated or dropped in predict (an unpadded split, like Lightning's
`UnrepeatedDistributedSampler`), and in training every rank sees the same number of batches.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lit_fast import sharding
from lit_fast.errors import ConfigError, InputDataError
from lit_fast.readers import check_texts, read_table

log = logging.getLogger(__name__)


@dataclass
class Split:
    records: list[dict[str, Any]]
    source: str


def make_batches(
    lengths: list[int],
    batch_size: int,
    max_tokens: int | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    bucket_batches: int = 50,
) -> list[list[int]]:
    """Group positions into batches of similar length.

    Predict (shuffle=False): longest first, so the largest batch runs first (an out-of-memory error shows at once)
    and padding is minimal. Training (shuffle=True): shuffle, then sort inside buckets of `bucket_batches` batches
    and shuffle the batch order: little padding, still random. `max_tokens` caps padded tokens per batch
    (rows x longest row); a single row longer than the budget gets a batch of its own.
    """
    if batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
        bucket = batch_size * bucket_batches
        chunks = [sorted(order[i:i + bucket], key=lambda j: -lengths[j]) for i in range(0, len(order), bucket)]
    else:
        chunks = [sorted(order, key=lambda j: (-lengths[j], j))]
    batches: list[list[int]] = []
    for chunk in chunks:
        current: list[int] = []
        longest = 0
        for j in chunk:
            grown = max(longest, lengths[j])
            full = len(current) >= batch_size or (max_tokens is not None and current and grown * (len(current) + 1) > max_tokens)
            if full:
                batches.append(current)
                current, grown = [], lengths[j]
            current.append(j)
            longest = grown
        if current:
            batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


class _Batches(IterableDataset):
    """Yields this rank's collated batches (and, with loader workers, this worker's share of them)."""

    def __init__(self, examples: list[dict], batches: Callable[[], list[list[int]]], collate: Callable):
        self.examples, self.batches, self.collate = examples, batches, collate

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[dict]:
        mine = self.batches()
        info = torch.utils.data.get_worker_info()
        if info is not None:
            mine = mine[info.id::info.num_workers]
        for batch in mine:
            yield self.collate([self.examples[j] for j in batch])


class _PredictBatches(IterableDataset):
    """Predict batches, planned from character lengths and tokenized lazily by the rank (and worker) that runs them.

    The plan needs no tokenizer pass over the whole input and is the same for any number of ranks, so N ranks
    compute exactly the batches one process would (the same numbers, bit for bit where the math is
    deterministic), and each rank tokenizes only its own share. `max_tokens` is enforced after tokenization by
    splitting a batch that is over budget.
    """

    def __init__(self, texts, plan: list[np.ndarray], encode: Callable, collate: Callable, max_tokens: Optional[int],
                 rank: int, world: int):
        self.texts, self.plan, self.encode, self.collate = texts, plan, encode, collate
        self.max_tokens, self.rank, self.world = max_tokens, rank, world

    def __len__(self) -> int:
        if self.max_tokens is not None:
            # batches over the token budget are split after tokenization, so the count is not known in advance;
            # Lightning stops a sized loader after len() batches, so an estimate would lose rows: report none
            raise TypeError("the number of predict batches is known only after tokenization when max_tokens is set")
        return len(self.plan[self.rank::self.world])

    def __iter__(self) -> Iterator[dict]:
        mine = self.plan[self.rank::self.world]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            mine = mine[info.id::info.num_workers]
        for rows in mine:
            texts = self.texts.take(rows).to_pylist()
            records = [{"index": int(i), "text": t if t is not None else ""} for i, t in zip(rows, texts)]
            examples = self.encode(records, "predict")
            if self.max_tokens is None:
                yield self.collate(examples)
                continue
            for part in make_batches([e["length"] for e in examples], len(examples), self.max_tokens):
                yield self.collate([examples[j] for j in part])


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: Optional[str] = None,
        text_column: str = "text",
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
        max_tokens: Optional[int] = None,
        num_workers: Union[int, Literal["auto"]] = 0,
        seed: int = 0,
    ):
        """Local text data for every task.

        Args:
            path: input file (.jsonl, .csv, .parquet, .txt: one text per line). For training, the training rows;
                `package:NAME/rel/path` names a file shipped inside an installed Python package.
            text_column: the column with the text (prompts, for generation).
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
            max_tokens: cap on padded tokens per batch (rows x longest row); long rows get smaller batches.
            num_workers: DataLoader worker processes (they tokenize, one thread each); "auto": the CPU cores
                this process may use, shared by the ranks of this machine, less one for the rank itself (at most 16).
            seed: seed for splits, subsets and shuffling.
        """
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise ConfigError(f"data.max_tokens must be >= 1 (padded tokens per batch), or null for no cap; got "
                              f"{max_tokens}")
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

    # ---- reading -------------------------------------------------------------------------------------------
    def _records(self, path: str, *, need_label: bool, need_target: bool) -> Split:
        hp = self.hparams
        used = {"text": hp.text_column, "label": hp.label_column if need_label else None,
                "target": hp.target_column if need_target else None, "id": hp.id_column}
        table, file = read_table(path, used)
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        texts = columns[hp.text_column]
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
            if text is None or (isinstance(text, str) and not text.strip()):
                if not hp.allow_empty_text:
                    raise InputDataError(
                        f"{file}: row {i} (0-based) has an empty '{hp.text_column}'; fix the row or pass "
                        "--data.allow_empty_text true"
                    )
                text = "" if text is None else text
            if not isinstance(text, str):
                raise InputDataError(
                    f"{file}: row {i} (0-based): '{hp.text_column}' is a {type(text).__name__}, expected text"
                )
            record: dict[str, Any] = {"index": i, "text": text}
            if labels is not None:
                if labels[i] is None or str(labels[i]) == "":
                    raise InputDataError(f"{file}: row {i} (0-based) has no label in '{hp.label_column}'")
                record["label"] = str(labels[i])
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
        model = self.trainer.lightning_module
        hp = self.hparams
        need_label = getattr(model, "needs_label", False)
        need_target = getattr(model, "needs_target", False) and hp.target_column is not None
        if stage == "predict":
            self._predict_table()
            return
        if "fit" not in self.splits:
            self._fit_splits(need_label, need_target)
        model.prepare_data_splits({k: v.records for k, v in self.splits.items()})
        for name, split in self.splits.items():
            if name not in self.examples:
                self.examples[name] = model.encode(split.records, name)

    def _predict_table(self) -> None:
        """Keep the input as Arrow (memory-mapped for Parquet): millions of rows need not become Python objects."""
        import pyarrow.compute as pc

        hp = self.hparams
        if not hp.path:
            raise ConfigError("no input: set --data.path")
        table, file = read_table(hp.path, {"text": hp.text_column, "id": hp.id_column})
        texts = table.column(hp.text_column)
        check_texts(texts, file, hp.text_column, hp.allow_empty_text)
        self._ids = table.column(hp.id_column) if hp.id_column else None
        self._texts = texts
        self.num_rows["predict"] = table.num_rows
        chars = pc.fill_null(pc.utf8_length(texts.cast("string")), 0).to_numpy()
        self._plan = [np.asarray(b, dtype=np.int64) for b in make_batches(chars.tolist(), hp.batch_size)]
        log.info("%s: %d rows in %d batches", file, table.num_rows, len(self._plan))

    def ids_for(self, indices: list[int]) -> Optional[list[Any]]:
        """The id column's values of these input rows (None without --data.id_column)."""
        if self._ids is None:
            return None
        return self._ids.take(np.asarray(indices, dtype=np.int64)).to_pylist()

    def _loader(self, name: str, *, shuffle: bool) -> DataLoader:
        """Train/val/test batches of this rank: rows dealt out to ranks first, then length-bucketed per rank.

        Every rank gets rows (Lightning refuses a rank without batches), and in training every rank runs the same
        number of steps (the few batches over the smallest rank's count are left out of that epoch; a new
        shuffle each epoch leaves out others).
        """
        examples = self.examples[name]
        lengths = [e["length"] for e in examples]
        hp = self.hparams
        trainer = self.trainer
        rank, world = sharding.data_parallel_rank(trainer.strategy)
        if len(examples) < world:
            raise InputDataError(f"{name} split has {len(examples)} rows, fewer than the {world} ranks; add rows")

        def rank_batches(epoch: int, r: int) -> list[list[int]]:
            order = list(range(len(examples)))
            if shuffle:
                random.Random(hp.seed + epoch).shuffle(order)
            mine = order[r::world]
            made = make_batches([lengths[j] for j in mine], hp.batch_size, hp.max_tokens, shuffle=shuffle,
                                seed=hp.seed + epoch)
            return [[mine[k] for k in batch] for batch in made]

        def batches() -> list[list[int]]:
            epoch = trainer.current_epoch if shuffle else 0
            mine = rank_batches(epoch, rank)
            if shuffle and world > 1:
                mine = mine[: min(len(rank_batches(epoch, r)) for r in range(world))]
            return mine

        dataset = _Batches(examples, batches, self.trainer.lightning_module.collate)
        return DataLoader(dataset, batch_size=None, num_workers=self._num_workers())

    def _num_workers(self) -> int:
        workers = self.hparams.num_workers
        if workers != "auto":
            if not isinstance(workers, int) or workers < 0:
                raise ConfigError(f"data.num_workers must be a number >= 0 or auto, got {workers!r}")
            return workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_ranks = getattr(self.trainer, "num_devices", None) or 1  # the ranks on this machine
        return max(0, min(16, cores // local_ranks - 1))

    def train_dataloader(self) -> DataLoader:
        return self._loader("fit", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.splits:
            raise ConfigError("no test rows: set --data.test_path or --data.test_fraction")
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        model = self.trainer.lightning_module
        rank, world = sharding.data_parallel_rank(self.trainer.strategy)
        dataset = _PredictBatches(self._texts, self._plan, model.encode, model.collate, self.hparams.max_tokens,
                                  rank, world)
        return DataLoader(dataset, batch_size=None, num_workers=self._num_workers())
