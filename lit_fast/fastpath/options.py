"""How the encoder fast path runs: one frozen object, passed to `to_fast_path` and kept on the converted model."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal, Union

from lit_fast.errors import ConfigError

Backend = Literal["auto", "fused", "packed"]
CudaGraphs = Union[bool, Literal["auto"]]
AttentionKernel = Literal["auto", "triton", "flash"]


@dataclass(frozen=True)
class FastPathOptions:
    """The first two fields are a user's choices (the config keys `model.fast_path` and `model.cuda_graphs`). Each
    field after them turns one optimisation off, so that a benchmark can measure what it contributes; the outputs
    are the same either way (docs/FAST_PATH.md describes each)."""

    backend: Backend = "auto"
    """"auto": per device and dtype what measured fastest (HF where nothing beats it); "packed": packed tokens and
    varlen attention; "fused": PyTorch's fused encoder-layer kernel over nested tensors."""
    cuda_graphs: CudaGraphs = "auto"
    """Replay the packed layers on CUDA in fp16/bf16 as CUDA graphs: "auto" for small batches whose shape repeats,
    True for every batch, False never."""

    front: bool = True
    """Plan the packing before the embeddings and run the base model's steps on packed tokens (front.py)."""
    row_plan: bool = True
    """On CUDA, plan rows whose tokens are one run each in one kernel and one wait (rows.py)."""
    qkv_ahead: bool = True
    """Queue the first layer's q/k/v GEMM in the front's CUDA graph, before the host knows the token count."""
    fuse_qkv: bool = True
    """q, k and v as one GEMM over concatenated weights."""
    add_norm_kernel: bool = True
    """LayerNorm(x + y) as one Triton kernel on CUDA."""
    embed_kernel: bool = True
    """The embeddings' gathers, sum and LayerNorm as one Triton kernel on CUDA."""
    attention: AttentionKernel = "auto"
    """Varlen attention on CUDA: lit_fast's Triton kernel for the head sizes it was measured faster on ("auto"),
    wherever it fits ("triton"), or PyTorch's flash kernel ("flash")."""
    onednn: bool = True
    """oneDNN's linear (with its fused GELU) for CPU fp32 GEMMs."""

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "fused", "packed"):
            raise ConfigError(f"fast-path backend {self.backend!r} is unknown; use auto, fused or packed")
        if not (isinstance(self.cuda_graphs, bool) or self.cuda_graphs == "auto"):
            raise ConfigError(f"cuda_graphs={self.cuda_graphs!r} is unknown; use True, False or 'auto'")
        if self.attention not in ("auto", "triton", "flash"):
            raise ConfigError(f"attention kernel {self.attention!r} is unknown; use auto, triton or flash")

    def with_changes(self, **changes) -> "FastPathOptions":
        """A copy with these fields changed (unknown names are an error)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown fast-path option(s) {unknown}; the options are {sorted(known)}")
        return replace(self, **changes)
