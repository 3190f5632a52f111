"""Reading input into columns: local .jsonl, .csv (also .csv.gz/.csv.bz2), .parquet, .txt, CoNLL (.conll) files,
and Hugging Face datasets (a `save_to_disk` folder or `hf:NAME[:CONFIG][@SPLIT]`, data/hf_datasets.py).

Every failure is an `InputDataError` that names the file, the line or row, and what to do. JSON lines are parsed
with the standard `json` module one line at a time (so the error can name the line); CSV and Parquet go through
pyarrow.
"""

from __future__ import annotations

import importlib.util
import json
import re
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional

from lit_fast.data import hf_datasets
from lit_fast.errors import InputDataError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".conll", ".iob", ".bio")
# a CoNLL file's columns: the first is the word, the last the tag (CoNLL-2003 puts POS and chunk tags between)
CONLL_COLUMNS = ("tokens", "ner_tags")
_COMPRESSED = (".gz", ".bz2")
TEXT_ROLES = ("text", "pair", "target")  # columns that must hold text


def resolve_data_path(path: str) -> Path:
    """A local path, or `package:NAME/relative/path` for a data file shipped inside an installed package. A hub
    dataset (`hf:NAME...`) is no local path: it comes back as it was written."""
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
    return {".json": ".jsonl", ".tsv": ".csv", ".iob": ".conll", ".bio": ".conll"}.get(suffix, suffix)


def read_table(path: str, columns: Optional[Mapping[str, Optional[str]]] = None, text_column: str = "text",
               list_roles: tuple[str, ...] = ()):
    """Read a file into an Arrow table (memory-mapped for Parquet).

    `columns`: the columns the task uses, {role: name} with roles "text", "label", "target" and "id" (None values
    are not used). Only those are read (other columns may hold anything) and a missing one is an error that lists
    the columns there are; CSV cells are read as text, never guessed into numbers. Without `columns` every column
    is read. A .txt file has one column, named `text_column` (or `columns["text"]`). `list_roles`: roles whose
    cells may be lists (a token classifier's words and tags, a chat's messages) instead of text.

    `path` may also be a Hugging Face dataset: a `save_to_disk` folder or `hf:NAME[:CONFIG][@SPLIT]`
    (data/hf_datasets.py); its Arrow table stays memory-mapped.
    """
    used = {role: name for role, name in (columns or {}).items() if name}
    file = resolve_data_path(path)
    if hf_datasets.is_hub_name(path) or hf_datasets.is_saved_dataset(file):
        table = hf_datasets.read_dataset(path if hf_datasets.is_hub_name(path) else str(file), used or None)
        if table.num_rows == 0:
            raise InputDataError(f"{path}: no rows")
        return table, file
    if not file.exists():
        raise InputDataError(f"input file not found: {file}")
    if file.is_dir():
        raise InputDataError(f"input path is a directory, not a file nor a datasets save_to_disk folder: {file}")
    fmt = file_format(file)
    if file.stat().st_size == 0:
        raise InputDataError(f"{file}: the file is empty")
    reader = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt,
              ".conll": _read_conll}[fmt]
    try:
        text_roles = tuple(r for r in TEXT_ROLES if r not in list_roles)
        if fmt == ".jsonl":
            table = _read_jsonl(file, used.get("text", text_column), used or None, text_roles)
        else:
            table = reader(file, used.get("text", text_column), used or None)
    except (EOFError, zlib.error) as err:
        raise _decompress_error(file, err) from None
    except OSError as err:  # gzip.BadGzipFile, bz2's "Invalid data stream", pyarrow's decompression errors
        if file.suffix.lower() not in _COMPRESSED:
            raise
        raise _decompress_error(file, err) from None
    if table.num_rows == 0:
        raise InputDataError(f"{file}: no rows")
    return table, file


