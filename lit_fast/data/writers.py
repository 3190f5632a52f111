"""Prediction writer: per-rank shards, one ordered merge, an output file that appears only when complete.

Each rank appends its rows to its own shard as batches finish (nothing accumulates in memory), remembering where
each row landed: JSON lines for a .jsonl output, Arrow IPC for .parquet (memory-mapped again by the merge, so no rank
ever holds the whole output). A batch is written once the next one is queued, so the GPU computes while the host
writes. After the last batch every rank waits at a barrier; rank 0 checks that the shards hold
every input index exactly once, writes the rows in input order to a temporary file beside the output, a slice at a
time, and renames it into place. On failure the shards and the temporary file are removed: no half-written output
that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import orjson
from lightning.pytorch.callbacks import BasePredictionWriter

from lit_fast.models import sharding
from lit_fast.errors import LitFastError
from lit_fast.outputs import clean_stale, publish_file, run_token, temp_sibling
from lit_fast.data.batching import ArrowRows
from lit_fast.data.device_rows import as_rows
from lit_fast.data.progress import Throughput

log = logging.getLogger(__name__)

def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _json_line(row: dict) -> bytes:
    """One output row as a line of JSON. orjson writes NumPy vectors from their buffer with the shortest digits that
    read back to the same float32 (13x faster than json.dumps of their .tolist(), half the bytes: docs/MEASUREMENTS.md,
    W8); tensors and anything else it does not know go through `_jsonable`. A vector with NaN or infinity goes
    through json, which writes NaN / Infinity where orjson would write null."""
    for value in row.values():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
            return (json.dumps({k: _jsonable(v) for k, v in row.items()}, ensure_ascii=False) + "\n").encode("utf-8")
    return orjson.dumps(row, default=_jsonable, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
                        | orjson.OPT_NON_STR_KEYS)


_KEPT_DTYPES = (np.dtype(np.float16), np.dtype(np.int8), np.dtype(np.uint8))
_SHARD_ROWS = 8192  # rows a Parquet output's shard gathers before it writes them as one Arrow record batch
_MERGE_ROWS = 65536  # rows the merge takes (in input order) and writes as one Parquet row group


def _to_arrow(rows: list[dict]):
    """Rows -> an Arrow table; equal-shaped vectors (embeddings) go in as one block, not as Python numbers: float32,
    or the dtype of numpy vectors that chose another (float16, packed int8 / uint8 bits)."""
    import pyarrow as pa

    columns = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if hasattr(values[0], "shape") and len(values[0].shape) == 1 and all(v.shape == values[0].shape for v in values):
            kept = values[0].dtype if isinstance(values[0], np.ndarray) and values[0].dtype in _KEPT_DTYPES else None
            block = np.stack([np.asarray(v, dtype=kept or np.float32) for v in values])
            columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), block.shape[1])
        else:
            columns[key] = pa.array([_jsonable(v) for v in values])
    return pa.table(columns)


class PredictionWriter(BasePredictionWriter):
    """Writes the rows returned by `predict_step` (a list of dicts with "index") to `output` in input order."""

    def __init__(self, output: str, overwrite: bool = False, before_publish: Optional[Callable[[], None]] = None):
        """`before_publish`: called just before the complete output replaces the path (the command holds stops from
        then on: a run whose output is in place has nothing left to stop)."""
        super().__init__(write_interval="batch")
        self.before_publish = before_publish
        self.output = Path(output).expanduser()
        self.overwrite = overwrite
        self.format = self.output.suffix.lower()
        self.rows_written = 0
        self._shard_dir: Optional[Path] = None
        self._file = None
        self._offsets: list[np.ndarray] = []  # a jsonl shard's (index, byte offset, byte length) rows, a block a batch
        self._position = 0  # the jsonl shard's size so far
        self._parquet_rows: list[dict] = []
        self._parquet_writer = None  # a Parquet output's shard: an Arrow IPC file writer
        self._shard_schema = None  # its first batch's schema, which later batches are cast to
        self._waiting = None  # the latest batch's prediction, written once the next batch is queued

    # ---- per rank ------------------------------------------------------------------------------------------
    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            clean_stale(self.output)  # what killed runs for this output left behind
        self._token = trainer.strategy.broadcast(run_token(), src=0)  # rank 0's host and pid name the temporaries
        self._shard_dir = temp_sibling(self.output, "parts", self._token)
        self._shard_dir.mkdir(parents=True, exist_ok=True)
        shard = self._shard_dir / f"rank{trainer.global_rank:05d}{'.jsonl' if self.format == '.jsonl' else '.arrow'}"
        self._offsets, self._parquet_rows, self._parquet_writer, self._shard_schema = [], [], None, None
        self._position, self._waiting = 0, None
        self._file = open(shard, "wb") if self.format == ".jsonl" else None
        self._shard = shard
        self.throughput = Throughput()

    def _rows(self, trainer, prediction: list[dict]) -> list[dict]:
        indices = [int(row["index"]) for row in prediction]
        ids_for = getattr(trainer.datamodule, "ids_for", None)
        ids = ids_for(indices) if ids_for is not None else None
        rows = []
        for k, (index, row) in enumerate(zip(indices, prediction)):
            out = {"index": index}
            if ids is not None:
                out["id"] = _jsonable(ids[k])
            out.update({k: v for k, v in row.items() if k != "index"})  # tensors stay tensors until written
            rows.append(out)
        return rows

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if not sharding.writes_predictions(trainer.strategy):
            return  # a tensor-parallel peer: its group's first rank writes these rows
        self.throughput.add(batch)
        # a batch is written when the next one has been queued: its rows may still be on their way from the GPU
        # (data/device_rows.py), and building them would leave the GPU idle
        waiting, self._waiting = self._waiting, prediction
        if waiting is not None:
            self._write(trainer, waiting)

    def _write(self, trainer, prediction) -> None:
        rows = self._rows(trainer, as_rows(prediction))
        if self.format == ".jsonl":
            lines = [_json_line(row) for row in rows]
            sizes = np.fromiter(map(len, lines), np.int64, len(lines))
            starts = self._position + np.cumsum(sizes) - sizes
            indices = np.fromiter((row["index"] for row in rows), np.int64, len(rows))
            self._offsets.append(np.stack([indices, starts, sizes], axis=1))
            self._position += int(sizes.sum())
            self._file.write(b"".join(lines))  # one write a batch: per row, the calls cost as much as the JSON
        else:
            self._parquet_rows.extend(rows)
            if len(self._parquet_rows) >= _SHARD_ROWS:
                self._flush_parquet()

    def _flush_parquet(self) -> None:
        import pyarrow as pa

        if not self._parquet_rows:
            return
        table = _to_arrow(self._parquet_rows)
        if self._parquet_writer is None:
            self._shard_schema = table.schema
            self._parquet_writer = pa.ipc.new_file(str(self._shard), table.schema)
        self._parquet_writer.write_table(table.cast(self._shard_schema))
        self._parquet_rows = []

    def _close_shard(self) -> None:
        if self.format == ".jsonl":
            if self._file is not None:
                self._file.close()
                self._file = None
                index = np.concatenate(self._offsets) if self._offsets else np.zeros((0, 3), np.int64)
                np.save(self._shard.with_suffix(".idx.npy"), index)
        else:
            self._flush_parquet()
            if self._parquet_writer is not None:
                self._parquet_writer.close()
                self._parquet_writer = None

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._waiting is not None:
            self._write(trainer, self._waiting)
            self._waiting = None
        rows, tokens, seconds = self.throughput.report(trainer.strategy)
        if trainer.is_global_zero:
            log.info("predicted %d rows (%d tokens) on %d rank(s) in %.2f s: %.1f rows/s, %.0f tokens/s", rows, tokens,
                     trainer.world_size, seconds, rows / max(seconds, 1e-9), tokens / max(seconds, 1e-9))
        self._close_shard()
        (self._shard_dir / f"rank{trainer.global_rank:05d}.done").touch()
        trainer.strategy.barrier("lit_fast_writer_shards")
        error: Optional[str] = None
        if trainer.is_global_zero:
            expected = trainer.datamodule.num_rows["predict"] if trainer.datamodule is not None else None
            try:
                self._check_shards(trainer.world_size)
                self.rows_written = self._merge(expected)
            except LitFastError as err:
                error = str(err)
            finally:
                shutil.rmtree(self._shard_dir, ignore_errors=True)
        error = trainer.strategy.broadcast(error, src=0)
        if error:
            raise LitFastError(error)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._waiting = None
        try:
            self._close_shard()
        except Exception:  # noqa: BLE001 - cleanup must not mask the real error
            pass
        if self._shard_dir is not None:
            shutil.rmtree(self._shard_dir, ignore_errors=True)

    # ---- rank 0 --------------------------------------------------------------------------------------------
    def _check_shards(self, world_size: int) -> None:
        """Every rank leaves a marker; on several nodes they must all be visible from rank 0's filesystem."""
        found = len(list(self._shard_dir.glob("rank*.done")))
        if found != world_size:
            raise LitFastError(
                f"rank 0 sees the shards of {found} of {world_size} ranks in {self._shard_dir}: on several nodes the "
                "output folder must be on storage that every node shares; no output written"
            )

    def _check(self, indices: np.ndarray, expected: Optional[int]) -> None:
        n = len(indices)
        unique = np.unique(indices)
        if len(unique) != n:
            raise LitFastError(f"internal error: {n - len(unique)} rows were predicted twice; no output written")
        if expected is not None and (n != expected or (n and (unique[0] != 0 or unique[-1] != expected - 1))):
            raise LitFastError(f"internal error: {n} rows predicted for {expected} input rows; no output written")

    def _merge(self, expected: Optional[int]) -> int:
        tmp = temp_sibling(self.output, "tmp", self._token)
        try:
            n = self._merge_jsonl(tmp, expected) if self.format == ".jsonl" else self._merge_parquet(tmp, expected)
            if self.before_publish is not None:
                self.before_publish()
            publish_file(tmp, self.output, self.overwrite)  # readers see the old file or the complete new one
        finally:
            if tmp.exists():
                tmp.unlink()
        return n

    def _merge_jsonl(self, tmp: Path, expected: Optional[int]) -> int:
        shards = sorted(self._shard_dir.glob("rank*.jsonl"))
        tables = [np.load(s.with_suffix(".idx.npy")) for s in shards]
        owner = np.concatenate([np.full(len(t), k) for k, t in enumerate(tables)]) if tables else np.zeros(0, int)
        merged = np.concatenate(tables) if tables else np.zeros((0, 3), np.int64)
        self._check(merged[:, 0], expected)
        order = np.argsort(merged[:, 0], kind="stable")
        # each row's bytes sliced from its memory-mapped shard (as Python ints: numpy scalars cost more per row)
        owners = owner[order].tolist()
        starts = merged[order, 1].tolist()
        ends = (merged[order, 1] + merged[order, 2]).tolist()
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(shard, "rb")) for shard in shards]
            maps = [stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                    if os.fstat(f.fileno()).st_size else b"" for f in files]  # an empty file cannot be mapped
            with open(tmp, "wb") as out:
                for k, start, end in zip(owners, starts, ends):
                    out.write(maps[k][start:end])
                out.flush()
                os.fsync(out.fileno())
        return len(order)

    def _merge_parquet(self, tmp: Path, expected: Optional[int]) -> int:
        """The shards memory-mapped; their rows taken in input order a slice at a time (ArrowRows: each slice's
        rows from the record batches that hold them) and written as one row group each."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        shards = sorted(self._shard_dir.glob("rank*.arrow"))
        tables = [pa.ipc.open_file(pa.memory_map(str(s))).read_all() for s in shards]
        tables = [t for t in tables if t.num_rows]
        table = pa.concat_tables(tables) if tables else pa.table({"index": pa.array([], pa.int64())})
        indices = table.column("index").to_numpy()
        self._check(indices, expected)
        order = np.argsort(indices, kind="stable")
        columns = [ArrowRows(column) for column in table.columns]
        with pq.ParquetWriter(tmp, table.schema) as out:
            for start in range(0, len(order), _MERGE_ROWS):
                rows = order[start:start + _MERGE_ROWS]
                out.write_table(pa.Table.from_arrays([c.take(rows) for c in columns], schema=table.schema))
            if not len(order):
                out.write_table(table)
        return table.num_rows
