"""CUDA graphs of the front's steps before its wait (front.py): the row plan and the embeddings of the real tokens.

Until the first GEMM of a forward is queued the GPU idles, and the front's steps before its wait (the plan kernel,
the index grids of the embeddings, the embedding kernel, the event) cost hundreds of microseconds of host time.
Replayed from a graph they are one launch and an event.

A graph reads its inputs where they are. It is keyed by the address, shape, strides and dtype of the mask and of the
ids, and by the stream. A later call whose tensors sit at those addresses with the same layout (the same tensors
again, or new ones the caching allocator put in the same place) replays it, and the graph reads that call's values.
The embedding module's tables, norm and index buffers are read in place too, so in-place updates show; their
addresses (and the norm's eps) are compared after each replay, while the GPU runs it. If one changed, the plan is
kept (it depends on the mask and the ids only), the embeddings are made again after the wait, and the graph is
dropped. The plan kernel writes straight into the graph's own pinned buffer (rows.row_plan).

Where the first layer starts with its fused q/k/v GEMM and runs eagerly (FastPathOptions.qkv_ahead), the graph also
computes that GEMM before the host knows how many rows are real: over as many as the key's previous call had,
rounded up to a bucket (a call with more projects the rest after the wait). It keeps the GPU busy through the host's
steps between the plan and the first GEMM. That result is used only if the q/k/v weights' addresses and versions
are those of the capture (else the graph is dropped and captured again). It is left out where the key's latest
call had few enough tokens for the layers to replay a graph of their own (`LayerGraphs.will_replay`).

The cache (cuda_graphs.py) captures a key the second time it is seen, keeps at most 4 graphs of at most 512 MB of
static outputs together, and gives up after 32 captures (a stream of ever new addresses or shapes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lit_fast.fastpath.cuda_graphs import GraphCache, GraphLimits
from lit_fast.fastpath.encoder import rows

log = logging.getLogger(__name__)

LIMITS = GraphLimits(repeats=2, max_graphs=4, max_bytes=512 << 20, max_captures=32, max_seen=256)


@dataclass
class FrontGraph:
    """What a front graph made (its static outputs) and what it is valid for."""

    plan: torch.Tensor  # the plan buffer on the device
    ahead: torch.Tensor  # the embeddings buffer: the first `count` rows are the tokens
    qkv: torch.Tensor | None  # the first layer's q/k/v projection of `ahead` (as many rows), or None
    qkv_key: tuple | None  # layers.qkv_key of the first layer at capture: what `qkv` is valid for
    copy: rows.HostCopy  # its pinned buffer is where the graph's plan kernel writes
    size: int  # plan values
    device: torch.device
    sources: tuple  # embedding_sources() at capture
    limits: list  # EmbeddingInputs.limits at capture: the range check of the ids
    qkv_rows: int = 0  # how many leading rows of `qkv` the graph computes (the rest is room for a longer call)


class FrontGraphs:
    """The graphs of one FastFront; see the module docstring."""

    def __init__(self) -> None:
        self.cache = GraphCache(LIMITS, "the front's CUDA graphs")
        self.tokens: dict[tuple, int] = {}  # the real tokens of the latest call of each key seen, not captured

    def __deepcopy__(self, memo) -> FrontGraphs:
        return FrontGraphs()  # a cache tied to the original's tensors (and CUDA graphs cannot be copied)

    @property
    def stopped(self) -> bool:
        return self.cache.stopped

    @staticmethod
    def key(mask: torch.Tensor, ids: torch.Tensor) -> tuple:
        return (mask.data_ptr(), mask.shape, mask.stride(), mask.dtype, ids.data_ptr(), ids.stride(), ids.dtype,
                torch._C._cuda_getCurrentRawStream(mask.get_device()))

    def replay(self, key: tuple, module: nn.Module) -> tuple[FrontGraph, bool] | None:
        """Replay the graph of `key` and queue its event: (graph, whether its embeddings are valid), or None when
        there is no graph for `key`. Invalid embeddings (the module's tensors moved) drop the graph."""
        graph = self.cache.get(key)
        if graph is None:
            return None
        entry: FrontGraph = graph.outputs
        entry.copy.target(entry.size, entry.device)  # (sets the values the graph's plan kernel overwrites)
        graph.replay()
        entry.copy.written()
        if embedding_sources(module)[0] == entry.sources:
            return entry, True
        self.cache.drop(key)
        return entry, False

    def drop(self, key: tuple) -> None:
        self.cache.drop(key)

    def wants(self, key: tuple) -> bool:
        """Whether to capture `key` now (the second time it is seen)."""
        if len(self.tokens) >= LIMITS.max_seen:
            self.tokens.clear()
        return self.cache.due(key)

    def capture(self, key: tuple, module: nn.Module, size: int, limits: list,
                queue: Callable[[rows.HostCopy], tuple], device: torch.device, nbytes: int,
                qkv_key: tuple | None = None, keep: tuple = (), qkv_rows: int = 0) -> FrontGraph | None:
        """Capture `queue(copy)` for `key`: the plan into `copy`'s pinned buffer, the embeddings, and optionally the
        first layer's q/k/v projection of them (valid for `qkv_key`, its first `qkv_rows` rows computed); it returns
        the three (the last may be None). `nbytes`: the size of the embeddings and q/k/v buffers. `keep`: further
        tensors the graph reads (the q/k/v weights). None when this front has stopped capturing or the capture
        failed (then it stops)."""
        copy = rows.HostCopy()
        copy.target(size, device)  # pinned memory cannot be allocated during a capture
        copy.in_graph = True
        sources, tensors = embedding_sources(module)
        try:
            graph = self.cache.capture(key, lambda: queue(copy), device, keep=tensors + keep, nbytes=nbytes)
        except RuntimeError as failure:  # a capture this torch/driver cannot do
            self.cache.stop(f"capture failed ({failure})")
            return None
        copy.in_graph = False
        if graph is None:
            return None
        plan, ahead, qkv = graph.outputs
        graph.outputs = FrontGraph(plan, ahead, qkv, qkv_key if qkv is not None else None, copy, size, device,
                                   sources, limits, qkv_rows if qkv is not None else 0)
        return graph.outputs


def embedding_sources(module: nn.Module) -> tuple[tuple, tuple]:
    """(the address of every tensor the front's embedding kernel reads from `module`, and the norm's eps; those
    tensors): the tables, the norm's weight and bias, and the position / token type index buffers."""
    modules, buffers = module._modules, module._buffers
    tensors = tuple(modules[name].weight for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
                    if modules.get(name) is not None)
    norm = modules["LayerNorm"]
    tensors += tuple(t for t in (norm.weight, norm.bias) if t is not None) + tuple(
        buffers[name] for name in ("position_ids", "token_type_ids") if buffers.get(name) is not None)
    return tuple(t.data_ptr() for t in tensors) + (norm.eps,), tensors
