"""Hand-written GPU kernels of the packed path (Triton), each with the plain PyTorch expression it replaces.

`add_layer_norm(x, y, norm)` is `LayerNorm(x + y)`, the post-LN residual step of BERT-style layers, as one pass
over memory: it reads `x` and `y` once and writes the result once, where PyTorch runs two kernels (the add writes
the sum, the norm reads it back). On W1 (18.7k tokens x 768, 24 residual steps) that is a third of the bytes of
those steps. The sum and the statistics are computed in fp32 from the fp16/bf16 inputs, so the result is at least
as close to an fp32 reference as PyTorch's (which rounds the sum to the input dtype first).

Triton is optional: without it (CPU-only installs, other accelerators) or for inputs the kernel does not take,
the PyTorch expression runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only environments
    triton = None

TRITON_ADD_NORM = True  # a switch for benchmarks (bench/w1_encoder.py --explore); leave it on
MAX_WIDTH = 8192  # one row per program; wider rows go to PyTorch
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """`norm(x + y)` for `(tokens, hidden)` matrices; one fused kernel where it applies."""
    if _kernel_fits(x, y, norm):
        return _add_layer_norm_triton(x, y, norm.weight, norm.bias, norm.eps)
    return F.layer_norm(x + y, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _kernel_fits(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm) -> bool:
    return (
        TRITON_ADD_NORM
        and triton is not None
        and x.is_cuda
        and x.dtype in KERNEL_DTYPES
        and x.dtype == y.dtype
        and x.dim() == 2
        and x.shape == y.shape
        and x.stride(-1) == 1
        and y.stride(-1) == 1
        and x.shape[-1] <= MAX_WIDTH
        and norm.weight is not None
        and norm.bias is not None
        and norm.weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or norm.weight.requires_grad))
    )


def _add_layer_norm_triton(x, y, weight, bias, eps: float) -> torch.Tensor:
    rows, width = x.shape
    out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block = triton.next_power_of_2(width)
    warps = min(max(block // 256, 1), 8)
    _add_layer_norm_kernel[(rows,)](
        x, y, weight, bias, out, x.stride(0), y.stride(0), out.stride(0), width, eps, BLOCK=block, num_warps=warps
    )
    return out


if triton is not None:

    @triton.jit
    def _add_layer_norm_kernel(X, Y, W, B, Out, stride_x, stride_y, stride_out, width, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        h = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
        h += tl.load(Y + row * stride_y + cols, mask=inside, other=0.0).to(tl.float32)
        mean = tl.sum(h, axis=0) / width
        centred = tl.where(inside, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / width + eps)
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(Out + row * stride_out + cols, (centred * rstd * w + b).to(Out.dtype.element_ty), mask=inside)
