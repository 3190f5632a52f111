"""W1 on the GPU, one step at a time: which kernel fusions of the packed path pay, and where the time goes.

Same model, batch and protocol as bench/w1_encoder.py (BERT-base shape, batch 128, the W1 length mix, CUDA events,
median of `--reps`), but only the W1 scenario, with the packed path's switches flipped one by one:

  packed-3gemm     q/k/v as three GEMMs, residual add and LayerNorm as two PyTorch kernels (the old layer)
  +fused_qkv       q/k/v as one GEMM over the concatenated weights (layers.FUSE_QKV)
  +triton_norm     residual add + LayerNorm as one Triton kernel (kernels.TRITON_ADD_NORM)
  +triton_attn     varlen attention in lit_fast's Triton kernel for head sizes 32/64/128 (VARLEN_KERNEL "auto")
  +front           the base model's FastFront plans before the embeddings and hands HF a mask view (front.FRONT)
  +packed_emb      + the embeddings of the real tokens only (front.PACKED_EMBEDDINGS)
  +row_plan        + the plan, gather and scatter of one-run rows as Triton kernels (front.ROW_PLAN)
  default          what the library runs: + the layers queued by the front before HF's forward (front.EARLY_LAYERS)
  default+graphs   the same, with the layers replayed as CUDA graphs (`cuda_graphs=True`)
  +flash_op        the default with flash attention called without torch's custom-op layer (layers.VARLEN_KERNEL)
  attn M,N,W,S     (--attn) the default with the Triton attention tiled BLOCK_M, BLOCK_N, warps, stages
Each row also gives the host time of one call (`host ms`): where it nears the device time, the host is the limit.
(cuDNN's varlen attention, tried 2026-11-25, ran 780 ms instead of 9: dropped.)

then a torch.profiler table of today's default (self CUDA time per kernel, summed over 5 forwards). Correctness in
the same run: max abs diff against HF eager in fp32 on the real tokens.

    PYTHONPATH=$PWD python3 bench/w1_profile.py --out bench/results/w1_profile_h100.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from w1_encoder import DTYPES, batch_for, bert_base, environment, matmul_peak_tflops, real_flops, time_ms  # noqa: E402

from lit_fast.fastpath import front, kernels, layers, to_fast_path  # noqa: E402

# name -> (FUSE_QKV, TRITON_ADD_NORM, VARLEN_KERNEL, FRONT, PACKED_EMBEDDINGS, ROW_PLAN, EARLY_LAYERS, cuda_graphs)
STEPS = {
    "packed-3gemm": (False, False, "flash", False, False, False, False, False),
    "+fused_qkv": (True, False, "flash", False, False, False, False, False),
    "+triton_norm": (True, True, "flash", False, False, False, False, False),
    "+triton_attn": (True, True, "auto", False, False, False, False, False),
    "+front": (True, True, "auto", True, False, False, False, False),
    "+packed_emb": (True, True, "auto", True, True, False, False, False),
    "+row_plan": (True, True, "auto", True, True, True, False, False),
    "default": (True, True, "auto", True, True, True, True, False),
    "default+graphs": (True, True, "auto", True, True, True, True, True),
    "+flash_op": (True, True, "flash-op", True, True, True, True, False),
}
DEFAULT = (True, True, "auto", True, True, True, True)


def switches(fuse: bool, triton_norm: bool, varlen_kernel: str, use_front: bool, packed_embeddings: bool,
             row_plan: bool, early_layers: bool) -> None:
    layers.FUSE_QKV, kernels.TRITON_ADD_NORM, layers.VARLEN_KERNEL = fuse, triton_norm, varlen_kernel
    front.FRONT, front.PACKED_EMBEDDINGS, front.ROW_PLAN, front.EARLY_LAYERS = (use_front, packed_embeddings,
                                                                                row_plan, early_layers)


def attention_tiling(spec: str) -> None:
    """`--attn` values: BLOCK_M,BLOCK_N,WARPS,STAGES for the Triton varlen kernel (kernels.ATTN_*)."""
    kernels.ATTN_BLOCK_M, kernels.ATTN_BLOCK_N, kernels.ATTN_WARPS, kernels.ATTN_STAGES = map(int, spec.split(","))


def host_ms(fn, reps: int) -> float:
    """Median host time of one call (it returns once its kernels are queued, or after its waits for the device)."""
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench/results/w1_profile.json"))
    parser.add_argument("--trace", help="also write a chrome trace of the default path per dtype (path prefix)")
    parser.add_argument("--trace-cpu", action="store_true", help="record host ops in the trace too")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), help="which variants to time (default: all)")
    parser.add_argument("--attn", nargs="*", default=[],
                        help="extra variants: the default with the Triton attention tiled BLOCK_M,BLOCK_N,WARPS,STAGES")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = matmul_peak_tflops()
    ids, mask = batch_for("w1")
    real = mask.bool()
    floor_ms = real_flops(mask) / (peak * 1e12) * 1e3
    rows, profile_text = [], ""
    reference_model = bert_base().cuda()
    reference_model.config._attn_implementation = "eager"
    with torch.inference_mode():
        reference = reference_model(input_ids=ids, attention_mask=mask).last_hidden_state
    for name in args.dtypes:
        base = bert_base().cuda().to(DTYPES[name])
        variants = {"hf_sdpa": (base, None)}
        for step, (*flags, graphs) in STEPS.items():
            if step not in args.steps and step != "default":
                continue
            variants[step] = (to_fast_path(copy.deepcopy(base), "packed", cuda_graphs=graphs), tuple(flags))
        for spec in args.attn:
            variants[f"attn {spec}"] = (variants["default"][0], DEFAULT)
        times = {}
        tiling = (kernels.ATTN_BLOCK_M, kernels.ATTN_BLOCK_N, kernels.ATTN_WARPS, kernels.ATTN_STAGES)
        for step, (model, flags) in variants.items():
            switches(*(flags or DEFAULT))
            if step.startswith("attn "):
                attention_tiling(step.removeprefix("attn "))
            try:
                with torch.inference_mode():
                    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
                    samples = time_ms(lambda: model(input_ids=ids, attention_mask=mask), args.warmup, args.reps)
                    host = host_ms(lambda: model(input_ids=ids, attention_mask=mask), args.reps)
            except RuntimeError as failure:  # an explored kernel this build cannot run
                print(f"{name} {step}: failed: {failure}", flush=True)
                continue
            finally:
                kernels.ATTN_BLOCK_M, kernels.ATTN_BLOCK_N, kernels.ATTN_WARPS, kernels.ATTN_STAGES = tiling
            diff = (out[real].float() - reference[real]).abs().max().item()
            times[step] = statistics.median(samples)
            rows.append({"dtype": name, "variant": step, "median_ms": times[step], "times_ms": samples,
                         "host_ms": host, "max_abs_diff_vs_fp32_eager": diff})
            print(f"{name} {step}: {times[step]:.2f} ms (host {host:.2f} ms), diff {diff:.1e}", flush=True)
        for row in rows:
            if row["dtype"] == name and "hf_sdpa" in times:
                row["speedup_vs_hf_sdpa"] = times["hf_sdpa"] / row["median_ms"]
                row["floor_percent"] = 100 * floor_ms / row["median_ms"]
        switches(*DEFAULT)
        model = variants["default"][0]
        if args.trace:  # device timeline of three forwards (chrome://tracing or ui.perfetto.dev); with --trace-cpu
            # the host ops too (which slows the host down and so overstates the device's idle time)
            activities = [torch.profiler.ProfilerActivity.CUDA]
            if args.trace_cpu:
                activities.append(torch.profiler.ProfilerActivity.CPU)
            with torch.inference_mode(), torch.profiler.profile(activities=activities) as prof:
                for _ in range(3):
                    model(input_ids=ids, attention_mask=mask)
                torch.cuda.synchronize()
            prof.export_chrome_trace(str(Path(args.trace).with_suffix(f".{name}.json")))
        with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(input_ids=ids, attention_mask=mask)
            torch.cuda.synchronize()
        text = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
        profile_text += f"\n### {name} default, 5 forwards\n{text}\n"
        del variants, base
        torch.cuda.empty_cache()
    report = {"workload": "W1 (profile)", "environment": environment(peak), "floor_ms": floor_ms, "rows": rows,
              "profile": profile_text}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(profile_text)
    print(f"floor {floor_ms:.2f} ms")
    print("| dtype | variant | median ms | host ms | vs HF sdpa | % of floor | max abs diff vs fp32 eager |\n"
          "|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['dtype']} | {row['variant']} | {row['median_ms']:.2f} | {row['host_ms']:.2f} | "
              f"{row['speedup_vs_hf_sdpa']:.2f}x | {row['floor_percent']:.0f}% | {row['max_abs_diff_vs_fp32_eager']:.1e} |")


if __name__ == "__main__":
    main()
