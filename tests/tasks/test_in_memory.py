"""The in-memory API: `Embedder.encode` (and the runner behind it) without a Trainer, as the command computes."""

import numpy as np
import pytest
import torch

import lit_fast
from conftest import ROOT, read_jsonl, write_jsonl
from lit_fast.tasks.in_memory import place, predict_rows

EMBED = str(ROOT / "configs" / "embed-minilm.yaml")


def _texts(n):
    # lengths that vary a lot, so batches are planned longest first and rows must be put back in order
    return [f"text {i} " + "word " * (i * 7 % 41) for i in range(n)]


def test_encode_equals_the_command_row_by_row(tmp_path, run_predict, tiny_bert_dir):
    texts = _texts(37)
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--data.batch_size", "8", "--output", str(tmp_path / "out.jsonl"))
    assert code == 0, err
    expected = np.array([r["embedding"] for r in read_jsonl(tmp_path / "out.jsonl")], dtype=np.float32)
    vectors = lit_fast.Embedder(tiny_bert_dir).encode(texts, batch_size=8)
    assert vectors.shape == expected.shape == (37, 32)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_encode_shapes_order_and_bad_input(tiny_bert_dir):
    model = lit_fast.Embedder(tiny_bert_dir)
    texts = _texts(20)
    batched = model.encode(texts, batch_size=3)
    one_by_one = np.stack([model.encode(t) for t in texts])  # one string -> one vector
    assert model.encode(texts[4]).shape == (32,)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert model.encode([]).shape[0] == 0
    with pytest.raises(lit_fast.InputDataError, match="text 1 \\(0-based\\) is empty"):
        model.encode(["fine", "  "])
    with pytest.raises(lit_fast.ConfigError, match="precision '64-true' is not one of auto"):
        model.encode(texts, precision="64-true")


def test_encode_matches_sentence_transformers_on_real_minilm(minilm_dir):
    from sentence_transformers import SentenceTransformer

    texts = _texts(30) + ["A warm, funny and beautifully acted film.", "Tedious and overlong."]
    ours = lit_fast.Embedder(minilm_dir).encode(texts, batch_size=7)
    reference = SentenceTransformer(minilm_dir, device="cpu").encode(texts)
    cosine = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.9999


def test_encode_bf16_mixed_is_the_commands_autocast_with_fp32_weights(tmp_path, run_predict, minilm_dir):
    """precision="bf16-mixed": fp32 weights under autocast, as Lightning's plugin runs the command's bf16-mixed; the
    vectors within cosine 0.9999 of fp32's and of the command's."""
    texts = [t["text"] for t in read_jsonl(ROOT / "lit_fast" / "examples" / "sentences.jsonl")]
    model = lit_fast.Embedder(minilm_dir)
    mixed = model.encode(texts, device="cpu", precision="bf16-mixed")
    assert model.model.get_input_embeddings().weight.dtype == torch.float32
    fp32 = model.encode(texts, device="cpu", precision="32-true")
    code, _, err = run_predict("--config", EMBED, "--model.pretrained", minilm_dir, "--trainer.accelerator", "cpu",
                               "--trainer.precision", "bf16-mixed", "--output", str(tmp_path / "out.jsonl"))
    assert code == 0, err
    command = np.array([r["embedding"] for r in read_jsonl(tmp_path / "out.jsonl")], dtype=np.float32)

    def cosines(a, b):
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    assert not np.array_equal(mixed, fp32)  # autocast did run
    assert cosines(mixed, fp32).min() >= 0.9999 and cosines(mixed, command).min() >= 0.9999


def test_placing_again_on_the_same_device_keeps_the_model(tiny_bert_dir):
    model = lit_fast.Embedder(tiny_bert_dir)
    assert place(model, "cpu") == torch.device("cpu")
    weights = model.model.get_input_embeddings().weight
    place(model, "cpu", "32-true")
    assert model.model.get_input_embeddings().weight is weights
    rows = predict_rows(model, ["b a", "a"], batch_size=1)
    assert [r["index"] for r in rows] == [0, 1]


def test_classifier_predict_equals_the_command(tmp_path, run_predict, minilm_dir):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model_dir = tmp_path / "classifier"
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=128, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
                        architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(model_dir)
    texts = _texts(19)
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    code, _, err = run_predict("--config", str(ROOT / "configs" / "classify.yaml"), "--model.pretrained",
                               str(model_dir), "--data.path", str(data), "--output", str(tmp_path / "out.jsonl"))
    assert code == 0, err
    expected = read_jsonl(tmp_path / "out.jsonl")
    got = lit_fast.Classifier(str(model_dir)).predict(texts, batch_size=4)
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert [g["score"] for g in got] == pytest.approx([e["score"] for e in expected], abs=1e-5)
