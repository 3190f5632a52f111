"""Which fast-path backend runs where, and which models the fused kernel can take.

`auto` is a table, not a guess: each entry is what measured fastest (docs/MEASUREMENTS.md), re-measured whenever the
layers change. The rule the table keeps is "never slower than HF SDPA on the batch at hand": where a backend did not
beat HF on batches with little or no padding, such batches are left to HF.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_fast.errors import UnsupportedModelError
from lit_fast.fastpath.encoder.adapters import Adapter
from lit_fast.fastpath.encoder.layers import VARLEN_DTYPES, LayerParts, varlen_attn

BACKENDS = ("auto", "fused", "packed")

# The fused kernel implements these activations exactly (`use_gelu` switches between them).
FUSED_ACTIVATIONS = ("gelu", "relu")

# The winners (docs/MEASUREMENTS.md, "Fast path" and "W6"):
#  - CUDA fp16/bf16: packed tokens, one q/k/v GEMM, varlen attention, the Triton residual+LayerNorm - faster than HF
#    SDPA at every padding level measured, no padding included.
#  - CUDA fp32: HF. Varlen flash attention has no fp32 kernel, and the fused kernel is not IEEE-exact there.
#  - CPU fp32: packed tokens, oneDNN GEMMs, one SDPA call per sequence (the fused kernel's many small parallel
#    regions fell apart when the two cores were shared).
CPU_BACKEND = "packed"

# The least padding at which `auto` runs a backend instead of HF, per device type and layer layout ("post": BERT
# style post-LN, "pre": pre-LN). Packed post-LN layers (one fused residual+LayerNorm kernel) beat HF SDPA even
# without padding, so they always run; pre-LN layers keep PyTorch's separate add and norm and were not measured
# without padding, so below 5% padding they stay with HF. On the CPU packed always runs.
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


def quantized_refusal(model: nn.Module) -> str | None:
    """Why a quantized model cannot take the fast path (models/quantization.py says it for every route), or None."""
    from lit_fast.models.quantization import fast_path_refusal

    return fast_path_refusal(model=model)


def unsupported_module(layer: nn.Module, path: str, module: nn.Module, expected: type) -> UnsupportedModelError:
    """The error for a layer part that is not the plain torch module the fast path reads weights from."""
    from lit_fast.models.quantization import fast_path_refusal

    kind = type(module).__name__
    refusal = fast_path_refusal(module=module)
    if refusal is None:
        refusal = ("it is a wrapped or replaced module (a LoRA adapter, say): merge adapters first (peft: "
                   "model.merge_and_unload()), or keep HF SDPA with fast_path: off")
    return UnsupportedModelError(
        f"The fast path reads plain {expected.__name__} weights, but {type(layer).__name__}.{path} is {kind}: {refusal}."
    )
