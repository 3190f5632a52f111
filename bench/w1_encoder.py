"""W1 - encoder inference on the GPU (bench/README.md): BERT-base shape, batch 128, max length 256.

BERT-base shape (12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522), random init from seed 0. Each padding
scenario draws its lengths after `torch.manual_seed(0)` and pads on the right to 256 (bench/common.py):
  pad0   all 256                        (0% padding)
  pad25  torch.randint(128, 257, (128,))
  w1     torch.randint(32, 257, (128,))  (the W1 mix, ~43% padding)
  pad60  torch.randint(32, 173, (128,))
  pad75  torch.randint(32, 97, (128,))   (~75% padding)
  w1_batch8  torch.randint(32, 257, (8,)) (the W1 mix in a batch of 8: launch overhead shows)
Variants on the same weights and inputs: HF eager, HF sdpa, lit_fast fused (nested tensors through PyTorch's
fused encoder-layer kernel), packed (packed tokens + varlen attention, `cuda_graphs=False`), auto (what
`to_fast_path(model)` runs: CUDA graphs for small repeated batches) and packed+graphs (`cuda_graphs=True`).
`--explore [NAME ...]` adds what-if variants (all, or those named; see EXPLORE below) and the time of the packed
GEMMs alone. `--scenarios w1_batch1 ... w1_batch64` times the W1 mix at other batch sizes (not in a default run).

Protocol: CUDA events, median of `--reps` after `--warmup`, `torch.inference_mode()`. The variants are timed round
robin (one call of each in turn, `--reps` rounds), so that a drift in GPU clocks or host speed during the run falls
on all of them alike rather than on whichever ran last; the order is shuffled each round (seeded), so that no
variant always runs right after the same one (where the host sets the pace, a call right after an eager variant,
which leaves the host's caches cold, measured 6-13% slower at batch 8; a rotation of the order keeps who follows
whom). The floor is the real tokens' FLOPs (GEMMs + attention) over an 8192^3 bf16 matmul measured in the same run.
Correctness in the same run: max abs diff on real tokens against HF eager in fp32 (TF32 off) on the same weights;
the fp16/bf16 tolerance is 2e-2 (outputs are LayerNorm outputs, unit scale), 1e-4 for fp32, and every variant is
also compared with HF sdpa's own error in that dtype (bf16 keeps 8 significant bits: HF itself misses 2e-2 there).
Results go to JSON (default bench/results/w1_<device>_<commit>.json); a table is printed last.

    python -m bench.w1_encoder [--explore] [--out bench/results/w1_h200_<commit>.json]
    python -m bench.w1_encoder --dry-run      # CPU, a 2-layer model, fp32, 3 rounds: checks the script only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common
from lit_fast.fastpath import FastPathOptions, to_fast_path
from lit_fast.fastpath.encoder import front as fast_front
from lit_fast.fastpath.encoder import layers as fast_layers

SHAPE = {"layers": 12, "hidden": 768, "heads": 12, "ffn": 3072}  # BERT-base; --dry-run shrinks it
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


# ---- what-if variants (--explore) ------------------------------------------------------------------------------
# name -> (backend, FastPathOptions changes, replacements patched into lit_fast's modules while that variant runs:
# {attribute of fastpath.encoder.layers, or "front.<attribute>" of fastpath.encoder.front: replacement}).
def _linear_exact_gelu(x, layer, onednn=True, gelu=False):
    """A separate exact-GELU pass instead of cuBLASLt's (tanh) GELU epilogue."""
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if gelu else y


_compiled_add_norm = None


def _add_norm_compiled(x, y, norm, kernel=True):
    """Residual add + LayerNorm as one torch.compile'd kernel (dynamic shapes) instead of lit_fast's Triton one."""
    global _compiled_add_norm
    if _compiled_add_norm is None:
        _compiled_add_norm = torch.compile(
            lambda x, y, w, b, eps: F.layer_norm(x + y, (x.shape[-1],), w, b, eps), dynamic=True
        )
    return _compiled_add_norm(x, y, norm.weight, norm.bias, norm.eps)


