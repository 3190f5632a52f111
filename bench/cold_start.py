"""Where a short job's seconds go (issue 18, "cold start"): whole processes, timed from start to exit.

Each step adds one thing to the one before, so the differences say what each costs:

  python            the interpreter alone
  torch             + import torch (+ the CUDA context on a GPU)
  lightning         + import lightning.pytorch (it imports torchmetrics, torch._dynamo, ...)
  lit_fast          + everything `lit-fast predict` imports (transformers, jsonargparse, the CLI)
  predict           `lit-fast predict --config embed-minilm` on the 10 example sentences: + config parsing, model
                    load, the fast path, the loop (its own line: "predicted ... in X s"), writing and exit
  st                sentence-transformers: load the model and encode the same 10 sentences

    python -m bench.cold_start --model DIR [--device cpu] [--repeats 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ROOT / "lit_fast" / "examples" / "sentences.jsonl"
_LOOP = re.compile(r"predicted \d+ rows \(\d+ tokens\) on \d+ rank\(s\) in ([0-9.]+) s")


def _timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall, proc.stdout + proc.stderr


def steps(model: str, device: str, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    cuda = "; torch.zeros(1, device='cuda')" if device == "cuda" else ""
    predict = [py, "-m", "lit_fast", "predict", "--config", "embed-minilm", "--model.pretrained", model,
               "--data.path", str(SENTENCES), "--output", str(out), "--overwrite", "true",
               "--trainer.enable_progress_bar", "false"]
    if device == "cpu":
        predict += ["--trainer.accelerator", "cpu"]
    st = ("import json, sys; from sentence_transformers import SentenceTransformer; "
          f"texts = [json.loads(l)['text'] for l in open({str(SENTENCES)!r})]; "
          f"m = SentenceTransformer({model!r}, device={device!r}); "
          f"m.half() if {device == 'cuda'} else None; m.encode(texts)")
    return {
        "python": [py, "-c", "pass"],
        "torch": [py, "-c", f"import torch{cuda}"],
        "lightning": [py, "-c", f"import torch{cuda}; import lightning.pytorch"],
        "lit_fast": [py, "-c", f"import torch{cuda}; import lit_fast.cli.app"],
        "predict": predict,
        "st": [py, "-c", st],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="MiniLM in sentence-transformers format (a folder)")
    parser.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd in steps(args.model, device, Path(tmp) / "out.jsonl").items():
            _timed(cmd)  # warm the file cache: what a second job on the machine sees
            walls, loops = [], []
            for _ in range(args.repeats):
                wall, log = _timed(cmd)
                walls.append(wall)
                found = _LOOP.search(log)
                if found:
                    loops.append(float(found.group(1)))
            results[name] = {"median_s": statistics.median(walls), "times_s": walls}
            if loops:
                results[name]["loop_s"] = statistics.median(loops)
    order = ["python", "torch", "lightning", "lit_fast", "predict"]
    for before, after in zip(order, order[1:]):
        results[after]["adds_s"] = results[after]["median_s"] - results[before]["median_s"]
    report = {"environment": common.environment(device), "device": device, "results": results}
    common.write_json(report, args.out or common.default_out("cold_start", device))
    rows = [[name, f"{r['median_s']:.2f}", f"{r['adds_s']:+.2f}" if "adds_s" in r else "",
             f"{r['loop_s']:.2f}" if "loop_s" in r else ""] for name, r in results.items()]
    print(common.markdown_table(["step", "whole s (median)", "adds s", "loop s"], rows))


if __name__ == "__main__":
    main()
