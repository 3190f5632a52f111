"""Fast generation for decoder-only models: our own static KV cache and one decode step captured as a CUDA graph.

Why our own loop: at batch 1 a decoder step is a few hundred tiny kernels; transformers' ``generate`` spends far
more time launching them (and growing a dynamic cache) than the GPU spends running them. A CUDA graph replays the
whole step with one launch, but only if every shape is fixed and nothing is re-allocated - so the KV cache is a
preallocated tensor per layer, the attention runs over all of it with a mask, and the step reads its inputs
(current token, cache slot) from fixed buffers that the host loop overwrites in place. (transformers' own static
cache under ``torch.compile(mode="reduce-overhead")`` crashed on 5.17 with "accessing tensor output of CUDAGraphs
that has been overwritten".)

The model is not copied or rewritten: each step calls the model's own submodules (projections, norms, MLPs) and
only the attention and the cache are ours, so fine-tuned, LoRA-wrapped or quantized weights are used as they are.
Per-architecture differences are written once, in small adapters (lit_fast/decoder_archs.py).

Layout of one generation (batch ``B``, cache length ``S``):
    slot s of row b holds the token at column s of the left-padded prompt, then generated tokens;
    row b's first ``pad[b]`` slots are padding and are never attended to;
    the token in slot s has position ``s - pad[b]`` (what transformers derives from the attention mask).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_fast.fastpath.cuda_graphs import GraphCache, GraphLimits
from lit_fast.fastpath.decoder.sdpa import sdpa_policy
from lit_fast.fastpath.decoder.archs import ADAPTERS, unsupported_reason
from lit_fast.errors import ConfigError, UnsupportedModelError

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """What to generate: how many tokens, greedy or sampled, when to stop."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens (None/0: all)
    top_p: float | None = None  # keep the smallest set with this much probability (None/1.0: all)
    seed: int | None = None  # sampling is reproducible for a fixed seed, batch and path
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}; "
                              "for deterministic output set do_sample: false (greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


# ----------------------------------------------------------------------------------------------------------
# The decoder: static KV cache, one forward for prefill (eager) and decode (captured), the generation loop.


