"""Optimizer and learning-rate schedule: transformers' get_scheduler names, the task's optimizer names, and
LightningCLI's own --optimizer / --lr_scheduler."""

import csv

import pytest
import torch
from conftest import ROOT, write_jsonl
from transformers.optimization import get_scheduler

from lit_fast.errors import ConfigError
from lit_fast.tasks.optim import build_optimizer, build_scheduler, check_optimizer

ROTTEN = str(ROOT / "configs/classify-rotten.yaml")
LR = 1e-3


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    """The learning rate each optimizer step runs at (Lightning steps the scheduler after each optimizer step)."""
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def _ours(name: str, warmup: int, total: int, **kwargs) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    return _lrs(build_scheduler(name, optimizer, warmup, total, kwargs), optimizer, total)


def _transformers(name: str, warmup: int, total: int, **kwargs) -> list[float]:
    """get_scheduler's own curve, one step in (our documented offset: the first step does not run at lr 0)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup + 1, num_training_steps=total + 1,
                              scheduler_specific_kwargs=kwargs)
    return _lrs(scheduler, optimizer, total + 1)[1:]


@pytest.mark.parametrize("name,kwargs", [("linear", {}), ("cosine", {}), ("cosine_with_restarts", {"num_cycles": 3}),
                                         ("polynomial", {"power": 2.0}), ("constant", {}),
                                         ("constant_with_warmup", {}), ("inverse_sqrt", {}),
                                         ("cosine_with_min_lr", {"min_lr": 1e-5})])
def test_schedule_follows_get_scheduler(name, kwargs):
    ours = _ours(name, 4, 30, **kwargs)
    assert ours == pytest.approx(_transformers(name, 4, 30, **kwargs), rel=1e-12, abs=0)
    assert ours[0] > 0  # the first step learns


def test_default_linear_schedule_is_the_one_before_the_choice():
    """lit_fast's schedule before `model.lr_scheduler` existed: warm-up (s + 1) / (W + 1), then linear decay."""
    warmup, total = 5, 40
    before = [LR * ((s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
              for s in range(total)]
    assert _ours("linear", warmup, total) == pytest.approx(before, rel=1e-12, abs=0)
    assert _ours("cosine", warmup, total) != pytest.approx(before)  # the choice changes the curve


def test_unknown_names_and_missing_schedule_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="model.optimizer='lion' is unknown; use one of adamw, sgd, adafactor"):
        check_optimizer("lion", "linear")
    with pytest.raises(ConfigError, match="model.lr_scheduler='reduce_lr_on_plateau'.*--lr_scheduler"):
        check_optimizer("adamw", "reduce_lr_on_plateau")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    with pytest.raises(ConfigError, match="min_lr.*model.lr_scheduler_kwargs"):
        build_scheduler("cosine_with_min_lr", optimizer, 1, 10)


def test_optimizer_names_build_their_optimizers():
    weights, bias = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [weights], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}]
    sgd = build_optimizer("sgd", groups, 0.5)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["lr"] == 0.5
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.1, 0.0]
    assert build_optimizer("sgd", groups, 0.5, {"momentum": 0.0}).defaults["momentum"] == 0.0
    from transformers.optimization import Adafactor

    adafactor = build_optimizer("adafactor", groups, 1e-3)
    assert isinstance(adafactor, Adafactor) and adafactor.defaults["lr"] == 1e-3
    assert adafactor.defaults["relative_step"] is False  # our schedule sets the step size, not Adafactor's own
    adamw = build_optimizer("adamw", groups, 2e-5, {"betas": (0.9, 0.95)})
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.95)


# ---- through the command line ----------------------------------------------------------------------------


def _train_lrs(run_train, tmp_path, tiny_bert_dir, *extra) -> tuple[dict[str, list[float]], str]:
    """Train the tiny classifier 12 steps; the learning rates LearningRateMonitor logged at every step."""
    rows = [{"text": f"review {i} " + "word " * (i % 5), "category": "fresh" if i % 2 else "rotten"}
            for i in range(48)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    root = tmp_path / "runs"
    code, out, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--data.keep_labels", "null", "--data.max_rows", "null", "--data.val_fraction", "0",
                               "--data.test_fraction", "0", "--data.batch_size", "4", "--trainer.max_epochs", "1",
                               "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(root),
                               "--trainer.callbacks+=LearningRateMonitor",
                               "--trainer.callbacks.logging_interval=step", *extra)
    assert code == 0, err
    (metrics,) = root.glob("lightning_logs/version_*/metrics.csv")
    lrs: dict[str, list[float]] = {}
    for row in csv.DictReader(metrics.open()):
        for key, value in row.items():
            if key.startswith("lr-") and value:
                lrs.setdefault(key, []).append(float(value))
    return lrs, err


def test_model_lr_scheduler_sets_the_curve_of_a_run(run_train, tmp_path, tiny_bert_dir):
    lrs, _ = _train_lrs(run_train, tmp_path, tiny_bert_dir, "--model.lr", "1e-3", "--model.warmup_ratio", "0.25",
                        "--model.lr_scheduler", "cosine")
    # 48 rows, batches of 4: 12 steps, 3 of warm-up; two parameter groups (with and without weight decay)
    assert set(lrs) == {"lr-AdamW/pg1", "lr-AdamW/pg2"}
    assert lrs["lr-AdamW/pg1"] == pytest.approx(_transformers("cosine", 3, 12), rel=1e-6)
    assert lrs["lr-AdamW/pg2"] == lrs["lr-AdamW/pg1"]


def test_model_optimizer_choice_in_a_run(run_train, tmp_path, tiny_bert_dir):
    lrs, _ = _train_lrs(run_train, tmp_path, tiny_bert_dir, "--model.optimizer", "sgd", "--model.lr", "0.01",
                        "--model.lr_scheduler", "constant")
    assert lrs["lr-SGD/pg1"] == [0.01] * 12


def test_lightning_cli_optimizer_and_scheduler_replace_the_task_ones(run_train, tmp_path, tiny_bert_dir):
    # --optimizer alone: that optimizer at a constant learning rate (LightningCLI's behaviour)
    lrs, err = _train_lrs(run_train, tmp_path / "a", tiny_bert_dir, "--optimizer", "torch.optim.SGD",
                          "--optimizer.lr", "0.05", "--model.lr_scheduler", "cosine")
    assert lrs["lr-SGD/pg1"] == [0.05] * 12 and not any(k.startswith("lr-AdamW") for k in lrs)
    # with --lr_scheduler: stepped once per epoch, as LightningCLI does (one epoch here: gamma never applies)
    lrs, _ = _train_lrs(run_train, tmp_path / "b", tiny_bert_dir, "--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.02",
                        "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.5")
    assert lrs["lr-Adam/pg1"] == [0.02] * 12
    # --lr_scheduler alone: the task's optimizer at the model's lr, under that scheduler
    lrs, _ = _train_lrs(run_train, tmp_path / "c", tiny_bert_dir, "--model.lr", "1e-3", "--lr_scheduler",
                        "ExponentialLR", "--lr_scheduler.gamma", "0.5", "--trainer.max_epochs", "2")
    assert lrs["lr-AdamW/pg1"] == [1e-3] * 12 + [5e-4] * 12


def test_bad_optimizer_settings_are_one_line_errors(run_train, tmp_path, tiny_bert_dir):
    code, _, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--model.lr_scheduler", "cosin")
    assert code == 2 and "model.lr_scheduler='cosin' is not one of transformers' step schedules" in err
    code, _, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--optimizer",
                             "collections.OrderedDict")
    assert code == 2 and "error:" in err
