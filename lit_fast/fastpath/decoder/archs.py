"""Per-architecture adapters of the fast decoding loop (lit_fast/decoding.py): embed -> blocks -> head.

Each adapter runs one HF model family with the model's own submodules (projections, norms, MLPs), so fine-tuned,
LoRA-wrapped or quantized weights are used as they are; only attention goes through the ``attend`` function the
loop passes in (our static KV cache). The differences between families are written down here, once:

- Llama / Mistral / Qwen2 / SmolLM2: RMSNorm pre-norm, rotary positions, grouped KV heads, gated MLP;
- OPT: learned positions with offset 2, LayerNorm before (most sizes) or after (350m) each sub-block, q scaled
  before attention, optional project_in / project_out around the stack;
- GPT-2: learned positions, fused qkv (Conv1D), optional 1/(layer+1) attention scaling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

def _qkv(q: nn.Module, k: nn.Module, v: nn.Module, fuse: bool, q_scale: float = 1.0):
    """A function h -> (q, k, v, kv) of projections, and whether q comes out already multiplied by ``q_scale``.

    With ``fuse`` and three plain ``nn.Linear`` layers, one matmul over concatenated weights: at batch 1 each matmul
    costs a kernel launch worth more than its arithmetic. Its k and v columns sit side by side, and ``kv`` is that
    (…, 2 * kv_size) slice, a view (None when not fused), which `_pair_kv` turns into the cache's layout without a
    copy. A ``q_scale`` that is a power of two is folded into the q rows of the concatenated weight and bias:
    scaling by a power of two is exact in floating point, so this gives bit for bit what scaling the projection
    afterwards gives, one kernel fewer. The concatenated weight is a copy made now; a FastDecoder lives for one
    predict run, so training never leaves it stale. LoRA or quantized layers are called as they are.
    """
    if not (fuse and all(type(m) is nn.Linear for m in (q, k, v))):
        return (lambda h: (q(h), k(h), v(h), None)), False
    fold = q_scale != 1.0 and math.frexp(q_scale)[0] == 0.5  # a power of two
    factor = q_scale if fold else 1.0
    weight = torch.cat([q.weight * factor, k.weight, v.weight])
    bias = None
    if q.bias is not None or k.bias is not None or v.bias is not None:
        biases = [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in (q, k, v)]
        bias = torch.cat([biases[0] * factor, biases[1], biases[2]])
    q_size, k_size = q.out_features, k.out_features

    def project(h: Tensor):
        out = F.linear(h, weight, bias)
        return out[..., :q_size], out[..., q_size:q_size + k_size], out[..., q_size + k_size:], out[..., q_size:]

    return project, fold


def _pair_kv(k: Tensor, v: Tensor, kv: Tensor | None, kv_heads: int) -> Tensor:
    """k and v (B, T, kv_heads * D) as one (B, T, 2, kv_heads, D) tensor, the layout of FastDecoder's cache: a view
    of ``kv`` (k's and v's columns side by side in one buffer) when there is one, else a copy."""
    if kv is not None:
        return kv.unflatten(-1, (2, kv_heads, -1))
    return torch.stack((k, v), dim=2).unflatten(-1, (kv_heads, -1))


def _mlp_relu(fc1: nn.Module, fc2: nn.Module, h: Tensor) -> Tensor | None:
    """fc2(relu(fc1(h))) with the ReLU in fc1's GEMM epilogue (one kernel fewer), for plain half-precision CUDA
    linears; None where it does not apply. fp32 keeps the separate kernels so that greedy tokens stay exactly HF's."""
    if not (type(fc1) is nn.Linear and fc1.bias is not None and h.is_cuda
            and h.dtype in (torch.float16, torch.bfloat16) and fc1.weight.dtype == h.dtype):
        return None
    hidden = torch._addmm_activation(fc1.bias, h.reshape(-1, h.shape[-1]), fc1.weight.t())
    return fc2(hidden.view(*h.shape[:-1], -1))

# `positional(positions)` returns what blocks need about positions (rotary tables or nothing);
# `attend(i, q, kv, scale)` (ours, in FastDecoder.forward) stores kv (B, T, 2, kv_heads, D) in layer i's cache and
# attends q (B, heads, T, D) over it.


