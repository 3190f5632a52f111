"""Reading local input files into columns: .jsonl, .csv (also .csv.gz/.csv.bz2), .parquet, .txt.

Every failure is an `InputDataError` that names the file, the line or row, and what to do. JSON lines are parsed
with the standard `json` module one line at a time (so the error can name the line); CSV and Parquet go through
pyarrow.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from lit_fast.errors import InputDataError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
_COMPRESSED = (".gz", ".bz2")


def resolve_data_path(path: str) -> Path:
    """A local path, or `package:NAME/relative/path` for a data file shipped inside an installed package."""
    if path.startswith("package:"):
        package, _, rel = path[len("package:"):].partition("/")
        spec = importlib.util.find_spec(package)  # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise InputDataError(f"data path '{path}': Python package '{package}' is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / rel
    return Path(path).expanduser()


def file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix not in SUFFIXES:
        raise InputDataError(
            f"{path}: unsupported input format '{suffix or '(none)'}'; use one of {', '.join(SUFFIXES)}"
        )
    return {".json": ".jsonl", ".tsv": ".csv"}.get(suffix, suffix)


def read_columns(path: str, text_column: str = "text") -> tuple[dict[str, list[Any]], Path]:
    """Read a file into {column: values}. A .txt file has one column, `text_column`, one row per line."""
    file = resolve_data_path(path)
    if not file.exists():
        raise InputDataError(f"input file not found: {file}")
    if file.is_dir():
        raise InputDataError(f"input path is a directory, not a file: {file}")
    fmt = file_format(file)
    if file.stat().st_size == 0:
        raise InputDataError(f"{file}: the file is empty")
    reader = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt}[fmt]
    columns = reader(file, text_column)
    if not columns or not any(len(v) for v in columns.values()):
        raise InputDataError(f"{file}: no rows")
    return columns, file


def _open_text(file: Path):
    if file.suffix.lower() == ".gz":
        import gzip

        return gzip.open(file, "rt", encoding="utf-8", errors="strict", newline="")
    if file.suffix.lower() == ".bz2":
        import bz2

        return bz2.open(file, "rt", encoding="utf-8", errors="strict", newline="")
    return open(file, encoding="utf-8", errors="strict", newline="")


def _read_lines(file: Path) -> list[str]:
    try:
        with _open_text(file) as f:
            text = f.read()
    except UnicodeDecodeError as err:
        line = 1 + _raw_bytes(file)[: err.start].count(b"\n") if file.suffix.lower() not in _COMPRESSED else "?"
        raise InputDataError(
            f"{file}: line {line}: bytes that are not UTF-8 ({err.reason}); re-encode the file as UTF-8"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # a final newline ends the last row; it does not start an empty one
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _raw_bytes(file: Path) -> bytes:
    return file.read_bytes()


def _read_txt(file: Path, text_column: str) -> dict[str, list[Any]]:
    return {text_column: _read_lines(file)}


def _read_jsonl(file: Path, text_column: str) -> dict[str, list[Any]]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(_read_lines(file), start=1):
        if not line.strip():
            raise InputDataError(f"{file}: line {number} is blank; every line must be one JSON object")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputDataError(f"{file}: line {number} is not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise InputDataError(f"{file}: line {number} is a JSON {type(row).__name__}, expected an object {{...}}")
        rows.append(row)
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in rows] for name in names}


def _read_csv(file: Path, text_column: str) -> dict[str, list[Any]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    delimiter = "\t" if ".tsv" in [s.lower() for s in file.suffixes] else ","
    try:
        table = pacsv.read_csv(
            file,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            # text stays text: no "1" -> int or "" -> null guessing on the columns people read as strings
            convert_options=pacsv.ConvertOptions(strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as err:
        message = str(err).splitlines()[0]
        if "UTF8" in message or "utf8" in message.lower():
            raise InputDataError(f"{file}: bytes that are not UTF-8 ({message}); re-encode the file as UTF-8") from None
        if "Empty CSV file" in message:
            raise InputDataError(f"{file}: the file is empty") from None
        raise InputDataError(f"{file}: not a readable CSV file ({message})") from None
    for name in table.column_names:
        # pyarrow reads a column with invalid UTF-8 as binary instead of failing: find the first bad row
        if pa.types.is_binary(table.column(name).type) or pa.types.is_large_binary(table.column(name).type):
            for row, value in enumerate(table.column(name).to_pylist()):
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise InputDataError(
                        f"{file}: row {row} (0-based), column '{name}': bytes that are not UTF-8 ({err.reason}); "
                        "re-encode the file as UTF-8"
                    ) from None
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _read_parquet(file: Path, text_column: str) -> dict[str, list[Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file, memory_map=True)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputDataError(f"{file}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    return {name: table.column(name).to_pylist() for name in table.column_names}


def require_column(columns: dict[str, list[Any]], name: str, file: Path, role: str) -> list[Any]:
    if name not in columns:
        raise InputDataError(
            f"{file}: no {role} column '{name}'; the columns are: {', '.join(columns) or '(none)'} "
            f"(choose one with --data.{role}_column)"
        )
    return columns[name]
