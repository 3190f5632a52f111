"""W1 — encoder inference on the GPU (shared/BENCHMARKS.md): BERT-base shape, batch 128, max length 256.

BERT-base shape (12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522), random init from seed 0. Each padding
scenario draws its lengths after `torch.manual_seed(0)` and pads on the right to 256:
  pad0   all 256                        (0% padding)
  pad25  torch.randint(128, 257, (128,))
  w1     torch.randint(32, 257, (128,))  (the W1 mix, ~43% padding)
  pad60  torch.randint(32, 173, (128,))
  pad75  torch.randint(32, 97, (128,))   (~75% padding)
  w1_batch8  torch.randint(32, 257, (8,)) (the W1 mix in a batch of 8: launch overhead shows)
Variants on the same weights and inputs: HF eager, HF sdpa, lit_fast fused (nested tensors through PyTorch's
fused encoder-layer kernel), packed (packed tokens + varlen attention, no CUDA graphs), packed+graphs
(`cuda_graphs=True`) and auto (what `to_fast_path(model)` runs: CUDA graphs for small repeated batches).
`--explore [NAME ...]` adds what-if variants (all, or those named) that are not in the library (see EXPLORE below)
and the time of the packed GEMMs alone. `--scenarios w1_batch1 ... w1_batch64` times the W1 mix at other batch sizes (not in a default run).

Protocol: CUDA events, median of `--reps` after `--warmup`, `torch.inference_mode()`. The variants are timed round
robin (one call of each in turn, `--reps` rounds), so that a drift in GPU clocks or host speed during the run falls
on all of them alike rather than on whichever ran last; the order is shuffled each round (seeded), so that no
variant always runs right after the same one (where the host sets the pace, a call right after an eager variant,
which leaves the host's caches cold, measured 6-13% slower: batch 8 at 64bbfbd and 55c562f, where `auto` always
followed the eager `packed`; a rotation of the order, tried at 36a6efa, keeps who follows whom). The floor is the real
tokens' FLOPs (GEMMs + attention) over an 8192^3 bf16 matmul measured in the same run. Correctness in the same
run: max abs diff on real tokens against HF eager in fp32 (TF32 off) on the same weights; the fp16/bf16 tolerance
is 2e-2 (outputs are LayerNorm outputs, unit scale), 1e-4 for fp32, and every variant is also compared with HF
sdpa's own error in that dtype (bf16 keeps 8 significant bits: HF itself misses 2e-2 there). Results go to JSON;
a table is printed last.

    export PYTHONPATH=$PWD; python3 bench/w1_encoder.py --out bench/results/w1_h100.json [--explore]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402

from lit_fast.fastpath import front as fast_front  # noqa: E402
from lit_fast.fastpath import layers as fast_layers  # noqa: E402
from lit_fast.fastpath import to_fast_path  # noqa: E402

BATCH, MAX_LEN, HIDDEN, FFN, LAYERS = 128, 256, 768, 3072, 12
SCENARIOS = {  # name -> (batch size, lengths drawn after manual_seed(0))
    "pad0": (BATCH, lambda: torch.full((BATCH,), MAX_LEN)),
    "pad25": (BATCH, lambda: torch.randint(128, 257, (BATCH,))),
    "w1": (BATCH, lambda: torch.randint(32, 257, (BATCH,))),
    "pad60": (BATCH, lambda: torch.randint(32, 173, (BATCH,))),
    "pad75": (BATCH, lambda: torch.randint(32, 97, (BATCH,))),
    "w1_batch8": (8, lambda: torch.randint(32, 257, (8,))),  # a small batch: where launch overhead shows
}
# --scenarios only (not in a default run): the W1 mix at other batch sizes, where the host stops being the limit
BATCH_SWEEP = {f"w1_batch{n}": (n, lambda n=n: torch.randint(32, 257, (n,))) for n in (1, 2, 4, 16, 32, 64)}
ALL_SCENARIOS = {**SCENARIOS, **BATCH_SWEEP}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


def bert_base() -> transformers.BertModel:
    config = transformers.BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=12, intermediate_size=FFN)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def batch_for(scenario: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch, draw = ALL_SCENARIOS[scenario]
    torch.manual_seed(0)
    lengths = draw()
    ids = torch.randint(1000, 30000, (batch, MAX_LEN))
    mask = (torch.arange(MAX_LEN) < lengths[:, None]).long()
    return ids.cuda(), mask.cuda()


def time_ms(fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return [time_once(fn) for _ in range(reps)]


def time_once(fn) -> float:
    """One call, device time in ms: CUDA events around it, then a wait for the end event."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def matmul_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(time_ms(lambda: a @ b, 5, 20))
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def real_flops(mask: torch.Tensor) -> float:
    lengths = mask.sum(1).double()
    tokens = lengths.sum().item()
    gemms = tokens * 2 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
    attention = 4 * HIDDEN * (lengths**2).sum().item()  # QK^T and PV
    return LAYERS * (gemms + attention)


