"""W6 - CPU encoder inference (bench/README.md): BERT-small shape, batch 32, the W1 length mix, fp32.

BERT-small shape: 4 layers, hidden 512, 8 heads, FFN 2048, vocab 30522, random init from seed 0. Lengths
`torch.randint(32, 257, (32,))` after `torch.manual_seed(0)`, right padding to 256 (~47% padding); the "none"
scenario runs every sequence at 256 tokens.

Variants (one model's weights, deep-copied):
  hf_eager, hf_sdpa      transformers as loaded with attn_implementation eager / sdpa
  fused                  lit_fast fast path, PyTorch's fused encoder-layer kernel over nested tensors
  packed                 lit_fast fast path, packed tokens, oneDNN GEMMs (+GELU epilogue), SDPA per sequence
  packed_blas            the same with F.linear (MKL BLAS) GEMMs (`FastPathOptions(onednn=False)`), to show what
                         oneDNN contributes
  auto                   what `to_fast_path(model)` picks
Runs are interleaved (round-robin over variants, in a fixed order) so that a busy machine slows all variants
alike; the medians of `--rounds` rounds after `--warmup` rounds are reported with the load average seen, and every
variant's output is checked against HF eager (max abs diff on real tokens, fp32 tolerance 1e-4) in the same run.
Results go to JSON (default bench/results/w6_cpu_<commit>.json); a table is printed last.

    .venv/bin/python -m bench.w6_cpu [--rounds 10] [--scenario w1 none] [--threads N] [--out FILE]
    .venv/bin/python -m bench.w6_cpu --quick    # 1 warm-up round and 2 timed, the W1 mix only: checks the script
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from lit_fast.fastpath import FastPathOptions, to_fast_path
from lit_fast.fastpath.encoder import layers as fast_layers

TOLERANCE = 1e-4
BATCH, MAX_LEN = 32, 256


def batch_for(scenario: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    lengths = torch.randint(32, 257, (BATCH,)) if scenario == "w1" else torch.full((BATCH,), MAX_LEN)
    ids = torch.randint(1000, 30000, (BATCH, MAX_LEN))
    mask = (torch.arange(MAX_LEN) < lengths[:, None]).long()
    return ids, mask


def build_variants(base) -> dict[str, torch.nn.Module]:
    """name -> model; every model holds the same weights."""
    eager = copy.deepcopy(base)
    eager.config._attn_implementation = "eager"
    return {
        "hf_eager": eager,
        "hf_sdpa": base,
        "fused": to_fast_path(copy.deepcopy(base), "fused"),
        "packed": to_fast_path(copy.deepcopy(base), "packed"),
        "packed_blas": to_fast_path(copy.deepcopy(base), FastPathOptions("packed", onednn=False)),
        "auto": to_fast_path(copy.deepcopy(base), "auto"),
    }


def run(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return time.perf_counter() - start, out


def measure(scenario: str, rounds: int, warmup: int) -> dict:
    ids, mask = batch_for(scenario)
    real = mask.bool()
    variants = build_variants(common.bert_small())
    diffs: dict[str, float] = {}
    load_before = os.getloadavg()
    with torch.inference_mode():
        reference = run(variants["hf_eager"], ids, mask)[1]

        def once(name: str) -> float:
            seconds, out = run(variants[name], ids, mask)
            diffs[name] = (out[real] - reference[real]).abs().max().item()
            return seconds

        common.round_robin(list(variants), warmup, once, seed=None)  # interleaved, in a fixed order
        times = common.round_robin(list(variants), rounds, once, seed=None)
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
    return common.environment("cpu", threads=threads, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(default)"),
                              onednn_linear_available=fast_layers.ONEDNN_AVAILABLE)


def table(results: list[dict]) -> str:
    rows = [[result["scenario"], f"{result['padding_fraction']:.0%}", name, f"{row['median_s']:.3f}",
             f"{row['speedup_vs_hf_sdpa']:.2f}x",
             f"{row['max_abs_diff_vs_hf_eager']:.1e}{'' if row['correct'] else ' FAIL'}"]
            for result in results for name, row in result["variants"].items()]
    return common.markdown_table(["scenario", "padding", "variant", "median s/batch", "vs HF sdpa",
                                  "max abs diff vs eager"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scenario", nargs="+", default=["w1", "none"], choices=["w1", "none"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", help="results JSON (default bench/results/w6_cpu_<commit>.json; --quick: temp dir)")
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up round, 2 timed, the W1 mix only, results to the temp dir: checks the script")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.rounds, args.scenario = 1, 2, ["w1"]
        args.out = args.out or str(Path(tempfile.gettempdir()) / "w6_quick.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(scenario, args.rounds, args.warmup) for scenario in args.scenario]
    report = {"workload": "W6", "environment": environment(torch.get_num_threads()), "results": results}
    common.write_json(report, args.out or common.default_out("w6", "cpu"))
    print(report["environment"])
    print("load average before/after: " + "; ".join(
        f"{r['scenario']}: {r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f}" for r in results))
    print(table(results))


if __name__ == "__main__":
    main()
