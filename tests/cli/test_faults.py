"""Real predict and fit processes stopped by SIGTERM, SIGINT and SIGKILL at random points.

Invariants, whenever the signal lands: the earlier output or export is intact or a complete new one replaced it; a
stopped run exits non-zero with one `error: stopped by ...` line and leaves no temporaries; after SIGKILL, the next
run for the same output removes what the killed one left and succeeds.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl, write_jsonl
from lit_fast import outputs

EMBED = str(ROOT / "configs/embed-minilm.yaml")
ROTTEN = str(ROOT / "configs/classify-rotten.yaml")
SEED = int(os.environ.get("LIT_FAST_FAULT_SEED", time.time_ns() % 10_000))


def _start(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _signal_after(proc: subprocess.Popen, signum: int, delay: float) -> tuple[int, str, str]:
    """Send `signum` to the process group (as a scheduler does) after `delay` seconds, unless it ended already."""
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults")
    return write_jsonl(folder / "in.jsonl", [{"text": f"line {i} " + "word " * (i % 23)} for i in range(1500)])


def _predict_args(model: str, data: Path, out: Path) -> tuple[str, ...]:
    return ("--config", EMBED, "--model.pretrained", model, "--data.path", str(data), "--data.batch_size", "1",
            "--data.max_tokens", "null", "--output", str(out), "--overwrite", "true", "--trainer.accelerator", "cpu")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_predict_stopped_at_a_random_point(tmp_path, corpus, tiny_bert_dir, signum):
    rng = random.Random(SEED + signum)
    out = tmp_path / "out.jsonl"
    out.write_text('{"index": 0, "old": true}\n')
    old = out.read_bytes()
    delay = rng.uniform(0.5, 12.0)
    code, _, err = _signal_after(_start("predict.py", *_predict_args(tiny_bert_dir, corpus, out)), signum, delay)
    where = f"(seed {SEED}, {signum.name} after {delay:.2f} s, exit {code})"
    if code == 0:  # it finished first: the new output is complete
        assert [r["index"] for r in read_jsonl(out)] == list(range(1500)), where
    else:
        assert out.read_bytes() == old, where
        if signum == signal.SIGKILL:
            assert code == -signal.SIGKILL, where
        else:
            assert code == 128 + signum, where + err[-2000:]
            assert err.strip().splitlines()[-1].startswith(f"error: stopped by {signum.name}"), where + err[-2000:]
            assert "Traceback" not in err, where + err[-3000:]
            assert _hidden(tmp_path) == [], where
    if code != -signal.SIGKILL:
        return  # a stopped run cleaned up itself (checked above); a killed one leaves files to the next run
    # the next run cleans up whatever was left and writes the complete output
    proc = subprocess.run([sys.executable, str(ROOT / "predict.py"), *_predict_args(tiny_bert_dir, corpus, out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["index"] for r in read_jsonl(out)] == list(range(1500))
    assert _hidden(tmp_path) == [], where


def _train_args(model: str, folder: Path, export: Path) -> tuple[str, ...]:
    data = write_jsonl(folder / "train.jsonl", [{"text": f"review {i} " + "word " * (i % 9),
                                                 "category": "fresh" if i % 3 else "rotten"} for i in range(200)])
    return ("--config", ROTTEN, "--model.pretrained", model, "--data.path", str(data), "--data.max_rows", "200",
            "--data.batch_size", "2", "--trainer.max_steps", "400", "--trainer.max_epochs", "100",
            "--trainer.val_check_interval", "40",
            "--trainer.default_root_dir", str(folder / "runs"), "--trainer.accelerator", "cpu",
            "--export_dir", str(export), "--overwrite", "true")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_fit_stopped_at_a_random_point(tmp_path, tiny_bert_dir, signum):
    rng = random.Random(SEED + 100 + signum)
    export = tmp_path / "model"
    export.mkdir()
    outputs.write_export_marker(export)
    (export / "weights.txt").write_text("the earlier export")
    delay = rng.uniform(0.5, 15.0)
    args = _train_args(tiny_bert_dir, tmp_path, export)
    code, out, err = _signal_after(_start("train.py", *args), signum, delay)
    where = f"(seed {SEED}, {signum.name} after {delay:.2f} s, exit {code})"
    if code == 0:
        assert (export / "config.json").is_file() and not (export / "weights.txt").exists(), where
    else:
        assert (export / "weights.txt").read_text() == "the earlier export", where
        if signum != signal.SIGKILL:
            assert code == 128 + signum, where + err[-2000:]
            last = err.strip().splitlines()[-1]
            assert last.startswith(f"error: stopped by {signum.name}"), where + err[-2000:]
            assert "Traceback" not in err, where + err[-3000:]
            assert _hidden(tmp_path) == [], where
            if "resumable checkpoint is at" in last:
                checkpoint = Path(last.split("resumable checkpoint is at ")[1].split(";")[0])
                import torch

                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
                assert state["global_step"] > 0 and "optimizer_states" in state, where
                assert _hidden(checkpoint.parent) == [], where
    if code != -signal.SIGKILL:
        return  # a stopped run cleaned up itself (checked above); a killed one leaves files to the next run
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--trainer.max_steps", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (export / "config.json").is_file() and outputs.is_export(export)
    assert _hidden(tmp_path) == [], where


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_after_the_command_ended_keeps_its_result(signum):
    """The command's process ignores stops once its result is decided: one landing while the interpreter shuts down
    (seconds with PyTorch loaded) once turned a complete export into a traceback and a non-zero exit."""
    script = ("import os, sys\n"
              "from lit_fast.signals import StopOnSignals\n"
              "with StopOnSignals(ignore_after=True):\n"
              "    pass\n"
              f"os.kill(os.getpid(), {int(signum)})\n"
              "print('still here')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "still here"), proc.stderr
