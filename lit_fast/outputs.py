"""Where results land: an output file or export folder appears whole or not at all, and replaces only what the user
asked to replace.

- A prediction file is written beside its destination under a hidden temporary name, then published: with
  `overwrite` by an atomic rename; without it by a hard link, which fails if something took the path meanwhile.
- An export folder replaces only an earlier lit_fast export (it holds `EXPORT_MARKER`) or an empty folder, never
  the working directory, a home directory or a folder that holds the run's inputs or checkpoints. The old export
  is renamed aside, the new one moved in, and only then is the old one deleted.
- Hidden temporary names carry the host and process id of the run that made them (`.NAME.KIND-HOST-PID-RANDOM`),
  so a later run for the same destination removes what a killed run left behind, and never touches a live run's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable, Optional

from lit_fast.errors import ConfigError, OutputExistsError

log = logging.getLogger(__name__)

EXPORT_MARKER = "lit_fast_export.json"
OUTPUT_FORMATS = (".jsonl", ".parquet")
TEMP_KINDS = ("tmp", "parts", "old")  # a file or folder being written, prediction shards, an export set aside


# ---- hidden temporary names ----------------------------------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def run_token() -> str:
    """This process's part of a temporary name: host, pid and a random suffix."""
    return f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_sibling(out: Path, kind: str, token: str) -> Path:
    """A hidden name beside `out` for a temporary of `kind` (one of TEMP_KINDS) made by the run of `token`."""
    assert kind in TEMP_KINDS
    return out.parent / f".{out.name}.{kind}-{token}"


def _parse(out: Path, entry: Path) -> Optional[tuple[str, str, int]]:
    """(kind, host, pid) of a temporary sibling of `out`, or None for any other file."""
    prefix = f".{out.name}."
    if not entry.name.startswith(prefix):
        return None
    kind, _, token = entry.name[len(prefix):].partition("-")
    parts = token.split("-")
    if kind not in TEMP_KINDS or len(parts) != 3 or not parts[1].isdigit():
        return None
    return kind, parts[0], int(parts[1])


def _process_start(pid: int) -> Optional[float]:
    """When process `pid` started (seconds since the epoch), where /proc tells; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _owner_is_dead(host: str, pid: int, made: float) -> bool:
    """Whether the process that made a temporary (at time `made`) is provably gone: same host, and no process with
    that pid, or one that started after the temporary was made (a reused pid, as in a restarted container)."""
    if host != _host():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # a live process of another user
    started = _process_start(pid)
    return started is not None and started > made + 1.0


def clean_stale(out: Path) -> None:
    """Remove the temporaries that killed runs left beside `out`. An export set aside by a run killed before its new
    export was in place is moved back where it was."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for entry in sorted(out.parent.iterdir()):
        owner = _parse(out, entry)
        if owner is None:
            continue
        kind, host, pid = owner
        try:
            made = entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        if not _owner_is_dead(host, pid, made):
            log.info("left %s alone: the run that made it (host %s, pid %d) may still be running", entry, host, pid)
            continue
        if kind == "old" and not os.path.lexists(out):
            os.rename(entry, out)
            log.warning("restored the earlier export %s, which a killed run had set aside", out)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        log.info("removed %s, left behind by a killed run (pid %d)", entry, pid)


# ---- prediction files ----------------------------------------------------------------------------------------
def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_parent(out: Path, flag: str, shown: str) -> None:
    """The folder that will hold `out` exists (made if missing), is a folder, and takes new files."""
    parent = out.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {shown}: {ancestor} is a file, not a folder; choose another path")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise ConfigError(f"{flag} {shown}: cannot write in {parent} ({err.strerror or err}); choose a folder you can "
                          "write to") from None


def check_output_file(path: str, overwrite: bool, inputs: Iterable[Optional[str]] = ()) -> Path:
    """Fail before any work if predictions cannot be written to `path`: format, folder, an existing file without
    `overwrite`, or a path that is one of the `inputs` (also through links)."""
    out = Path(path).expanduser()
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {path}: unsupported format '{out.suffix}'; use {' or '.join(OUTPUT_FORMATS)}")
    if out.is_dir():
        raise ConfigError(f"--output {path} is a directory; give a file path")
    for source in inputs:
        if source and _same_file(out, Path(source).expanduser()):
            raise ConfigError(f"--output {path} is the input file {source}: writing it would destroy the input; "
                              "choose another output path")
    if os.path.lexists(out) and not overwrite:
        raise OutputExistsError(f"--output {path} exists; pass --overwrite true to replace it")
    _check_parent(out, "--output", path)
    return out


