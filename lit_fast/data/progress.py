"""Predict throughput: rows/s and tokens/s, live in the progress bar and exact (summed over ranks) at the end."""

from __future__ import annotations

import logging
import time

import torch
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)


def token_count(batch: dict) -> int:
    """A batch's real (non-padding) tokens."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()) if "input_ids" in batch else 0


class Throughput:
    """Counts rows and real (non-padding) tokens this rank has predicted (kept by the PredictionWriter)."""

    def __init__(self) -> None:
        self.rows = 0
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, batch: dict) -> None:
        self.rows += len(batch["index"])
        # "num_tokens": counted on the host before the batch went to the device (the DataModule)
        self.tokens += batch["num_tokens"] if "num_tokens" in batch else token_count(batch)

    def rates(self, world_size: int = 1) -> dict[str, float]:
        """This rank's rates times the number of ranks: the live estimate shown in the bar."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"rows/s": world_size * self.rows / elapsed, "tok/s": world_size * self.tokens / elapsed}

    def report(self, strategy) -> tuple[int, int, float]:
        """Exact totals over all ranks (a collective: every rank must call it)."""
        elapsed = time.perf_counter() - self.start
        totals = torch.tensor([self.rows, self.tokens], dtype=torch.float64, device=strategy.root_device)
        totals = strategy.reduce(totals, reduce_op="sum")
        return int(totals[0]), int(totals[1]), elapsed


class ThroughputProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, with rows/s and tokens/s (estimated over all ranks) while predicting."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        writer = next((c for c in trainer.callbacks if hasattr(c, "throughput")), None)
        meter = getattr(writer, "throughput", None)
        if meter is not None and self.predict_progress_bar is not None:
            self.predict_progress_bar.set_postfix({k: f"{v:,.0f}" for k, v in meter.rates(trainer.world_size).items()})