class _Llama:
    """Llama, Mistral, Qwen2, SmolLM2: RMSNorm pre-norm, rotary positions, grouped KV heads, gated MLP."""

    def __init__(self, model: nn.Module, max_len: int, fuse: bool) -> None:
        cfg, self.body, self.lm_head = model.config, model.model, model.lm_head
        self.layers = list(self.body.layers)
        self.qkv = [_qkv(a.q_proj, a.k_proj, a.v_proj, fuse)[0] for a in (layer.self_attn for layer in self.layers)]
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        # The model's own rotary module computes the table, so every rope variant it knows (llama3, linear...) is
        # reproduced exactly; we only look rows up by position.
        positions = torch.arange(max_len, device=self.lm_head.weight.device)[None]
        emb = self.body.embed_tokens
        dtype = emb.weight.dtype if emb.weight.is_floating_point() else emb.dtype  # 4-bit tables store uint8
        probe = torch.empty(0, device=positions.device, dtype=dtype)
        cos, sin = self.body.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # (max_len, head_dim)

    def positional(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (B, 1, T, D) each

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        return self.body.embed_tokens(ids)

    @staticmethod
    def _rotate(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        cos, sin = rope
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def block(self, i: int, x: Tensor, rope: tuple[Tensor, Tensor], attend) -> Tensor:
        layer, B, T = self.layers[i], x.shape[0], x.shape[1]
        attn = layer.self_attn
        q, k, v, _ = self.qkv[i](layer.input_layernorm(x))  # k is rotated below: no view of k and v together
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        cos, sin = rope  # (B, 1, T, D): heads before time; k stays time before heads, the cache's layout
        k = self._rotate(k, (cos.transpose(1, 2), sin.transpose(1, 2)))
        y = attend(i, self._rotate(q.transpose(1, 2), rope), torch.stack((k, v), dim=2), self.scale)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.body.norm(x))


class _OPT:
    """OPT: learned positions (offset 2), LayerNorm before (most sizes) or after (350m) each sub-block."""

    def __init__(self, model: nn.Module, max_len: int, fuse: bool) -> None:
        cfg, self.body, self.lm_head = model.config, model.model.decoder, model.lm_head
        self.layers = list(self.body.layers)
        self.heads = self.kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.pre_norm = cfg.do_layer_norm_before
        self.scale = self.head_dim**-0.5
        # HF scales q after its projection, then attends with scale 1; a power-of-two scale is folded into q's rows
        self.qkv, self.q_scaled = zip(*(_qkv(a.q_proj, a.k_proj, a.v_proj, fuse, self.scale)
                                        for a in (layer.self_attn for layer in self.layers)))
        self.relu = isinstance(self.layers[0].activation_fn, nn.ReLU)

    def positional(self, positions: Tensor) -> None:
        return None

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        x = self.body.embed_tokens(ids)
        if self.body.project_in is not None:
            x = self.body.project_in(x)
        return x + self.body.embed_positions.weight[positions + self.body.embed_positions.offset]

    def block(self, i: int, x: Tensor, _: None, attend) -> Tensor:
        layer, B, T = self.layers[i], x.shape[0], x.shape[1]
        attn = layer.self_attn
        q, k, v, kv = self.qkv[i](layer.self_attn_layer_norm(x) if self.pre_norm else x)
        if not self.q_scaled[i]:
            q = q * self.scale  # HF scales q before attention, then attends with scale 1
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)
        x = x + attn.out_proj(attend(i, q, _pair_kv(k, v, kv, self.kv_heads), 1.0).transpose(1, 2).reshape(B, T, -1))
        if not self.pre_norm:
            x = layer.self_attn_layer_norm(x)
        h = layer.final_layer_norm(x) if self.pre_norm else x
        mlp = _mlp_relu(layer.fc1, layer.fc2, h) if self.relu else None
        x = x + (mlp if mlp is not None else layer.fc2(layer.activation_fn(layer.fc1(h))))
        return x if self.pre_norm else layer.final_layer_norm(x)

    def head(self, x: Tensor) -> Tensor:
        if self.body.final_layer_norm is not None:
            x = self.body.final_layer_norm(x)
        if self.body.project_out is not None:
            x = self.body.project_out(x)
        return self.lm_head(x)


class _GPT2:
    """GPT-2: learned positions, fused qkv projection (Conv1D), LayerNorm pre-norm."""

    def __init__(self, model: nn.Module, max_len: int, fuse: bool) -> None:  # c_attn is fused already
        cfg, self.body, self.lm_head = model.config, model.transformer, model.lm_head
        self.layers = list(self.body.h)
        self.heads = self.kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.by_layer = cfg.scale_attn_by_inverse_layer_idx

    def positional(self, positions: Tensor) -> None:
        return None

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        return self.body.wte(ids) + self.body.wpe(positions)

    def block(self, i: int, x: Tensor, _: None, attend) -> Tensor:
        layer, B, T = self.layers[i], x.shape[0], x.shape[1]
        width = x.shape[-1]
        qkv = layer.attn.c_attn(layer.ln_1(x))  # (B, T, 3 * width): q, k, v side by side
        q = qkv[..., :width].view(B, T, -1, self.head_dim).transpose(1, 2)
        kv = _pair_kv(None, None, qkv[..., width:], self.kv_heads)
        scale = self.scale / (i + 1) if self.by_layer else self.scale
        x = x + layer.attn.c_proj(attend(i, q, kv, scale).transpose(1, 2).reshape(B, T, -1))
        return x + layer.mlp(layer.ln_2(x))

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.body.ln_f(x))


ADAPTERS = {"llama": _Llama, "mistral": _Llama, "qwen2": _Llama, "opt": _OPT, "gpt2": _GPT2}


def unsupported_reason(model: nn.Module, max_len: int | None = None) -> str | None:
    """Why the fast loop cannot run this model (``None`` when it can)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA layers stay in place
    cfg = model.config
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return "the weights are sharded over devices (tensor parallel); transformers generate handles DTensors"
    if any(type(m).__name__ == "Linear8bitLt" for m in model.modules()) and model.device.type == "cuda":
        return ("bitsandbytes 8-bit layers cannot be captured in a CUDA graph (their matmul waits on the host); "
                "int8 keeps transformers generate, 4-bit modes (nf4, fp4) run the fast loop")
    if cfg.model_type not in ADAPTERS:
        return f"model type {cfg.model_type!r} has no fast-decoding adapter (supported: {', '.join(ADAPTERS)})"
    if cfg.model_type in ("mistral", "qwen2"):
        window = getattr(cfg, "sliding_window", None)
        uses_window = window is not None and getattr(cfg, "use_sliding_window", cfg.model_type == "mistral")
        if uses_window and (max_len is None or max_len > window):
            return f"sliding-window attention (window {window}) is not implemented in the fast loop"
    if cfg.model_type in ("llama", "mistral", "qwen2"):
        rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            return f"rope type {rope_type!r} depends on the sequence length"
        if getattr(cfg, "pretraining_tp", 1) != 1:
            return "pretraining_tp != 1"
    if cfg.model_type == "gpt2" and getattr(cfg, "add_cross_attention", False):
        return "GPT-2 with cross-attention"
    return None
