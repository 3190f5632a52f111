"""Prediction rows whose tensors are still on their way from the GPU.

Turning a batch's outputs into rows on the host (`.cpu()`, then Python objects, then JSON or Arrow) waits for the
GPU to finish that batch, and while the host builds and writes the rows the GPU has nothing queued. `DeviceRows`
queues the copies instead (into pinned memory, without waiting) and builds the rows only when asked; the
PredictionWriter asks one batch later, so the host writes batch k while the GPU computes batch k + 1
(docs/MEASUREMENTS.md, W8). On a CPU the tensors are already on the host and nothing changes.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch


class DeviceRows:
    """A batch's rows: `build(arrays)` makes them from `tensors` as NumPy arrays (same keys), once the copies are
    done; `rows()` gives them."""

    def __init__(self, tensors: dict[str, torch.Tensor], build: Callable[[dict[str, np.ndarray]], list[dict]]):
        self.build = build
        self.event = None
        self.host: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            tensor = tensor.detach()
            if tensor.device.type == "cuda":
                copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                copy.copy_(tensor, non_blocking=True)
                tensor = copy
                if self.event is None:
                    self.event = torch.cuda.Event()
            self.host[key] = tensor.cpu()  # (a no-op for host tensors; other devices copy now)
        if self.event is not None:
            self.event.record()
        self._rows: list[dict] | None = None

    def rows(self) -> list[dict]:
        if self._rows is None:
            if self.event is not None:
                self.event.synchronize()
            self._rows = self.build({key: t.numpy() for key, t in self.host.items()})
            self.host = {}
        return self._rows


def as_rows(prediction: Any) -> list[dict]:
    """A predict step's rows, whether it returned them or a DeviceRows."""
    return prediction.rows() if isinstance(prediction, DeviceRows) else prediction
