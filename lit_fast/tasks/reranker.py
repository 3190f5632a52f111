"""Cross-encoder reranking: a (query, passage) pair in, one relevance score out, as sentence-transformers'
CrossEncoder computes it (the pair in one sequence, the classifier's logit, a sigmoid for one label).

Predict writes one row per pair in input order: "score"; with `top_k`, also "rank" (1 = the best passage of its
query, null below the k best). A rank needs every pair of its query scored first, and the batches of a run are cut
by length, not by query: so with `top_k` every pair is scored once when predict starts (on each rank, its share,
gathered), and the predict steps then write the scores and ranks. Fine-tuning reads a relevance label per pair
(0/1 or graded in [0, 1]) with binary cross-entropy on the logit (sentence-transformers' BinaryCrossEntropyLoss), and
validates by accuracy at 0.5 and by MRR@10 over each query's passages. Training, validation and test run on packed
rows where the model type allows (`PackedPairs`: each pair's first token through the classifier's head, token types
and query keys kept; docs/PACKED_TRAINING.md). docs/TASKS.md, "Reranker".
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from lit_fast.data.collate import pad_ids, padded_batch
from lit_fast.errors import ConfigError, InputDataError
from lit_fast.models.loading import hub_file
from lit_fast.tasks.base import Attention, CudaGraphs, FastPath, Packing
from lit_fast.tasks.contrastive import text_key
from lit_fast.training.ranks import gather_rows
from lit_fast.tasks.encoder import EncoderTask
from lit_fast.tasks.optim import OptimizerName
from lit_fast.training import CLASSIFIER_HEADS, PackedBatch, classifier_logits, pack_classification

log = logging.getLogger(__name__)

Activation = Literal["auto", "sigmoid", "identity", "softmax"]
# what sentence-transformers saves as a CrossEncoder's activation_fn -> ours
_SAVED_ACTIVATIONS = {"torch.nn.modules.activation.Sigmoid": "sigmoid", "torch.nn.modules.linear.Identity": "identity"}
MRR_AT = 10


@dataclass
class PackedPairs(PackedBatch):
    """A packed row of (query, passage) pairs, with each pair's query key (MRR groups pairs by query)."""

    query_key: Optional[torch.Tensor] = None  # (N,)


@dataclass(frozen=True)
class CrossEncoderCodec:
    """(query, passage) rows -> one sequence per pair, `[CLS] query [SEP] passage [SEP]` with the token types the
    model was trained with; truncated longest-first to `max_length` (as sentence-transformers does). Training rows
    carry their relevance label as a float."""

    tokenizer: Any
    max_length: int

    def encode(self, records: list[dict], stage: str) -> list[dict]:
        encoded = self.tokenizer([r["text"] for r in records], [r["pair"] for r in records], truncation=True,
                                 max_length=self.max_length)
        types = encoded.get("token_type_ids")
        examples = []
        for k, (record, ids) in enumerate(zip(records, encoded["input_ids"])):
            example = {"index": record["index"], "input_ids": ids, "length": len(ids),
                       "query_key": text_key(record["text"])}
            if types is not None:
                example["token_type_ids"] = types[k]
            if "label" in record:
                example["labels"] = relevance(record["label"], record["index"])
            examples.append(example)
        return examples

    def collate(self, examples: list[dict]) -> dict:
        batch = padded_batch(self.tokenizer, [e["input_ids"] for e in examples])
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = pad_ids([e["token_type_ids"] for e in examples], 0,
                                              self.tokenizer.padding_side == "left")[0]
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        batch["query_key"] = torch.tensor([e["query_key"] for e in examples], dtype=torch.long)
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.float32)
        return batch

    def pack(self, examples: list[dict]) -> PackedPairs:
        """The pairs in one packed row (training, validation and test): token types, relevance and query keys."""
        batch = pack_classification(examples)  # relevance labels are floats: a float32 (N,) tensor
        return PackedPairs(**{f.name: getattr(batch, f.name) for f in fields(batch)},
                           query_key=torch.tensor([e["query_key"] for e in examples], dtype=torch.long))


def relevance(label: Any, row: int) -> float:
    """A pair's relevance label: a number in [0, 1] (1 relevant, 0 not; graded values in between)."""
    try:
        value = float(label)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise InputDataError(f"row {row}: relevance label {label!r} is not a number from 0 to 1; use 1 for a "
                             "relevant passage, 0 for another (graded labels: scale them into [0, 1])")
    return value


