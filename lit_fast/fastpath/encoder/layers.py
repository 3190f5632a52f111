"""One encoder layer on tokens without padding, in two flavours.

`packed_layer` is the layer written out in plain PyTorch over a packed `(tokens, hidden)` matrix: the GEMMs only
ever see real tokens (q/k/v as one GEMM), and attention runs per sequence (a varlen kernel on CUDA in fp16/bf16 -
lit_fast's Triton kernel or flash-attention's - one SDPA call per sequence elsewhere). It computes exactly what the HF layer computes in eval mode: post-LN BERT style
`x = LN(x + attn(x)); x = LN(x + ffn(x))` or pre-LN `x = x + attn(LN(x)); x = x + ffn(LN(x))`, with the HF
activation module itself.

`fused_layer` hands the same weights to `torch._transformer_encoder_layer_fwd`, PyTorch's fused encoder-layer
kernel (the one `nn.TransformerEncoderLayer` and BetterTransformer used), which takes nested tensors. It knows only
exact GELU and ReLU, and one LayerNorm epsilon for both norms.

Both read the weights from the HF modules on every call (`LayerParts`); nothing is copied at conversion. The one
derived tensor, the q/k/v weights concatenated for a single GEMM, is remembered per layer keyed by the address and
version counter of its sources (`fused_qkv`), so training, `load_state_dict` or `.to()` between calls can never
leave a stale copy behind.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lit_fast.fastpath.encoder import kernels
from lit_fast.fastpath.encoder.padding import Packing
from lit_fast.fastpath.options import FastPathOptions

try:  # flash-attention over packed sequences; torch >= 2.10 with CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

VARLEN_DTYPES = (torch.float16, torch.bfloat16)

QKV_CACHE = "_lit_fast_qkv"  # the attribute of the query module that remembers the q/k/v concatenation
ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# CPU attention: one padded SDPA call while it computes at most this many times the scores the sequences need
PADDED_ATTENTION_WASTE = 2.0

# The fused kernel only takes the strided nested layout, which PyTorch flags as "prototype" on first use; the
# layout is internal to one forward here and never reaches the user, so the warning would only be noise.
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")


class LayerParts(NamedTuple):
    """The HF modules one encoder layer is made of, resolved by an adapter's `LayerMap` at call time."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    out: nn.Linear
    attn_norm: nn.LayerNorm
    ffn_in: nn.Linear
    activation: Callable[[torch.Tensor], torch.Tensor]
    ffn_out: nn.Linear
    ffn_norm: nn.LayerNorm
    num_heads: int
    norm_first: bool  # pre-LN (ViT, mBART, wav2vec2 "stable") instead of post-LN (BERT)
    exact_gelu: bool  # the activation is erf GELU (HF "gelu"), which the CPU GEMM can apply in its epilogue


def packed_layer(x: torch.Tensor, parts: LayerParts, packing: Packing, options: FastPathOptions,
                 qkv: torch.Tensor | None = None) -> torch.Tensor:
    """One encoder layer over packed tokens `x` (tokens, hidden) -> (tokens, hidden). `qkv`: the q/k/v projection of
    `x` computed already (post-LN layers; the front's CUDA graph queues it before the host knows the token count)."""
    if parts.norm_first:
        x = x + self_attention(parts.attn_norm(x), parts, packing, options)
        return x + feed_forward(parts.ffn_norm(x), parts, options.onednn)
    x = add_norm(x, self_attention(x, parts, packing, options, qkv), parts.attn_norm, options.add_norm_kernel)
    return add_norm(x, feed_forward(x, parts, options.onednn), parts.ffn_norm, options.add_norm_kernel)


def add_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm, kernel: bool = True) -> torch.Tensor:
    """LayerNorm(x + y), the post-LN residual step (one fused kernel on CUDA where `kernel`, see kernels.py). The
    GEMM's product `y` is rounded to fp16/bf16 and the sum is formed in fp32 inside the kernel (a variant that let
    the GEMM add into `x` in place doubled the error: docs/MEASUREMENTS.md)."""
    return kernels.add_layer_norm(x, y, norm, kernel)


