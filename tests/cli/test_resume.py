"""Resuming (issue 20): a fine-tune stopped by SIGTERM and then killed by SIGKILL at random points, each time resumed
with `--ckpt_path last`, ends with the weights (bit for bit, fp32 on CPU) and the metrics of an uninterrupted run;
last.ckpt is written atomically; the run folder's config.yaml repeats the run.
"""

import contextlib
import csv
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, write_jsonl
from lit_fast.checkpoints import LastCheckpoint

ROTTEN = str(ROOT / "configs/classify-rotten.yaml")
SEED = int(os.environ.get("LIT_FAST_FAULT_SEED", time.time_ns() % 10_000))


def _args(model: str, data: Path, runs: Path, export: Path, *extra: str) -> list[str]:
    # 96 training rows in 24 batches: 60 steps are 2.5 epochs, validation every 10 batches, last.ckpt every 7 steps
    return ["--config", ROTTEN, "--model.pretrained", model, "--data.path", str(data), "--data.max_rows", "null",
            "--data.batch_size", "4", "--trainer.max_steps", "60", "--trainer.max_epochs", "100",
            "--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "5", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(runs),
            "--checkpoint_every", "7", "--export_dir", str(export), *extra]


def _fit_here(args: list[str]) -> tuple[int, str]:
    from lit_fast.cli import train_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train_main(args)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = [{"text": f"review {i} " + "word " * (i % 9), "category": "fresh" if i % 3 else "rotten"}
            for i in range(120)]
    return write_jsonl(tmp_path_factory.mktemp("resume-data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert_dir, data):
    folder = tmp_path_factory.mktemp("uninterrupted")
    code, out = _fit_here(_args(tiny_bert_dir, data, folder / "runs", folder / "model"))
    assert code == 0
    return folder, out


def _run_folder(runs: Path) -> Path:
    return runs / "lightning_logs/version_0"


def _same_tensors(a: Path, b: Path, where: str = "") -> None:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]} {where}"


def _metrics(run: Path) -> dict:
    """Validation and test values by step; where a resumed run logged a step again, its own (later) row."""
    found = {}
    for row in csv.DictReader((run / "metrics.csv").open()):
        for name, value in row.items():
            if value and name.startswith(("val_", "test_")):
                found[(row["step"], name)] = value
    return found


def _exported_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("exported "))


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _after_writes(last: Path, writes: int, delay: float, running) -> bool:
    """Wait until last.ckpt has been (re)written `writes` times, then `delay` seconds: a point in training whatever
    the machine's speed. False when the run ended first."""
    seen, stamp = 0, last.stat().st_mtime_ns if last.exists() else 0
    while seen < writes:
        if not running():
            return False
        if last.exists() and last.stat().st_mtime_ns != stamp:
            seen, stamp = seen + 1, last.stat().st_mtime_ns
        time.sleep(0.005)
    time.sleep(delay)
    return running()


def _sigterm_here(args: list[str], last: Path, writes: int, delay: float) -> tuple[int, str]:
    """Fit in this process; SIGTERM to it after `writes` writes of last.ckpt and `delay` seconds, unless the run ended
    first. A signal that comes too late meets a handler that ignores it, never pytest's."""
    done = threading.Event()

    def stop() -> None:
        if _after_writes(last, writes, delay, lambda: not done.is_set()):
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    stopper = threading.Thread(target=stop)
    stopper.start()
    try:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code, _ = _fit_here(args)
    finally:
        done.set()
        stopper.join()
        signal.signal(signal.SIGTERM, previous)
    return code, err.getvalue()


def _kill(proc: subprocess.Popen, last: Path, writes: int, delay: float) -> tuple[int, str]:
    """SIGKILL after `writes` more writes of last.ckpt and `delay` seconds, unless the run ended first."""
    if _after_writes(last, writes, delay, lambda: proc.poll() is None):
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_stopped_then_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_bert_dir, data, uninterrupted):
    """SIGTERM (a stop lands at a step boundary, after the step's validation when one follows), then SIGKILL (the run
    is gone at once: the newest last.ckpt is all there is), each at a random point of training; a third run ends the
    fit. last.ckpt is written at steps 7, 14, ... 56 and 60."""
    rng = random.Random(SEED)
    args = _args(tiny_bert_dir, data, tmp_path / "runs", tmp_path / "model", "--overwrite", "true")
    last = tmp_path / "runs/lightning_logs/version_0/checkpoints/last.ckpt"

    writes, delay = rng.randint(1, 4), rng.uniform(0.0, 0.3)
    code, err = _sigterm_here(args, last, writes, delay)
    where = f"(seed {SEED}: SIGTERM {delay:.2f} s after write {writes} of last.ckpt, exit {code}"
    assert code in (0, 128 + signal.SIGTERM), where + err[-3000:]
    message = err.strip().splitlines()[-1] if code else ""
    assert code == 0 or message.startswith("error: stopped by SIGTERM while "), where + err[-2000:]
    if "while training" in message:
        assert f"a resumable checkpoint is at {last}" in message, where + message
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]

    writes, delay = rng.randint(1, 3), rng.uniform(0.0, 0.3)
    code, err = _kill(_start(*args, "--ckpt_path", "last"), last, writes, delay)
    where += f"; resumed at step {stopped_at}, SIGKILL {delay:.2f} s after its write {writes}, exit {code}"
    assert code in (0, -signal.SIGKILL), where + err[-3000:]
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    where += f"; resumed again at step {killed_at})"

    code, out = _fit_here(args + ["--ckpt_path", "last"])
    assert code == 0, where
    reference, reference_out = uninterrupted
    _same_tensors(reference / "model", tmp_path / "model", where)
    final = torch.load(last, map_location="cpu", weights_only=True)
    expected = torch.load(_run_folder(reference / "runs") / "checkpoints/last.ckpt", map_location="cpu",
                          weights_only=True)
    assert final["global_step"] == expected["global_step"] == 60, where
    assert all(torch.equal(final["state_dict"][k], v) for k, v in expected["state_dict"].items()), where
    assert _exported_line(out).replace(str(tmp_path), "") == _exported_line(reference_out).replace(str(reference), "")
    run = _run_folder(tmp_path / "runs")
    assert [p.name for p in run.parent.iterdir()] == ["version_0"], where  # each resumed run went on in its folder
    assert _metrics(run) == _metrics(_run_folder(reference / "runs")), where
    assert [p.name for p in run.rglob(".*")] == [], where  # a killed write's temporary was cleaned


