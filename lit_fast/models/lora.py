"""LoRA fine-tuning with peft: the settings a config gives, applying them, and exporting the result.

In a config::

    model:
      init_args:
        lora: {rank: 16, alpha: 32, dropout: 0.05, target_modules: all-linear, export: merged}

``export: merged`` writes an ordinary transformers model (adapters folded into the weights; loads without peft),
``export: adapter`` writes only the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, a few MB),
which ``peft.AutoPeftModelForCausalLM.from_pretrained`` (or ``PeftModel.from_pretrained(base, dir)``) loads on
top of the base model named in it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from lit_fast.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """LoRA adapters: trainable low-rank updates beside frozen weights.

    Args:
        rank: rank r of each update (A: r x in, B: out x r).
        alpha: scaling numerator; updates are scaled by alpha / rank.
        dropout: dropout on the adapter input during training.
        target_modules: module names to adapt (e.g. [q_proj, v_proj]) or "all-linear" (every linear layer except
            the output head).
        export: "merged" (a plain transformers model with the adapters folded in) or "adapter" (adapter only).
        fsdp_units: under FSDP, "separate" (default): every A/B projection is an FSDP unit of its own, so FSDP keeps
            no gradients for the frozen weights, but the many small units slow every step; "blocks": the adapters
            stay inside their block's unit - much faster steps, but FSDP then holds gradients for the frozen
            weights too (4 bytes a parameter over the GPUs; measured in docs/MEASUREMENTS.md, W7).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: Union[list[str], str] = "all-linear"
    export: Literal["merged", "adapter"] = "merged"
    fsdp_units: Literal["separate", "blocks"] = "separate"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.export not in ("merged", "adapter"):
            raise ConfigError(f"lora.export must be merged or adapter, got {self.export!r}")
        if self.fsdp_units not in ("separate", "blocks"):
            raise ConfigError(f"lora.fsdp_units must be separate or blocks, got {self.fsdp_units!r}")

    def to_peft_config(self, task_type: Optional[str] = None):
        """The equivalent ``peft.LoraConfig``."""
        try:
            from peft import LoraConfig
        except ImportError as err:
            raise ConfigError("LoRA needs the peft package: pip install peft (or lit_fast[lora])") from err
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type=task_type)


def apply_lora(model: torch.nn.Module, settings: LoraSettings, task_type: Optional[str] = None):
    """Wrap ``model`` with LoRA adapters; only the adapters stay trainable. Returns the ``PeftModel``."""
    from peft import get_peft_model

    try:
        wrapped = get_peft_model(model, settings.to_peft_config(task_type))
    except ValueError as err:  # peft's message for names that match nothing
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules {settings.target_modules!r} does not fit "
                          f"{type(model).__name__}: {err}. Linear layers of this model: {names}") from err
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("LoRA r=%d alpha=%g on %s: %d trainable of %d parameters (%.2f%%)", settings.rank, settings.alpha,
             settings.target_modules, trainable, total, 100 * trainable / total)
    return wrapped


def export_lora(model: torch.nn.Module, directory: str | Path, how: str = "merged") -> None:
    """Save a peft-wrapped model: merged into a plain transformers model, or the adapter alone.

    Merging works on a copy of the adapter weights folded into the base (``merge_and_unload`` on a deep copy), so
    the module being trained is left as it was.
    """
    import copy

    directory = Path(directory)
    if how == "adapter":
        model.save_pretrained(directory)
        return
    if how != "merged":
        raise ConfigError(f"lora.export must be merged or adapter, got {how!r}")
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(directory)
