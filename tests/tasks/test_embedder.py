"""The packaged all-MiniLM-L6-v2 through lit_fast equals sentence-transformers and a plain-transformers reference."""

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, read_jsonl, write_jsonl

TEXTS = [
    "A man is eating food.",
    "The new movie is awesome!",
    "x",
    "Nothing here but an ordinary sentence of middling length, written to be padded against longer ones.",
    # far past 256 tokens: must be truncated exactly as the model's sentence_bert_config.json says
    " ".join(f"token{i} and some filler words" for i in range(400)),
    "Ünïcödé, emoji 🙂 and CJK 漢字 survive tokenization.",
]


@pytest.fixture(scope="module")
def lit_fast_embeddings(tmp_path_factory):
    from lit_fast.cli import predict_main

    tmp = tmp_path_factory.mktemp("emb")
    data = write_jsonl(tmp / "in.jsonl", [{"text": t} for t in TEXTS])
    out = tmp / "out.jsonl"
    code = predict_main(["--config", str(ROOT / "configs/embed-minilm.yaml"), "--data.path", str(data),
                         "--data.batch_size", "4", "--output", str(out)])
    assert code == 0
    return torch.tensor([r["embedding"] for r in read_jsonl(out)])


def test_matches_sentence_transformers(lit_fast_embeddings, minilm_dir):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(minilm_dir, device="cpu")
    assert st.max_seq_length == 256
    reference = torch.tensor(st.encode(TEXTS, batch_size=4, convert_to_numpy=True))
    cosine = F.cosine_similarity(lit_fast_embeddings, reference, dim=-1)
    assert cosine.min() >= 0.9999, cosine
    torch.testing.assert_close(lit_fast_embeddings, reference, atol=1e-5, rtol=1e-4)


def test_matches_plain_transformers_mean_pool(lit_fast_embeddings, minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    rows = []
    with torch.no_grad():
        for text in TEXTS:  # one at a time: no padding at all in the reference
            enc = tok(text, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0]
            rows.append(F.normalize(hidden.mean(0), dim=-1))
    reference = torch.stack(rows)
    cosine = F.cosine_similarity(lit_fast_embeddings, reference, dim=-1)
    assert cosine.min() >= 0.9999, cosine
    # the long text really was truncated at 256 tokens (and not at the tokenizer's 512)
    long_ids = tok(TEXTS[4], truncation=True, max_length=512)["input_ids"]
    assert len(long_ids) > 256


def test_pooling_modes_match_their_definitions():
    from lit_fast.tasks.embedding import pool

    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right and left padding
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "mean")[1], hidden[1, 1:].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "max")[1], hidden[1, 1:].max(0).values)
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.stack([hidden[0, 0], hidden[1, 1]]))  # first kept
    torch.testing.assert_close(pool(hidden, mask, "lasttoken"), torch.stack([hidden[0, 2], hidden[1, 3]]))
    torch.testing.assert_close(pool(hidden, mask, "mean_sqrt_len")[0], hidden[0, :3].sum(0) / 3 ** 0.5)
    weights = torch.tensor([1.0, 2.0, 3.0])[:, None]
    torch.testing.assert_close(pool(hidden, mask, "weightedmean")[1], (hidden[1, 1:] * weights).sum(0) / 6)
    torch.testing.assert_close(pool(hidden, mask, ("cls", "mean")),
                               torch.cat([pool(hidden, mask, "cls"), pool(hidden, mask, "mean")], dim=-1))
    # a prompt of 2 tokens (with the leading special token) is left out of the pooling
    torch.testing.assert_close(pool(hidden, mask, "mean", prompt_length=2)[0], hidden[0, 2])
    torch.testing.assert_close(pool(hidden, mask, "cls", prompt_length=2)[1], hidden[1, 3])


def test_exported_embedder_loads_in_sentence_transformers(tmp_path, tiny_bert_dir):
    from sentence_transformers import SentenceTransformer

    from lit_fast import Embedder

    module = Embedder(tiny_bert_dir, pooling="cls", normalize=True, max_length=64)
    module.configure_model()
    module.export(str(tmp_path / "exported"))
    st = SentenceTransformer(str(tmp_path / "exported"), device="cpu")
    assert st.max_seq_length == 64
    enc = module.tokenizer(["hello world"], return_tensors="pt")
    with torch.no_grad():
        mine = module.embed({**enc})
    torch.testing.assert_close(torch.tensor(st.encode(["hello world"])), mine, atol=1e-5, rtol=1e-4)


def test_fp16_weights_run_fp32_where_the_precision_is_32_true(tmp_path, tiny_bert_dir, run_predict, caplog):
    """Lightning's 32-true leaves a module as loaded: a model saved in fp16 ran fp16 on the CPU (4.6x slower than
    encode() on W8's CPU rows) while the log said 32-true. Weights now load in fp32 there."""
    from transformers import AutoModel, AutoTokenizer

    half = tmp_path / "half"
    AutoModel.from_pretrained(tiny_bert_dir).half().save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(half)
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    with caplog.at_level("INFO", logger="lit_fast"):
        code, _, err = run_predict("--config", str(ROOT / "configs/embed-minilm.yaml"), "--model.pretrained", str(half),
                                   "--model.max_length", "64", "--data.path", str(data), "--trainer.accelerator", "cpu",
                                   "--output", str(tmp_path / "out.jsonl"))
    assert code == 0, err
    assert "cpu/float32" in caplog.text and "cpu/float16" not in caplog.text