def _decompress_error(file: Path, err: BaseException) -> InputDataError:
    kind = {".gz": "gzip", ".bz2": "bzip2"}.get(file.suffix.lower(), "compressed")
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return InputDataError(f"{file}: cannot be read as {kind} ({reason}); the file is damaged, cut short or not "
                          f"{kind}-compressed: check it, or rename it without '{file.suffix}' if it is plain text")


def read_columns(path: str, text_column: str = "text") -> tuple[dict[str, list[Any]], Path]:
    """Read every column of a file into {column: Python values} (small files; tests)."""
    table, file = read_table(path, text_column=text_column)
    return {name: table.column(name).to_pylist() for name in table.column_names}, file


def _select(table, used: Optional[Mapping[str, str]], file: Path):
    """The used columns of `table` ({role: name}), or an error naming the missing one and the columns there are."""
    if used is None:
        return table
    for role, name in used.items():
        require_column(table, name, file, role)
    return table.select(list(dict.fromkeys(used.values())))


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


def _read_txt(file: Path, text_column: str, used: Optional[Mapping[str, str]] = None):
    import pyarrow as pa

    return _select(pa.table({text_column: pa.array(_read_lines(file), pa.string())}), used, file)


def _read_conll(file: Path, text_column: str, used: Optional[Mapping[str, str]] = None):
    """One word a line (`word [more columns] tag`, tab- or space-separated), a blank line between sentences,
    `-DOCSTART-` lines skipped: rows of `tokens` (the words) and `ner_tags` (the tags), as Hugging Face's CoNLL
    datasets name them."""
    import pyarrow as pa

    sentences, words, tags = [], [], []
    for number, line in enumerate(_read_lines(file), start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        if len(fields) < 2:
            raise InputDataError(f"{file}: line {number} has one field ({fields[0]!r}); a CoNLL line is a word and "
                                 "its tag (other columns between them are skipped), a blank line between sentences")
        words.append(fields[0])
        tags.append(fields[-1])
    if words:
        sentences.append((words, tags))
    table = pa.table({CONLL_COLUMNS[0]: pa.array([w for w, _ in sentences], pa.list_(pa.string())),
                      CONLL_COLUMNS[1]: pa.array([t for _, t in sentences], pa.list_(pa.string()))})
    return _select(table, used, file)


_BLANK_LINE = re.compile(rb"(^|\n)[ \t\r]*(\n|$)")


def _read_jsonl(file: Path, text_column: str, used: Optional[Mapping[str, str]] = None,
                text_roles: tuple[str, ...] = TEXT_ROLES):
    """pyarrow's JSON reader for speed; the line-by-line reader whenever it objects, so the error names the line."""
    import pyarrow as pa
    import pyarrow.json as pajson

    if file.suffix.lower() not in _COMPRESSED:
        data = file.read_bytes()
        # pyarrow neither checks UTF-8 nor complains about blank lines (it skips them); we do both
        if _is_utf8(data) and not _BLANK_LINE.search(data.rstrip(b"\n") if data.endswith(b"\n") else data):
            try:
                table = _select(pajson.read_json(pa.BufferReader(data)), used, file)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pass  # fall through: the careful reader says where and what
            else:
                if all(_text_typed(table.column(name)) for role, name in (used or {}).items() if role in text_roles):
                    return table
    rows = _read_jsonl_rows(file)
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    if used is not None:
        for role, name in used.items():
            require_column(list(names), name, file, role)
    wanted = list(dict.fromkeys(used.values())) if used is not None else list(names)
    roles = {name: role for role, name in (used or {}).items()}
    columns = {name: _jsonl_column(rows, name, roles.get(name), file, text_roles) for name in wanted}
    return pa.table({name: pa.array(values) for name, values in columns.items()})


def _text_typed(column) -> bool:
    import pyarrow as pa

    return pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return f"a JSON {'list' if isinstance(value, list) else 'object'}"


def _jsonl_column(rows: list[dict], name: str, role: Optional[str], file: Path,
                  text_roles: tuple[str, ...] = TEXT_ROLES) -> list[Any]:
    """One column's values; every value of one kind (text for the text and target columns), else an error that
    names the line and the column."""
    values = [row.get(name) for row in rows]
    first = next((k for k, v in enumerate(values) if v is not None), None)
    if first is None:
        return values
    expected = "text" if role in text_roles else _kind(values[first])
    for line, value in enumerate(values, start=1):
        if value is not None and _kind(value) != expected:
            if role in text_roles:
                raise InputDataError(f"{file}: line {line}, column '{name}': {_kind(value)} where text is expected; "
                                     f"quote it as a JSON string")
            raise InputDataError(f"{file}: line {line}, column '{name}': {_kind(value)}, but line {first + 1} has "
                                 f"{expected}; every value of a column must be of one kind")
    return values


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_jsonl_rows(file: Path) -> list[dict[str, Any]]:
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
    return rows


def _read_csv(file: Path, text_column: str, used: Optional[Mapping[str, str]] = None):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    delimiter = "\t" if ".tsv" in [s.lower() for s in file.suffixes] else ","
    try:
        table = pacsv.read_csv(
            file,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            # text stays text: no "1" -> int or "true" -> bool guessing on the columns the task reads; the
            # other columns are not read at all
            convert_options=pacsv.ConvertOptions(
                strings_can_be_null=False, quoted_strings_can_be_null=False,
                column_types={name: pa.string() for name in (used or {}).values()},
                include_columns=list(dict.fromkeys(used.values())) if used else None),
        )
    except (pa.ArrowInvalid, pa.ArrowKeyError) as err:
        message = str(err).splitlines()[0]
        if "UTF8" in message or "utf8" in message.lower():
            raise InputDataError(f"{file}: bytes that are not UTF-8 ({message}); re-encode the file as UTF-8") from None
        if "Empty CSV file" in message:
            raise InputDataError(f"{file}: the file is empty") from None
        missing = re.search(r"Column '([^']+)' in include_columns does not exist", message)
        if missing and used:
            import csv

            with _open_text(file) as f:
                header = next(csv.reader(f, delimiter=delimiter), [])
            role = next(r for r, n in used.items() if n == missing.group(1))
            require_column(header, missing.group(1), file, role)
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
    return table


def _read_parquet(file: Path, text_column: str, used: Optional[Mapping[str, str]] = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file, memory_map=True)
        if used is not None:
            for role, name in used.items():
                require_column(schema.names, name, file, role)
        table = pq.read_table(file, memory_map=True,
                              columns=list(dict.fromkeys(used.values())) if used is not None else None)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputDataError(f"{file}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    return table


def require_column(columns, name: str, file: Path, role: str):
    """`columns[name]` of a dict or an Arrow table (or just the check, for a list of names), or an error listing the
    columns there are."""
    names = list(columns.column_names if hasattr(columns, "column_names") else columns)
    if name not in names:
        raise InputDataError(
            f"{file}: no {role} column '{name}'; the columns are: {', '.join(names) or '(none)'} "
            f"(choose one with --data.{role}_column)"
        )
    if isinstance(columns, list):
        return None
    return columns.column(name) if hasattr(columns, "column_names") else columns[name]


def check_texts(column, file: Path, name: str, allow_empty: bool) -> None:
    """Vectorised checks of a text column: text type, and no empty/blank cells unless allowed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        raise InputDataError(f"{file}: column '{name}' holds {column.type} values, expected text")
    if allow_empty:
        return
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column.cast(pa.string()))), 0)
    empty = pc.or_kleene(pc.is_null(column), pc.fill_null(blank, True))
    if pc.any(empty).as_py():
        row = pc.index(empty, True).as_py()
        raise InputDataError(
            f"{file}: row {row} (0-based) has an empty '{name}'; fix the row or pass --data.allow_empty_text true"
        )
