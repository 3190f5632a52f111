"""Hugging Face datasets as --data.path: a save_to_disk folder and a hub dataset from the local cache (offline)."""

import json
import shutil

import pytest

pytest.importorskip("datasets")

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
from conftest import ROOT, read_jsonl  # noqa: E402

from lit_fast.data.readers import read_table  # noqa: E402
from lit_fast.errors import ConfigError, InputDataError  # noqa: E402

ROTTEN = str(ROOT / "configs/classify-rotten.yaml")


def _rows(n: int) -> dict[str, list]:
    return {"text": [f"review {i} " + "word " * (i % 5) for i in range(n)],
            "category": ["fresh" if i % 2 else "rotten" for i in range(n)], "id": [f"r{i}" for i in range(n)],
            "extra": [[i, i] for i in range(n)]}


def test_save_to_disk_folder_is_read_as_a_memory_mapped_arrow_table(tmp_path):
    rows = _rows(2000)
    rows["text"] = [t + "x" * 1000 for t in rows["text"]]  # ~2 MB of text
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    bars = datasets.is_progress_bar_enabled()
    before = pa.total_allocated_bytes()
    table, source = read_table(str(tmp_path / "ds"), {"text": "text", "label": "category"})
    assert isinstance(table, pa.Table) and table.column_names == ["text", "category"]
    assert table.column("text").to_pylist() == rows["text"]
    # the rows stay in the memory-mapped Arrow file: almost nothing was allocated to hold them
    assert pa.total_allocated_bytes() - before < 100_000
    assert source == tmp_path / "ds"
    assert datasets.is_progress_bar_enabled() == bars  # quiet while reading only


def test_class_labels_become_their_names(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]}, features=features).save_to_disk(
        str(tmp_path / "ds"))
    table, _ = read_table(str(tmp_path / "ds"), {"text": "text", "label": "label"})
    assert table.column("label").to_pylist() == ["pos", "neg", "pos"]


def test_dataset_dict_folder_names_its_splits_and_a_split_folder_reads(tmp_path):
    data = datasets.Dataset.from_dict(_rows(6))
    datasets.DatasetDict({"train": data, "test": data.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputDataError, match=r"a DatasetDict of the splits test, train; name one as the path, e.g. "):
        read_table(str(tmp_path / "dd"))
    table, _ = read_table(str(tmp_path / "dd" / "test"), {"text": "text"})
    assert table.num_rows == 2


def test_missing_column_lists_the_columns(tmp_path):
    datasets.Dataset.from_dict(_rows(3)).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(InputDataError, match="no label column 'label'; the columns are: text, category, id, extra"):
        read_table(str(tmp_path / "ds"), {"text": "text", "label": "label"})


def test_train_and_predict_from_saved_datasets(tmp_path, run_train, run_predict, tiny_bert_dir):
    datasets.Dataset.from_dict(_rows(80)).save_to_disk(str(tmp_path / "train"))
    export = tmp_path / "clf"
    code, out, err = run_train("--config", ROTTEN, "--model.pretrained", tiny_bert_dir, "--data.path",
                               str(tmp_path / "train"), "--data.max_rows", "null", "--trainer.max_steps", "3",
                               "--export_dir", str(export))
    assert code == 0, err
    datasets.Dataset.from_dict(_rows(5)).save_to_disk(str(tmp_path / "new"))
    code, _, err = run_predict("--config", str(ROOT / "configs/classify.yaml"), "--model.pretrained", str(export),
                               "--data.path", str(tmp_path / "new"), "--data.id_column", "id",
                               "--output", str(tmp_path / "out.jsonl"))
    assert code == 0, err
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)]
    assert {r["label"] for r in rows} <= {"fresh", "rotten"}


# ---- hub datasets, offline, from the local datasets cache ------------------------------------------------------


def _cache_hub_dataset(cache, name: str, config: str, splits: dict[str, list[dict]], tmp_path) -> None:
    """What datasets.load_dataset(name, config) leaves in HF_DATASETS_CACHE after a download: the prepared Arrow
    files under OWNER___NAME/CONFIG/VERSION/HASH. Built here offline with the json builder, then put where a hub
    dataset's files go."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, rows in splits.items():
        files[split] = [str(tmp_path / f"{config}-{split}.jsonl")]
        (tmp_path / f"{config}-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = Json(dataset_name=name.split("/")[-1], config_name=config, cache_dir=str(tmp_path / "build"),
                   data_files=DataFilesDict.from_patterns(files))
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, cache / name.replace("/", "___") / config / "0.0.0" / "0123456789abcdef",
                    ignore=shutil.ignore_patterns("*.lock"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty datasets cache for this test, with the hub out of reach."""
    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # read at import time
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def test_cached_hub_dataset_by_name_config_and_split(hub_cache, tmp_path):
    reviews = [{"text": f"t{i}", "category": "ab"[i % 2]} for i in range(6)]
    _cache_hub_dataset(hub_cache, "tiny-org/reviews", "plain", {"train": reviews, "test": reviews[:2]}, tmp_path)
    table, source = read_table("hf:tiny-org/reviews:plain@test", {"text": "text", "label": "category"})
    assert table.column("text").to_pylist() == ["t0", "t1"] and str(source) == "hf:tiny-org/reviews:plain@test"
    table, _ = read_table("hf:tiny-org/reviews", {"text": "text"})  # the only config; split train by default
    assert table.num_rows == 6
    table, _ = read_table("hf:tiny-org/reviews:plain@train[2:5]", {"text": "text"})
    assert table.column("text").to_pylist() == ["t2", "t3", "t4"]


def test_hub_dataset_not_cached_is_a_clear_error(hub_cache, tmp_path):
    with pytest.raises(InputDataError, match=r"hf:tiny-org/absent@train: not in the local datasets cache \(.*\) and "
                                             r"the hub cannot be reached"):
        read_table("hf:tiny-org/absent@train")
    _cache_hub_dataset(hub_cache, "tiny-org/reviews", "plain", {"train": [{"text": "a"}]}, tmp_path)
    with pytest.raises(InputDataError, match="hf:tiny-org/reviews:other: .*Available configs in the cache"):
        read_table("hf:tiny-org/reviews:other")


def test_hub_name_syntax_errors_say_how_to_write_it():
    with pytest.raises(ConfigError, match=r"write a hub dataset as hf:NAME\[:CONFIG\]\[@SPLIT\]"):
        read_table("hf:")
