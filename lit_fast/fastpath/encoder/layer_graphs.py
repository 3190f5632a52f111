"""The packed layers as CUDA graphs: the whole layer stack replayed with one launch instead of ~15 a layer.

For small batches the eager forward is bound by the host's launches, not by the GPU; for large ones graphs pay
nothing (docs/MEASUREMENTS.md, "graphs against eager by batch size"). So `cuda_graphs="auto"` replays batches of at
most `AUTO_MAX_TOKENS` real tokens whose shape was seen before; True replays every packed CUDA fp16/bf16 batch; False
never (FastPathOptions.cuda_graphs).

A graph is fixed to its shapes, so batches are bucketed: the packed tokens are padded up to a bucket size (steps of
1/32 of the next lower power of two, at least 64) and the filler tokens form one extra sequence at the end, which
attention keeps to itself and which is cut off afterwards; varlen attention gets a power-of-two `max_len` bound. (The
filler sequence may be longer than that bound; attention then leaves part of it unwritten, which only ever touches
filler rows: every other op works row by row.)

A graph is keyed by the batch shape and by the address of every weight: in-place updates (optimizer steps,
`load_state_dict`) are read by the next replay, and a weight that moved (`.to()`, a reassigned Parameter) makes a
new graph; the q/k/v weights, which the layers read as one concatenated copy, are keyed by their version counters
too. The key is checked after the replay: the graph last replayed for a batch shape is replayed at once, and the
layers are looked up and the key built while the GPU runs it; if it no longer matches, that result is discarded, the
graph dropped and the batch run again as a new shape. Weights made under `torch.inference_mode` carry no version
counter, so an in-place update of them could not be noticed: such a model runs without graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lit_fast.fastpath.cuda_graphs import GraphCache, GraphLimits
from lit_fast.fastpath.encoder import layers as fast_layers
from lit_fast.fastpath.encoder.layers import LayerParts, packed_layer
from lit_fast.fastpath.encoder.padding import Packing
from lit_fast.fastpath.options import FastPathOptions

log = logging.getLogger(__name__)

AUTO_MAX_TOKENS = 16384  # auto: real tokens in a batch up to which graphs measured at least as fast as eager
# auto: a shape is captured the second time it is seen; after 64 captures the cache gives up
AUTO_LIMITS = GraphLimits(repeats=2, max_graphs=32, max_bytes=256 << 20, max_captures=64, max_seen=256)
ALWAYS_LIMITS = GraphLimits(repeats=1, max_graphs=64)


def bucket_tokens(num_tokens: int) -> int:
    """Round a token count up to a bucket: steps of 1/32 of the next lower power of two (>= 64)."""
    step = max(64, (1 << (max(num_tokens, 1).bit_length() - 1)) // 32)
    return -(-num_tokens // step) * step


def bucket_max_len(max_len: int) -> int:
    """A power-of-two upper bound on the longest sequence (>= 16); varlen attention only needs a bound."""
    return max(16, 1 << (max(max_len, 1) - 1).bit_length())


class LayerGraphs:
    """Runs `packed_layer` over a list of layers as cached CUDA graphs (varlen attention only: CUDA fp16/bf16)."""

    def __init__(self, options: FastPathOptions) -> None:
        self.options = options
        self.auto = options.cuda_graphs == "auto"
        self.cache = GraphCache(AUTO_LIMITS if self.auto else ALWAYS_LIMITS, "the layers' CUDA graphs")
        self.max_tokens = AUTO_MAX_TOKENS  # auto: the largest batch (real tokens) that replays a graph
        self.latest: dict[tuple, tuple] = {}  # batch shape -> key of the graph last replayed for it
        self.untracked = False  # said once that inference-tensor weights keep graphs off

    def __deepcopy__(self, memo) -> LayerGraphs:
        """A copied model gets the same options and no graphs (they are tied to the original's weights)."""
        return LayerGraphs(self.options)

    def wants(self, packing: Packing, dtype: torch.dtype) -> bool:
        """Whether this batch should replay a graph (always when not auto). Cheap: shapes only, no weights."""
        if not self.auto:
            return True
        if self.cache.stopped or packing.num_tokens > self.max_tokens:
            return False
        return self.cache.due((packing.batch, bucket_tokens(packing.num_tokens + 1), bucket_max_len(packing.max_len),
                               dtype))

    def will_replay(self, num_tokens: int) -> bool:
        """Whether a batch of `num_tokens` real tokens would replay a graph once its shape has been seen."""
        return not self.auto or (not self.cache.stopped and num_tokens <= self.max_tokens)

    def __call__(self, tokens: torch.Tensor, packing: Packing, resolve: Callable[[], list[LayerParts]],
                 copy_out: bool = True) -> torch.Tensor | None:
        """The layers' output for `tokens`, replayed from a graph (captured if new); None when the cache declines
        (the caller then runs the layers itself). `resolve()` looks the layers up (once; the caller may reuse it).
        `copy_out=False`: the result is a view of the graph's static output, which the next replay overwrites (for a
        caller that copies it before then, such as the unpacking of a padded batch)."""
        count = packing.num_tokens
        bucket, bound = bucket_tokens(count + 1), bucket_max_len(packing.max_len)  # >= 1 filler token
        shape = (packing.batch, bucket, bound, tokens.dtype, tokens.shape[-1], tokens.device)
        known = self.latest.get(shape)
        if known is not None and self.cache.get(known) is None:  # evicted to make room for others
            del self.latest[shape]
            known = None
        if known is not None:
            out = self._replay(known, tokens, packing, copy_out)
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
        if self.cache.get(key) is None and self._capture(key, tokens, packing, layers, bucket, bound) is None:
            return None
        self.latest[shape] = key
        return self._replay(key, tokens, packing, copy_out)

    def _key(self, shape: tuple, layers: list[LayerParts]) -> tuple | None:
        """What a graph is valid for: the batch shape, every weight's address, the q/k/v versions (None: untracked).
        The q/k/v concatenation is a copy that an in-place update replaces; other weights are read in place."""
        versions = tuple(fast_layers.qkv_key(parts) for parts in layers) if self.options.fuse_qkv else ()
        if None in versions:
            return None
        return (*shape, tuple(t.data_ptr() for parts in layers for t in _weights(parts)), versions)

    def _replay(self, key: tuple, tokens: torch.Tensor, packing: Packing, copy_out: bool) -> torch.Tensor:
        graph = self.cache.get(key)
        static_tokens, static_cu, out = graph.outputs
        count = packing.num_tokens
        static_tokens[:count].copy_(tokens)
        static_cu[: packing.batch + 1].copy_(packing.cu_seqlens)
        graph.replay()
        out = out[:count]
        return out.clone() if copy_out else out  # the next replay of any graph in the pool may overwrite `out`

    def _drop(self, key: tuple) -> None:
        """Forget a graph (and the tensors it held) and every shape that pointed at it."""
        self.cache.drop(key)
        self.latest = {shape: known for shape, known in self.latest.items() if known != key}

    def _capture(self, key: tuple, tokens: torch.Tensor, packing: Packing, layers: list[LayerParts], bucket: int,
                 bound: int):
        static_tokens = tokens.new_zeros(bucket, tokens.shape[-1])
        static_cu = F.pad(packing.cu_seqlens, (0, 1), value=bucket)
        filler = bucket - packing.num_tokens
        # Inside the graph attention reads only cu_seqlens (refilled before each replay) and the max_len bound.
        static_packing = Packing(packing.batch + 1, 0, None, static_cu, packing.lengths + (filler,), bound)
        options = self.options

        def run() -> tuple:
            x = static_tokens
            for parts in layers:
                x = packed_layer(x, parts, static_packing, options)
            return static_tokens, static_cu, x

        keep = tuple(t.detach() for parts in layers for t in _weights(parts))
        if options.fuse_qkv:
            keep += tuple(t for parts in layers for t in fast_layers.fused_qkv(parts) if t is not None)
        graph = self.cache.capture(key, run, tokens.device, keep=keep, nbytes=2 * static_tokens.nbytes)
        if graph is not None:
            log.debug("captured a CUDA graph: batch %d, %d tokens, max_len <= %d", packing.batch, bucket, bound)
        else:
            self.latest.clear()
        return graph


def _weights(parts: LayerParts):
    """Every tensor a layer reads; their addresses are part of a graph's key."""
    for module in (parts.query, parts.key, parts.value, parts.out, parts.attn_norm, parts.ffn_in, parts.ffn_out,
                   parts.ffn_norm):
        yield module.weight
        if module.bias is not None:
            yield module.bias
