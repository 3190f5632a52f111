"""What `lit-fast predict` spends on the host per row, apart from the model (docs/MEASUREMENTS.md, W8).

  writer   one rank's PredictionWriter fed rows of 384-dim float32 vectors in batches of 445, in shuffled index
           order (a length-sorted plan's order): seconds writing its shard (in the predict loop) and merging it
           into the output (after the loop), and the process's peak resident memory
  take     the texts of one predict batch (70 random rows) taken from an Arrow column read from JSON lines (one
           chunk per block): ChunkedArray.take against data/batching.ArrowRows

    .venv/bin/python -m bench.explore.w8_host_costs writer --rows 100000 --format .jsonl
    .venv/bin/python -m bench.explore.w8_host_costs take --rows 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def writer(rows: int, fmt: str, dim: int = 384, batch: int = 445) -> dict:
    import torch
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lit_fast.data.writers import PredictionWriter

    out = Path(tempfile.mkdtemp()) / f"out{fmt}"
    trainer = SimpleNamespace(strategy=SingleDeviceStrategy(torch.device("cpu")), is_global_zero=True, global_rank=0,
                              world_size=1, datamodule=SimpleNamespace(num_rows={"predict": rows}))
    w = PredictionWriter(str(out), overwrite=True)
    w.on_predict_start(trainer, None)
    rng = np.random.default_rng(0)
    order = rng.permutation(rows)
    vectors = rng.standard_normal((batch, dim)).astype(np.float32)
    start = time.perf_counter()
    for k in range(0, rows, batch):
        index = order[k:k + batch]
        prediction = [{"index": int(i), "embedding": vectors[j]} for j, i in enumerate(index)]
        w.write_on_batch_end(trainer, None, prediction, None, {"index": torch.as_tensor(index)}, k // batch, 0)
    shards = time.perf_counter() - start
    w.on_predict_end(trainer, None)
    merge = time.perf_counter() - start - shards
    return {"rows": rows, "format": fmt, "shards_s": shards, "merge_s": merge, "bytes": out.stat().st_size,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def take(rows: int, batch: int = 70, repeats: int = 20) -> dict:
    from lit_fast.data.batching import ArrowRows
    from lit_fast.data.readers import read_table

    rng = np.random.default_rng(0)
    path = Path(tempfile.mkdtemp()) / "texts.jsonl"
    with open(path, "w") as f:
        for n in rng.integers(5, 120, rows):
            f.write(json.dumps({"text": "word " * int(n)}) + "\n")
    column = read_table(str(path), {"text": "text"})[0].column("text")
    draws = [rng.permutation(rows)[:batch] for _ in range(repeats)]
    result = {"rows": rows, "chunks": column.num_chunks}
    for name, taker in (("chunked_array_take_ms", column.take), ("arrow_rows_take_ms", ArrowRows(column).take)):
        start = time.perf_counter()
        for draw in draws:
            taker(draw).to_pylist()
        result[name] = (time.perf_counter() - start) / repeats * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["writer", "take"])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--format", default=".jsonl", choices=[".jsonl", ".parquet"])
    args = parser.parse_args()
    print(json.dumps(writer(args.rows, args.format) if args.what == "writer" else take(args.rows)))


if __name__ == "__main__":
    main()
