"""Converting a Hugging Face model to the encoder fast path and back: checked once, then installed.

`plan_fast_path` checks everything first (architecture, configuration, quantization, every layer's modules) and
returns a `FastPathPlan`: the options, the backend that will run on the given device and dtype (None: HF keeps
running, with the reason) and the stacks, built but not installed. `FastPathPlan.install()` sets them as the
`forward` of each encoder stack (and a `FastFront` on the base model where the adapter allows), so a refused model
is left untouched. The weights are never copied or renamed: `save_pretrained` on a converted model writes the normal
HF format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from lit_fast.errors import ConfigError, UnsupportedModelError
from lit_fast.fastpath.encoder import policy
from lit_fast.fastpath.encoder.adapters import ADAPTERS, Adapter, adapter_for, unsupported_feature
from lit_fast.fastpath.encoder.front import FastFront
from lit_fast.fastpath.encoder.layers import drop_fused_qkv
from lit_fast.fastpath.encoder.stack import FastStack
from lit_fast.fastpath.options import FastPathOptions

log = logging.getLogger(__name__)

INSTALLED = (FastStack, FastFront)  # what `install` sets as an instance `forward`


@dataclass
class FastPathPlan:
    """What `to_fast_path` will do to `model`, decided once."""

    model: nn.Module
    options: FastPathOptions
    backend: str | None  # what runs on the planned device and dtype; None: HF's forward (see `reason`)
    reason: str  # one line for the log: what runs and why
    stacks: list[FastStack] = field(default_factory=list)

    def install(self) -> nn.Module:
        """Install the stacks (and the front); converting again replaces an earlier installation."""
        revert_fast_path(self.model)
        for stack in self.stacks:
            stack.owner.forward = stack
        _install_front(self.model, self.stacks, self.options)
        self.model.__dict__["_lit_fast_options"] = self.options  # a plain attribute: not a parameter or buffer
        log.debug("fast path installed on %d module(s) of %s: %s", len(self.stacks), type(self.model).__name__,
                  self.reason)
        return self.model


def fast_path_architectures() -> list[str]:
    """The `config.model_type`s the fast path converts."""
    return sorted(ADAPTERS)


def plan_fast_path(model: nn.Module, options: FastPathOptions | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> FastPathPlan:
    """Check `model` for the fast path and decide what runs on `device` in compute `dtype` (the autocast dtype under
    mixed precision; default: where the model's weights are, in their dtype).

    A model the fast path cannot take raises UnsupportedModelError (or ConfigError for a "fused" request the kernel
    cannot serve exactly) when a backend was asked for explicitly; with backend "auto" the plan says HF runs, and
    why."""
    options = options or FastPathOptions()
    weight = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (weight.device if weight is not None else
                                                               torch.device("cpu"))
    dtype = dtype or (weight.dtype if weight is not None else torch.float32)
    try:
        stacks = _stacks(model, options)
    except (UnsupportedModelError, ConfigError) as refusal:
        if options.backend != "auto":
            raise
        return FastPathPlan(model, options, None, f"HF forward: {refusal}")
    backend = policy.resolve(options.backend, device, dtype, stacks[0].fused_ok)
    return FastPathPlan(model, options, backend, policy.describe(backend, device, dtype, options.cuda_graphs), stacks)


def to_fast_path(model: nn.Module, options: FastPathOptions | str | None = None, **changes) -> nn.Module:
    """Convert `model` in place to the encoder fast path and return it.

    `options`: a FastPathOptions, or a backend name as a shorthand ("auto", "fused", "packed"); `changes` set
    fields on it (`to_fast_path(model, cuda_graphs=False)`). Raises UnsupportedModelError for architectures without
    an adapter and for quantized or adapter-wrapped layers, ConfigError for an unknown option or a "fused" request
    the kernel cannot serve exactly.
    """
    if isinstance(options, str):
        options = FastPathOptions(backend=options)
    options = (options or FastPathOptions()).with_changes(**changes)
    stacks = _stacks(model, options)
    plan = FastPathPlan(model, options, options.backend, f"requested {options.backend}", stacks)
    return plan.install()


def revert_fast_path(model: nn.Module) -> nn.Module:
    """Give `model` back its HF forwards (the weights never left); a model that is not converted is returned as is."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), INSTALLED):
            del module.forward
    model.__dict__.pop("_lit_fast_options", None)
    drop_fused_qkv(model)
    return model


def is_fast_path(model: nn.Module) -> bool:
    """Whether `model` has fast-path stacks installed."""
    return any(isinstance(module.__dict__.get("forward"), FastStack) for module in model.modules())


def fast_path_options(model: nn.Module) -> FastPathOptions | None:
    """The options a converted model runs with (None when it is not converted)."""
    return model.__dict__.get("_lit_fast_options")


def choose_backend(model: nn.Module, requested: str, device: torch.device | str, dtype: torch.dtype,
                   cuda_graphs: bool | str = "auto") -> tuple[str | None, str]:
    """(backend, reason) of `plan_fast_path` for a backend name (None: HF's forward runs); "off" plans nothing."""
    if requested == "off":
        return None, "fast_path=off: HF forward"
    plan = plan_fast_path(model, FastPathOptions(backend=requested, cuda_graphs=cuda_graphs), device, dtype)
    return plan.backend, plan.reason


def _stacks(model: nn.Module, options: FastPathOptions) -> list[FastStack]:
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
    refusal = policy.quantized_refusal(model)
    if refusal is not None:
        raise UnsupportedModelError(f"The fast path cannot convert this {model_type} model: {refusal}")
    owners = _stack_owners(model, adapter, model_type)
    stacks = [FastStack(owner, adapter, config, options) for owner in owners]  # resolves every layer's parts
    if options.backend == "fused" and not stacks[0].fused_ok:
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
    return list(target) if adapter.per_layer else [target]


def _install_front(model: nn.Module, stacks: list[FastStack], options: FastPathOptions) -> None:
    """A FastFront on the base model where the adapter allows (front.py)."""
    adapter = stacks[0].adapter
    if not options.front or not adapter.front or adapter.per_layer or len(stacks) != 1:
        return
    base = getattr(model, "base_model", model)
    try:
        front = FastFront(base, stacks[0], base.get_submodule(adapter.embeddings), options)
    except UnsupportedModelError as why:  # the stack alone still serves this model
        log.info("fast path: no front for %s (%s)", type(base).__name__, why)
        return
    base.forward = front
