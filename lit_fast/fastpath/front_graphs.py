"""CUDA graphs of the front's steps before its wait (front.py): the row plan and the embeddings of the real tokens.

Until the first GEMM of a forward is queued the GPU idles, and on the H200 machine's host the front's steps before
its wait (the plan kernel, the index grids of the embeddings, the embedding kernel, the event) took ~300 us of host
time at W1. Replayed from a graph they are one launch and an event.

A graph reads its inputs where they are. It is keyed by the address, shape, strides and dtype of the mask and of
the ids, and by the stream. A later call whose tensors sit at those addresses with the same layout (the same tensors
again, or new ones the caching allocator put in the same place) replays it, and the graph reads that call's values.
The embedding module's tables, norm and index buffers are read in place too, so in-place updates show; their
addresses (and the norm's eps) are compared after each replay, while the GPU runs it. If one changed, the plan is
kept (it depends on the mask and the ids only), the embeddings are made again after the wait, and the graph is
dropped. Each graph holds the tensors it read, so a replay for weights that have since moved reads their old
memory, never freed memory. The plan kernel writes straight into the graph's own pinned buffer (rows.row_plan).

Where the first layer starts with its fused q/k/v GEMM and runs eagerly (front.FIRST_QKV_AHEAD), the graph also
computes that GEMM before the host knows how many rows are real: over as many as the key's previous call had, rounded
up to a bucket (a call with more projects the rest after the wait). It keeps the GPU busy through the host's steps
between the plan and the first GEMM (W1 0.7-3.1% faster in two runs, `bench/w1_encoder.py --explore auto-qkv_ahead`,
when it still covered all `batch * seq_len` rows, ~70 us of them padding at W1; over the previous call's rows, W1
was 2.1% (fp16) / 1.7% (bf16) faster than over all rows, `--explore auto-qkv_all_rows`, c3e80e2). That result is used
only if the q/k/v weights' addresses and versions are those of the capture (else the graph is dropped and captured
again). It is left out where the key's latest call had few enough tokens for the layers to replay a CUDA graph of
their own (`GraphedLayers.will_replay`), which would not use it.

A key is captured the second time it is seen. At most MAX_GRAPHS graphs are kept (the oldest is dropped first),
their static outputs at most MAX_BYTES together; after MAX_CAPTURES captures a front stops capturing (a stream of
ever new addresses or shapes). With `to_fast_path(..., cuda_graphs=False)` the front runs its steps eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lit_fast.fastpath import rows

log = logging.getLogger(__name__)

MAX_GRAPHS = 4
MAX_BYTES = 512 << 20  # the graphs' static outputs together (W1, bf16: 50 MB of embeddings, 151 MB of q/k/v)
MAX_CAPTURES = 32
REPEATS = 2  # a key is captured the second time it is seen


@dataclass
class FrontGraph:
    graph: torch.cuda.CUDAGraph
    plan: torch.Tensor  # the plan buffer on the device (static output)
    ahead: torch.Tensor  # the embeddings buffer (static output): the first `count` rows are the tokens
    qkv: torch.Tensor | None  # the first layer's q/k/v projection of `ahead` (static output, as many rows), or None
    qkv_key: tuple | None  # layers.qkv_key of the first layer at capture: what `qkv` is valid for
    copy: rows.HostCopy  # its pinned buffer is where the graph's plan kernel writes
    size: int  # plan values
    device: torch.device
    sources: tuple  # embedding_sources() at capture
    limits: list  # EmbeddingInputs.limits at capture: the range check of the ids
    keep: tuple  # the tensors the graph reads besides its inputs, held so their memory stays valid
    qkv_rows: int = 0  # how many leading rows of `qkv` the graph computes (the rest is room for a longer call)

    @property
    def nbytes(self) -> int:
        return self.ahead.nbytes + (self.qkv.nbytes if self.qkv is not None else 0)


class FrontGraphs:
    """The graphs of one FastFront; see the module docstring."""

    def __init__(self) -> None:
        self.graphs: dict[tuple, FrontGraph] = {}
        self.seen: dict[tuple, int] = {}
        self.tokens: dict[tuple, int] = {}  # the real tokens of the latest call of each key seen, not captured
        self.captures = 0
        self.stopped = False
        self.pool = None

    def __deepcopy__(self, memo) -> FrontGraphs:
        return FrontGraphs()  # a cache tied to the original's tensors (and CUDA graphs cannot be copied)

    @staticmethod
    def key(mask: torch.Tensor, ids: torch.Tensor) -> tuple:
        return (mask.data_ptr(), mask.shape, mask.stride(), mask.dtype, ids.data_ptr(), ids.stride(), ids.dtype,
                torch._C._cuda_getCurrentRawStream(mask.get_device()))

    def replay(self, key: tuple, module: nn.Module) -> tuple[FrontGraph, bool] | None:
        """Replay the graph of `key` and queue its event: (graph, whether its embeddings are valid), or None when
        there is no graph for `key`. Invalid embeddings (the module's tensors moved) drop the graph."""
        entry = self.graphs.get(key)
        if entry is None:
            return None
        entry.copy.target(entry.size, entry.device)  # (sets the values the graph's plan kernel overwrites)
        entry.graph.replay()
        entry.copy.written()
        if embedding_sources(module)[0] == entry.sources:
            return entry, True
        del self.graphs[key]
        return entry, False

    def drop(self, key: tuple) -> None:
        self.graphs.pop(key, None)

    def wants(self, key: tuple) -> bool:
        """Whether to capture `key` now (the second time it is seen)."""
        if self.stopped:
            return False
        if len(self.seen) >= 8 * MAX_CAPTURES and key not in self.seen:
            self.seen.clear()  # a long stream of one-off keys: forget them rather than grow
            self.tokens.clear()
        self.seen[key] = count = self.seen.get(key, 0) + 1
        return count >= REPEATS

    def capture(self, key: tuple, module: nn.Module, size: int, limits: list,
                queue: Callable[[rows.HostCopy], tuple], device: torch.device, qkv_key: tuple | None = None,
                keep: tuple = (), qkv_rows: int = 0) -> FrontGraph | None:
        """Capture `queue(copy)` for `key`: the plan into `copy`'s pinned buffer, the embeddings, and optionally the
        first layer's q/k/v projection of them (valid for `qkv_key`, its first `qkv_rows` rows computed); it returns
        the three (the last may be None). `keep`: further tensors the graph reads (the q/k/v weights). None when this
        front has stopped capturing or the capture failed (then it stops)."""
        if self.captures >= MAX_CAPTURES:
            self.stop(f"{self.captures} captures without settling on a few input addresses and shapes")
            return None
        self.captures += 1
        copy = rows.HostCopy()
        copy.target(size, device)  # pinned memory cannot be allocated during a capture
        copy.in_graph = True
        stream = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)  # warm up off the capture stream (compiles, lazy init)
        side.wait_stream(stream)
        try:
            with torch.cuda.stream(side):
                queue(copy)
            stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                plan, ahead, qkv = queue(copy)
        except RuntimeError as failure:  # a capture this torch/driver cannot do
            self.stop(f"capture failed ({failure})")
            return None
        copy.in_graph = False
        self.pool = graph.pool()
        sources, tensors = embedding_sources(module)
        entry = FrontGraph(graph, plan, ahead, qkv, qkv_key if qkv is not None else None, copy, size, device, sources,
                           limits, tensors + keep, qkv_rows if qkv is not None else 0)
        self.admit(key, entry)
        return entry

    def admit(self, key: tuple, entry: FrontGraph) -> None:
        """Keep `entry` for `key`, dropping the oldest graphs first while more than MAX_GRAPHS, or more than
        MAX_BYTES of static outputs, would be kept."""
        while self.graphs and (len(self.graphs) >= MAX_GRAPHS or entry.nbytes + sum(
                g.nbytes for g in self.graphs.values()) > MAX_BYTES):
            del self.graphs[next(iter(self.graphs))]
        self.graphs[key] = entry

    def stop(self, why: str) -> None:
        log.info("fast path: the front's CUDA graphs are off for this model: %s", why)
        self.stopped = True
        self.graphs.clear()
        self.seen.clear()
        self.tokens.clear()
        self.pool = None


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
