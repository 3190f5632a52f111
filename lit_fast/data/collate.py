"""Padding token-id lists into a batch: one flat copy instead of per-row Python work (the loader workers' hot loop)."""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch


def pad_ids(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` as int64 tensors of shape (len(rows), longest row), padded with `pad_id` on the
    right (or the left): what `tokenizer.pad(..., padding=True)` returns, several times faster for large batches."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max()) if len(rows) else 0
    positions = np.arange(width)
    real = positions >= width - lengths[:, None] if left else positions < lengths[:, None]
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    ids[real] = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(real.astype(np.int64))


def padded_batch(tokenizer, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """`tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")` on the tokenizer's padding side (it
    runs itself where the tokenizer has no pad token, to raise its own error)."""
    if tokenizer.pad_token_id is None:
        return dict(tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt"))
    ids, mask = pad_ids(rows, tokenizer.pad_token_id, tokenizer.padding_side == "left")
    return {"input_ids": ids, "attention_mask": mask}
