"""W1 on the GPU, one step at a time: which parts of the packed path pay, and where the time goes.

Same model, batch and protocol as bench/w1_encoder.py (BERT-base shape, batch 128, the W1 length mix, CUDA events,
median of `--reps`), but only the W1 scenario, with the packed path's options (FastPathOptions) turned on one by one:

  packed-3gemm     q/k/v as three GEMMs, residual add and LayerNorm as two PyTorch kernels, flash varlen attention,
                   HF's embeddings and base-model forward around the packed layers (front=False)
  +fused_qkv       q/k/v as one GEMM over the concatenated weights (fuse_qkv)
  +triton_norm     residual add + LayerNorm as one Triton kernel (add_norm_kernel)
  +triton_attn     varlen attention in lit_fast's Triton kernel for head sizes 32/64/128 (attention="auto")
  +front           the base model's FastFront runs the whole forward on packed tokens: plan, embeddings of the real
                   tokens only (in PyTorch ops here: embed_kernel=False), layers, pooler (front)
  +embed_kernel    + the embeddings' gathers, sum and LayerNorm as one Triton kernel (embed_kernel)
  default          + the plan of one-run rows in one Triton kernel and one wait (row_plan): the library's packed path,
                   FastPathOptions("packed", cuda_graphs=False)
  default+graphs   the same, with the layers (and the front's steps before its wait) replayed as CUDA graphs
  auto             what `to_fast_path(model)` runs (FastPathOptions())
  attn M,N,W,S     (--attn) the default with the Triton attention tiled BLOCK_M, BLOCK_N, warps, stages (the
                   short-sequence key tile, kernels.ATTN_SHORT_*, off)
Each row also gives the host time of one call (`host ms`): where it nears the device time, the host is the limit.

Then a torch.profiler table of the default (self CUDA time per kernel, summed over 5 forwards). Correctness in the
same run: max abs diff against HF eager in fp32 on the real tokens.

Steps of earlier versions that no option reproduces (front without packed embeddings, the layers queued before
HF's forward, flash attention without torch's custom-op layer, cuDNN attention) are listed in
bench/explore/README.md; their numbers are in docs/MEASUREMENTS.md ("Step by step").

    python -m bench.explore.w1_profile [--steps default auto] [--out bench/results/w1_profile_h200_<commit>.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

from bench import common
from lit_fast.fastpath import FastPathOptions, to_fast_path
from lit_fast.fastpath.encoder import kernels

PACKED = FastPathOptions("packed", cuda_graphs=False)
BARE = PACKED.with_changes(fuse_qkv=False, add_norm_kernel=False, attention="flash", front=False, embed_kernel=False,
                           row_plan=False)
STEPS = {  # name -> the options of that step
    "packed-3gemm": BARE,
    "+fused_qkv": BARE.with_changes(fuse_qkv=True),
    "+triton_norm": BARE.with_changes(fuse_qkv=True, add_norm_kernel=True),
    "+triton_attn": BARE.with_changes(fuse_qkv=True, add_norm_kernel=True, attention="auto"),
    "+front": BARE.with_changes(fuse_qkv=True, add_norm_kernel=True, attention="auto", front=True),
    "+embed_kernel": BARE.with_changes(fuse_qkv=True, add_norm_kernel=True, attention="auto", front=True,
                                       embed_kernel=True),
    "default": PACKED,
    "default+graphs": PACKED.with_changes(cuda_graphs=True),
    "auto": FastPathOptions(),
}
TILING = ("ATTN_BLOCK_M", "ATTN_BLOCK_N", "ATTN_WARPS", "ATTN_STAGES", "ATTN_SHORT_HEAD_DIMS")


def attention_tiling(spec: str) -> None:
    """`--attn` values: BLOCK_M,BLOCK_N,WARPS,STAGES for the Triton varlen kernel (kernels.ATTN_*; read at each call)."""
    kernels.ATTN_BLOCK_M, kernels.ATTN_BLOCK_N, kernels.ATTN_WARPS, kernels.ATTN_STAGES = map(int, spec.split(","))
    kernels.ATTN_SHORT_HEAD_DIMS = ()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", help="results JSON (default bench/results/w1_profile_<device>_<commit>.json)")
    parser.add_argument("--trace", help="also write a chrome trace of the default path per dtype (path prefix)")
    parser.add_argument("--trace-cpu", action="store_true", help="record host ops in the trace too")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS),
                        help="which variants to time (default: all; `default` always runs)")
    parser.add_argument("--attn", nargs="*", default=[],
                        help="extra variants: the default with the Triton attention tiled BLOCK_M,BLOCK_N,WARPS,STAGES")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("w1_profile needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = common.matmul_peak_tflops()
    ids, mask = common.w1_batch("w1")
    real = mask.bool()
    floor_ms = common.encoder_flops(mask) / (peak * 1e12) * 1e3
    rows, profile_text = [], ""
    reference_model = common.bert_model(12, 768, 12, 3072, attention="eager").cuda()
    with torch.inference_mode():
        reference = reference_model(input_ids=ids, attention_mask=mask).last_hidden_state
    del reference_model
    for name in args.dtypes:
        base = common.bert_base().cuda().to(common.DTYPES[name])
        variants = {"hf_sdpa": (base, None)}
        for step, options in STEPS.items():
            if step in args.steps or step == "default":
                variants[step] = (to_fast_path(copy.deepcopy(base), options), None)
        for spec in args.attn:
            variants[f"attn {spec}"] = (variants["default"][0], spec)
        times = {}
        for step, (model, tiling) in variants.items():
            saved = {attr: getattr(kernels, attr) for attr in TILING}
            if tiling is not None:
                attention_tiling(tiling)
            try:
                with torch.inference_mode():
                    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
                    samples = common.time_ms(lambda: model(input_ids=ids, attention_mask=mask), args.warmup,
                                             args.reps)
                    host = common.host_ms(lambda: model(input_ids=ids, attention_mask=mask), args.reps)
            except RuntimeError as failure:  # an explored kernel this build cannot run
                print(f"{name} {step}: failed: {failure}", flush=True)
                continue
            finally:
                for attr, value in saved.items():
                    setattr(kernels, attr, value)
            diff = (out[real].float() - reference[real]).abs().max().item()
            times[step] = statistics.median(samples)
            rows.append({"dtype": name, "variant": step, "median_ms": times[step], "times_ms": samples,
                         "host_ms": host, "max_abs_diff_vs_fp32_eager": diff,
                         "options": repr(STEPS.get(step)) if step in STEPS else None})
            print(f"{name} {step}: {times[step]:.2f} ms (host {host:.2f} ms), diff {diff:.1e}", flush=True)
        for row in rows:
            if row["dtype"] == name and "hf_sdpa" in times:
                row["speedup_vs_hf_sdpa"] = times["hf_sdpa"] / row["median_ms"]
                row["floor_percent"] = 100 * floor_ms / row["median_ms"]
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
    report = {"workload": "W1 (profile)", "environment": common.environment(bf16_matmul_peak_tflops=peak),
              "floor_ms": floor_ms, "rows": rows, "profile": profile_text}
    common.write_json(report, args.out or common.default_out("w1_profile"))
    print(profile_text)
    print(f"floor {floor_ms:.2f} ms")
    print(common.markdown_table(
        ["dtype", "variant", "median ms", "host ms", "vs HF sdpa", "% of floor", "max abs diff vs fp32 eager"],
        [[r["dtype"], r["variant"], f"{r['median_ms']:.2f}", f"{r['host_ms']:.2f}",
          f"{r.get('speedup_vs_hf_sdpa', float('nan')):.2f}x", f"{r.get('floor_percent', float('nan')):.0f}%",
          f"{r['max_abs_diff_vs_fp32_eager']:.1e}"] for r in rows]))


if __name__ == "__main__":
    main()
