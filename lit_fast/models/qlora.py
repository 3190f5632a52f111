"""QLoRA: LoRA adapters trained on a frozen bitsandbytes (4-bit or int8) base, and exporting the result.

The base is loaded quantized through :func:`lit_fast.models.quantization.bnb_config` (``--model.quantization nf4``);
:func:`prepare_qlora` applies peft's k-bit preparation and the adapters; :func:`export_qlora` writes either the
adapters alone or a merged full-precision transformers model.

Why "merged" folds the adapters into the *dequantized* base: the adapters were trained against the quantized
weights, so dequantized base + adapters reproduces the fine-tuned model exactly (up to the export dtype), and the
result is an ordinary model (no bitsandbytes, no peft) that any tool loads. (peft's own ``merge_and_unload`` on a
4-bit base re-quantizes the merged weights, which is neither full precision nor exact.)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lit_fast.errors import ConfigError
from lit_fast.models.quantization import is_quantized, weight_footprint

log = logging.getLogger(__name__)


def lora_config(lora_settings: Any, task_type: str | None = None) -> Any:
    """A ``peft.LoraConfig`` from a LoraConfig, an object with ``to_peft_config()``, or a mapping of arguments."""
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise ConfigError("QLoRA needs the peft package: pip install 'lit_fast[lora]'") from exc
    if lora_settings is None:
        raise ConfigError("QLoRA needs a LoRA config: set --model.lora (e.g. '{rank: 16, alpha: 32}') or drop "
                          "--model.quantization for plain training (a frozen 4-bit base alone has nothing to train).")
    if isinstance(lora_settings, LoraConfig):
        config = lora_settings
    elif hasattr(lora_settings, "to_peft_config"):
        config = lora_settings.to_peft_config(task_type)
    else:
        settings = dict(lora_settings) if isinstance(lora_settings, Mapping) else dict(vars(lora_settings))
        # QLoRA's recipe: adapters on every linear layer (peft's "all-linear" leaves the output head out)
        settings.setdefault("target_modules", "all-linear")
        try:
            config = LoraConfig(**settings)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid LoRA settings {settings}: {exc}") from exc
    if task_type and config.task_type is None:
        config = copy.deepcopy(config)
        config.task_type = task_type
    return config


def prepare_qlora(model: torch.nn.Module, lora_settings: Any, *, task_type: str | None = None,
                  gradient_checkpointing: bool = False) -> Any:
    """peft's k-bit preparation of a quantized transformers model, then LoRA adapters on it.

    Args:
        model: a transformers model loaded with a bitsandbytes ``quantization_config``.
        lora_settings: LoRA settings (see :func:`lora_config`); None raises ConfigError.
        task_type: peft task type (e.g. "CAUSAL_LM", "SEQ_CLS": peft then also trains the classifier head).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower steps).

    Returns the ``PeftModel``: only the adapters (and heads peft keeps for the task) are trainable. Norms and other
    full-precision weights are upcast to fp32 by peft for stable training.
    """
    config = lora_config(lora_settings, task_type)
    if not is_quantized(model):
        raise ConfigError("QLoRA needs a quantized base model: set --model.quantization nf4 (or nf4-dq, fp4, "
                          "int8), or use plain LoRA on the full-precision model.")
    from peft import get_peft_model, prepare_model_for_kbit_training

    _keep_trainable_cpu_layout(model)
    _accept_own_quant_state(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. no module matches target_modules
        raise ConfigError(f"LoRA could not be applied to {type(model).__name__}: {exc}") from exc
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("QLoRA: %d trainable parameters on a %s", trainable, weight_footprint(model))
    return peft_model


def _keep_trainable_cpu_layout(model: torch.nn.Module) -> None:
    """Keep 4-bit layers on bitsandbytes' autograd path on CPU.

    On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight at its first eval-mode forward (a validation pass) and
    from then on calls a kernel that has no backward: gradients through the frozen base would silently be wrong in
    the training steps that follow. Undo any repacking and switch it off for the model being trained.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            nested = state.original_nested
            data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            if not nested:
                # bitsandbytes 0.50 leaves these scales in the packed layout ([K / block, N], bf16): put them back
                # in row-major block order (their bf16 rounding stays: ~0.4% per block scale)
                state.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()
            module.weight.data, module.weight.quant_state = data, state
            module.quant_state = state


