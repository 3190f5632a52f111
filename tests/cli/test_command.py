"""The `lit-fast` command (and `python -m lit_fast`): subcommands, configs named without a path, auto precision."""

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, read_jsonl, write_jsonl
from lit_fast.cli import main, normalize_args, shipped_configs
from lit_fast.models import precision_checks
from lit_fast.models.precision_checks import auto_precision


def _lit_fast(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "lit_fast", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def test_python_m_lit_fast_predicts_with_a_config_named_without_a_path(tmp_path, tiny_bert_dir):
    """From another folder, as an installed command runs: the config and its example input come from the package."""
    out = tmp_path / "out.jsonl"
    proc = _lit_fast("predict", "--config", "embed-minilm", "--model.pretrained", tiny_bert_dir, "--output", str(out),
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 10 rows to {out}" in proc.stdout
    assert [r["index"] for r in read_jsonl(out)] == list(range(10))
    assert "precision: 32-true (auto: no GPU" in proc.stderr


def test_every_shipped_config_is_named_by_its_stem(capsys):
    names = shipped_configs()
    assert {"embed-minilm", "classify-rotten", "generate-smollm2"} <= set(names)
    assert sorted(p.stem for p in (ROOT / "lit_fast" / "configs").glob("*.yaml")) == names
    assert main(["configs"]) == 0
    assert capsys.readouterr().out.split() == names


def test_config_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = str(ROOT / "lit_fast" / "configs" / "embed-minilm.yaml")
    assert normalize_args(["--config", "embed-minilm"]) == ["--config", shipped]
    assert normalize_args(["--config=embed-minilm.yaml"]) == [f"--config={shipped}"]
    (tmp_path / "embed-minilm").write_text("model: {}\n")  # a file here wins over the shipped name
    assert normalize_args(["--config", "embed-minilm"]) == ["--config", "embed-minilm"]
    assert normalize_args(["--config", "no-such-config"]) == ["--config", "no-such-config"]  # LightningCLI says so
    assert normalize_args(["--trainer.precision", "auto"]) == ["--trainer.precision", "null"]
    assert normalize_args(["--trainer.precision=auto"]) == ["--trainer.precision=null"]


def test_usage_and_unknown_commands(capsys):
    assert main([]) == 2
    assert "usage: lit-fast" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert main(["predcit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'predcit'") and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory, minilm_dir) -> str:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-classifier")
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=128, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
                        architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(path)
    return str(path)


def test_test_subcommand_scores_every_row(tmp_path, tiny_classifier_dir):
    rows = [{"text": f"review {i} " + "good " * (i % 3), "label": "pos" if i % 2 else "neg"} for i in range(12)]
    data = write_jsonl(tmp_path / "labelled.jsonl", rows)
    proc = _lit_fast("test", "--config", "classify", "--model.pretrained", tiny_classifier_dir, "--data.path", str(data),
                     "--data.label_column", "label", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "evaluating all 12 rows" in proc.stderr
    assert "test_loss" in proc.stdout


@pytest.mark.parametrize("cuda, bf16, mode, saved, expected", [
    (False, False, "predict", "float32", "32-true"),
    (False, False, "train", "bfloat16", "32-true"),
    (True, True, "predict", "float32", "16-true"),
    (True, True, "predict", torch.float16, "16-true"),
    (True, True, "predict", torch.bfloat16, "bf16-true"),
    (True, False, "predict", "bfloat16", "16-true"),
    (True, True, "train", "float32", "bf16-mixed"),
    (True, False, "train", "float32", "16-mixed"),
])
def test_auto_precision(monkeypatch, cuda, bf16, mode, saved, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    precision, why = auto_precision(mode, "auto", saved)
    assert precision == expected and why
    assert auto_precision(mode, "cpu", saved)[0] == "32-true"  # an explicit CPU accelerator is a CPU run


def test_saved_dtype_prefers_what_the_model_asks_for():
    class Task:
        hparams = {"dtype": "bfloat16"}
        hf_config = type("C", (), {"dtype": torch.float32})()

    assert precision_checks.saved_dtype(Task()) == "bfloat16"
    Task.hparams = {"dtype": None}
    assert precision_checks.saved_dtype(Task()) == torch.float32
