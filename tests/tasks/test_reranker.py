"""Reranker: scores equal sentence-transformers' CrossEncoder on the same weights, the fast path equals HF eager,
ranks per query, fine-tune -> export -> CrossEncoder and predict, and one clear error for bad input."""

import numpy as np
import pytest
import torch

from conftest import ROOT, read_jsonl, write_jsonl

PREDICT = str(ROOT / "configs/rerank.yaml")
FINETUNE = str(ROOT / "configs/rerank-finetune.yaml")

PAIRS = [
    ("what do pandas eat", "Pandas mostly eat bamboo."),
    ("what do pandas eat", "Owls hunt at night, and they eat mice and insects when they find them in the fields."),
    ("owl habits", "Owls hunt at night."),
    ("what do pandas eat", "Pandas spend most of the day eating."),
    ("owl habits", "x"),
    ("a query long enough to need truncation " * 30, "and a long passage too " * 30),  # longest-first truncation
    ("what do pandas eat", "Cows mostly eat grass and hay."),
]


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory, tiny_bert_dir):
    """A random-init 2-layer BERT cross-encoder (one output), saved as transformers saves it."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-ce")
    # a wider initialisation than BERT's 0.02, so that random weights give scores that differ from pair to pair
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1, initializer_range=0.3)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return str(path)


def _pairs_file(tmp_path, pairs=PAIRS):
    return write_jsonl(tmp_path / "pairs.jsonl", [{"query": q, "passage": p} for q, p in pairs])


def _cross_encoder_scores(model_dir, pairs=PAIRS, max_length=128):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(model_dir, device="cpu", max_length=max_length).predict(pairs, batch_size=3)


def test_scores_equal_sentence_transformers_cross_encoder(tmp_path, run_predict, cross_encoder_dir):
    out = tmp_path / "out.jsonl"
    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", cross_encoder_dir, "--model.top_k", "null",
                               "--model.max_length", "128",
                               "--data.path", str(_pairs_file(tmp_path)), "--data.batch_size", "3",
                               "--output", str(out))
    assert code == 0, err
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == list(range(len(PAIRS)))
    assert all(set(r) == {"index", "score"} for r in rows)
    reference = _cross_encoder_scores(cross_encoder_dir)
    np.testing.assert_allclose([r["score"] for r in rows], reference, atol=1e-5, rtol=0)
    # the scores differ from pair to pair (a constant would pass the comparison above without meaning anything)
    assert np.ptp(reference) > 0.05, reference


def test_fast_path_equals_hf_eager(cross_encoder_dir):
    """The encoder fast path under the Reranker's forward: logits of real pairs equal HF eager's within 1e-4."""
    from lit_fast.fastpath import FastPathOptions, plan_fast_path
    from lit_fast.tasks.reranker import Reranker

    task = Reranker(cross_encoder_dir, attention="eager", max_length=128)
    task.configure_model()
    task.model.eval()
    codec = task.codec()
    batch = codec.collate(codec.encode([{"index": i, "text": q, "pair": p} for i, (q, p) in enumerate(PAIRS)],
                                       "predict"))
    assert batch["token_type_ids"].any(), "pairs carry the passage's token type"
    with torch.no_grad():
        reference = task._logits(batch)
        plan = plan_fast_path(task.model, FastPathOptions(backend="packed"), "cpu", torch.float32)
        assert plan.backend == "packed", plan.reason
        plan.install()
        fast = task._logits(batch)
    assert type(vars(task.model.bert).get("forward")).__name__ == "FastFront"
    diff = (fast - reference).abs().max().item()
    assert diff <= 1e-4, diff


def test_saved_activation_and_several_labels_as_sentence_transformers(tmp_path, run_predict, cross_encoder_dir,
                                                                      tiny_bert_dir):
    """A CrossEncoder saved with Identity scores with raw logits; a 3-label pair classifier writes its best label."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, \
        BertForSequenceClassification

    saved = tmp_path / "identity"
    CrossEncoder(cross_encoder_dir, device="cpu", max_length=128, activation_fn=torch.nn.Identity()).save(str(saved))
    out = tmp_path / "o.jsonl"
    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", str(saved), "--model.top_k", "null",
                               "--model.max_length", "128", "--data.path", str(_pairs_file(tmp_path)),
                               "--output", str(out))
    assert code == 0, err
    scores = [r["score"] for r in read_jsonl(out)]
    np.testing.assert_allclose(scores, _cross_encoder_scores(str(saved)), atol=1e-5, rtol=0)
    assert min(scores) < 0 or max(scores) > 1, "raw logits, not probabilities"

    names = ["contradiction", "entailment", "neutral"]
    torch.manual_seed(4)  # weights that give these pairs all three labels
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=1.0,
                        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    nli = tmp_path / "nli"
    BertForSequenceClassification(config).save_pretrained(nli)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(nli)
    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", str(nli), "--model.top_k", "null",
                               "--model.max_length", "128", "--data.path", str(_pairs_file(tmp_path)),
                               "--output", str(tmp_path / "nli.jsonl"), "--overwrite", "true")
    assert code == 0, err
    rows = read_jsonl(tmp_path / "nli.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(nli)
    model = AutoModelForSequenceClassification.from_pretrained(nli, attn_implementation="eager").eval()
    with torch.no_grad():
        probs = model(**tokenizer([q for q, _ in PAIRS], [p for _, p in PAIRS], truncation=True, max_length=128,
                                  padding=True, return_tensors="pt")).logits.softmax(-1)
    assert [r["label"] for r in rows] == [names[k] for k in probs.argmax(-1).tolist()]
    np.testing.assert_allclose([r["score"] for r in rows], probs.max(-1).values.numpy(), atol=1e-5, rtol=0)
    assert len({r["label"] for r in rows}) > 1


def test_top_k_on_two_ddp_processes_equals_one_process(tmp_path, cross_encoder_dir):
    """A query's pairs land on both ranks: the ranks are computed over all of them, the file is the same."""
    from conftest import run_script

    pairs = [(f"query {k % 3}", f"passage {k} " + "word " * (k % 5)) for k in range(23)]
    data = _pairs_file(tmp_path, pairs)
    outputs = []
    for devices in ("1", "2"):
        out = tmp_path / f"out{devices}.jsonl"
        proc = run_script("predict.py", "--config", PREDICT, "--model.pretrained", cross_encoder_dir,
                          "--model.max_length", "128", "--model.top_k", "3", "--data.path", str(data),
                          "--data.batch_size", "4", "--trainer.strategy", "ddp" if devices == "2" else "auto",
                          "--trainer.devices", devices, "--trainer.accelerator", "cpu", "--output", str(out),
                          env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(read_jsonl(out))
    assert [r["rank"] for r in outputs[1]] == [r["rank"] for r in outputs[0]]
    np.testing.assert_allclose([r["score"] for r in outputs[1]], [r["score"] for r in outputs[0]], atol=1e-6, rtol=0)
    assert sorted(r["rank"] for r in outputs[0] if r["rank"] is not None) == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_ranks_within_queries_by_score_then_input_order():
    from lit_fast.tasks.reranker import mean_reciprocal_rank, ranks_within_queries

    keys = np.array([7, 3, 7, 7, 3, 9])
    scores = np.array([0.2, 0.9, 0.8, 0.2, 0.1, 0.5])
    # query 7: 0.8 first, then the two 0.2s in input order (rows 0 and 3); query 3: 0.9 then 0.1; query 9 alone
    assert ranks_within_queries(keys, scores).tolist() == [2, 1, 1, 3, 2, 1]
    relevant = np.array([True, False, False, False, True, False])
    # query 7: its relevant pair is ranked 2nd -> 1/2; query 3: 2nd -> 1/2; query 9 has none and is not counted
    assert mean_reciprocal_rank(keys, scores, relevant) == pytest.approx(0.5)
    assert mean_reciprocal_rank(keys, scores, relevant, at=1) == 0.0


def test_top_k_ranks_each_query_over_batches(tmp_path, run_predict, cross_encoder_dir):
    out = tmp_path / "out.jsonl"
    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", cross_encoder_dir, "--model.top_k", "2",
                               "--model.max_length", "128",
                               "--data.path", str(_pairs_file(tmp_path)), "--data.batch_size", "2",
                               "--output", str(out))
    assert code == 0, err
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == list(range(len(PAIRS)))
    reference = _cross_encoder_scores(cross_encoder_dir)
    np.testing.assert_allclose([r["score"] for r in rows], reference, atol=1e-5, rtol=0)
    for query in {q for q, _ in PAIRS}:
        mine = [k for k, (q, _) in enumerate(PAIRS) if q == query]
        by_score = sorted(mine, key=lambda k: -rows[k]["score"])
        expected = {k: n + 1 if n < 2 else None for n, k in enumerate(by_score)}
        assert {k: rows[k]["rank"] for k in mine} == expected


def test_finetune_export_loads_in_cross_encoder_and_predicts(tmp_path, run_train, run_predict, tiny_bert_dir):
    export = tmp_path / "rr"
    code, out, err = run_train("--config", FINETUNE, "--model.pretrained", tiny_bert_dir, "--model.max_length", "64",
                               "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "runs"),
                               "--export_dir", str(export))
    assert code == 0, err
    assert "exported the best model (val_mrr@10=" in out

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(export)
    assert model.config.num_labels == 1
    # sentence-transformers reads the activation from here (as its v4+ CrossEncoder saves it)
    assert model.config.sentence_transformers["activation_fn"] == "torch.nn.modules.activation.Sigmoid"

    pairs = [("what do cows eat", "Cows mostly eat grass and hay."), ("what do cows eat", "Owls hunt at night."),
             ("koala habits", "Koalas sleep up to twenty hours a day.")]
    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", str(export), "--model.top_k", "1",
                               "--data.path", str(_pairs_file(tmp_path, pairs)), "--output", str(tmp_path / "o.jsonl"))
    assert code == 0, err
    rows = read_jsonl(tmp_path / "o.jsonl")
    np.testing.assert_allclose([r["score"] for r in rows], _cross_encoder_scores(str(export), pairs, None),
                               atol=1e-5, rtol=0)
    assert [r["rank"] for r in rows][:2] in ([1, None], [None, 1]) and rows[2]["rank"] == 1