# ---- what-if variants (--explore): patched into lit_fast.fastpath.layers while their own model copy runs -------
def _linear_exact_gelu(x, layer, gelu=False):
    """A separate exact-GELU pass instead of cuBLASLt's (tanh) GELU epilogue."""
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if gelu else y


_compiled_add_norm = None


def _add_norm_compiled(x, y, norm):
    """Residual add + LayerNorm as one torch.compile'd kernel (dynamic shapes)."""
    global _compiled_add_norm
    if _compiled_add_norm is None:
        _compiled_add_norm = torch.compile(
            lambda x, y, w, b, eps: F.layer_norm(x + y, (x.shape[-1],), w, b, eps), dynamic=True
        )
    return _compiled_add_norm(x, y, norm.weight, norm.bias, norm.eps)


EXPLORE = {  # name -> {attribute of fastpath.layers (or "front.<attribute>" of fastpath.front): replacement}
    "packed+exact_gelu": {"linear": _linear_exact_gelu},
    "packed+compile": {"add_norm": _add_norm_compiled},
    "auto-qkv_ahead": {"front.FIRST_QKV_AHEAD": False},  # auto without the first q/k/v GEMM in the front's graph
    # auto with that GEMM over all batch * seq_len rows (as before 2026-11-30) instead of the previous call's count
    "auto-qkv_all_rows": {"front.bucket_tokens": lambda count: 1 << 40},
}


def _owner(name: str) -> tuple:
    return (fast_front, name[len("front."):]) if name.startswith("front.") else (fast_layers, name)


