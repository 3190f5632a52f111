"""Hugging Face `datasets` as a source of rows: a `save_to_disk` folder, or a hub dataset by name.

    --data.path runs/reviews                  a Dataset saved with save_to_disk (a DatasetDict: name its split folder,
                                              runs/reviews/train)
    --data.path hf:NAME[:CONFIG][@SPLIT]      a hub dataset (split default train; slices such as train[:10%] work),
                                              from the local datasets cache when offline

Either way the rows stay in the Arrow files datasets keeps (memory-mapped), and columns are chosen as for files.
ClassLabel columns become their label names.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional

from lit_fast.errors import ConfigError, InputDataError

PREFIX = "hf:"
# NAME (owner/name or name), then :CONFIG, then @SPLIT (which may hold a slice: train[:100], test[10%:])
_HUB = re.compile(r"^hf:(?P<name>[^:@\s]+)(?::(?P<config>[^@\s]+))?(?:@(?P<split>\S+))?$")


def is_hub_name(path: str) -> bool:
    return path.startswith(PREFIX)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def parse_hub_name(path: str) -> tuple[str, Optional[str], str]:
    """`hf:NAME[:CONFIG][@SPLIT]` -> (name, config or None, split)."""
    match = _HUB.match(path)
    if not match:
        raise ConfigError(f"data path {path!r}: write a hub dataset as hf:NAME[:CONFIG][@SPLIT], e.g. "
                          "hf:stanfordnlp/imdb@test or hf:nyu-mll/glue:sst2@validation")
    return match["name"], match["config"], match["split"] or "train"


def read_dataset(path: str, used: Optional[Mapping[str, str]]):
    """The Arrow table of a saved dataset folder or a hub dataset, only the `used` columns ({role: name})."""
    datasets = _datasets(path)
    with _quiet(datasets):
        if is_hub_name(path):
            dataset = _load_hub(datasets, path)
        else:
            dataset = _load_folder(datasets, Path(path))
    return _arrow(dataset, used, path)


def _load_folder(datasets, folder: Path):
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
        raise InputDataError(f"{folder}: a DatasetDict of the splits {', '.join(splits)}; name one as the path, "
                             f"e.g. {folder / (splits[0] if splits else 'train')}")
    try:
        return datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise InputDataError(f"{folder}: not a readable save_to_disk dataset ({_first_line(err)})") from None


@contextmanager
def _quiet(datasets) -> Iterator[None]:
    """No progress bar per shard around a run's own; datasets' setting is left as it was."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _datasets(path: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data path {path!r} is a Hugging Face dataset, which needs the datasets package: "
                          "pip install 'lit_fast[datasets]'") from None
    return datasets


def _load_hub(datasets, path: str):
    name, config, split = parse_hub_name(path)
    from datasets import config as hf_config

    try:
        return datasets.load_dataset(name, config, split=split)
    except ConnectionError as err:  # offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and not cached
        raise InputDataError(
            f"{path}: not in the local datasets cache ({hf_config.HF_DATASETS_CACHE}) and the hub cannot be reached "
            f"({_first_line(err)}); load it once where the hub is reachable (datasets.load_dataset({name!r}"
            f"{', ' + repr(config) if config else ''})), or point HF_DATASETS_CACHE at a cache that has it") from None
    except (FileNotFoundError, ValueError, KeyError) as err:  # no such dataset, config or split (cached or not)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]  # e.g. the configs that are cached
        raise InputDataError(f"{path}: {'; '.join(lines) or type(err).__name__}") from None


def _arrow(dataset, used: Optional[Mapping[str, str]], path: str):
    """The dataset's memory-mapped Arrow table, its ClassLabel columns as names; only the used columns."""
    import pyarrow as pa

    from lit_fast.data.readers import require_column

    if hasattr(dataset, "keys"):  # load_dataset without a split would give a DatasetDict; ours always names one
        raise InputDataError(f"{path}: holds several splits ({', '.join(dataset)}); name one with @SPLIT")
    if dataset._indices is not None:  # a selection over the Arrow rows: make it the rows themselves
        dataset = dataset.flatten_indices()
    table = dataset.data.table
    names = list(dict.fromkeys(used.values())) if used is not None else table.column_names
    for role, name in (used or {}).items():
        require_column(table, name, Path(path), role)
    columns = []
    for name in names:
        column = table.column(name)
        feature = dataset.features.get(name)
        if type(feature).__name__ == "ClassLabel":  # ids -> the names the dataset gives them
            column = pa.array(feature.names, pa.string()).take(column.combine_chunks())
        columns.append(column)
    return pa.table(dict(zip(names, columns)))


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