class FastDecoder:
    """Generation with a static KV cache of ``batch_size`` rows x ``max_len`` slots for one HF causal LM.

    Build once, call :meth:`generate` many times: batches up to ``batch_size`` rows and prompt + new tokens up to
    ``max_len`` reuse the cache and the captured graphs (smaller batches are filled with idle rows).
    ``fuse_qkv`` (default: on for CUDA) runs the q/k/v projections as one matmul; ``compile`` runs the decode step
    through ``torch.compile`` before capturing it, which fuses its small element-wise kernels.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, *, cuda_graph: bool | None = None,
                 compile: bool = False, fuse_qkv: bool | None = None, sdpa_backends: list[str] | None = None) -> None:
        reason = unsupported_reason(model, max_len)
        if reason:
            raise UnsupportedModelError(f"fast decoding: {reason}; use decoding: hf (transformers generate)")
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        embeddings = model.get_input_embeddings()
        weight = embeddings.weight
        # 4-bit embedding tables (quantization.quantize_embeddings) store uint8: their module says the real dtype
        self.device, self.dtype = weight.device, weight.dtype if weight.is_floating_point() else embeddings.dtype
        on_gpu = self.device.type == "cuda"
        if cuda_graph and not on_gpu:
            raise ConfigError("cuda_graph=True needs the model on a CUDA device")
        self.model, self.batch_size, self.sdpa_backends = model, batch_size, sdpa_backends
        self.max_len = math.ceil(max_len / 64) * 64  # whole 64-slot tiles keep the attention kernels aligned
        self.arch = ADAPTERS[model.config.model_type](model, self.max_len, on_gpu if fuse_qkv is None else fuse_qkv)
        self.use_graph = on_gpu if cuda_graph is None else cuda_graph

        # The generation state lives in fixed buffers, so that a captured step can read and update it in place.
        B, S, dev = batch_size, self.max_len, self.device
        # Keys and values of a layer share one tensor, (B, S, 2, kv_heads, head_dim), so that one kernel writes
        # both (the fused projection's k and v columns are already side by side: no copy at all there).
        # zeros, not empty: masked slots still enter the attention matmul (with weight 0), and 0 * NaN is NaN
        shape = (B, S, 2, self.arch.kv_heads, self.arch.head_dim)
        self.kv = [torch.zeros(shape, device=dev, dtype=self.dtype) for _ in self.arch.layers]
        self.slots = torch.arange(S, device=dev)
        self.pad = torch.zeros(B, dtype=torch.long, device=dev)  # left-padding slots per row
        self.tokens = torch.zeros(B, S, dtype=torch.long, device=dev)  # the token in each slot
        self.token = torch.zeros(B, 1, dtype=torch.long, device=dev)  # the newest token of each row...
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)  # ...and its slot
        self.first_slot = torch.zeros(1, dtype=torch.long, device=dev)  # where a prompt starts: slot 0
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)  # rows that produced a stop token
        self.eos = torch.full((8,), -1, dtype=torch.long, device=dev)  # stop tokens; -1 never matches
        self.pad_id = torch.zeros((), dtype=torch.long, device=dev)

        self.steps = {"logits": self._logits_step, "greedy": self._greedy_step}
        if compile:
            self.steps = {k: torch.compile(f, fullgraph=True, dynamic=False) for k, f in self.steps.items()}
        # the decode steps by kind, and the prefill by prompt width; each graph with a memory pool of its own
        self.graphs = GraphCache(GraphLimits(shared_pool=False), "the decoding loop's CUDA graphs")
        if self.use_graph:
            self._capture("greedy")

    # -- the model, over the cache ------------------------------------------------------------------------

    def forward(self, ids: Tensor, first_slot: Tensor) -> Tensor:
        """Run ``ids`` (B, T), which fill cache slots ``first_slot ...``; return the last column's logits (B, V)."""
        T = ids.shape[1]
        slots = first_slot + torch.arange(T, device=self.device)  # (T,)
        positions = (slots[None, :] - self.pad[:, None]).clamp(min=0)  # (B, T), as HF derives from the mask
        # key slot s is visible to the query in slot t when it is not padding and not in the future; a query
        # always sees its own slot, so an all-padding row never gets a softmax over nothing (NaN)
        keys = self.slots[None, None, :]
        visible = (keys >= self.pad[:, None, None]) & (keys <= slots[None, :, None]) | (keys == slots[None, :, None])
        # Grouped KV heads without copying K/V: the `group` query heads that share one KV head become
        # `group * T` query rows of that head (HF's repeat_kv maps head h to KV head h // group), so the mask
        # repeats per group. Additive, in the model's dtype, built once per step for all layers.
        B, kv_heads, group = ids.shape[0], self.arch.kv_heads, self.arch.heads // self.arch.kv_heads
        visible = visible[:, None, None].expand(B, 1, group, T, self.max_len).reshape(B, 1, group * T, self.max_len)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill(~visible, float("-inf"))

        def attend(i: int, q: Tensor, kv: Tensor, scale: float) -> Tensor:
            """q (B, heads, T, D) and the new keys/values kv (B, T, 2, kv_heads, D) -> (B, heads, T, D)."""
            cache = self.kv[i]
            cache.index_copy_(1, slots, kv)
            H, D = q.shape[1], q.shape[3]
            q = q.reshape(B, kv_heads, group * T, D)
            k, v = cache[:, :, 0].transpose(1, 2), cache[:, :, 1].transpose(1, 2)  # (B, kv_heads, S, D) views
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            return y.reshape(B, H, T, D)

        x = self.arch.embed(ids, positions)
        pos = self.arch.positional(positions)
        for i in range(len(self.arch.layers)):
            x = self.arch.block(i, x, pos, attend)
        return self.arch.head(x[:, -1])

    def advance(self, choice: Tensor) -> None:
        """Append each row's chosen token (padding once the row is done) in the next slot; mark stop tokens."""
        token = torch.where(self.done, self.pad_id, choice)
        self.slot.add_(1)
        self.tokens.index_copy_(1, self.slot, token[:, None])
        self.done.logical_or_((token[:, None] == self.eos).any(dim=1))
        self.token.copy_(token[:, None])

    def _logits_step(self) -> Tensor:
        """The newest token through the model at its slot: the next token's logits (B, V)."""
        return self.forward(self.token, self.slot)

    def _greedy_step(self) -> None:
        """A whole greedy step - model, argmax, bookkeeping - so that one graph replay is all a step costs."""
        self.advance(self.forward(self.token, self.slot).argmax(dim=-1))

    def _capture(self, kind: str) -> None:
        """Warm up (and compile) on a side stream, then record one step as a CUDA graph.

        The warm-up runs change the generation state (cache slots 0-2, slot counter): every generate() resets it.
        """
        self.slot.zero_()
        with torch.inference_mode(), sdpa_policy(self.sdpa_backends):
            self.graphs.capture(("step", kind), self.steps[kind], self.device, warmups=3)

    def prefill(self, ids: Tensor) -> Tensor:
        """The prompt (batch_size, T) through the model into slots 0..T-1; the next token's logits.

        With CUDA graphs, one graph per prompt width T (a multiple of 64, see generate): launching a few hundred
        kernels from Python costs milliseconds, a replay does not. Every tensor a graph reads from outside must
        outlive it (hence ``self.first_slot``, not a temporary zero: a freed temporary's memory gets reused and
        the replay would read whatever lands there).
        """
        if not self.use_graph:
            return self.forward(ids, self.first_slot)
        key = ("prefill", ids.shape[1])
        if self.graphs.get(key) is None:
            buffer = ids.clone()  # the warm-up writes cache slots; the replay below overwrites them
            self.graphs.capture(key, lambda: (buffer, self.forward(buffer, self.first_slot)), self.device, keep=(buffer,))
        buffer, logits = self.graphs.get(key).outputs
        buffer.copy_(ids)
        return self.graphs.get(key).replay()[1]

    def step(self, kind: str = "greedy") -> Tensor | None:
        """One decode step: a graph replay on CUDA, the plain (or compiled) function elsewhere."""
        if not self.use_graph:
            return self.steps[kind]()
        if self.graphs.get(("step", kind)) is None:
            self._capture(kind)
        return self.graphs.get(("step", kind)).replay()

    # -- the generation loop ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, cfg: SamplingConfig) -> Tensor:
        """New tokens (B, <= max_new_tokens) for a left-padded batch; rows that stopped are filled with pad."""
        B, T = input_ids.shape
        if self.model.training:
            raise ConfigError("fast decoding runs the model as it is: call model.eval() first (dropout is on)")
        if self.use_graph and math.ceil(T / 64) * 64 + cfg.max_new_tokens <= self.max_len:
            T = math.ceil(T / 64) * 64  # more left padding: prompt widths in steps of 64 share prefill graphs
        if B > self.batch_size or T + cfg.max_new_tokens > self.max_len:
            raise ConfigError(f"batch {B} x {T}+{cfg.max_new_tokens} tokens does not fit this decoder "
                              f"({self.batch_size} x {self.max_len}); build a larger FastDecoder")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ConfigError("fast decoding needs left padding (the last prompt column must be real tokens)")
        if len(cfg.eos_token_ids) > self.eos.numel():
            raise ConfigError(f"at most {self.eos.numel()} stop token ids, got {len(cfg.eos_token_ids)}")
        kind = "logits" if cfg.do_sample else "greedy"
        if self.use_graph and self.graphs.get(("step", kind)) is None:
            self._capture(kind)  # before the prefill: the warm-up writes into the cache
        # reset the state; idle rows fill the batch up to the captured size (all padding, done from the start)
        ids = torch.full((self.batch_size, T), cfg.pad_token_id, dtype=torch.long, device=self.device)
        ids[:B, T - input_ids.shape[1]:] = input_ids
        self.pad.fill_(T)
        self.pad[:B] = T - attention_mask.sum(dim=1)
        self.done.fill_(False)
        self.done[B:] = True
        self.eos.fill_(-1)
        self.eos[: len(cfg.eos_token_ids)] = torch.tensor(cfg.eos_token_ids, dtype=torch.long)
        self.pad_id.fill_(cfg.pad_token_id)
        self.tokens.fill_(cfg.pad_token_id)
        generator = None
        if cfg.do_sample:
            generator = torch.Generator(self.device)
            generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())

        with sdpa_policy(self.sdpa_backends):
            logits = self.prefill(ids)
            self.slot.fill_(T - 1)
            self.advance(pick_token(logits, cfg, generator))
            n = 1
            while n < cfg.max_new_tokens:
                # asking the GPU whether all rows are done waits for it: every 16 steps, not every step
                if n % 16 == 0 and bool(self.done.all()):
                    break
                if cfg.do_sample:
                    self.advance(pick_token(self.step("logits"), cfg, generator))
                else:
                    self.step("greedy")
                n += 1
        return self.tokens[:B, T: T + n].clone()


def pick_token(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """Greedy argmax, or a sample after temperature, top-k and top-p (same order as transformers)."""
    logits = logits.float()
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        # drop the least likely tokens whose total probability stays <= 1 - top_p (the most likely always stays)
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - cfg.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def hf_generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, cfg: SamplingConfig, **extra) -> Tensor:
    """transformers' ``generate`` with the same settings; returns the new tokens only (decoder-only models)."""
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, pad_token_id=cfg.pad_token_id,
                  eos_token_id=list(cfg.eos_token_ids) or None)
    if cfg.do_sample:  # explicit, so the model's generation_config defaults (top_k=50...) do not sneak in
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or 0, top_p=cfg.top_p or 1.0)
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)  # transformers samples from the global generator
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs, **extra)
    return out if model.config.is_encoder_decoder else out[:, input_ids.shape[1]:]
