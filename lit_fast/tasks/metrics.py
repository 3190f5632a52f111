"""Validation and test metrics as torchmetrics objects: updated per batch, computed once per epoch over every rank's
rows (torchmetrics synchronises their states under DDP), logged by Lightning (base.py `_eval_step`).
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

CLASSIFICATION_MODES = {"loss": "min", "acc": "max", "f1": "max", "precision": "max", "recall": "max"}
LANGUAGE_MODEL_MODES = {"loss": "min", "perplexity": "min"}


def classification_metrics(num_classes: int) -> dict[str, Metric]:
    """Accuracy over all rows; F1, precision and recall averaged over the classes (macro: each class counts the
    same, however rare). Each is updated with (predicted class ids, true class ids)."""
    return {"acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro")}


class Perplexity(MeanMetric):
    """exp of the mean loss per target token over the epoch: updated with (a batch's mean token loss, its number of
    target tokens), so every token weighs the same whatever its batch (not the mean of per-batch perplexities)."""

    higher_is_better = False

    def update(self, loss: torch.Tensor, tokens: torch.Tensor) -> None:
        # a batch without target tokens has a NaN mean loss and weight 0: it adds nothing (and no device sync to
        # find out)
        loss = loss.detach().float()
        super().update(torch.where(tokens > 0, loss, torch.zeros_like(loss)), tokens.to(loss.dtype))

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())
