"""Which fast-path backend runs where, from measurements, and which models the fused kernel can take.

`auto` is a table, not a guess: each entry comes from the benchmarks in bench/ (W1 on the H100 and H200 for CUDA,
W6 on the 2-core CPU), re-measured whenever the layers change. The rule the table keeps is "never slower than HF
SDPA on the batch at hand": where a backend did not beat HF on batches with little or no padding, such batches
are left to HF.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_fast.errors import UnsupportedModelError
from lit_fast.fastpath.adapters import Adapter
from lit_fast.fastpath.layers import VARLEN_DTYPES, LayerParts, varlen_attn

BACKENDS = ("auto", "fused", "packed")

# The fused kernel implements these activations exactly (`use_gelu` switches between them).
FUSED_ACTIVATIONS = ("gelu", "relu")

# Measured winners per device (bench/results/w1_h100.json, w1_h200_e189a9f.json, bench/results/w6_cpu*.json).
#  - CUDA fp16/bf16: packed tokens, one q/k/v GEMM, varlen attention (Triton or flash), Triton residual+LayerNorm:
#    H100 2.07-2.10x HF sdpa at W1's 43% padding, 3.8-4.0x at 75%, 1.12-1.17x with no padding at all (the fused
#    GEMM and kernels pay there too); H200 (with the front and row plan) 2.17x, 4.0-4.5x, 1.08-1.11x; the fused
#    kernel over nested tensors 1.1-2.5x (bf16 nested is erratic).
#  - CUDA fp32: HF. Varlen flash attention has no fp32 kernel; the fused kernel was 1.65x faster at 43% padding
#    but 1.3e-3 off (its fp32 attention is not IEEE-exact there, likely TF32) and no faster without padding.
#  - CPU fp32: packed tokens, oneDNN GEMMs, one SDPA call per sequence: 1.9-3.5x at 47% padding and 1.9x with
#    none; the fused kernel 0.46-1.28x (its many small parallel regions fall apart when the two cores are shared).
CPU_BACKEND = "packed"

# The least padding at which `auto` runs a backend instead of HF, per device type and layer layout ("post": BERT
# style post-LN, "pre": pre-LN). Packed post-LN layers (one fused residual+LayerNorm kernel) are faster than HF
# SDPA without any padding on the H100 (W1 shape, pad0, two runs: 1.12-1.16x bf16, 1.17x fp16), so they
# always run; pre-LN layers keep PyTorch's separate add and norm and were not measured without padding, so below
# 5% padding they stay with HF. On the CPU packed always runs.
MIN_PADDING = {
    ("cuda", "packed", "post"): 0.0,
    ("cuda", "packed", "pre"): 0.05,
    ("cpu", "packed", "post"): 0.0,
    ("cpu", "packed", "pre"): 0.0,
    ("cpu", "fused", "post"): 0.0,
    ("cpu", "fused", "pre"): 0.0,
}


def resolve(requested: str, device: torch.device, dtype: torch.dtype, fused_ok: bool) -> str | None:
    """The backend to run for this device and compute dtype; None means HF's own forward is the better choice."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "packed" if dtype in VARLEN_DTYPES and varlen_attn is not None else None
    if device.type == "cpu":
        return CPU_BACKEND if (CPU_BACKEND != "fused" or fused_ok) else "packed"
    return None  # other accelerators: not measured, HF keeps running


def pays_off(backend: str, device: torch.device, padding_fraction: float, norm_first: bool = False) -> bool:
    """Whether `auto` should run `backend` on a batch with this much padding rather than HF."""
    threshold = MIN_PADDING.get((device.type, backend, "pre" if norm_first else "post"))
    return threshold is not None and padding_fraction >= threshold


def describe(backend: str | None, device: torch.device, dtype: torch.dtype, cuda_graphs: bool | str = "auto") -> str:
    """One line on why `backend` runs for this device and dtype, with `to_fast_path`'s `cuda_graphs` (for the
    LightningModule's log)."""
    where = f"{device.type}/{str(dtype).removeprefix('torch.')}"
    if backend == "packed":
        varlen = device.type == "cuda" and dtype in VARLEN_DTYPES and varlen_attn is not None
        attention = ("varlen attention (lit_fast's Triton kernel for head sizes 32/64/128, else flash)" if varlen
                     else "one SDPA call per sequence")
        graphs = ""
        if varlen and cuda_graphs:  # graphs replay the varlen path only
            graphs = ("; CUDA graphs for every batch" if cuda_graphs is True
                      else "; CUDA graphs for repeated batches of up to 16k real tokens")
        return f"packed tokens with {attention} on {where}: padding removed once, GEMMs on real tokens only{graphs}"
    if backend == "fused":
        return f"PyTorch's fused encoder-layer kernel over nested tensors on {where}: padding removed once"
    return f"HF forward on {where}: no fast-path backend was measured faster here"


def fused_unsupported(config, adapter: Adapter, parts: LayerParts) -> str | None:
    """Why the fused kernel cannot reproduce this model's layers exactly, or None when it can."""
    activation = getattr(config, adapter.activation, None)
    if activation not in FUSED_ACTIVATIONS:
        return f"its activation {activation!r} is not one of the fused kernel's {FUSED_ACTIVATIONS}"
    if parts.attn_norm.eps != parts.ffn_norm.eps:
        return "its two LayerNorms use different eps and the fused kernel takes one"
    return None


def unsupported_module(layer: nn.Module, path: str, module: nn.Module, expected: type) -> UnsupportedModelError:
    """The error for a layer part that is not the plain torch module the fast path reads weights from."""
    kind = type(module).__name__
    if "4bit" in kind or "8bit" in kind or "Quant" in kind:
        what = "quantized weights"
        fix = "Quantized models keep running HF SDPA: load them with fast_path: off (or without quantization)."
    else:
        what = "a wrapped or replaced module (a LoRA adapter, say)"
        fix = "Merge adapters first (peft: model.merge_and_unload()), or keep HF SDPA with fast_path: off."
    return UnsupportedModelError(
        f"The fast path reads plain {expected.__name__} weights, but {type(layer).__name__}.{path} is {kind} "
        f"({what}). {fix}"
    )
