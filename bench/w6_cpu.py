"""W6 — CPU encoder inference (shared/BENCHMARKS.md): BERT-small shape, batch 32, the W1 length mix, fp32.

BERT-small shape: 4 layers, hidden 512, 8 heads, FFN 2048, vocab 30522, random init from seed 0. Lengths
`torch.randint(32, 257, (32,))` after `torch.manual_seed(0)`, right padding to 256 (~47% padding); the "none"
scenario runs every sequence at 256 tokens.

Variants (one model's weights, deep-copied):
  hf_eager, hf_sdpa      transformers as loaded with attn_implementation eager / sdpa
  fused                  lit_fast fast path, PyTorch's fused encoder-layer kernel over nested tensors
  packed                 lit_fast fast path, packed tokens, oneDNN GEMMs (+GELU epilogue), SDPA per sequence
  packed_blas            the same with F.linear (MKL BLAS) GEMMs, to show what oneDNN contributes
  auto                   what `to_fast_path(model)` picks
Runs are interleaved (round-robin over variants) so that a busy machine slows all variants alike; the medians of
`--rounds` rounds after `--warmup` rounds are reported with the load average seen, and every variant's output is
checked against HF eager (max abs diff on real tokens, fp32 tolerance 1e-4) in the same run.

    PYTHONPATH=. .venv/bin/python bench/w6_cpu.py [--rounds 10] [--scenario w1 none] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402

from lit_fast.fastpath import layers as fast_layers  # noqa: E402
from lit_fast.fastpath import to_fast_path  # noqa: E402

TOLERANCE = 1e-4
VARIANTS = ("hf_eager", "hf_sdpa", "fused", "packed", "packed_blas", "auto")


def bert_small() -> transformers.BertModel:
    config = transformers.BertConfig(vocab_size=30522, hidden_size=512, num_hidden_layers=4,
                                     num_attention_heads=8, intermediate_size=2048)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def batch_for(scenario: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    lengths = torch.randint(32, 257, (32,)) if scenario == "w1" else torch.full((32,), 256)
    ids = torch.randint(1000, 30000, (32, 256))
    mask = (torch.arange(256) < lengths[:, None]).long()
    return ids, mask


def build_variants(base: transformers.BertModel) -> dict[str, tuple[torch.nn.Module, bool]]:
    """name -> (model, use oneDNN GEMMs); every model holds the same weights."""
    eager = copy.deepcopy(base)
    eager.config._attn_implementation = "eager"
    return {
        "hf_eager": (eager, True),
        "hf_sdpa": (base, True),
        "fused": (to_fast_path(copy.deepcopy(base), "fused"), True),
        "packed": (to_fast_path(copy.deepcopy(base), "packed"), True),
        "packed_blas": (to_fast_path(copy.deepcopy(base), "packed"), False),
        "auto": (to_fast_path(copy.deepcopy(base), "auto"), True),
    }


def run(model: torch.nn.Module, onednn: bool, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, torch.Tensor]:
    fast_layers.ONEDNN_LINEAR = onednn and fast_layers.ONEDNN_AVAILABLE
    start = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return time.perf_counter() - start, out


def measure(scenario: str, rounds: int, warmup: int) -> dict:
    ids, mask = batch_for(scenario)
    real = mask.bool()
    variants = build_variants(bert_small())
    times: dict[str, list[float]] = {name: [] for name in variants}
    diffs: dict[str, float] = {}
    load_before = os.getloadavg()
    with torch.inference_mode():
        reference = run(*variants["hf_eager"], ids, mask)[1]
        for round_index in range(warmup + rounds):
            for name, (model, onednn) in variants.items():
                seconds, out = run(model, onednn, ids, mask)
                if round_index >= warmup:
                    times[name].append(seconds)
                diffs[name] = (out[real] - reference[real]).abs().max().item()
    load_after = os.getloadavg()
    sdpa = statistics.median(times["hf_sdpa"])
    rows = {
        name: {
            "median_s": statistics.median(values),
            "times_s": values,
            "speedup_vs_hf_sdpa": sdpa / statistics.median(values),
            "max_abs_diff_vs_hf_eager": diffs[name],
            "correct": diffs[name] <= TOLERANCE,
        }
        for name, values in times.items()
    }
    return {
        "scenario": scenario,
        "padding_fraction": 1 - real.sum().item() / real.numel(),
        "real_tokens": int(real.sum()),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "variants": rows,
    }


def environment(threads: int) -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "unknown"

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "device": f"CPU: {cpu}, {os.cpu_count()} cores",
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "onednn_linear_available": fast_layers.ONEDNN_AVAILABLE,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": os.environ.get("LIT_FAST_COMMIT") or git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--", "lit_fast", "bench")),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def table(results: list[dict]) -> str:
    lines = ["| scenario | padding | variant | median s/batch | vs HF sdpa | max abs diff vs eager |",
             "|---|---|---|---|---|---|"]
    for result in results:
        for name, row in result["variants"].items():
            check = "" if row["correct"] else " FAIL"
            lines.append(f"| {result['scenario']} | {result['padding_fraction']:.0%} | {name} | "
                         f"{row['median_s']:.3f} | {row['speedup_vs_hf_sdpa']:.2f}x | "
                         f"{row['max_abs_diff_vs_hf_eager']:.1e}{check} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scenario", nargs="+", default=["w1", "none"], choices=["w1", "none"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/w6_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(scenario, args.rounds, args.warmup) for scenario in args.scenario]
    report = {"workload": "W6", "environment": environment(torch.get_num_threads()), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["environment"]))
    print(f"load average before/after: " + "; ".join(
        f"{r['scenario']}: {r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f}" for r in results))
    print(table(results))


if __name__ == "__main__":
    main()
