"""Converting a Hugging Face model to the encoder fast path and back.

`to_fast_path` checks everything first (architecture, quantization, layer modules, backend) and only then
installs a `FastStack` as the `forward` of each encoder stack, so a refused model is left untouched. The weights
are never copied or renamed: `save_pretrained` on a converted model writes the normal HF format.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lit_fast.errors import ConfigError, UnsupportedModelError
from lit_fast.fastpath import policy
from lit_fast.fastpath.adapters import ADAPTERS, Adapter, adapter_for, unsupported_feature
from lit_fast.fastpath.layers import drop_fused_qkv
from lit_fast.fastpath.front import FastEmbeddings, FastFront
from lit_fast.fastpath.stack import FastStack

log = logging.getLogger(__name__)

INSTALLED = (FastStack, FastFront, FastEmbeddings)  # what to_fast_path sets as an instance `forward`


def fast_path_architectures() -> list[str]:
    """The `config.model_type`s the fast path converts."""
    return sorted(ADAPTERS)


def to_fast_path(model: nn.Module, backend: str = "auto", *, cuda_graphs: bool | str = "auto") -> nn.Module:
    """Convert `model` in place to the encoder fast path and return it.

    backend: "auto" (per device and dtype, what measured fastest; HF where nothing beats it), "fused" (PyTorch's
    fused encoder-layer kernel over nested tensors) or "packed" (packed tokens, varlen attention on CUDA).
    Raises UnsupportedModelError for architectures without an adapter and for quantized or adapter-wrapped
    layers, ConfigError for an unknown backend or a "fused" request the kernel cannot serve exactly.
    cuda_graphs: replay the packed layers on CUDA in fp16/bf16 as CUDA graphs (one capture per batch-shape
    bucket): "auto" for small batches whose shape repeats (where the host, not the GPU, is the limit), True for
    every batch, False never; see graphs.py.
    """
    if backend not in policy.BACKENDS:
        raise ConfigError(f"fast-path backend {backend!r} is unknown; use one of {policy.BACKENDS}.")
    if not (isinstance(cuda_graphs, bool) or cuda_graphs == "auto"):
        raise ConfigError(f"cuda_graphs={cuda_graphs!r} is unknown; use True, False or 'auto'.")
    stacks = _plan(model, backend, cuda_graphs)
    revert_fast_path(model)  # converting again switches the backend
    for stack in stacks:
        stack.owner.forward = stack
    _install_front(model, stacks)
    log.debug("fast path (%s) installed on %d module(s) of %s", backend, len(stacks), type(model).__name__)
    return model


def revert_fast_path(model: nn.Module) -> nn.Module:
    """Give `model` back its HF forwards (the weights never left); a model that is not converted is returned as is."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), INSTALLED):
            del module.forward
    drop_fused_qkv(model)
    return model


def is_fast_path(model: nn.Module) -> bool:
    """Whether `model` has fast-path stacks installed."""
    return any(isinstance(module.__dict__.get("forward"), FastStack) for module in model.modules())


def choose_backend(
    model: nn.Module, requested: str, device: torch.device | str, dtype: torch.dtype, cuda_graphs: bool | str = "auto"
) -> tuple[str | None, str]:
    """Which fast-path backend would run for this model, device and compute dtype, and why (for a log line).

    `requested` is "auto", "fused", "packed" or "off"; `dtype` is the dtype the layers compute in (the autocast
    dtype under mixed precision); `cuda_graphs` is what `to_fast_path` will be given (it only shapes the reason).
    Returns (None, reason) when HF's own forward runs instead: with "off", and with
    "auto" for a model the fast path cannot take. An explicit "fused" or "packed" request for such a model raises
    (UnsupportedModelError / ConfigError), since the user asked for something that cannot happen.
    """
    device = torch.device(device)
    if requested == "off":
        return None, "fast_path=off: HF forward"
    if requested not in policy.BACKENDS:
        raise ConfigError(f"fast_path {requested!r} is unknown; use one of {policy.BACKENDS + ('off',)}.")
    try:
        stacks = _plan(model, requested)
    except (UnsupportedModelError, ConfigError) as refusal:
        if requested != "auto":
            raise
        return None, f"HF forward: {refusal}"
    backend = policy.resolve(requested, device, dtype, stacks[0].fused_ok)
    return backend, policy.describe(backend, device, dtype, cuda_graphs)


def _plan(model: nn.Module, backend: str, cuda_graphs: bool | str = "auto") -> list[FastStack]:
    """Check the model and build (not install) its fast stacks; raises when the model cannot be converted."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    adapter = adapter_for(config) if config is not None else None
    if adapter is None:
        raise UnsupportedModelError(
            f"The fast path has no adapter for model type {model_type!r} ({type(model).__name__}). Supported: "
            f"{', '.join(fast_path_architectures())}. Run this model as it is (HF SDPA; fast_path: off)."
        )
    feature = unsupported_feature(config)
    if feature is not None:
        raise UnsupportedModelError(
            f"The fast path cannot convert this {model_type} model: {feature}. Run it as it is (fast_path: off)."
        )
    _refuse_quantized(model, model_type)
    owners = _stack_owners(model, adapter, model_type)
    stacks = [FastStack(owner, adapter, config, backend, cuda_graphs) for owner in owners]
    if backend == "fused" and not stacks[0].fused_ok:
        why = policy.fused_unsupported(config, adapter, stacks[0].layer_parts()[0])
        raise ConfigError(
            f"backend='fused' cannot run this {model_type} model exactly: {why}. Use backend='packed' or 'auto'."
        )
    return stacks


def _stack_owners(model: nn.Module, adapter: Adapter, model_type: str) -> list[nn.Module]:
    """The modules whose forward the fast path replaces: the stack, or each layer for per-layer adapters."""
    base = getattr(model, "base_model", model)
    try:
        target = base.get_submodule(adapter.stack)
    except AttributeError as missing:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({model_type}) has no encoder stack at {adapter.stack!r} under its base model: "
            f"pass the full HF model (bare or with a task head), not a part of it."
        ) from missing
    owners = list(target) if adapter.per_layer else [target]
    for owner in owners:  # resolves every layer's parts now, so a wrapped or quantized one is refused up front
        FastStack(owner, adapter, model.config, "auto").layer_parts()
    return owners


def _install_front(model: nn.Module, stacks: list[FastStack]) -> None:
    """A FastFront on the base model (and FastEmbeddings on its embeddings) where the adapter allows (front.py)."""
    adapter = stacks[0].adapter
    if not adapter.front or adapter.per_layer or len(stacks) != 1:
        return
    base = getattr(model, "base_model", model)
    embeddings = None
    # ELECTRA with an embedding size below the hidden size projects the embeddings in its base model's forward,
    # between the embeddings and the stack: those must stay padded HF embeddings.
    if adapter.embeddings is not None and not hasattr(base, "embeddings_project"):
        embeddings = base.get_submodule(adapter.embeddings)
    front = FastFront(base, stacks[0], embeddings)
    base.forward = front
    if embeddings is not None:
        embeddings.forward = FastEmbeddings(embeddings, front)


def _refuse_quantized(model: nn.Module, model_type: str) -> None:
    """Quantized weights cannot feed the fast path's kernels; such models keep HF SDPA."""
    quantized = getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False)
    bnb = next((m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")), None)
    if quantized or bnb is not None:
        kind = type(bnb).__name__ if bnb is not None else "quantized weights"
        raise UnsupportedModelError(
            f"The fast path cannot convert this quantized {model_type} model ({kind}): its kernels need plain "
            f"float weights. Quantized models keep running HF SDPA: use fast_path: off, or load without quantization."
        )
