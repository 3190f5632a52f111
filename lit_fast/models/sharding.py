"""Sharded fine-tuning with Lightning's FSDPStrategy: wrap by transformer block, load weights once, export whole.

- Wrapping: each transformer block is its own FSDP unit, found from the model's own `_no_split_modules` (the
  block classes transformers itself keeps whole when it splits a model over devices) unless the strategy was
  given an `auto_wrap_policy`.
- LoRA: frozen and trainable parameters in separate units: every leaf module whose parameters all train (the
  LoRA A/B projections) becomes a unit of its own, so FSDP never keeps gradient or optimizer state for frozen
  weights (a flat parameter that mixes both would); `use_orig_params=True` as FSDP requires for mixed
  `requires_grad`. Many small units cost time every step (docs/MEASUREMENTS.md, W7), so `lora.fsdp_units: blocks`
  keeps the adapters in their block's unit instead (several times faster there;
  FSDP then holds gradients for the frozen weights).
- Loading: on several ranks only rank 0 reads the checkpoint into CPU memory; the other ranks build the same
  model on the meta device and receive the weights when FSDP shards the model (`sync_module_states`).
- Export: the full state dict is gathered (a collective on every rank) and rank 0 writes one ordinary
  Hugging Face model.

Tensor parallel (Lightning's ModelParallelStrategy): transformers' own tensor-parallel plan for the architecture
(`from_pretrained(tp_plan="auto", device_mesh=...)`) shards attention heads and MLP columns/rows over the
"tensor_parallel" mesh dimension as DTensors. Every rank of a tensor-parallel group must see the same batches, so
batches are dealt by data-parallel rank, and only the group's first rank writes predictions.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from lit_fast.errors import ConfigError

log = logging.getLogger(__name__)


def is_fsdp(strategy: Any) -> bool:
    try:
        from lightning.pytorch.strategies import FSDPStrategy
    except ImportError:  # pragma: no cover
        return False
    return isinstance(strategy, FSDPStrategy)


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes of an HF model (from `_no_split_modules`), as classes present in it."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(
            f"cannot tell the transformer blocks of {type(model).__name__} for FSDP wrapping (no _no_split_modules); "
            "give the strategy an auto_wrap_policy"
        )
    return classes


def _trainable_leaf(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    params = list(module.parameters(recurse=False))
    return not list(module.children()) and bool(params) and all(p.requires_grad for p in params)


def wrap_policy(model: nn.Module, lora_units: str = "separate"):
    """Blocks as units; with frozen weights present and `lora_units` "separate", trainable leaves (LoRA A/B) as units
    of their own too ("blocks": they stay in their block's unit)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, _or_policy, lambda_auto_wrap_policy

    blocks = ModuleWrapPolicy(block_classes(model))
    if lora_units == "blocks" or all(p.requires_grad for p in model.parameters()):
        return blocks
    trainable = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: _trainable_leaf(m, True, 0))
    return functools.partial(_or_policy, policies=[blocks, trainable])


def configure_fsdp(strategy: Any, model: nn.Module, lora_units: str = "separate") -> None:
    """Fill in what the user's strategy config left open: the wrap policy and the flags LoRA needs."""
    kwargs = strategy.kwargs
    if "auto_wrap_policy" not in kwargs:
        kwargs["auto_wrap_policy"] = wrap_policy(model, lora_units)
        log.info("FSDP: one unit per %s", ", ".join(sorted(c.__name__ for c in block_classes(model))))
    if not all(p.requires_grad for p in model.parameters()):
        kwargs.setdefault("use_orig_params", True)


def build_for_fsdp(build_pretrained, build_empty, strategy: Any, lora_units: str = "separate") -> nn.Module:
    """Rank 0 loads the weights; the other ranks build on the meta device and get theirs from rank 0."""
    if strategy.world_size == 1:
        model = build_pretrained()
    elif strategy.global_rank == 0:
        model = build_pretrained()
        log.info("FSDP: rank 0 loaded the weights; %d other rank(s) receive them while sharding", strategy.world_size - 1)
    else:
        with torch.device("meta"):
            model = build_empty()
    if strategy.world_size > 1:
        device = strategy.root_device
        strategy.kwargs["sync_module_states"] = True  # broadcast rank 0's parameters and buffers
        # materialize each meta module on the GPU (values arrive from rank 0); rank 0's real weights move as they are
        strategy.kwargs["param_init_fn"] = lambda module: module.to_empty(device=device, recurse=False)
    configure_fsdp(strategy, model, lora_units)
    return model


def full_state_dict(trainer: Any) -> dict[str, torch.Tensor]:
    """The whole LightningModule state dict on rank 0 (a collective: call it on every rank)."""
    return trainer.strategy.lightning_module_state_dict()


def export_consolidated(module: Any, directory: str, state: dict[str, torch.Tensor]) -> None:
    """Rank 0: rebuild the model on CPU, load the gathered weights, and export it as usual."""
    fresh = module.build_model()
    own = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = fresh.load_state_dict(own, strict=False)
    if unexpected or [k for k in missing if "lora_" in k or not k.endswith("lm_head.weight")]:
        raise ConfigError(f"FSDP export: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    original, module.model = module.model, fresh
    try:
        module.export(directory)
    finally:
        module.model = original


def is_model_parallel(strategy: Any) -> bool:
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # pragma: no cover
        return False
    return isinstance(strategy, ModelParallelStrategy)


def data_parallel_rank(strategy: Any) -> tuple[int, int]:
    """(rank, size) over which batches are dealt: the data-parallel group under tensor parallelism, else all ranks."""
    if is_model_parallel(strategy):
        mesh = strategy.device_mesh["data_parallel"]
        return mesh.get_local_rank(), mesh.size()
    return strategy.global_rank, strategy.world_size


def writes_predictions(strategy: Any) -> bool:
    """Under tensor parallelism every rank of a group computes the same rows; the group's rank 0 writes them."""
    if is_model_parallel(strategy):
        return strategy.device_mesh["tensor_parallel"].get_local_rank() == 0
    return True


def tensor_parallel_kwargs(strategy: Any) -> dict[str, Any]:
    """`from_pretrained` arguments that shard the model by transformers' tensor-parallel plan."""
    mesh = strategy.device_mesh["tensor_parallel"]
    log.info("tensor parallel: sharding over %d rank(s) with transformers' plan for this architecture", mesh.size())
    return {"tp_plan": "auto", "device_mesh": mesh}
