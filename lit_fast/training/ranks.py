"""Packed losses under DDP: each rank's step carries about the same number of tokens, but not of loss units
(examples, target tokens), so a rank's own mean would weigh each of its units by 1 / its count, and DDP's average
of the ranks' gradients would not be the gradient of the mean over every rank's units."""

from __future__ import annotations

import torch


def rank_share(count: int, device: torch.device) -> float | torch.Tensor:
    """This rank's loss units over the mean count across data-parallel ranks: a rank's mean loss times this, averaged
    by DDP, is the mean over all units (transformers' Trainer normalises by `num_items_in_batch` the same way). 1.0
    in one process. Every rank must call it in the same steps (it is a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1.0
    total = torch.tensor(float(count), device=device)
    dist.all_reduce(total)
    return count * dist.get_world_size() / total