def publish_file(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the complete file `tmp` at `out` in one step. Without `overwrite`, a path taken since the start is an
    error (the file there is left as it is, `tmp` is removed)."""
    if overwrite:
        _replace(tmp, out, "--output")
        return
    try:
        os.link(tmp, out)  # fails if `out` exists, atomically
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise OutputExistsError(f"--output {out} appeared while this run was predicting; it was left as it is and "
                                "these predictions were not written (pass --overwrite true to replace it)") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # a filesystem without hard links: check, then rename (a short window, the best it allows)
        if os.path.lexists(out):
            tmp.unlink(missing_ok=True)
            raise OutputExistsError(f"--output {out} appeared while this run was predicting; it was left as it is "
                                    "(pass --overwrite true to replace it)") from None
        _replace(tmp, out, "--output")
        return
    tmp.unlink()


def _replace(tmp: Path, out: Path, flag: str) -> None:
    try:
        os.replace(tmp, out)
    except IsADirectoryError:
        raise ConfigError(f"{flag} {out} is now a directory; nothing was written there") from None


# ---- export folders ------------------------------------------------------------------------------------------
def is_export(folder: Path) -> bool:
    return (Path(folder) / EXPORT_MARKER).is_file()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_export_dir(path: str, overwrite: bool, protected: dict[str, Optional[str]]) -> Path:
    """Fail before training if `path` cannot take an export. `protected`: what the run reads or writes ({"--data.path":
    ..., "default_root_dir": ...}); a folder that holds any of them is never replaced."""
    out = Path(os.path.abspath(Path(path).expanduser()))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--export_dir {path} is a file; give a folder path")
    real = out.resolve()
    home = Path.home().resolve()
    vital = {"the working directory": Path.cwd().resolve(), "your home directory": home}
    for what, where in vital.items():
        if _inside(where, real):
            raise ConfigError(f"--export_dir {path} is {what} or holds it; an export replaces its folder, so give a "
                              "new folder of its own (e.g. runs/my-model)")
    for what, where in protected.items():
        if where and _inside(Path(where).expanduser().resolve(), real):
            raise ConfigError(f"--export_dir {path} holds {what} ({where}); an export replaces its folder, so give "
                              "a new folder of its own (e.g. runs/my-model)")
    _refuse_foreign(out, path, overwrite)
    _check_parent(out, "--export_dir", path)
    return out


def _refuse_foreign(out: Path, shown: str, overwrite: bool) -> None:
    """An existing folder may be replaced only when empty, or when it is an earlier export and `overwrite` is on."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_export(out):
        raise OutputExistsError(
            f"--export_dir {shown} exists, is not empty and is not a lit_fast export (no {EXPORT_MARKER}); lit_fast "
            "replaces only its own exports: choose a new folder")
    if not overwrite:
        raise OutputExistsError(f"--export_dir {shown} holds an earlier export; pass --overwrite true to replace it")


def write_export_marker(folder: Path, **about: object) -> None:
    """Mark `folder` as a lit_fast export: what a later `--overwrite true` may replace."""
    record = {"written_by": "lit_fast", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **about}
    (Path(folder) / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def publish_dir(tmp: Path, out: Path, overwrite: bool, token: str) -> None:
    """Move the complete export `tmp` to `out`. An earlier export there is renamed aside first and deleted last, so
    a crash in between leaves it recoverable (`clean_stale` moves it back)."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if out.is_symlink() or not out.is_dir():
        raise ConfigError(f"--export_dir {out} is no longer a folder; the export was not written")
    _refuse_foreign(out, str(out), overwrite)  # it may have changed while training
    aside = temp_sibling(out, "old", token)
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:  # a failure or a stop: the earlier export goes back in place
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
