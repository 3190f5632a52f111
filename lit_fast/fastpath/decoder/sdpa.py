"""Attention policy: which attention implementation a model uses, and which SDPA kernels it may run.

Two settings, both plain strings in a config:

- ``attention``: ``"sdpa"`` (PyTorch's ``scaled_dot_product_attention``, the default), ``"flash_attention_2"``
  (the optional ``flash-attn`` package) or ``"eager"`` (transformers' reference matmul/softmax code);
- ``sdpa_backends``: the SDPA kernels allowed, any of ``flash``, ``efficient``, ``cudnn``, ``math``. ``None``
  lets PyTorch choose among all of them.

The kernels are restricted with ``torch.nn.attention.sdpa_kernel`` (the deprecated
``torch.backends.cuda.sdp_kernel`` is never used). When none of the allowed kernels can run the model's attention
(for example fp32 with only ``flash`` allowed, a head dimension flash does not take, a padding mask with only
``flash`` allowed, or a CPU with only ``efficient``/``cudnn``), :func:`check_sdpa_backends` says which constraint
each allowed kernel breaks and what to change, or - with ``strict=False`` - adds ``math`` (which always works)
with a warning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lit_fast.errors import ConfigError

log = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")

# Config names -> PyTorch's enum. Order is the order of preference when several are allowed.
SDPA_BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}

FLASH_ATTN_INSTALL_HINT = (
    "install it with `pip install flash-attn --no-build-isolation` (needs a CUDA GPU of compute capability >= 8.0, "
    "fp16/bf16 weights and a CUDA toolkit matching your PyTorch), or use attention: sdpa, which needs no extra "
    "package and uses the same kind of fused kernel through PyTorch"
)


def check_attention_implementation(name: str) -> str:
    """Validate an ``attention`` setting and return it.

    Raises:
        ConfigError: unknown name, or ``flash_attention_2`` without the ``flash_attn`` package installed.
    """
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"attention: {name!r} is not known; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)} "
            "(sdpa is the default and the fastest choice without extra packages)"
        )
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(f"attention: flash_attention_2 needs the optional package flash-attn, which is not installed; "
                          f"{FLASH_ATTN_INSTALL_HINT}")
    return name


def parse_sdpa_backends(names: Sequence[str] | None) -> list[str] | None:
    """Validate ``sdpa_backends`` (config names); ``None`` or an empty list means "let PyTorch choose"."""
    if not names:
        return None
    if isinstance(names, str):  # a YAML scalar instead of a list: be kind
        names = [names]
    unknown = [n for n in names if n not in SDPA_BACKENDS]
    if unknown:
        raise ConfigError(
            f"sdpa_backends: {unknown} not known; allowed names are {', '.join(SDPA_BACKENDS)} "
            "(for example sdpa_backends: [flash, efficient, math])"
        )
    return list(dict.fromkeys(names))  # drop duplicates, keep order


def why_not(
    backend: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    has_mask: bool,
) -> str | None:
    """The documented constraint that stops one SDPA kernel, or ``None`` when it should run.

    These mirror the checks in PyTorch's ``sdp_utils`` for the common cases, so that an error can say *why*
    in words a user can act on; the final word is always a real probe call (see :func:`check_sdpa_backends`).
    """
    device = torch.device(device)
    half = dtype in (torch.float16, torch.bfloat16)
    if backend == "math":
        return None
    if device.type == "cpu":
        if backend == "flash":  # PyTorch's CPU flash kernel: any float dtype, masks allowed
            return None
        return f"the {backend} kernel exists only on CUDA GPUs, and this model runs on the CPU"
    if device.type != "cuda":
        return f"the {backend} kernel needs a CUDA device, and this model runs on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if backend == "flash":
        if not half:
            return f"flash takes only fp16/bf16 inputs, and the model runs in {dtype}"
        if has_mask:
            return "flash takes no padding/arbitrary attention mask (only a causal one), and this batch has one"
        if head_dim > 256 or head_dim % 8:
            return f"flash needs a head dimension <= 256 and divisible by 8, and this model's is {head_dim}"
        if major < 8:
            return f"flash needs a GPU of compute capability >= 8.0, and this one is {major}.{minor}"
    if backend == "efficient":
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"efficient takes fp16/bf16/fp32, and the model runs in {dtype}"
        if head_dim % 8 and half:
            return f"efficient needs a head dimension divisible by 8 in fp16/bf16, and this model's is {head_dim}"
    if backend == "cudnn":
        if not half:
            return f"cudnn takes only fp16/bf16 inputs, and the model runs in {dtype}"
        if major < 8:
            return f"cudnn attention needs a GPU of compute capability >= 8.0, and this one is {major}.{minor}"
        if head_dim > 128 or head_dim % 8:
            return f"cudnn needs a head dimension <= 128 and divisible by 8, and this model's is {head_dim}"
    return None


def _probe(backends: list[str], device: torch.device, dtype: torch.dtype, head_dim: int, has_mask: bool) -> str | None:
    """Run one tiny SDPA call under the allowed kernels; return PyTorch's complaint or ``None`` if it ran."""
    q = torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype)
    mask = torch.ones(16, 16, device=device, dtype=torch.bool).tril() if has_mask else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # PyTorch explains each kernel it skipped in a UserWarning
        try:
            with sdpa_kernel([SDPA_BACKENDS[b] for b in backends]):
                F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=not has_mask)
        except RuntimeError as err:
            details = "; ".join(str(w.message).strip() for w in caught)
            return f"{err}" + (f" ({details})" if details else "")
    return None


