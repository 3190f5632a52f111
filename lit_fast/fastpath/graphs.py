"""CUDA graphs for the packed layers (opt-in): replay the whole layer stack as one graph instead of ~15 launches
a layer.

Eager PyTorch spends a few microseconds of host time per kernel launch; a CUDA graph replays all kernels of the
stack with one launch. On W1 (batch 128) this bought nothing measurable on the H100 (the GPU, not the host, is
the bottleneck there) at 0-43% padding, 1.3-1.4x at 75% padding and 2.2-2.7x for a batch of 8 over the
packed path without graphs; every new batch shape costs a capture (two forwards), so it is off by default:
`to_fast_path(model, cuda_graphs=True)` is for small or repeated batch shapes (online inference).

A graph is fixed to its shapes, so batches are bucketed: the packed tokens are padded up to a bucket size
(steps of 1/32 of the next lower power of two, at least 64: under 3% more tokens past 2048) and the filler tokens form one extra
sequence at the end, which attention keeps to itself and which is cut off afterwards; varlen attention gets a
power-of-two `max_len` bound. (The filler sequence may be longer than that bound; attention then leaves part of
it unwritten, which only ever touches filler rows: every other op works row by row.) Graphs are keyed by (batch, bucket, max-len bound, dtype) and by the data
pointers of every weight: in-place updates (optimizer steps, `load_state_dict`) are read by the next replay, and
a weight that moved (`.to()`, a reassigned Parameter) makes a new graph; the q/k/v weights, which the layers read
as one concatenated copy, are keyed by their version counters too, so an in-place update of them makes a new graph. All graphs of a stack share one memory
pool; outputs are copied out before the next replay can overwrite them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_fast.fastpath import layers as fast_layers
from lit_fast.fastpath.layers import LayerParts, packed_layer
from lit_fast.fastpath.padding import Packing

log = logging.getLogger(__name__)

MAX_GRAPHS = 64  # per stack; past this the oldest graph is dropped (its memory goes back to the shared pool)


def bucket_tokens(num_tokens: int) -> int:
    """Round a token count up to a bucket: steps of 1/32 of the next lower power of two (>= 64)."""
    step = max(64, (1 << (max(num_tokens, 1).bit_length() - 1)) // 32)
    return -(-num_tokens // step) * step


def bucket_max_len(max_len: int) -> int:
    """A power-of-two upper bound on the longest sequence (>= 16); varlen attention only needs a bound."""
    return max(16, 1 << (max(max_len, 1) - 1).bit_length())


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # static input (bucket, hidden)
    cu_seqlens: torch.Tensor  # static (batch + 2,) int32: the batch's offsets, then the filler sequence's end
    out: torch.Tensor  # static output (bucket, hidden)


class GraphedLayers:
    """Runs `packed_layer` over a list of layers as cached CUDA graphs (varlen attention only: CUDA fp16/bf16)."""

    def __init__(self) -> None:
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None  # one memory pool for all graphs of this stack

    def __call__(self, tokens: torch.Tensor, packing: Packing, layers: list[LayerParts]) -> torch.Tensor:
        count = packing.num_tokens
        bucket, bound = bucket_tokens(count + 1), bucket_max_len(packing.max_len)  # >= 1 filler token
        weights = tuple(t.data_ptr() for parts in layers for t in _weights(parts))
        key = (packing.batch, bucket, bound, tokens.dtype, tokens.shape[-1], tokens.device, weights,
               _qkv_versions(layers))
        entry = self.graphs.get(key) or self._capture(key, tokens, packing, layers, bucket, bound)
        entry.tokens[:count].copy_(tokens)
        entry.cu_seqlens[: packing.batch + 1].copy_(packing.cu_seqlens)
        entry.graph.replay()
        return entry.out[:count].clone()  # the next replay of any graph in the pool may overwrite `out`

    def _capture(self, key: tuple, tokens: torch.Tensor, packing: Packing, layers: list[LayerParts],
                 bucket: int, bound: int) -> _Graph:
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        static_tokens = tokens.new_zeros(bucket, tokens.shape[-1])
        static_cu = F.pad(packing.cu_seqlens, (0, 1), value=bucket)
        filler = bucket - packing.num_tokens
        # Inside the graph attention reads only cu_seqlens (refilled before each replay) and the max_len bound.
        static_packing = Packing(packing.batch + 1, 0, None, static_cu, packing.lengths + (filler,), bound)

        def run() -> torch.Tensor:
            x = static_tokens
            for parts in layers:
                x = packed_layer(x, parts, static_packing)
            return x

        stream = torch.cuda.current_stream(tokens.device)
        side = torch.cuda.Stream(device=tokens.device)  # warm up (lazy cuBLAS / flash init) off the capture stream
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            run()
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        self.pool = graph.pool()
        log.debug("captured a CUDA graph: batch %d, %d tokens, max_len <= %d", packing.batch, bucket, bound)
        entry = _Graph(graph, static_tokens, static_cu, out)
        self.graphs[key] = entry
        return entry


def _qkv_versions(layers: list[LayerParts]) -> tuple:
    """The q/k/v concatenations' keys (layers.qkv_key): a graph reads the remembered concatenation, a copy that an
    in-place update replaces, so such an update needs a new capture. Other weights are read in place."""
    return tuple(fast_layers.qkv_key(parts) for parts in layers) if fast_layers.FUSE_QKV else ()


def _weights(parts: LayerParts):
    """Every tensor a layer reads; their addresses are part of a graph's key."""
    for module in (parts.query, parts.key, parts.value, parts.out, parts.attn_norm, parts.ffn_in, parts.ffn_out,
                   parts.ffn_norm):
        yield module.weight
        if module.bias is not None:
            yield module.bias
