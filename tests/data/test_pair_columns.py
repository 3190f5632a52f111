"""Rows with two texts (reranker query/passage, embedder anchor/positive) and hard negatives."""

import json
from types import SimpleNamespace

import pytest

from lit_fast import ConfigError, InputDataError, TextDataModule


def _write(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_records_carry_the_pair_and_the_negatives(tmp_path):
    path = _write(tmp_path, [{"q": "a", "p": "b", "n": ["c"]}, {"q": "d", "p": "e", "n": ["f", "g"]}])
    data = TextDataModule(path, text_column="q", pair_column="p", negative_column="n")
    records = data._records(path, need_label=False, need_target=False).records
    assert records == [{"index": 0, "text": "a", "pair": "b", "negative": ["c"]},
                       {"index": 1, "text": "d", "pair": "e", "negative": ["f", "g"]}]
    one = _write(tmp_path, [{"q": "a", "p": "b", "n": "c"}])  # one negative per row: a text column
    assert data._records(one, need_label=False, need_target=False).records[0]["negative"] == ["c"]


@pytest.mark.parametrize("row, message", [
    ({"q": "a", "p": ""}, "row 0 .* no text in 'p'"),
    ({"q": "a", "p": "b", "n": []}, "row 0 .*'n' must be a text or a list of texts"),
    ({"q": "a", "p": "b", "n": ["x", ""]}, "row 0 .*'n' must be a text or a list of texts"),
])
def test_a_bad_pair_or_negative_names_the_row(tmp_path, row, message):
    path = _write(tmp_path, [row])
    data = TextDataModule(path, text_column="q", pair_column="p", negative_column="n" if "n" in row else None)
    with pytest.raises(InputDataError, match=message):
        data._records(path, need_label=False, need_target=False)


def test_a_task_that_reads_pairs_asks_for_the_column():
    data = TextDataModule("x.jsonl")
    with pytest.raises(ConfigError, match="set --data.pair_column"):
        data._check_columns(SimpleNamespace(needs_pair=True), "predict")
    with pytest.raises(ConfigError, match="set --data.label_column"):
        data._check_columns(SimpleNamespace(needs_label=True), "fit")
    data._check_columns(SimpleNamespace(needs_label=True), "predict")  # predicting needs no labels


def test_list_cells_only_where_the_task_takes_them(tmp_path):
    path = _write(tmp_path, [{"words": ["EU", "rejects"], "tags": ["B-ORG", "O"]}])
    data = TextDataModule(path, text_column="words", label_column="tags")
    with pytest.raises(InputDataError, match="line 1, column 'words': a JSON list where text is expected"):
        data._records(path, need_label=True, need_target=False)
    data.list_roles = ("text", "label")  # what a token classifier declares
    record = data._records(path, need_label=True, need_target=False).records[0]
    assert record["text"] == ["EU", "rejects"] and record["label"] == ["B-ORG", "O"]