def check_sdpa_backends(
    backends: Sequence[str] | None,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    has_mask: bool = True,
    strict: bool = True,
) -> list[str] | None:
    """Check that at least one allowed SDPA kernel can run this attention; return the backends to use.

    ``has_mask=True`` (the default) checks the padded-batch case: training and batched generation with padding
    pass an attention mask, which the flash kernel cannot take.

    Raises:
        ConfigError: no allowed kernel fits and ``strict`` is true; the message lists each kernel's reason and
            what to change. With ``strict=False`` the ``math`` kernel is added instead, with a warning.
    """
    names = parse_sdpa_backends(backends)
    if names is None:
        return None
    device = torch.device(device)
    reasons = {b: why_not(b, device=device, dtype=dtype, head_dim=head_dim, has_mask=has_mask) for b in names}
    failure = None
    if all(reasons.values()):
        failure = "; ".join(f"{b}: {r}" for b, r in reasons.items())
    else:
        complaint = _probe(names, device, dtype, head_dim, has_mask)
        if complaint is not None:
            failure = f"PyTorch found no kernel: {complaint}"
    if failure is None:
        return names
    where = f"device {device}, dtype {str(dtype).removeprefix('torch.')}, head_dim {head_dim}, " + (
        "with a padding mask" if has_mask else "causal, no padding mask")
    if strict:
        raise ConfigError(
            f"sdpa_backends: {names} - none of these SDPA kernels can run this model's attention ({where}). "
            f"{failure}. What to change: add 'efficient' or 'math' to sdpa_backends (math always works, slowest), "
            "or run in bf16/fp16 on a GPU for flash/cudnn, or set attention_strict: false to fall back to math "
            "with a warning"
        )
    log.warning("sdpa_backends %s cannot run this attention (%s): %s. Falling back to adding 'math' "
                "(attention_strict is false).", names, where, failure)
    return names + ["math"]


@contextlib.contextmanager
def sdpa_policy(backends: Sequence[str] | None) -> Iterator[None]:
    """Context manager: restrict SDPA to the given kernels (config names); ``None`` leaves PyTorch's choice.

    The list order is also the priority order (``set_priority=True``), so ``[cudnn, flash]`` prefers cudnn.
    """
    names = parse_sdpa_backends(backends)
    if names is None:
        yield
        return
    with sdpa_kernel([SDPA_BACKENDS[b] for b in names], set_priority=True):
        yield
