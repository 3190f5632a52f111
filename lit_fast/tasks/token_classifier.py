"""Token classification (NER and other word tagging): words or text in, a tag per word and entity spans out.

A row's text is a list of words (CoNLL style, `{"tokens": [...]}`) or a plain string. The model tags subword tokens;
a word takes the tag of its first token, and in training only first tokens carry a label (-100 on the other subwords
and on special tokens: transformers' token-classification recipe). Entities are read from the word tags in the
seqeval scheme (entities.py), with character offsets: into the text for a string; for a list of words, into the words
joined by single spaces (the words' own indices come along). Validation reports entity-level precision, recall and
F1 as seqeval computes them. Training, validation and test run on packed rows where the model type allows
(`PackedTokens`: each token's label and word travel with it; docs/PACKED_TRAINING.md). docs/TASKS.md,
"Token classifier".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from transformers import AutoModelForTokenClassification

from lit_fast.data.collate import pad_ids, padded_batch
from lit_fast.errors import ConfigError, InputDataError
from lit_fast.tasks.base import Attention, CudaGraphs, FastPath, Packing
from lit_fast.tasks.codecs import IGNORE
from lit_fast.tasks.encoder import EncoderTask
from lit_fast.tasks.entities import EntityCounts, spans, tag_error
from lit_fast.tasks.optim import OptimizerName
from lit_fast.training import CLASSIFIER_HEADS, PackedBatch, pack_tokens, token_classification_loss

log = logging.getLogger(__name__)

NO_WORD = -1  # word id of special and padding tokens


@dataclass
class PackedTokens(PackedBatch):
    """A packed row of tagged examples: with the row's per-token labels, each token's word (NO_WORD on special
    tokens) and each example's word tags, which the entity scores read."""

    word_ids: Optional[torch.Tensor] = None  # (1, T)
    tags: Optional[list[list[int]]] = None