def ranks_within_queries(keys: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """1-based rank of each pair among the pairs of its query (same key): higher score first, ties in input order."""
    order = np.lexsort((np.arange(len(keys)), -scores, keys))
    sorted_keys = keys[order]
    starts = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    ranks = np.empty(len(keys), dtype=np.int64)
    ranks[order] = np.arange(len(keys)) - group_start + 1
    return ranks


def mean_reciprocal_rank(keys: np.ndarray, scores: np.ndarray, relevant: np.ndarray, at: int = MRR_AT) -> float:
    """MRR@at over the queries with at least one relevant pair: 1 / the rank of their best-ranked relevant pair
    (0 beyond `at`)."""
    ranks = ranks_within_queries(keys, scores)
    best: dict[int, int] = {}
    for key, rank in zip(keys[relevant].tolist(), ranks[relevant].tolist()):
        best[key] = min(rank, best.get(key, rank))
    if not best:
        return 0.0
    return float(np.mean([1.0 / r if r <= at else 0.0 for r in best.values()]))


class Reranker(EncoderTask):
    """Cross-encoder: one relevance score per (query, passage) pair (or a label, for a model with several)."""

    auto_model_class = AutoModelForSequenceClassification
    needs_label = True
    needs_pair = True
    monitor = (f"val_mrr@{MRR_AT}", "max")
    metric_modes = {"loss": "min", "acc": "max", f"mrr@{MRR_AT}": "max"}  # what validation logs
    # the encoders whose packed pair logits equal the padded model's (tests/training/test_packed_equality.py)
    packing_types = frozenset(CLASSIFIER_HEADS)

    def __init__(
        self,
        pretrained: str,
        *,
        activation: Activation = "auto",
        top_k: Optional[int] = None,
        max_length: Optional[int] = None,
        gradient_checkpointing: bool = False,
        packing: Packing = "auto",
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        optimizer: OptimizerName = "adamw",
        optimizer_kwargs: Optional[dict[str, Any]] = None,
        lr_scheduler: str = "linear",
        lr_scheduler_kwargs: Optional[dict[str, Any]] = None,
        monitor: Optional[str] = None,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        dtype: Optional[str] = None,
        attention: Attention = "sdpa",
        fast_path: FastPath = "auto",
        cuda_graphs: CudaGraphs = "auto",
        quantization: Optional[str] = None,
    ):
        """Args:
            pretrained: a cross-encoder (sentence-transformers CrossEncoder or a transformers sequence classifier
                with one output), or an encoder to fine-tune into one (its head then starts random).
            activation: what turns the logit into the score: auto (what the model saved, else sigmoid for one
                label and softmax for several, as sentence-transformers does), sigmoid, identity (the raw logit) or
                softmax (several labels).
            top_k: also write each pair's "rank" among the passages of its query (the same query text), for the k
                best of each query (null for the others). Every pair is scored before the first row is written.
            max_length: longer pairs are truncated to this many tokens, the longer text first (default: the
                tokenizer's limit, at most 512).
            gradient_checkpointing: recompute activations in backward (less memory, more compute).
            packing: train, validate and test on packed rows: each batch's pairs' real tokens (and token types) in
                one row, no padding, attention inside each pair (docs/PACKED_TRAINING.md). auto (default): packed
                for BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT and ALBERT, padded otherwise (a log line
                says which); true: packed or an error; false: padded. Predict is not affected.
            lr: peak learning rate.
            weight_decay: weight decay (not on biases and norms).
            warmup_ratio: share of the steps spent warming up.
            optimizer: adamw, sgd (momentum 0.9) or adafactor; --optimizer CLASS (any torch.optim class) replaces it.
            optimizer_kwargs: more arguments of the optimizer (e.g. {betas: [0.9, 0.98]}).
            lr_scheduler: a transformers get_scheduler name: linear (warm-up, then linear decay to 0), cosine,
                cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, ...
            lr_scheduler_kwargs: the schedule's own arguments (num_cycles, power, lr_end, min_lr, ...).
            monitor: the validation metric that picks the best checkpoint: val_mrr@10 (default), val_acc or val_loss.
            revision: hub revision for hub ids.
            trust_remote_code: run code shipped with the model (off unless you trust it).
            dtype: weights dtype (auto, float32, float16, bfloat16).
            attention: attention implementation for the HF model.
            fast_path: encoder fast path for predict (auto, fused, packed, off).
            cuda_graphs: the fast path's CUDA graphs on GPUs: auto (small batches whose shape repeats), on, off.
            quantization: bitsandbytes weights: nf4, nf4-dq, fp4, fp4-dq or int8 (inference only for 4-bit
                embeddings, "+emb").
        """
        super().__init__(
            pretrained, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, attention=attention,
            fast_path=fast_path, cuda_graphs=cuda_graphs, quantization=quantization, max_length=max_length, lr=lr,
            weight_decay=weight_decay, warmup_ratio=warmup_ratio, gradient_checkpointing=gradient_checkpointing,
            packing=packing, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs, lr_scheduler=lr_scheduler,
            lr_scheduler_kwargs=lr_scheduler_kwargs, monitor=monitor,
        )
        if top_k is not None and top_k < 1:
            raise ConfigError(f"model.top_k must be at least 1 (the ranks written per query), got {top_k}")
        self.num_labels = self._outputs_of_checkpoint()
        self._ranks: Optional[tuple[np.ndarray, ...]] = None  # top_k: (input indices, scores, ranks), in predict
        if activation not in ("auto", "sigmoid", "identity", "softmax"):
            raise ConfigError(f"model.activation={activation!r} is unknown; use auto, sigmoid, identity or softmax")
        self.activation = self._saved_activation() if activation == "auto" else activation
        if self.num_labels == 1 and self.activation == "softmax":
            raise ConfigError("model.activation=softmax needs a model with several labels; this one has one output "
                              "(use sigmoid or identity)")
        if top_k is not None and self.num_labels != 1:
            raise ConfigError(f"model.top_k ranks by one relevance score; {pretrained} has {self.num_labels} labels")

    def _outputs_of_checkpoint(self) -> int:
        """One relevance output, unless the checkpoint is already a pair classifier with several labels."""
        config = self.hf_config
        is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        return int(config.num_labels) if is_classifier else 1

    def _saved_activation(self) -> str:
        """The activation a sentence-transformers CrossEncoder saved (its config_sentence_transformers.json, or
        older versions' "sentence_transformers" key in config.json); its defaults where none was saved."""
        saved = (getattr(self.hf_config, "sentence_transformers", None) or {}).get("activation_fn")
        path = hub_file(self.source, "config_sentence_transformers.json", self.hparams.revision)
        if path is not None:
            saved = json.loads(path.read_text()).get("activation_fn", saved)
        if saved is None:
            return "sigmoid" if self.num_labels == 1 else "softmax"
        if saved not in _SAVED_ACTIVATIONS:
            raise ConfigError(f"{self.hparams.pretrained} scores with activation {saved}, which lit_fast does not "
                              "reproduce; set model.activation (sigmoid, identity or softmax) to choose one")
        return _SAVED_ACTIVATIONS[saved]

    def model_kwargs(self) -> dict:
        return {"num_labels": self.num_labels}

    def codec(self) -> CrossEncoderCodec:
        return CrossEncoderCodec(self.tokenizer, self.max_length)

    def prepare_data_splits(self, splits: dict[str, list[dict]]) -> None:
        if self.num_labels != 1 and "fit" in splits:
            raise ConfigError(f"{self.hparams.pretrained} has {self.num_labels} labels; fine-tuning trains one "
                              "relevance score per pair: start from an encoder or a one-label cross-encoder")

    # ---- scores --------------------------------------------------------------------------------------------
    def _logits(self, batch: dict | PackedPairs) -> torch.Tensor:
        if isinstance(batch, PackedBatch):  # each pair's own first token through the model's head
            return classifier_logits(self.model, batch).float()
        return self.model(**self._inputs(batch)).logits.float()

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        if self.activation == "softmax":
            return logits.softmax(-1)
        return logits

    # ---- training ------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict | PackedPairs) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self._logits(batch)[:, 0], _labels(batch))

    def on_validation_epoch_start(self) -> None:
        self._ranked: list[tuple[torch.Tensor, torch.Tensor]] = []  # (query keys, [logit, label]) per batch

    on_test_epoch_start = on_validation_epoch_start

    def evaluate_batch(self, batch: dict | PackedPairs) -> dict[str, torch.Tensor]:
        logits = self._logits(batch)[:, 0]
        labels = _labels(batch)
        keys = batch.query_key if isinstance(batch, PackedBatch) else batch["query_key"]
        self._ranked.append((keys, torch.stack([logits.detach(), labels], 1)))
        return {"loss": F.binary_cross_entropy_with_logits(logits, labels),
                "acc": ((logits > 0) == (labels >= 0.5)).float().mean()}

    def on_validation_epoch_end(self) -> None:
        self._log_mrr("val")

    def on_test_epoch_end(self) -> None:
        self._log_mrr("test")

    def _log_mrr(self, prefix: str) -> None:
        """MRR@10 over the split's queries, with every rank's pairs (a query's pairs may be on several ranks)."""
        if not getattr(self, "_ranked", None):  # every rank holds validation rows (the DataModule checks)
            return
        keys = gather_rows(torch.cat([k for k, _ in self._ranked])).cpu().numpy()
        values = gather_rows(torch.cat([v for _, v in self._ranked])).cpu().numpy()
        self.log(f"{prefix}_mrr@{MRR_AT}", mean_reciprocal_rank(keys, values[:, 0], values[:, 1] >= 0.5),
                 prog_bar=True)
        self._ranked = []

    # ---- prediction ----------------------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._ranks = self._score_all() if self.hparams.top_k is not None else None

    @torch.no_grad()
    def _score_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair's score and rank within its query: this rank's share of the batches scored, all ranks'
        gathered (a query may span ranks). Returns (input indices, sorted; their scores; their ranks)."""
        trainer = self.trainer
        loaders = trainer.predict_dataloaders
        indices, keys, scores = [], [], []
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            for batch in loader:
                batch = trainer.strategy.batch_to_device(batch)
                with trainer.precision_plugin.predict_step_context():
                    scores.append(self._scores(self._logits(batch))[:, 0].double())
                indices.append(batch["index"])
                keys.append(batch["query_key"])

        def gathered(parts: list[torch.Tensor], dtype: torch.dtype) -> np.ndarray:  # every rank's, in rank order
            mine = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=self.device)
            return gather_rows(mine).cpu().numpy()

        index, key, score = gathered(indices, torch.long), gathered(keys, torch.long), gathered(scores, torch.float64)
        order = np.argsort(index)  # input order, so that ties rank in input order whatever rank scored them
        index, key, score = index[order], key[order], score[order]
        log.info("top_k: %d pairs of %d queries scored before writing (a rank needs every pair of its query)",
                 len(index), len(np.unique(key)))
        return index, score, ranks_within_queries(key, score)

    def predict_rows(self, batch: dict) -> list[dict]:
        indices = batch["index"].tolist()
        if self._ranks is not None:  # scored when predict started (top_k)
            known, scores, ranks = self._ranks
            at = np.searchsorted(known, indices)
            k = self.hparams.top_k
            return [{"index": i, "score": float(scores[j]), "rank": int(ranks[j]) if ranks[j] <= k else None}
                    for i, j in zip(indices, at)]
        scores = self._scores(self._logits(batch)).cpu()
        if self.num_labels == 1:
            return [{"index": i, "score": float(s)} for i, s in zip(indices, scores[:, 0])]
        names = [self.hf_config.id2label[k] for k in range(self.num_labels)]
        best, label = scores.max(-1)
        return [{"index": i, "label": names[int(k)], "score": float(s)} for i, k, s in zip(indices, label, best)]

    # ---- export --------------------------------------------------------------------------------------------
    def export(self, directory: str) -> None:
        """HF format that sentence-transformers' CrossEncoder also loads: the activation in config.json (its
        "sentence_transformers" key) and the trained maximum length in the tokenizer."""
        saved = {ours: theirs for theirs, ours in _SAVED_ACTIVATIONS.items()}.get(self.activation)
        if saved is not None:  # softmax: sentence-transformers' own default for several labels is the raw logits
            self.model.config.sentence_transformers = {"activation_fn": saved}
        previous = self.tokenizer.model_max_length
        self.tokenizer.model_max_length = self.max_length
        try:
            super().export(directory)
        finally:
            self.tokenizer.model_max_length = previous


def _labels(batch: dict | PackedPairs) -> torch.Tensor:
    return batch.labels if isinstance(batch, PackedBatch) else batch["labels"]
