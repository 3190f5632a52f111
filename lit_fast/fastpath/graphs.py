"""CUDA graphs for the packed layers: replay the whole layer stack as one graph instead of ~15 launches a layer.

Eager PyTorch spends host time on every kernel launch (~20-40 us on the H200 machine, a microVM), and while the host
launches, a GPU that has finished its queue waits. A CUDA graph replays all kernels of the stack with one launch.
W1 on the H200 (`bench/w1_encoder.py --scenarios w1_batch1 ... w1_batch64`, `bench/results/w1_batches_h200.json`):
for batches of 1 to 32 sequences of the W1 length mix (up to ~4.3k real tokens) the eager forward is host-bound
(2.8-4.5 ms whatever the batch) and graphs took it to 0.9-2.4 ms, 1.2-3.4x faster; at 64 and 128 sequences
(8.6k and 18.7k tokens) the GPU is the limit and graphs were 9-14% and ~4% slower (the token count is rounded up
to a bucket, and the host's lookup before the replay came on top). Since a known shape replays first and the
weights are checked while the GPU runs it, graphs at 8-19k real tokens are as fast as eager on a quick host and
faster on a slow one (see AUTO_MAX_TOKENS).

`to_fast_path(model, cuda_graphs=...)`: "auto" (the default) replays batches of at most `AUTO_MAX_TOKENS` real tokens,
and only a shape seen before (`AUTO_REPEATS`), so a stream of one-off shapes never pays for captures; after
`AUTO_MAX_CAPTURES` captures it stops capturing and frees its graphs (a workload of too many shapes); it keeps at
most `AUTO_MAX_GRAPHS` at once, whose static inputs and outputs take at most `AUTO_MAX_BYTES`. True: every packed
CUDA fp16/bf16 batch, captured on first sight (online inference with few, repeated shapes). False: never.

A graph is fixed to its shapes, so batches are bucketed: the packed tokens are padded up to a bucket size
(steps of 1/32 of the next lower power of two, at least 64: under 3% more tokens past 2048) and the filler tokens
form one extra sequence at the end, which attention keeps to itself and which is cut off afterwards; varlen
attention gets a power-of-two `max_len` bound. (The filler sequence may be longer than that bound; attention then
leaves part of it unwritten, which only ever touches filler rows: every other op works row by row.) Graphs are
keyed by (batch, bucket, max-len bound, dtype) and by the data pointers of every weight: in-place updates
(optimizer steps, `load_state_dict`) are read by the next replay, and a weight that moved (`.to()`, a reassigned
Parameter) makes a new graph; the q/k/v weights, which the layers read as one concatenated copy, are keyed by their
version counters too, so an in-place update of them makes a new graph. The key is checked after the replay: the
graph last replayed for a batch shape is replayed at once, and the layers are looked up and the key built while the
GPU runs it; if it no longer matches, that result is discarded, the graph dropped and the batch run again as a new
shape. Each graph holds every tensor it reads, so a replay for weights that have since moved reads their old
memory, never freed memory. All graphs of a stack share one memory pool; outputs are copied out before the next
replay can overwrite them. Weights made under `torch.inference_mode` carry no version counter, so an in-place update
of them could not be noticed: such a model runs without graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_fast.fastpath import layers as fast_layers
from lit_fast.fastpath.layers import LayerParts, packed_layer
from lit_fast.fastpath.padding import Packing

log = logging.getLogger(__name__)

MAX_GRAPHS = 64  # per stack; past this the oldest graph is dropped (its memory goes back to the shared pool)
# cuda_graphs="auto": where graphs measured faster (see the module docstring), and only for shapes that repeat
# Real tokens in the batch. With the replay ahead of the weight check (GraphedLayers.__call__), on the H200: W1 at
# 8.2k and 12.9k real tokens (75% and 60% padding) graphs were within +-5% of eager on a quick host and up to 1.6x
# faster on a slow one, at 18.7k (W1) equal, at 24.6k and 32.8k 1-2% slower (the bucket's filler tokens);
# bench/results/w1_h200_0f6e7e3.json, w1_h200_4b2cd97.json, w1_h200_6180482.json (slow host), w1_h200_e2e9f4d.json.
AUTO_MAX_TOKENS = 16384
AUTO_REPEATS = 2  # a shape is captured the second time it is asked for
AUTO_MAX_CAPTURES = 64  # then auto stops capturing and frees its graphs: too many shapes for graphs to pay
AUTO_MAX_GRAPHS = 32  # kept at once in auto mode
# and their static inputs and outputs together at most this many bytes (BERT-base fp16 at 16k tokens: 50 MB a graph)
AUTO_MAX_BYTES = 256 << 20


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
    # Every tensor the graph reads besides its static buffers, held so that their memory stays valid: a replay for
    # weights that have since moved then reads the old values (never freed memory), and its result is thrown away.
    keep: tuple = ()


class GraphedLayers:
    """Runs `packed_layer` over a list of layers as cached CUDA graphs (varlen attention only: CUDA fp16/bf16)."""

    def __init__(self, auto: bool = False) -> None:
        self.graphs: dict[tuple, _Graph] = {}
        self.latest: dict[tuple, tuple] = {}  # batch shape -> key of the graph last replayed for it
        self.pool = None  # one memory pool for all graphs of this stack
        self.auto = auto
        self.seen: dict[tuple, int] = {}  # auto: how often each shape was asked for
        self.captures = 0
        self.stopped = False  # auto gave up: too many shapes
        self.untracked = False  # said once that inference-tensor weights keep graphs off

    def __deepcopy__(self, memo) -> GraphedLayers:
        """A copied model gets the same settings and no graphs: they are a cache, tied to the original's weights
        (and CUDA graphs cannot be copied)."""
        return GraphedLayers(auto=self.auto)

    def wants(self, packing: Packing, dtype: torch.dtype) -> bool:
        """Whether this batch should replay a graph (always when not auto). Cheap: shapes only, no weights."""
        if not self.auto:
            return True
        if self.stopped or packing.num_tokens > AUTO_MAX_TOKENS:
            return False
        shape = (packing.batch, bucket_tokens(packing.num_tokens + 1), bucket_max_len(packing.max_len), dtype)
        count = self.seen.get(shape, 0) + 1
        if len(self.seen) >= 4 * AUTO_MAX_CAPTURES and shape not in self.seen:
            self.seen.clear()  # a long stream of one-off shapes: forget them rather than grow
        self.seen[shape] = count
        return count >= AUTO_REPEATS

    def will_replay(self, num_tokens: int) -> bool:
        """Whether a batch of `num_tokens` real tokens would replay a graph, once its shape has been seen (`wants`
        without the count of sightings)."""
        return not self.auto or (not self.stopped and num_tokens <= AUTO_MAX_TOKENS)

    def stop(self) -> None:
        """Auto mode gives up on graphs for this stack (too many shapes) and frees their memory."""
        log.info("fast path: %d CUDA graph captures without settling on a few batch shapes; the layers run without "
                 "graphs from now on (to_fast_path(..., cuda_graphs=True) keeps capturing)", self.captures)
        self.stopped = True
        self.graphs.clear()
        self.latest.clear()
        self.pool = None
        self.seen.clear()

    def __call__(self, tokens: torch.Tensor, packing: Packing, resolve: Callable[[], list[LayerParts]],
                 copy_out: bool = True) -> torch.Tensor | None:
        """The layers' output for `tokens`, replayed from a graph (captured if new); None when auto mode declines
        (the caller then runs the layers itself). `resolve()` looks the layers up (once; the caller may reuse it).
        `copy_out=False`: the result is a view of the graph's static output, which the next replay overwrites (for a
        caller that copies it anyway before then, such as the unpacking of a padded batch).

        A batch shape replayed before is replayed again at once, and the layers are looked up and the weights
        checked while the GPU runs it: that walk (~200 tensors for BERT-base) is host time the GPU would otherwise
        wait for. If a weight moved or q/k/v changed since the capture, that result is discarded and the batch runs
        as if the shape were new."""
        count = packing.num_tokens
        bucket, bound = bucket_tokens(count + 1), bucket_max_len(packing.max_len)  # >= 1 filler token
        shape = (packing.batch, bucket, bound, tokens.dtype, tokens.shape[-1], tokens.device)
        known = self.latest.get(shape)
        if known is not None:
            out = self._replay(self.graphs[known], tokens, packing, copy_out)
            if self._key(shape, resolve()) == known:
                return out
            self._drop(known)  # stale: the weights changed under it
        layers = resolve()
        key = self._key(shape, layers)
        if key is None:  # weights made under inference_mode: an in-place update would not show; stay eager
            if not self.untracked:
                log.info("fast path: the q/k/v weights are inference tensors (no version counter), so a CUDA graph "
                         "could not notice an in-place update of them; the layers run without graphs")
                self.untracked = True
            return None
        entry = self.graphs.get(key)
        if entry is None:
            if self.auto and self.captures >= AUTO_MAX_CAPTURES:
                self.stop()
                return None
            entry = self._capture(key, tokens, packing, layers, bucket, bound)
        self.latest[shape] = key
        return self._replay(entry, tokens, packing, copy_out)

    @staticmethod
    def _key(shape: tuple, layers: list[LayerParts]) -> tuple | None:
        """What a graph is valid for: the batch shape, every weight's address, the q/k/v versions (None: untracked)."""
        versions = _qkv_versions(layers)
        if None in versions:
            return None
        return (*shape, tuple(t.data_ptr() for parts in layers for t in _weights(parts)), versions)

    @staticmethod
    def _replay(entry: _Graph, tokens: torch.Tensor, packing: Packing, copy_out: bool = True) -> torch.Tensor:
        count = packing.num_tokens
        entry.tokens[:count].copy_(tokens)
        entry.cu_seqlens[: packing.batch + 1].copy_(packing.cu_seqlens)
        entry.graph.replay()
        out = entry.out[:count]
        return out.clone() if copy_out else out  # the next replay of any graph in the pool may overwrite `out`

    def _drop(self, key: tuple) -> None:
        """Forget a graph (and the tensors it held) and every shape that pointed at it."""
        self.graphs.pop(key, None)
        self.latest = {shape: known for shape, known in self.latest.items() if known != key}

    def _capture(self, key: tuple, tokens: torch.Tensor, packing: Packing, layers: list[LayerParts],
                 bucket: int, bound: int) -> _Graph:
        size = 2 * bucket * tokens.shape[-1] * tokens.element_size()  # the new graph's static input and output
        while self.graphs and (len(self.graphs) >= (AUTO_MAX_GRAPHS if self.auto else MAX_GRAPHS) or (
                self.auto and size + sum(g.tokens.nbytes + g.out.nbytes for g in self.graphs.values())
                > AUTO_MAX_BYTES)):
            self._drop(next(iter(self.graphs)))  # the oldest
        self.captures += 1
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
        keep = tuple(t.detach() for parts in layers for t in _weights(parts))
        if fast_layers.FUSE_QKV:
            keep += tuple(t for parts in layers for t in fast_layers.fused_qkv(parts) if t is not None)
        entry = _Graph(graph, static_tokens, static_cu, out, keep)
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