@dataclass(frozen=True)
class TokenCodec:
    """Rows of words (a list) or text (a string) -> subword ids, each token's word, and in training the label ids of
    first subwords (IGNORE elsewhere). Every example also keeps its words' character spans in the text that the
    offsets refer to, and with labels, each word's tag id (for entity scores over every word, truncated ones too)."""

    tokenizer: Any
    max_length: int
    labels: Optional[tuple[str, ...]] = None

    def encode(self, records: list[dict], stage: str) -> list[dict]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError("token classification maps subwords to words with a fast (Rust) tokenizer; this model "
                              "has a slow one: save it with a tokenizer.json")
        lists = [r for r in records if isinstance(r["text"], list)]
        texts = [r for r in records if not isinstance(r["text"], list)]
        examples = {}
        if lists:
            examples.update(self._encode_words(lists, stage))
        if texts:
            examples.update(self._encode_texts(texts, stage))
        return [examples[r["index"]] for r in records]

    def _encode_words(self, records: list[dict], stage: str) -> dict[int, dict]:
        for r in records:
            if not all(isinstance(w, str) for w in r["text"]):
                raise InputDataError(f"row {r['index']}: every word must be a string, got {r['text']!r:.80}")
            if stage != "predict" and not r["text"]:
                raise InputDataError(f"row {r['index']}: no words; every training row needs at least one")
        encoded = self.tokenizer([r["text"] for r in records], is_split_into_words=True, truncation=True,
                                 max_length=self.max_length)
        out = {}
        for k, r in enumerate(records):
            words = r["text"]
            starts, position = [], 0
            for w in words:  # the words joined by single spaces: where each one starts
                starts.append(position)
                position += len(w) + 1
            word_spans = [(s, s + len(w)) for s, w in zip(starts, words)]
            out[r["index"]] = self._example(r, encoded["input_ids"][k], encoded.word_ids(k), word_spans,
                                            " ".join(words), True)
        return out

    def _encode_texts(self, records: list[dict], stage: str) -> dict[int, dict]:
        if stage != "predict" and any("label" in r for r in records):
            bad = next(r for r in records if "label" in r)
            raise InputDataError(f"row {bad['index']}: training rows need their words as a list (with one tag "
                                 "each), not a string")
        texts = [r["text"] or "" for r in records]
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        out = {}
        for k, r in enumerate(records):
            word_ids = encoded.word_ids(k)
            word_spans: dict[int, list[int]] = {}
            for word, (start, end) in zip(word_ids, encoded["offset_mapping"][k]):
                if word is not None:  # a word's span runs from its first token's start to its last token's end
                    span = word_spans.setdefault(word, [start, end])
                    span[1] = end
            # the tokenizer's words, renumbered from 0 (a truncated text keeps only the words that fit)
            order = sorted(word_spans)
            renumber = {w: i for i, w in enumerate(order)}
            word_ids = [renumber[w] if w is not None else None for w in word_ids]
            out[r["index"]] = self._example(r, encoded["input_ids"][k], word_ids,
                                            [tuple(word_spans[w]) for w in order], texts[k], False)
        return out

    def _example(self, record: dict, ids: list[int], word_ids: list, word_spans: list, text: str,
                 given: bool) -> dict:
        word_ids = [NO_WORD if w is None else w for w in word_ids]
        example = {"index": record["index"], "input_ids": ids, "length": len(ids), "word_ids": word_ids,
                   "spans": word_spans, "text": text, "given": given}
        if "label" in record and self.labels is not None:
            tags = self._tag_ids(record, len(word_spans))
            seen: set[int] = set()
            labels = []
            for w in word_ids:  # first subword of each word: its tag; the rest and special tokens: IGNORE
                labels.append(tags[w] if w != NO_WORD and w not in seen else IGNORE)
                seen.add(w)
            example["labels"] = labels
            example["tags"] = tags
        return example

    def _tag_ids(self, record: dict, count: int) -> list[int]:
        tags = record["label"]
        row = record["index"]
        if not isinstance(tags, list):
            raise InputDataError(f"row {row}: the tags must be a list with one tag per word, got {tags!r:.80}")
        if len(tags) != count:
            raise InputDataError(f"row {row}: {count} words but {len(tags)} tags; give one tag per word")
        try:
            return [self.labels.index(str(t)) for t in tags]
        except ValueError:
            unknown = sorted({str(t) for t in tags} - set(self.labels))
            raise InputDataError(f"row {row}: tags {unknown} are not among the model's labels "
                                 f"{list(self.labels)}") from None

    def collate(self, examples: list[dict]) -> dict:
        batch = padded_batch(self.tokenizer, [e["input_ids"] for e in examples])
        left = self.tokenizer.padding_side == "left"
        batch["word_ids"] = pad_ids([e["word_ids"] for e in examples], NO_WORD, left)[0]
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        for key in ("spans", "text", "given"):  # plain lists: what predict needs to write offsets
            batch[key] = [e[key] for e in examples]
        if "labels" in examples[0]:
            batch["labels"] = pad_ids([e["labels"] for e in examples], IGNORE, left)[0]
            batch["tags"] = [e["tags"] for e in examples]
        return batch

    def pack(self, examples: list[dict]) -> PackedTokens:
        """The examples in one packed row (training, validation and test): labels, words and tags per token."""
        batch = pack_tokens(examples)
        word_ids = torch.tensor([w for e in examples for w in e["word_ids"]], dtype=torch.long).unsqueeze(0)
        tags = [e["tags"] for e in examples] if "tags" in examples[0] else None
        return PackedTokens(**{f.name: getattr(batch, f.name) for f in fields(batch)}, word_ids=word_ids, tags=tags)


def example_rows(values: torch.Tensor, cu_seqlens: torch.Tensor, longest: int, fill: float) -> torch.Tensor:
    """(T, ...) values of a packed row -> (N, longest, ...): one row per example, `fill` after its end (the layout
    of a right-padded batch, which word_predictions reads)."""
    starts = cu_seqlens.long()
    lengths = starts[1:] - starts[:-1]
    example = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths,
                                      output_size=values.shape[0])
    position = torch.arange(values.shape[0], device=values.device) - starts[:-1][example]
    rows = values.new_full((lengths.numel(), longest, *values.shape[1:]), fill)
    rows[example, position] = values
    return rows