@contextlib.contextmanager
def patched(replacements: dict):
    saved = {name: getattr(*_owner(name)) for name in replacements}
    for name, fn in replacements.items():
        setattr(*_owner(name), fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(*_owner(name), fn)


def gemms_only(model: transformers.BertModel, mask: torch.Tensor, dtype: torch.dtype):
    """The packed path's GEMMs alone (12 layers x 6 on the real tokens): what no kernel fusion can go below."""
    tokens = torch.randn(int(mask.sum()), HIDDEN, device="cuda", dtype=dtype)
    weights = [(layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                layer.attention.output.dense, layer.intermediate.dense, layer.output.dense)
               for layer in model.encoder.layer]

    def run():
        for q, k, v, o, up, down in weights:
            F.linear(tokens, q.weight, q.bias), F.linear(tokens, k.weight, k.bias)
            F.linear(tokens, v.weight, v.bias), F.linear(tokens, o.weight, o.bias)
            F.linear(F.linear(tokens, up.weight, up.bias), down.weight, down.bias)

    return run


def measure_dtype(dtype_name: str, scenarios: list[str], args, peak: float) -> list[dict]:
    dtype = DTYPES[dtype_name]
    base = bert_base().cuda()
    reference_model = copy.deepcopy(base)
    reference_model.config._attn_implementation = "eager"
    base = base.to(dtype)
    eager = copy.deepcopy(base)
    eager.config._attn_implementation = "eager"
    variants = {"hf_eager": (eager, {}), "hf_sdpa": (base, {})}
    for backend in ("fused", "packed", "auto"):  # packed: without CUDA graphs; auto: what to_fast_path(model) runs
        graphs = "auto" if backend == "auto" else False
        variants[backend] = (to_fast_path(copy.deepcopy(base), backend, cuda_graphs=graphs), {})
    if dtype != torch.float32:
        variants["packed+graphs"] = (to_fast_path(copy.deepcopy(base), "packed", cuda_graphs=True), {})
    if args.explore is not None and dtype != torch.float32:
        variants.update({name: (to_fast_path(copy.deepcopy(base), "auto" if name.startswith("auto") else "packed"),
                                replacements)
                         for name, replacements in EXPLORE.items() if not args.explore or name in args.explore})
    rows = []
    for scenario in scenarios:
        ids, mask = batch_for(scenario)
        real = mask.bool()
        with torch.inference_mode():
            reference = reference_model(input_ids=ids, attention_mask=mask).last_hidden_state
            floor_ms = real_flops(mask) / (peak * 1e12) * 1e3
            result = {"dtype": dtype_name, "scenario": scenario, "padding_fraction": 1 - real.float().mean().item(),
                      "real_tokens": int(real.sum()), "floor_ms": floor_ms, "variants": {}}
            diffs = {}
            for name, (model, replacements) in variants.items():
                with patched(replacements):
                    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
                    for _ in range(args.warmup):
                        model(input_ids=ids, attention_mask=mask)
                diffs[name] = (out[real].float() - reference[real]).abs().max().item()
                del out
            torch.cuda.synchronize()
            times = {name: [] for name in variants}
            order = list(variants)
            shuffle = random.Random(0).shuffle
            for _ in range(args.reps):  # round robin: drift in clocks or host speed falls on every variant alike
                shuffle(order)  # and a new order each round: no variant always runs right after the same one
                for name in order:
                    model, replacements = variants[name]
                    with patched(replacements):
                        times[name].append(time_once(lambda: model(input_ids=ids, attention_mask=mask)))
            for name in variants:
                result["variants"][name] = {"median_ms": statistics.median(times[name]), "times_ms": times[name],
                                            "max_abs_diff_vs_fp32_eager": diffs[name],
                                            "within_tolerance": diffs[name] <= TOLERANCE[dtype]}
            if args.explore is not None:
                times = time_ms(gemms_only(base, mask, dtype), args.warmup, args.reps)
                result["gemms_only_ms"] = statistics.median(times)
        sdpa = result["variants"]["hf_sdpa"]
        for row in result["variants"].values():
            row["speedup_vs_hf_sdpa"] = sdpa["median_ms"] / row["median_ms"]
            row["floor_percent"] = 100 * floor_ms / row["median_ms"]
            row["no_worse_than_hf_sdpa"] = row["max_abs_diff_vs_fp32_eager"] <= 1.25 * sdpa["max_abs_diff_vs_fp32_eager"]
            row["correct"] = row["within_tolerance"] or row["no_worse_than_hf_sdpa"]
        rows.append(result)
        print(f"{dtype_name} {scenario}: " + ", ".join(
            f"{n} {r['median_ms']:.2f}ms" for n, r in result["variants"].items()), flush=True)
    return rows


def environment(peak: float) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "commit": os.environ.get("LIT_FAST_COMMIT") or commit or "unknown",
            "bf16_matmul_peak_tflops": peak, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "varlen_attn": fast_layers.varlen_attn is not None}


def table(results: list[dict]) -> str:
    lines = ["| dtype | padding | variant | median ms | vs HF sdpa | % of floor | max abs diff vs fp32 eager |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        for name, row in result["variants"].items():
            flag = "" if row["within_tolerance"] else (" (HF-level)" if row["no_worse_than_hf_sdpa"] else " FAIL")
            lines.append(f"| {result['dtype']} | {result['padding_fraction']:.0%} ({result['scenario']}) | {name} | "
                         f"{row['median_ms']:.2f} | {row['speedup_vs_hf_sdpa']:.2f}x | {row['floor_percent']:.0f}% | "
                         f"{row['max_abs_diff_vs_fp32_eager']:.1e}{flag} |")
        if "gemms_only_ms" in result:
            lines.append(f"| {result['dtype']} | {result['padding_fraction']:.0%} ({result['scenario']}) | "
                         f"GEMMs alone | {result['gemms_only_ms']:.2f} | | | |")
        lines.append(f"| {result['dtype']} | {result['padding_fraction']:.0%} ({result['scenario']}) | floor | "
                     f"{result['floor_ms']:.2f} | | 100% | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(ALL_SCENARIOS))
    parser.add_argument("--fp32-scenarios", nargs="+", default=["w1"], choices=list(ALL_SCENARIOS))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--explore", nargs="*", choices=list(EXPLORE),
                        help="add what-if variants (all of them when none is named)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/w1_h100.json"))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    peak = matmul_peak_tflops()
    results = []
    for name in args.dtypes:
        scenarios = args.fp32_scenarios if name == "fp32" else args.scenarios
        results += measure_dtype(name, scenarios, args, peak)
        torch.cuda.empty_cache()
    report = {"workload": "W1", "environment": environment(peak), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["environment"]))
    print(table(results))


if __name__ == "__main__":
    main()