def self_attention(x: torch.Tensor, parts: LayerParts, packing: Packing, options: FastPathOptions,
                   qkv: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head self-attention of every sequence with itself; (tokens, hidden) -> (tokens, hidden). `qkv`: `x`'s
    fused q/k/v projection when it was computed ahead (see `packed_layer`)."""
    heads, onednn = parts.num_heads, options.onednn
    if qkv is not None or (options.fuse_qkv and not torch.is_grad_enabled()):
        if qkv is None:
            qkv = matmul(x, *fused_qkv(parts), onednn=onednn)
        q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(1)
    else:
        q = linear(x, parts.query, onednn).unflatten(-1, (heads, -1))
        k = linear(x, parts.key, onednn).unflatten(-1, (heads, -1))
        v = linear(x, parts.value, onednn).unflatten(-1, (heads, -1))
    return linear(attend(q, k, v, packing, options.attention).flatten(-2), parts.out, onednn)


def fused_qkv(parts: LayerParts) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The q/k/v weights (and biases) concatenated, so that one GEMM computes all three projections.

    One GEMM three times as wide keeps the GPU busier than three (fewer launches, fewer partial waves). The
    concatenation is remembered on the query module, keyed by the address and the version counter of every
    source tensor: any in-place update (an optimizer step, `load_state_dict`, `copy_`) bumps a version and `.to()`
    moves an address, so a stale copy is never used. Tensors without a version counter (made under
    `torch.inference_mode`) are concatenated on every call.
    """
    modules = (parts.query, parts.key, parts.value)
    key = qkv_key(parts)
    cached = parts.query.__dict__.get(QKV_CACHE)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1], cached[2]
    weight = torch.cat([m.weight for m in modules])
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])
    if key is not None:
        parts.query.__dict__[QKV_CACHE] = (key, weight, bias)  # a plain attribute: not a parameter or buffer
    return weight, bias


def qkv_key(parts: LayerParts) -> tuple | None:
    """The address and version counter of every q/k/v weight and bias: what their concatenation is valid for. None
    for tensors made under `torch.inference_mode`, which track no versions (they are concatenated on every call)."""
    modules = (parts.query, parts.key, parts.value)
    sources = [m.weight for m in modules] + [m.bias for m in modules if m.bias is not None]
    try:
        return tuple((t.data_ptr(), t._version) for t in sources)
    except RuntimeError:  # inference tensors track no versions
        return None


def drop_fused_qkv(module: nn.Module) -> None:
    """Forget every remembered q/k/v concatenation under `module` (revert_fast_path)."""
    for sub in module.modules():
        sub.__dict__.pop(QKV_CACHE, None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, kernel: str = "auto") -> torch.Tensor:
    """Softmax attention within each packed sequence; q, k, v and the result are (tokens, heads, head_dim).
    `kernel` (CUDA fp16/bf16): "auto", "triton" or "flash" (FastPathOptions.attention)."""
    if varlen_attn is not None and q.is_cuda and q.dtype in VARLEN_DTYPES:
        cu, longest = packing.cu_seqlens, packing.max_len
        triton_ok = kernels.varlen_attention_fits(q)
        if (kernel == "triton" and triton_ok) or (
                kernel == "auto" and triton_ok and q.shape[-1] in kernels.ATTN_MEASURED_HEAD_DIMS):
            return kernels.varlen_attention(q, k, v, cu, longest)
        return varlen_attn(q, k, v, cu, cu, longest, longest)
    # Elsewhere (CPU, fp32): SDPA's fused CPU kernel. Sequences of similar lengths (predict sorts batches by length)
    # go in one call over a right-padded grid whose mask keeps every sequence to itself; very uneven ones in one call
    # per sequence, which spends nothing on padding but starts a parallel region for each.
    lengths = packing.lengths
    longest = max(lengths, default=0)
    if len(lengths) > 1 and len(lengths) * longest * longest <= PADDED_ATTENTION_WASTE * sum(n * n for n in lengths):
        return _attend_padded(q, k, v, lengths, longest)
    out = torch.empty_like(q)
    start = 0
    for length in packing.lengths:
        span = slice(start, start + length)
        q_s, k_s, v_s = (t[span].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, length, head_dim)
        out[span] = F.scaled_dot_product_attention(q_s, k_s, v_s)[0].transpose(0, 1)
        start += length
    return out


def _attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...], longest: int
                   ) -> torch.Tensor:
    """`attend` for the CPU in one SDPA call: the packed tokens placed in a (sequences, longest) grid, padded keys
    masked out, the real rows taken back in packed order."""
    heads, dim = q.shape[1:]
    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # (sequences, longest)
    where = valid.reshape(-1).nonzero().squeeze(1)  # row-major: the packed order

    def grid(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(len(lengths) * longest, heads, dim)
        out[where] = t
        return out.view(len(lengths), longest, heads, dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), attn_mask=valid[:, None, None, :])
    return out.transpose(1, 2).reshape(-1, heads, dim)[where]