def word_predictions(logits: torch.Tensor, word_ids: torch.Tensor, counts: list[int]) -> list[list[tuple[int, float]]]:
    """(tag id, probability) of each word, from its first token; (-1, 0.0) for a word without a token (truncated)."""
    probs = logits.float().softmax(-1)
    score, tag = probs.max(-1)
    previous = torch.cat([torch.full_like(word_ids[:, :1], NO_WORD), word_ids[:, :-1]], 1)
    first = (word_ids != NO_WORD) & (word_ids != previous)
    rows, cols = first.nonzero(as_tuple=True)
    words, tags, scores = word_ids[rows, cols].tolist(), tag[rows, cols].tolist(), score[rows, cols].tolist()
    out = [[(-1, 0.0)] * n for n in counts]
    for r, w, t, s in zip(rows.tolist(), words, tags, scores):
        out[r][w] = (t, s)
    return out


class TokenClassifier(EncoderTask):
    """Token classification: a tag per word and the entities they spell, with character offsets."""

    auto_model_class = AutoModelForTokenClassification
    needs_label = True
    list_roles = ("text", "label")  # words and their tags come as lists
    monitor = ("val_f1", "max")
    metric_modes = {"loss": "min", "f1": "max", "precision": "max", "recall": "max"}  # what validation logs
    # the encoders whose packed token logits equal the padded model's (tests/training/test_packed_equality.py)
    packing_types = frozenset(CLASSIFIER_HEADS)

    def __init__(
        self,
        pretrained: str,
        *,
        labels: Optional[list[str]] = None,
        max_length: Optional[int] = None,
        gradient_checkpointing: bool = False,
        packing: Packing = "auto",
        lr: float = 5e-5,
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
            pretrained: a token-classification model (for predict), or an encoder to fine-tune into one.
            labels: the tags in order (O, B-TYPE, I-TYPE, ...: IOB2, or IOBES); default: the model's id2label when it
                has real names, else O and the tags of the training data.
            max_length: longer rows are truncated to this many tokens (default: the tokenizer's limit, at most 512);
                predict gives their remaining words no tag (null) and says how many.
            gradient_checkpointing: recompute activations in backward (less memory, more compute).
            packing: train, validate and test on packed rows: each batch's real tokens in one row, no padding,
                attention inside each example, each token's label and word kept with it (docs/PACKED_TRAINING.md).
                auto (default): packed for BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT and ALBERT, padded
                otherwise (a log line says which); true: packed or an error; false: padded. Predict is not affected.
            lr: peak learning rate.
            weight_decay: weight decay (not on biases and norms).
            warmup_ratio: share of the steps spent warming up.
            optimizer: adamw, sgd (momentum 0.9) or adafactor; --optimizer CLASS (any torch.optim class) replaces it.
            optimizer_kwargs: more arguments of the optimizer (e.g. {betas: [0.9, 0.98]}).
            lr_scheduler: a transformers get_scheduler name: linear (warm-up, then linear decay to 0), cosine,
                cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, ...
            lr_scheduler_kwargs: the schedule's own arguments (num_cycles, power, lr_end, min_lr, ...).
            monitor: the validation metric that picks the best checkpoint: val_f1 (default), val_precision, val_recall or val_loss.
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
        why = _tags_error(labels or [])
        if why is not None:
            raise ConfigError(f"model.labels: {why}")
        self.labels: Optional[list[str]] = list(labels) if labels else self._labels_of_checkpoint()

    def _labels_of_checkpoint(self) -> Optional[list[str]]:
        config = self.hf_config
        names = [config.id2label[i] for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
        is_tagger = any(a.endswith("ForTokenClassification") for a in (config.architectures or []))
        # "LABEL_0" names are transformers' placeholders, not tags anyone chose
        if is_tagger and names and not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            return names
        return None

    def prepare_data_splits(self, splits: dict[str, list[dict]]) -> None:
        seen = {str(t) for rows in splits.values() for r in rows if isinstance(r.get("label"), list)
                for t in r["label"]}
        why = _tags_error(sorted(seen))
        if why is not None:
            raise InputDataError(f"the training data: {why}")
        if self.labels is None:
            # O first, then each type's tags together (B before I): the order people read them in
            self.labels = sorted(seen | {"O"}, key=lambda t: (t != "O", t[2:], t[:1]))
        unknown = sorted(seen - set(self.labels))
        if unknown:
            raise InputDataError(f"tags {unknown} in the data are not among the model's labels {self.labels}")

    def model_kwargs(self) -> dict:
        if not self.labels:
            raise ConfigError("the token classifier has no labels: train it on tagged data or set --model.labels")
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {n: i for i, n in enumerate(self.labels)}}

    def codec(self) -> TokenCodec:
        return TokenCodec(self.tokenizer, self.max_length, tuple(self.labels) if self.labels else None)

    # ---- training ------------------------------------------------------------------------------------------
    def _loss_and_logits(self, batch: dict | PackedTokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits, word ids), the last two one row per example as in a right-padded batch."""
        if isinstance(batch, PackedBatch):  # the row's tokens through the model's per-token head
            loss, logits = token_classification_loss(self.model, batch)
            return (loss, example_rows(logits, batch.cu_seqlens, batch.max_seqlen, 0.0),
                    example_rows(batch.word_ids[0], batch.cu_seqlens, batch.max_seqlen, NO_WORD))
        out = self.model(**self._inputs(batch), labels=batch["labels"])
        return out.loss, out.logits, batch["word_ids"]

    def compute_loss(self, batch: dict | PackedTokens) -> torch.Tensor:
        return self._loss_and_logits(batch)[0]

    def on_validation_epoch_start(self) -> None:
        self._counts = EntityCounts()

    on_test_epoch_start = on_validation_epoch_start

    def evaluate_batch(self, batch: dict | PackedTokens) -> dict[str, torch.Tensor]:
        loss, logits, word_ids = self._loss_and_logits(batch)
        all_tags = batch.tags if isinstance(batch, PackedBatch) else batch["tags"]
        words = word_predictions(logits, word_ids, [len(t) for t in all_tags])
        for tags, predicted in zip(all_tags, words):
            # a truncated word counts as tagged O: its true entities are still counted, as missed
            self._counts.add([self.labels[t] for t in tags], [self.labels[t] if t >= 0 else "O" for t, _ in predicted])
        return {"loss": loss}

    def on_validation_epoch_end(self) -> None:
        self._log_entity_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_entity_scores("test")

    def _log_entity_scores(self, prefix: str) -> None:
        """Entity precision / recall / F1 from the counts of every rank, summed."""
        counts = getattr(self, "_counts", None)
        if counts is None:
            return
        totals = torch.tensor([counts.predicted, counts.true, counts.correct], dtype=torch.float64,
                              device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum") if self._trainer is not None else totals
        summed = EntityCounts(*(int(v) for v in totals.tolist()))
        for name, value in summed.scores().items():
            self.log(f"{prefix}_{name}", value, prog_bar=name == "f1")
        self._counts = None

    # ---- prediction ----------------------------------------------------------------------------------------
    def predict_rows(self, batch: dict) -> list[dict]:
        logits = self.model(**self._inputs(batch)).logits
        counts = [len(s) for s in batch["spans"]]
        rows = []
        for k, predicted in enumerate(word_predictions(logits, batch["word_ids"], counts)):
            index = int(batch["index"][k])
            tags = [self.labels[t] if t >= 0 else None for t, _ in predicted]
            missing = tags.count(None)
            if missing:
                log.warning("row %d: %d word(s) have no tag (past max_length %d tokens, or empty)", index, missing,
                            self.max_length)
            row = {"index": index, "entities": _entities(tags, predicted, batch["spans"][k], batch["text"][k]),
                   "tags": tags}
            if not batch["given"][k]:  # the tokenizer's words: say which they are
                row["words"] = [batch["text"][k][s:e] for s, e in batch["spans"][k]]
            rows.append(row)
        return rows


def _entities(tags: list[Optional[str]], predicted: list[tuple[int, float]], word_spans: list, text: str
              ) -> list[dict]:
    found = []
    for kind, first, last in spans([t or "O" for t in tags]):
        start, end = word_spans[first][0], word_spans[last][1]
        score = sum(s for _, s in predicted[first:last + 1]) / (last - first + 1)
        found.append({"type": kind, "start": start, "end": end, "text": text[start:end], "first_word": first,
                      "last_word": last, "score": score})
    return found


def _tags_error(tags: list[str]) -> Optional[str]:
    """Why the first tag outside the scheme is (None when every tag is in it)."""
    return next((why for why in map(tag_error, tags) if why is not None), None)