def test_the_run_folder_holds_the_resolved_config_which_repeats_the_run(tmp_path, uninterrupted):
    import yaml

    reference, reference_out = uninterrupted
    saved = _run_folder(reference / "runs") / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    assert config["checkpoint_every"] == 7 and config["ckpt_path"] is None and config["allow_import"] is None
    assert config["trainer"]["max_steps"] == 60 and config["seed_everything"] == 42
    # the same checkpoint folder again: a new run folder beside the first, its own config.yaml, the same model
    code, out = _fit_here(["--config", str(saved), "--export_dir", str(tmp_path / "again")])
    assert code == 0
    _same_tensors(reference / "model", tmp_path / "again")
    repeat = reference / "runs/lightning_logs/version_1"
    assert (repeat / "config.yaml").is_file() and _metrics(repeat) == _metrics(_run_folder(reference / "runs"))


def test_ckpt_path_mistakes_are_one_error_line(tmp_path, run_train, run_predict, tiny_bert_dir, data):
    args = _args(tiny_bert_dir, data, tmp_path / "runs", tmp_path / "model")
    for bad, message in ((["--ckpt_path", str(tmp_path / "nothing.ckpt")], "--ckpt_path"),
                         (["--checkpoint_every", "0"], "checkpoint_every must be a number of optimizer steps >= 1")):
        code, _, err = run_train(*args, *bad)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], err
    code, _, err = run_predict("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--output", str(tmp_path / "out.jsonl"), "--ckpt_path", "last")
    assert code == 2 and "--ckpt_path is for fit (resume) and export" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "model").exists()


# ---- pieces ---------------------------------------------------------------------------------------------------
def test_the_training_loader_resumes_mid_epoch_with_the_next_batch():
    from lit_fast.data.batching import Batches, EpochLoader, EpochPlan

    examples = [{"index": i, "length": 1 + i % 7} for i in range(30)]
    plan = EpochPlan(tuple(e["length"] for e in examples), 4, None, 3, 0, 1, True)
    epoch = {"now": 0}

    def loader():
        return EpochLoader(Batches(examples, plan(0), lambda rows: [r["index"] for r in rows]), plan,
                           lambda: epoch["now"])

    whole = list(loader())
    first = loader()
    it = iter(first)
    taken = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert taken + rest == whole and len(resumed) == len(whole)  # the epoch's length, not what is left
    assert resumed.state_dict() == {"epoch": 0, "batches": len(whole)}
    epoch["now"] = 1  # the next epoch starts from its first batch, newly shuffled
    assert sorted(i for b in resumed for i in b) == list(range(30)) and list(resumed) != whole


def test_last_checkpoint_is_replaced_whole_or_not_at_all(tmp_path):
    class Strategy:
        def broadcast(self, value):
            return value

        def barrier(self, name=None):
            pass

    class Trainer:
        is_global_zero, global_step, fast_dev_run, strategy = True, 7, False, Strategy()

        def save_checkpoint(self, path, weights_only=False):
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError("disk full")

    last = LastCheckpoint(every=7)
    last.path = tmp_path / "last.ckpt"
    last.path.write_bytes(b"the previous checkpoint")
    with pytest.raises(OSError):
        last.save(Trainer())
    assert last.path.read_bytes() == b"the previous checkpoint"

    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the failed write's temporary is gone
    Trainer.save_checkpoint = lambda self, path, weights_only=False: Path(path).write_bytes(b"step 7")
    assert last.save(Trainer()) == last.path and last.path.read_bytes() == b"step 7"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and last.saved_step == 7


def test_last_is_the_newest_last_checkpoint_of_the_same_model(tmp_path):
    from lit_fast.checkpoints import named_checkpoint
    from lit_fast.errors import ConfigError

    runs = tmp_path / "runs"
    for version, pretrained in ((0, "model-a"), (1, "model-b")):
        folder = runs / f"lightning_logs/version_{version}"
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints/last.ckpt").write_bytes(b"")
        (folder / "config.yaml").write_text(f"model:\n  class_path: lit_fast.Classifier\n  init_args:\n"
                                            f"    pretrained: {pretrained}\n")
        os.utime(folder / "checkpoints/last.ckpt", (1000 + version, 1000 + version))
    newest = runs / "lightning_logs/version_1/checkpoints/last.ckpt"
    assert named_checkpoint("last", ("last",), [runs], ("lit_fast.Classifier", "model-b")) == newest
    with pytest.raises(ConfigError, match="of another run \\(pretrained model-b\\)"):
        named_checkpoint("last", ("last",), [runs], ("lit_fast.Classifier", "model-a"))
    assert named_checkpoint("last", ("last",), [tmp_path / "nothing"], ("lit_fast.Classifier", "model-a")) is None
    with pytest.raises(ConfigError, match="no such checkpoint"):
        named_checkpoint(str(tmp_path / "x.ckpt"), ("last",), [runs], ("lit_fast.Classifier", "model-a"))