def _accept_own_quant_state(model: torch.nn.Module) -> None:
    """Let ``load_state_dict`` take back a checkpoint of this model (e.g. Lightning's best checkpoint).

    bitsandbytes' 4-bit layers write their scales into the state dict (``weight.absmax``, ``weight.quant_map``...)
    but do not read them back ("unexpected keys"), and int8 layers refuse theirs after the first forward ("call
    module.cuda() before module.load_state_dict()"). The frozen base does not
    change during QLoRA: the hook checks that the checkpoint's scales are this layer's own and drops them; a
    checkpoint of another base is refused instead of being half-loaded.
    """
    import bitsandbytes as bnb

    def scales(module) -> tuple[torch.Tensor | None, str, list[str]]:
        """This layer's own scales, the state-dict key of the checkpoint's, and every key to drop."""
        if isinstance(module, bnb.nn.Linear8bitLt):  # row scales: on the weight, or on the state after a forward
            own = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
            return own, "SCB", ["SCB", "weight_format"]
        state = module.weight.quant_state
        nested = bool(getattr(state, "nested", False))
        own = state.state2.absmax if nested else state.absmax
        return own, "weight.nested_absmax" if nested else "weight.absmax", []

    def hook(module, state_dict, prefix, *args) -> None:
        own, key, extra = scales(module)
        drop = [k for k in state_dict if k.startswith(prefix + "weight.")] + [prefix + k for k in extra]
        drop = [k for k in drop if k in state_dict]
        if not drop:
            return
        theirs = state_dict.get(prefix + key)
        if own is None or theirs is None or theirs.shape != own.shape or \
                not torch.equal(theirs.to(own.device, own.dtype), own):
            raise ConfigError(f"{prefix}weight: the checkpoint holds a different quantized base than this model; "
                              "load it into a model built from the same pretrained weights and quantization mode")
        for k in drop:
            del state_dict[k]

    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            module._register_load_state_dict_pre_hook(hook, with_module=True)


def load_trainable_state(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a checkpoint's trainable tensors (adapters, trained heads) into a QLoRA module.

    A Lightning checkpoint of a quantized model also holds the frozen packed base with its bitsandbytes scales,
    which ``load_state_dict`` cannot take back (unexpected ``weight.absmax`` keys); the base never changes during
    QLoRA, so only the trainable tensors are restored - every one of them must be in the checkpoint.
    """
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state_dict))
    if missing:
        raise ConfigError(f"the checkpoint lacks {len(missing)} trainable tensors of this QLoRA model "
                          f"(e.g. {missing[0]}): was it written for another LoRA configuration?")
    result = module.load_state_dict({k: v for k, v in state_dict.items() if k in trainable}, strict=False)
    assert not result.unexpected_keys  # only names of this module's own parameters were passed


def _export_dtype(model: torch.nn.Module, dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(name, torch.dtype):
        return name
    resolved = getattr(torch, str(name).replace("torch.", ""), None) if name else torch.float32
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"export dtype {dtype!r} is not a floating-point torch dtype (use bfloat16, float16, float32)")
    return resolved


def merge_qlora(peft_model: Any, dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """A full-precision transformers model: the dequantized base with the active adapters folded in.

    Works on copies; ``peft_model`` (possibly still training) is left as it was. ``dtype`` defaults to the dtype
    the base was loaded in (its config).
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = peft_model.active_adapter
    config = copy.deepcopy(peft_model.peft_config[adapter])
    config.inference_mode = True
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter)
    base = copy.deepcopy(peft_model).unload()  # the quantized base without adapter layers
    out_dtype = _export_dtype(base, dtype)
    if is_quantized(base):
        # dequantize in fp32, add the adapters in fp32, round once at the end
        try:
            base = base.dequantize(dtype=torch.float32)
        except TypeError:  # transformers without the dtype argument
            base = base.dequantize()
    base = base.to(torch.float32)
    fresh = get_peft_model(base, config)
    result = set_peft_model_state_dict(fresh, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ConfigError(f"could not restore the adapters for merging (missing {missing[:3]}, unexpected "
                          f"{result.unexpected_keys[:3]})")
    merged = fresh.merge_and_unload().to(out_dtype)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(merged, flag, False):
            setattr(merged, flag, False)
    merged.config.dtype = out_dtype
    return merged


def export_qlora(peft_model: Any, directory: str | Path, how: str = "merged",
                 dtype: str | torch.dtype | None = None) -> None:
    """Write a QLoRA model: ``how="adapter"`` the adapters alone (peft format, a few MB; load them on the same
    quantized or full-precision base), ``how="merged"`` a full-precision transformers model (see
    :func:`merge_qlora`)."""
    directory = Path(directory)
    if how == "adapter":
        peft_model.save_pretrained(directory)
    elif how == "merged":
        merge_qlora(peft_model, dtype).save_pretrained(directory)
    else:
        raise ConfigError(f"lora.export must be merged or adapter, got {how!r}")
    log.info("exported the QLoRA model (%s) to %s", how, directory)
