"""Sequence classification: one string label (and its probability) per text."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from transformers import AutoModelForSequenceClassification

from lit_fast.errors import ConfigError, InputDataError
from lit_fast.tasks.base import Attention, CudaGraphs, FastPath, Packing
from lit_fast.tasks.codecs import EncoderCodec
from lit_fast.tasks.encoder import EncoderTask
from lit_fast.tasks.metrics import CLASSIFICATION_MODES, classification_metrics
from lit_fast.tasks.optim import OptimizerName
from lit_fast.training import CLASSIFIER_HEADS, PackedBatch, classification_loss


class Classifier(EncoderTask):
    """Sequence classification: one string label (and its probability) per text."""

    auto_model_class = AutoModelForSequenceClassification
    needs_label = True
    monitor = ("val_acc", "max")
    metric_modes = CLASSIFICATION_MODES
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
        warmup_ratio: float = 0.06,
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
            pretrained: a local model directory, a packaged model or a hub id (a fine-tuned classifier for predict).
            labels: the label names in order; default: the model's id2label when it has real names, else the
                sorted labels of the training data.
            max_length: longer texts are truncated to this many tokens (default: the tokenizer's limit, at most 512).
            gradient_checkpointing: recompute activations in backward (less memory, more compute).
            packing: train, validate and test on packed rows: each batch's real tokens in one row, no padding,
                attention inside each example (docs/PACKED_TRAINING.md). auto (default): packed for BERT, RoBERTa,
                XLM-R, CamemBERT, ELECTRA, DistilBERT and ALBERT, padded otherwise (a log line says which); true:
                packed or an error; false: padded. Predict is not affected.
            lr: peak learning rate.
            weight_decay: weight decay (not on biases and norms).
            warmup_ratio: share of the steps spent warming up.
            optimizer: adamw, sgd (momentum 0.9) or adafactor; --optimizer CLASS (any torch.optim class) replaces it.
            optimizer_kwargs: more arguments of the optimizer (e.g. {betas: [0.9, 0.98]}).
            lr_scheduler: a transformers get_scheduler name: linear (warm-up, then linear decay to 0), cosine,
                cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, ...
            lr_scheduler_kwargs: the schedule's own arguments (num_cycles, power, lr_end, min_lr, ...).
            monitor: the validation metric that picks the best checkpoint: val_acc (default), val_f1,
                val_precision, val_recall or val_loss.
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
            packing=packing, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs, lr_scheduler=lr_scheduler,
            lr_scheduler_kwargs=lr_scheduler_kwargs, monitor=monitor,
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

    def _loss_and_logits(self, batch: dict | PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, PackedBatch):  # each example's own first token through the model's head
            return classification_loss(self.model, batch)
        out = self.model(**self._inputs(batch), labels=batch["labels"])
        return out.loss, out.logits

    def compute_loss(self, batch: dict | PackedBatch) -> torch.Tensor:
        return self._loss_and_logits(batch)[0]

    def metrics(self) -> dict:
        return classification_metrics(len(self.labels)) if self.labels else {}

    def evaluate_batch(self, batch: dict | PackedBatch) -> dict:
        loss, logits = self._loss_and_logits(batch)
        labels = batch.labels if isinstance(batch, PackedBatch) else batch["labels"]
        classes = (logits.argmax(-1), labels)
        return {"loss": loss, **{name: classes for name in ("acc", "f1", "precision", "recall")}}

    def predict_rows(self, batch: dict) -> list[dict]:
        probs = self.model(**self._inputs(batch)).logits.float().softmax(-1).cpu()
        score, label = probs.max(-1)
        return [{"index": int(i), "label": self.labels[int(k)], "score": float(s)}
                for i, k, s in zip(batch["index"].tolist(), label, score)]

    def predict(self, texts, batch_size: int = 512, *, max_tokens: Union[int, str, None] = "auto",
                device: Optional[str] = None, precision: str = "auto", num_workers: Optional[int] = None) -> list[dict]:
        """Classify `texts` in this process, no Trainer: one {"label", "score"} per text, in order. The same batching,
        fast path and precision choice as `lit-fast predict` (tasks/in_memory.py)."""
        from lit_fast.tasks.in_memory import predict_rows

        rows = predict_rows(self, texts, batch_size=batch_size, max_tokens=max_tokens, device=device,
                            precision=precision, num_workers=num_workers)
        return [{"label": r["label"], "score": r["score"]} for r in rows]