EXPLORE = {
    "packed+exact_gelu": ("packed", {}, {"linear": _linear_exact_gelu}),
    "packed+compile": ("packed", {}, {"add_norm": _add_norm_compiled}),
    # auto without the first layer's q/k/v GEMM queued in the front's CUDA graph
    "auto-qkv_ahead": ("auto", {"qkv_ahead": False}, {}),
    # auto with that GEMM over all batch * seq_len rows (as before c3e80e2) instead of the previous call's count
    "auto-qkv_all_rows": ("auto", {}, {"front.bucket_tokens": lambda count: 1 << 40}),
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


# ---- the run ---------------------------------------------------------------------------------------------------
def build_model(device: str):
    return common.bert_model(SHAPE["layers"], SHAPE["hidden"], SHAPE["heads"], SHAPE["ffn"]).to(device)


def gemms_only(model, mask: torch.Tensor, dtype: torch.dtype):
    """The packed path's GEMMs alone (12 layers x 6 on the real tokens): what no kernel fusion can go below."""
    tokens = torch.randn(int(mask.sum()), SHAPE["hidden"], device=mask.device, dtype=dtype)
    weights = [(layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                layer.attention.output.dense, layer.intermediate.dense, layer.output.dense)
               for layer in model.encoder.layer]

    def run():
        for q, k, v, o, up, down in weights:
            F.linear(tokens, q.weight, q.bias), F.linear(tokens, k.weight, k.bias)
            F.linear(tokens, v.weight, v.bias), F.linear(tokens, o.weight, o.bias)
            F.linear(F.linear(tokens, up.weight, up.bias), down.weight, down.bias)

    return run


def build_variants(base, dtype: torch.dtype, explore: list[str] | None, allow_explore: bool) -> dict:
    """name -> (model, replacements); every model holds the same weights."""
    eager = copy.deepcopy(base)
    eager.config._attn_implementation = "eager"
    variants = {"hf_eager": (eager, {}), "hf_sdpa": (base, {})}
    for backend in ("fused", "packed", "auto"):  # packed: without CUDA graphs; auto: what to_fast_path(model) runs
        graphs = "auto" if backend == "auto" else False
        variants[backend] = (to_fast_path(copy.deepcopy(base), FastPathOptions(backend, cuda_graphs=graphs)), {})
    if dtype != torch.float32:
        variants["packed+graphs"] = (to_fast_path(copy.deepcopy(base), "packed", cuda_graphs=True), {})
    if explore is not None and allow_explore:
        for name, (backend, changes, replacements) in EXPLORE.items():
            if not explore or name in explore:
                options = FastPathOptions(backend).with_changes(**changes)
                variants[name] = (to_fast_path(copy.deepcopy(base), options), replacements)
    return variants


def measure_dtype(dtype_name: str, scenarios: list[str], args, peak: float) -> list[dict]:
    dtype = common.DTYPES[dtype_name]
    cuda = args.device == "cuda"
    base = build_model(args.device)
    reference_model = copy.deepcopy(base)
    reference_model.config._attn_implementation = "eager"
    base = base.to(dtype)
    variants = build_variants(base, dtype, args.explore, dtype != torch.float32 or args.dry_run)
    rows = []
    for scenario in scenarios:
        ids, mask = common.w1_batch(scenario, args.device)
        real = mask.bool()
        with torch.inference_mode():
            reference = reference_model(input_ids=ids, attention_mask=mask).last_hidden_state
            floor_ms = common.encoder_flops(mask, SHAPE["layers"], SHAPE["hidden"], SHAPE["ffn"]) / (peak * 1e12) * 1e3
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
            common.synchronize(args.device)

            def measure(name: str) -> float:
                model, replacements = variants[name]
                with patched(replacements):
                    return common.time_once_ms(lambda: model(input_ids=ids, attention_mask=mask), cuda)

            # round robin in an order shuffled each round (seeded): drift falls on every variant alike
            times = common.round_robin(list(variants), args.reps, measure, seed=0)
            for name in variants:
                result["variants"][name] = {"median_ms": statistics.median(times[name]), "times_ms": times[name],
                                            "max_abs_diff_vs_fp32_eager": diffs[name],
                                            "within_tolerance": diffs[name] <= TOLERANCE[dtype]}
            if args.explore is not None:
                samples = common.time_ms(gemms_only(base, mask, dtype), args.warmup, args.reps, cuda)
                result["gemms_only_ms"] = statistics.median(samples)
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


def table(results: list[dict]) -> str:
    rows = []
    for result in results:
        where = f"{result['padding_fraction']:.0%} ({result['scenario']})"
        for name, row in result["variants"].items():
            flag = "" if row["within_tolerance"] else (" (HF-level)" if row["no_worse_than_hf_sdpa"] else " FAIL")
            rows.append([result["dtype"], where, name, f"{row['median_ms']:.2f}", f"{row['speedup_vs_hf_sdpa']:.2f}x",
                         f"{row['floor_percent']:.0f}%", f"{row['max_abs_diff_vs_fp32_eager']:.1e}{flag}"])
        if "gemms_only_ms" in result:
            rows.append([result["dtype"], where, "GEMMs alone", f"{result['gemms_only_ms']:.2f}", "", "", ""])
        rows.append([result["dtype"], where, "floor", f"{result['floor_ms']:.2f}", "", "100%", ""])
    return common.markdown_table(["dtype", "padding", "variant", "median ms", "vs HF sdpa", "% of floor",
                                  "max abs diff vs fp32 eager"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(common.DTYPES))
    parser.add_argument("--scenarios", nargs="+", default=list(common.W1_SCENARIOS),
                        choices=list(common.W1_ALL_SCENARIOS))
    parser.add_argument("--fp32-scenarios", nargs="+", choices=list(common.W1_ALL_SCENARIOS),
                        help="scenarios of the fp32 runs (--dtypes fp32); default w1 (--dry-run: w1_batch8)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--explore", nargs="*", choices=list(EXPLORE),
                        help="add what-if variants (all of them when none is named)")
    parser.add_argument("--out", help="results JSON (default bench/results/w1_<device>_<commit>.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, 2 layers of hidden 128, fp32 only (w1_batch8 unless --fp32-scenarios), 1 warm-up and "
                             "3 rounds, results to the temp dir: checks the script only")
    args = parser.parse_args()
    args.device = "cuda"
    if args.dry_run:
        SHAPE.update(layers=2, hidden=128, heads=2, ffn=512)
        args.device, args.dtypes, args.warmup, args.reps = "cpu", ["fp32"], 1, 3
        args.fp32_scenarios = args.fp32_scenarios or ["w1_batch8"]
    args.fp32_scenarios = args.fp32_scenarios or ["w1"]
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("W1 runs on a CUDA GPU (use --dry-run to check the script on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    peak = (common.matmul_peak_tflops() if not args.dry_run
            else common.matmul_peak_tflops(1024, torch.float32, "cpu"))
    results = []
    for name in args.dtypes:
        scenarios = args.fp32_scenarios if name == "fp32" else args.scenarios
        results += measure_dtype(name, scenarios, args, peak)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    environment = common.environment(args.device, bf16_matmul_peak_tflops=peak,
                                     varlen_attn=fast_layers.varlen_attn is not None, dry_run=args.dry_run,
                                     shape=dict(SHAPE))
    report = {"workload": "W1", "environment": environment, "results": results}
    if args.dry_run:  # a check of the script, not a measurement: never into bench/results by default
        args.out = args.out or str(Path(tempfile.gettempdir()) / "w1_dry_run.json")
    common.write_json(report, args.out or common.default_out("w1", args.device))
    print(environment)
    print(table(results))


if __name__ == "__main__":
    main()
