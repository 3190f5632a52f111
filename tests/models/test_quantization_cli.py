"""`--model.quantization` end to end through predict.py, on tiny models (CPU) and on a GPU when there is one."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from tests.conftest import read_jsonl, write_jsonl  # noqa: E402

TEXTS = ["a fine film", "the plot drags and the jokes fall flat", "luminous", "I walked out after an hour",
         "an uneven but often funny comedy with a great lead performance", "dull"]


VOCAB = 128


def _save_tokenizer(path) -> None:
    """A word-level BERT tokenizer over the test texts (no packaged model needed: the GPU image has none)."""
    from transformers import BertTokenizerFast

    words = sorted({w for t in TEXTS for w in t.lower().split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("q-tiny-classifier")
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128, initializer_range=0.1,
                        num_labels=2, id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1},
                        architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(config).save_pretrained(path)
    _save_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A tiny BERT with hidden size 64: bitsandbytes' AVX512-BF16 CPU kernel needs in_features to be a multiple
    of its block size (64) unless the model went through prepare_quantized_model."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("q-tiny-bert")
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    _save_tokenizer(path)
    return str(path)


@pytest.fixture
def texts_file(tmp_path):
    return write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])


def _embed(run_predict, model_dir, texts_file, out, *extra):
    code, _, err = run_predict("--config", "configs/embed-minilm.yaml", "--model.pretrained", model_dir,
                               "--data.path", str(texts_file), "--data.id_column", "null", "--output", str(out),
                               "--trainer.accelerator", "cpu", *extra)
    assert code == 0, err
    return torch.tensor([r["embedding"] for r in read_jsonl(out)])


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_embedder_predict_quantized(run_predict, tiny_bert_dir, texts_file, tmp_path, mode, caplog):
    full = _embed(run_predict, tiny_bert_dir, texts_file, tmp_path / "full.jsonl", "--model.fast_path", "off")
    with caplog.at_level("INFO"):
        quant = _embed(run_predict, tiny_bert_dir, texts_file, tmp_path / "q.jsonl", "--model.quantization", mode)
    assert quant.shape == full.shape == (len(TEXTS), 64)
    cos = torch.nn.functional.cosine_similarity(quant, full, dim=-1)
    assert cos.min() > 0.99 and not torch.equal(quant, full)
    # the fast path refuses bitsandbytes layers and the module says it keeps SDPA
    assert any("fast path: not used" in r.getMessage() and "sdpa" in r.getMessage() for r in caplog.records)


def test_classifier_predict_quantized(run_predict, tiny_classifier_dir, texts_file, tmp_path):
    outputs = {}
    for name, extra in (("full", ()), ("nf4", ("--model.quantization", "nf4"))):
        out = tmp_path / f"{name}.jsonl"
        code, _, err = run_predict("--config", "configs/classify.yaml", "--model.pretrained", tiny_classifier_dir,
                                   "--data.path", str(texts_file), "--output", str(out),
                                   "--trainer.accelerator", "cpu", *extra)
        assert code == 0, err
        outputs[name] = read_jsonl(out)
    assert len(outputs["nf4"]) == len(TEXTS)
    assert {r["label"] for r in outputs["nf4"]} <= {"rotten", "fresh"}
    for full, quant in zip(outputs["full"], outputs["nf4"]):
        assert abs(full["score"] - quant["score"]) < 0.1


def test_unknown_mode_is_one_line(run_predict, tiny_bert_dir, texts_file, tmp_path):
    code, _, err = run_predict("--config", "configs/embed-minilm.yaml", "--model.pretrained", tiny_bert_dir,
                               "--data.path", str(texts_file), "--output", str(tmp_path / "o.jsonl"),
                               "--trainer.accelerator", "cpu", "--model.quantization", "nf3")
    assert code == 2
    assert "error: unknown quantization mode 'nf3'" in err and "nf4, nf4-dq, fp4, fp4-dq, int8" in err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["nf4", "int8", "nf4+emb"])
def test_embedder_predict_quantized_on_gpu(run_predict, tiny_bert_dir, texts_file, tmp_path, mode):
    """Lightning builds the model under the GPU's device context; bitsandbytes layers must end up on CUDA."""
    cpu = _embed(run_predict, tiny_bert_dir, texts_file, tmp_path / "cpu.jsonl", "--model.fast_path", "off")
    code, _, err = run_predict("--config", "configs/embed-minilm.yaml", "--model.pretrained", tiny_bert_dir,
                               "--data.path", str(texts_file), "--data.id_column", "null",
                               "--output", str(tmp_path / "gpu.jsonl"), "--trainer.accelerator", "cuda",
                               "--model.quantization", mode)
    assert code == 0, err
    gpu = torch.tensor([r["embedding"] for r in read_jsonl(tmp_path / "gpu.jsonl")])
    assert torch.nn.functional.cosine_similarity(gpu, cpu, dim=-1).min() > (0.95 if "+emb" in mode else 0.99)


def test_embedder_with_4bit_embedding_table(run_predict, tiny_bert_dir, texts_file, tmp_path, caplog):
    """`nf4+emb`: linears and the word-embedding table in 4 bits, one config switch; close to full precision."""
    full = _embed(run_predict, tiny_bert_dir, texts_file, tmp_path / "full.jsonl", "--model.fast_path", "off")
    with caplog.at_level("INFO"):
        quant = _embed(run_predict, tiny_bert_dir, texts_file, tmp_path / "q.jsonl", "--model.quantization", "NF4+emb")
    cos = torch.nn.functional.cosine_similarity(quant, full, dim=-1)
    assert cos.min() > 0.95 and not torch.equal(quant, full)
    footprint = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantization nf4+emb:")]
    assert footprint, "the footprint line names the mode"


def test_4bit_embeddings_are_refused_for_training_and_int8(run_train, tmp_path):
    from lit_fast.errors import ConfigError
    from lit_fast.models.quantization import base_mode, normalize_mode, quantizes_embeddings

    assert normalize_mode("fp4-DQ+emb") == "fp4-dq+emb" and base_mode("fp4-dq+emb") == "fp4-dq"
    assert quantizes_embeddings("nf4+emb") and not quantizes_embeddings("nf4") and not quantizes_embeddings(None)
    with pytest.raises(ConfigError, match="4-bit modes"):
        normalize_mode("int8+emb")
    code, _, err = run_train("--config", "configs/qlora-causal.yaml", "--model.quantization", "nf4+emb",
                             "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path))
    assert code == 2 and "error: --model.quantization nf4+emb puts the embedding tables in 4 bits" in err
    assert "Fine-tune with nf4 (QLoRA)" in err