def feed_forward(x: torch.Tensor, parts: LayerParts, onednn: bool = True) -> torch.Tensor:
    """The position-wise MLP; (tokens, hidden) -> (tokens, hidden)."""
    if parts.exact_gelu:
        hidden = linear(x, parts.ffn_in, onednn, gelu=True)
    else:
        hidden = parts.activation(linear(x, parts.ffn_in, onednn))
    return linear(hidden, parts.ffn_out, onednn)


def linear(x: torch.Tensor, layer: nn.Linear, onednn: bool = True, gelu: bool = False) -> torch.Tensor:
    """`x @ W.T + b` with the layer's current weights (no pre-packed copy to go stale), then GELU when `gelu`."""
    return matmul(x, layer.weight, layer.bias, gelu, onednn)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False,
           onednn: bool = True) -> torch.Tensor:
    """`x @ weight.T + bias` (then GELU when `gelu`) on the fastest kernel for the device.

    CPU fp32 (`onednn`): oneDNN's linear, which outran MKL's sgemm on the 2-core machine and applies the exact GELU
    inside the GEMM; its row count is rounded up to a bucket (`_row_bucket`). CUDA fp16/bf16: the GELU is cuBLASLt's GEMM epilogue, the tanh form, within half an fp16 step
    of the exact GELU, and it saves a pass over the widest activation (both measured: docs/MEASUREMENTS.md).
    """
    if onednn and _onednn_fits(x):
        rows = x.shape[0]
        bucket = _row_bucket(rows) if x.dim() == 2 else rows
        if bucket != rows:  # oneDNN keeps state for every row count it sees: a few buckets keep its memory flat
            x = _pad_rows(x, bucket)
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
        return y[:rows] if bucket != rows else y
    if gelu and x.is_cuda and x.dtype in VARLEN_DTYPES and bias is not None and not torch.is_grad_enabled():
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def matmul_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """`out = x @ weight.T + bias` written into `out` (contiguous rows of a larger buffer) instead of a new tensor.
    On CUDA this runs the same cuBLASLt kernel, bias in its epilogue, as `F.linear` (bit-identical results)."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with zero rows appended up to `rows`. Only the new rows are zeroed: `F.pad` fills the whole output before
    copying `x` in, which cost 7% of the CPU predict loop (docs/MEASUREMENTS.md, W8)."""
    out = x.new_empty(rows, x.shape[1])
    out[: x.shape[0]].copy_(x)
    out[x.shape[0]:].zero_()
    return out


def _row_bucket(rows: int) -> int:
    """`rows` rounded up to one of 8 steps per power of two (at least 16): at most 12.5% more rows, and a bounded
    number of shapes whatever the batches (docs/MEASUREMENTS.md, "W6: memory")."""
    step = max(16, (1 << (max(rows, 1).bit_length() - 1)) // 8)
    return -(-rows // step) * step


def _onednn_fits(x: torch.Tensor) -> bool:
    """oneDNN's fp32 linear applies: CPU, fp32, no autocast (which it would ignore), no autograd (it has none)."""
    return (
        ONEDNN_AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def fused_layer(x: torch.Tensor, parts: LayerParts, use_gelu: bool) -> torch.Tensor:
    """One encoder layer through PyTorch's fused kernel; `x` is nested (padding removed) or dense (no padding)."""
    q = parts.query
    qkv_weight, qkv_bias = fused_qkv(parts)
    if qkv_bias is None:  # the fused kernel always adds one
        qkv_bias = qkv_weight.new_zeros(qkv_weight.shape[0])
    return torch._transformer_encoder_layer_fwd(
        x,
        q.in_features,
        parts.num_heads,
        qkv_weight,
        qkv_bias,
        parts.out.weight,
        _bias(parts.out),
        use_gelu,
        parts.norm_first,
        parts.attn_norm.eps,
        parts.attn_norm.weight,
        parts.attn_norm.bias,
        parts.ffn_norm.weight,
        parts.ffn_norm.bias,
        parts.ffn_in.weight,
        _bias(parts.ffn_in),
        parts.ffn_out.weight,
        _bias(parts.ffn_out),
        None,  # no mask: padding is already gone (nested) or there is none (dense)
        None,
    )


def _bias(linear: nn.Linear) -> torch.Tensor:
    """The linear's bias, or zeros where it has none (the fused kernel always adds one)."""
    if linear.bias is not None:
        return linear.bias
    return linear.weight.new_zeros(linear.out_features)