@pytest.mark.slow
def test_rerank_config_learns_the_example_data(tmp_path, run_train, run_predict):
    """The real run of configs/rerank-finetune.yaml: MiniLM, 221 synthetic pairs, 5 epochs, then configs/rerank.yaml.

    Reference (CPU, packed): MRR@10 0.50 after the first epoch (a random order of 4-5 passages scores about 0.5),
    1.0 after the fifth (seeds 42, 5, 2: 1.0, 1.0, 0.90 packed; 0.92, 0.85, 0.98 padded)."""
    export = tmp_path / "rr"
    code, out, err = run_train("--config", FINETUNE, "--trainer.default_root_dir", str(tmp_path / "runs"),
                               "--export_dir", str(export))
    assert code == 0, err
    mrr = float(out.split("val_mrr@10=")[1].split(",")[0])
    assert mrr >= 0.8, out
    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", str(export),
                               "--output", str(tmp_path / "o.jsonl"))
    assert code == 0, err
    rows = read_jsonl(tmp_path / "o.jsonl")
    assert rows[0]["rank"] == 1 and rows[3]["rank"] == 1  # the panda's diet; what owls do


def test_bad_input_gives_one_clear_error(tmp_path, run_train, run_predict, tiny_bert_dir, cross_encoder_dir):
    rows = [{"query": "q", "passage": "p", "label": "relevant"}] * 20
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, _, err = run_train("--config", FINETUNE, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                             "--data.val_path", str(data))
    assert code == 2 and "relevance label 'relevant' is not a number from 0 to 1" in err
    assert err.count("error:") == 1

    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", cross_encoder_dir,
                               "--data.pair_column", "null", "--data.path", str(_pairs_file(tmp_path)),
                               "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and "Reranker reads two texts per row: set --data.pair_column" in err
    assert not (tmp_path / "o.jsonl").exists()

    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", cross_encoder_dir, "--model.top_k", "0",
                               "--data.path", str(_pairs_file(tmp_path)), "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and "model.top_k must be at least 1" in err
