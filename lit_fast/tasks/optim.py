"""The task's optimiser and learning-rate schedule by name (`model.optimizer`, `model.lr_scheduler`).

LightningCLI's own `--optimizer` / `--lr_scheduler` (any torch.optim class) replace these; base.py decides which.
Schedules are transformers' `get_scheduler` curves (docs/TRAINING.md).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch

from lit_fast.errors import ConfigError

OptimizerName = Literal["adamw", "sgd", "adafactor"]
OPTIMIZERS = ("adamw", "sgd", "adafactor")
# get_scheduler names whose schedule is a function of the step (LambdaLR); the others need a metric or state
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")


def check_optimizer(optimizer: str, lr_scheduler: str) -> None:
    """Unknown names fail when the task is built, before any weights load."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"model.optimizer={optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}, or any "
                          "torch.optim class with --optimizer CLASS")
    if lr_scheduler not in SCHEDULERS:
        raise ConfigError(f"model.lr_scheduler={lr_scheduler!r} is not one of transformers' step schedules "
                          f"({', '.join(SCHEDULERS)}); for ReduceLROnPlateau use --lr_scheduler ReduceLROnPlateau")


def build_optimizer(name: str, groups: list[dict], lr: float, kwargs: Optional[dict[str, Any]] = None):
    """adamw: torch AdamW (fused on CUDA); sgd: momentum 0.9, the least optimiser state; adafactor: transformers'
    factored second moments (T5's own optimiser, least memory of the adaptive ones) at the given lr."""
    kwargs = dict(kwargs or {})
    params = [p for g in groups for p in g["params"]]
    if name == "adamw":
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=lr, **{"fused": fused or None, **kwargs})
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, **{"momentum": 0.9, **kwargs})
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed lr under our schedule, not Adafactor's own relative step size
        return Adafactor(groups, lr=lr, **{"scale_parameter": False, "relative_step": False, "warmup_init": False,
                                           **kwargs})
    raise ConfigError(f"model.optimizer={name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")


def build_scheduler(name: str, optimizer, warmup: int, total: int, kwargs: Optional[dict[str, Any]] = None):
    """transformers' schedule `name` over `total` optimizer steps with `warmup` steps of warm-up, started one step in.

    Lightning runs optimizer step s at the schedule's value for s, and transformers' warm-ups give 0 there: the first
    step would not learn. So step s gets get_scheduler's value at s + 1 of a schedule one step longer (warm-up too);
    for "linear" that is (s + 1) / (warmup + 1) in warm-up, then (total - s) / (total - warmup).
    """
    from transformers.optimization import get_scheduler

    # the schedule's shape from a stand-in optimiser at the same lr (polynomial decay reads it), not ours: building it
    # on ours would rewrite its learning rates
    lr = optimizer.defaults["lr"]
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    try:
        curve = get_scheduler(name, probe, num_warmup_steps=warmup + 1, num_training_steps=total + 1,
                              scheduler_specific_kwargs=dict(kwargs or {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.lr_scheduler={name!r}: {str(err).splitlines()[0]} (set it in "
                          "model.lr_scheduler_kwargs)") from None
    if not isinstance(curve, torch.optim.lr_scheduler.LambdaLR):
        raise ConfigError(f"model.lr_scheduler={name!r} is not a step schedule; use --lr_scheduler CLASS for it")
    factor = curve.lr_lambdas[0]

    def one_step_in(step: int) -> float:  # a plain function: LambdaLR leaves it out of checkpoints
        return factor(step + 1)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, one_step_in)
