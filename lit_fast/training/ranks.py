"""What a loss needs from the other data-parallel ranks.

- Packed losses: each rank's step carries about the same number of tokens, but not of loss units (examples, target
  tokens), so a rank's own mean would weigh each of its units by 1 / its count, and DDP's average of the ranks'
  gradients would not be the gradient of the mean over every rank's units (`rank_share`).
- Contrastive losses and rerankers' metrics: every rank's rows, with gradients back to each rank's own
  (`gather_rows`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    """Whether this process is one of several torch.distributed ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_share(count: int, device: torch.device) -> float | torch.Tensor:
    """This rank's loss units over the mean count across data-parallel ranks: a rank's mean loss times this, averaged
    by DDP, is the mean over all units (transformers' Trainer normalises by `num_items_in_batch` the same way). 1.0
    in one process. Every rank must call it in the same steps (it is a collective)."""
    if not distributed():
        return 1.0
    total = torch.tensor(float(count), device=device)
    dist.all_reduce(total)
    return count * dist.get_world_size() / total


def _sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def gathered_offset(n: int, device: torch.device) -> int:
    """Where this rank's `n` rows start in `gather_rows`' output (0 outside torch.distributed)."""
    if not distributed():
        return 0
    return sum(_sizes(n, device)[: dist.get_rank()])


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x`, concatenated in rank order, with gradients flowing back to each rank's own rows
    (the backward sums what every rank's loss asks of this rank's rows). Ranks may hold different numbers of rows
    (length-bucketed batches): rows are padded to the largest count for the collective and the padding dropped.
    Outside torch.distributed, `x` itself."""
    if not distributed():
        return x
    sizes = _sizes(x.shape[0], x.device)
    padded = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))])
    parts = _GatherRows.apply(padded) if x.requires_grad else _all_gather_plain(padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def _all_gather_plain(x: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


class _GatherRows(torch.autograd.Function):
    """all_gather whose backward is one all_reduce of the gradients then this rank's slice: gloo and NCCL both run
    it (torch.distributed.nn's own all_gather is deprecated and needs all_to_all on gloo)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_all_gather_plain(x))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        total = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(total)
        return total[dist.get_rank()]


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank (a collective: every rank must call it)."""
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
