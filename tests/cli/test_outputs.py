"""Outputs and exports never destroy what the user did not ask to replace (lit_fast/outputs.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl, write_jsonl
from lit_fast import outputs
from lit_fast.errors import ConfigError, OutputExistsError

ROTTEN = str(ROOT / "configs/classify-rotten.yaml")
EMBED = str(ROOT / "configs/embed-minilm.yaml")


def _train_args(tiny_bert_dir, data_dir: Path, runs: Path, *extra):
    data = write_jsonl(data_dir / "train.jsonl", [{"text": f"review {i} " + "word " * (i % 5),
                                                   "category": "fresh" if i % 2 else "rotten"} for i in range(40)])
    return ("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--data.path", str(data), "--data.max_rows", "40",
            "--trainer.max_steps", "2", "--trainer.default_root_dir", str(runs), *extra)


# (working directory, home, folder of the input, checkpoint root, --export_dir, what the error names); "w" is a
# folder holding a precious file, "d" one holding the input
REFUSED = {
    "cwd": ("w", "elsewhere", "d", "d/runs", ".", "the working directory"),
    "home": (".", "w", "d", "d/runs", "w", "your home directory"),
    "parent of the checkpoints": (".", "elsewhere", "d", "w/runs", "w", "holds the checkpoints"),
    "parent of the input": (".", "elsewhere", "d", "runs", "d", "holds the input"),
    "not an export": (".", "elsewhere", "d", "runs", "w", "is not a lit_fast export"),
    "a file": (".", "elsewhere", "d", "runs", "w/precious.txt", "is a file"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_export_dir_that_is_not_an_export_is_refused_before_training(tmp_path, monkeypatch, run_train, tiny_bert_dir,
                                                                    case):
    cwd, home, data_dir, runs, export, message = REFUSED[case]
    for folder in ("w", "d"):
        (tmp_path / folder).mkdir()
    (tmp_path / "w" / "precious.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path / cwd)
    monkeypatch.setenv("HOME", str(tmp_path / home))
    args = _train_args(tiny_bert_dir, tmp_path / data_dir, tmp_path / runs)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    target = export if export == "." else str(tmp_path / export)
    code, _, err = run_train(*args, "--export_dir", target, "--overwrite", "true")
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--export_dir" in errors[0] and message in errors[0], err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing deleted or changed, and no training ran
    assert not any(p.name == "runs" for p in tmp_path.rglob("*"))


def test_export_replaces_only_an_earlier_export(tmp_path, run_train, tiny_bert_dir):
    export = tmp_path / "model"
    code, out, err = run_train(*_train_args(tiny_bert_dir, tmp_path, tmp_path / "runs"), "--export_dir", str(export))
    assert code == 0, err
    assert outputs.is_export(export) and (export / "config.json").is_file()
    (export / "stale-extra.txt").write_text("from the first export")
    code, _, err = run_train(*_train_args(tiny_bert_dir, tmp_path, tmp_path / "runs"), "--export_dir", str(export))
    assert code == 2 and "holds an earlier export; pass --overwrite true" in err
    code, out, err = run_train(*_train_args(tiny_bert_dir, tmp_path, tmp_path / "runs"), "--export_dir", str(export), "--overwrite", "true")
    assert code == 0, err
    assert outputs.is_export(export) and not (export / "stale-extra.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_publish_dir_keeps_the_old_export_when_the_swap_fails(tmp_path, monkeypatch):
    out, new = tmp_path / "model", tmp_path / ".model.tmp-x"
    out.mkdir()
    outputs.write_export_marker(out)
    (out / "weights").write_text("old")
    new.mkdir()
    (new / "weights").write_text("new")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == new:
            raise OSError("disk full")
        return real_rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        outputs.publish_dir(new, out, overwrite=True, token=outputs.run_token())
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp-x", "model"]


def test_export_folder_that_appears_during_training_is_not_replaced(tmp_path):
    out, new = tmp_path / "model", tmp_path / ".model.tmp-x"
    new.mkdir()
    out.mkdir()
    (out / "theirs.txt").write_text("someone else's")
    with pytest.raises(OutputExistsError, match="not a lit_fast export"):
        outputs.publish_dir(new, out, overwrite=True, token=outputs.run_token())
    assert (out / "theirs.txt").read_text() == "someone else's"


# ---- prediction files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_output_that_is_the_input_is_refused(tmp_path, run_predict, tiny_bert_dir, how):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    original = data.read_bytes()
    out = {"same path": data, "symlink": tmp_path / "link.jsonl", "hard link": tmp_path / "hard.jsonl"}[how]
    if how == "symlink":
        out.symlink_to(data)
    elif how == "hard link":
        os.link(data, out)
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--output", str(out), "--overwrite", "true")
    assert code == 2 and "is the input file" in err, err
    assert data.read_bytes() == original


def test_output_that_appears_while_predicting_is_not_replaced(tmp_path, run_predict, tiny_bert_dir, monkeypatch):
    from lit_fast.data.writers import PredictionWriter

    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    out = tmp_path / "out.jsonl"
    start = PredictionWriter.on_predict_start

    def someone_writes(self, trainer, pl_module):
        start(self, trainer, pl_module)
        out.write_text("another job's file\n")

    monkeypatch.setattr(PredictionWriter, "on_predict_start", someone_writes)
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--output", str(out))
    assert code == 2 and "appeared while this run was predicting" in err, err
    assert out.read_text() == "another job's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_publish_file_without_overwrite_never_replaces(tmp_path):
    out, tmp = tmp_path / "o.jsonl", tmp_path / ".o.jsonl.tmp-x"
    tmp.write_text("new\n")
    outputs.publish_file(tmp, out, overwrite=False)
    assert out.read_text() == "new\n" and not tmp.exists()
    tmp.write_text("newer\n")
    with pytest.raises(OutputExistsError):
        outputs.publish_file(tmp, out, overwrite=False)
    assert out.read_text() == "new\n" and not tmp.exists()
    tmp.write_text("newer\n")
    outputs.publish_file(tmp, out, overwrite=True)
    assert out.read_text() == "newer\n"


@pytest.mark.parametrize("case", ["parent is a file", "unwritable folder"])
def test_output_that_cannot_be_written_fails_before_loading(tmp_path, case):
    if case == "parent is a file":
        (tmp_path / "f").write_text("x")
        path = tmp_path / "f" / "sub" / "o.jsonl"
        with pytest.raises(ConfigError, match="is a file, not a folder"):
            outputs.check_output_file(str(path), overwrite=False)
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        with pytest.raises(ConfigError, match="cannot write in"):
            outputs.check_output_file(str(folder / "o.jsonl"), overwrite=False)


# ---- what killed runs leave behind -----------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_clean_stale_removes_only_what_dead_runs_left(tmp_path):
    out = tmp_path / "o.jsonl"
    host = outputs._host()
    dead = _dead_pid()
    stale_parts = tmp_path / f".o.jsonl.parts-{host}-{dead}-aaaa"
    stale_parts.mkdir()
    (stale_parts / "rank00000.jsonl").write_text("{}\n")
    stale_tmp = tmp_path / f".o.jsonl.tmp-{host}-{dead}-bbbb"
    stale_tmp.write_text("half")
    live = tmp_path / f".o.jsonl.parts-{host}-{os.getpid()}-cccc"  # this process: alive
    live.mkdir()
    other_host = tmp_path / f".o.jsonl.tmp-otherhost-{dead}-dddd"  # cannot be proven dead
    other_host.write_text("?")
    unrelated = tmp_path / ".o.jsonl.notes"
    unrelated.write_text("mine")
    outputs.clean_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name, unrelated.name])


def test_clean_stale_puts_back_an_export_set_aside_by_a_killed_run(tmp_path):
    out = tmp_path / "model"
    aside = tmp_path / f".model.old-{outputs._host()}-{_dead_pid()}-aaaa"
    aside.mkdir()
    outputs.write_export_marker(aside)
    outputs.clean_stale(out)
    assert outputs.is_export(out) and not aside.exists()


def test_a_later_predict_cleans_what_a_killed_one_left(tmp_path, run_predict, tiny_bert_dir):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    out = tmp_path / "out.jsonl"
    junk = tmp_path / f".out.jsonl.parts-{outputs._host()}-{_dead_pid()}-aaaa"
    junk.mkdir()
    (junk / "rank00000.jsonl").write_text('{"index": 0}\n')
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--output", str(out))
    assert code == 0, err
    assert len(read_jsonl(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
