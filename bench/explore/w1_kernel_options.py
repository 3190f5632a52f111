"""W1 kernel options and what the GPU's clock does to them, each timed inside CUDA graphs (H200/H100, bf16 and fp16).

Parts (all by default; name some to run those):
  addnorm    the fused residual + LayerNorm kernel on W1's 18,685 x 768 rows at 1, 2, 4 and 8 warps a row
  attention  the Triton varlen attention with 64- and 32-wide key tiles, 128 sequences of five length mixes
             (W1 and bench/w1_encoder.py's padding scenarios, common.w1_lengths), head size 64; checked against
             fp32 SDPA
  gemm       the four W1 GEMMs as the packed layer calls them, the first FFN GEMM also without its GELU epilogue
             (what the epilogue costs), and the same in a child process with CUBLASLT_WORKSPACE_SIZE=0 (cuBLASLt then
             picks kernels that need no workspace, hence no memset before each GEMM; a process-wide setting that
             would speed HF up as well, so the library leaves it to the user)
  headstart  the 12 packed layers of W1 (eager launches and one CUDA graph), with and without the GPU busy on a
             sleep kernel first: a GPU that has just been idle runs the same kernels slower (its clock ramps up and,
             at ~700 W, is capped), which no launch scheme removes
  clocks     HF sdpa and lit_fast's default path on W1, each called back to back for 4 s, with the SM clock and the
             power nvidia-smi reports meanwhile: both run at the power limit, the denser one at a lower clock

    python -m bench.explore.w1_kernel_options [addnorm attention gemm headstart clocks] [--out FILE]
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench import common
from bench.common import ROOT, capture_graph as capture
from bench.explore.attn_configs import make_inputs, max_diff, reference
from lit_fast.fastpath import to_fast_path
from lit_fast.fastpath.encoder import kernels, stack

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOKENS = int(common.w1_lengths().sum())  # 18,685


def graph_us(fn, launches: int = 20, reps: int = 15) -> float:
    """Per-launch us of `fn`: `launches` calls in one CUDA graph, median of `reps` replays (after 3 untimed)."""
    return round(statistics.median(common.time_graph_us(fn, launches, 3, reps)), 2)


def part_addnorm() -> dict:
    result = {}
    for name, dtype in DTYPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x, y = (torch.randn(TOKENS, 768, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        norm = torch.nn.LayerNorm(768, device="cuda", dtype=dtype)
        out = torch.empty_like(x)
        row = {"library": graph_us(lambda: kernels._add_layer_norm_triton(x, y, norm.weight, norm.bias, norm.eps))}
        for warps in (1, 2, 4, 8):
            row[f"{warps} warps"] = graph_us(lambda w=warps: kernels._add_layer_norm_kernel[(TOKENS,)](
                x, y, norm.weight, norm.bias, out, 768, 768, 768, 768, norm.eps, BLOCK=1024, num_warps=w))
        gbytes = 3 * x.nbytes / 1e9
        print(f"add+norm {name} {TOKENS}x768: " + ", ".join(f"{k} {v} us" for k, v in row.items())
              + f" ({gbytes / row['library'] * 1e6:.0f} GB/s for the library's)", flush=True)
        result[name] = row
    return result


def length_mixes() -> dict:
    """bench/w1_encoder.py's scenarios at batch 128 (each drawn after torch.manual_seed(0))."""
    return {name: common.w1_lengths(name) for name in ("pad0", "pad25", "w1", "pad60", "pad75")}


def part_attention() -> dict:
    result = {}
    for mix, lengths in length_mixes().items():
        for name, dtype in DTYPES.items():
            _, q, k, v, cu = make_inputs(dtype, 64, lengths, "cuda")
            ref = reference(q, k, v, lengths)
            max_len = int(lengths.max())
            out = torch.empty(q.shape, dtype=dtype, device="cuda")
            grid = (-(-max_len // kernels.ATTN_BLOCK_M), len(lengths), q.shape[1])
            row = {}
            for block_n in (64, 32):
                def call(block_n=block_n):
                    kernels._varlen_attention_kernel[grid](
                        q, k, v, out, cu, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                        v.stride(1), out.stride(0), out.stride(1), 64**-0.5 * kernels.LOG2E, HEAD_DIM=64,
                        BLOCK_M=kernels.ATTN_BLOCK_M, BLOCK_N=block_n, num_warps=kernels.ATTN_WARPS,
                        num_stages=kernels.ATTN_STAGES)
                out.fill_(float("nan"))
                call()
                diff = max_diff(out, ref)
                row[f"key tile {block_n}"] = graph_us(call)
                row[f"key tile {block_n} max diff"] = diff
            row["library"] = graph_us(lambda: kernels.varlen_attention(q, k, v, cu, max_len))
            mean = lengths.double().mean().item()
            print(f"attention {mix} (mean {mean:.0f} tokens) {name}: 64-wide {row['key tile 64']} us, 32-wide "
                  f"{row['key tile 32']} us, library {row['library']} us; max diff vs fp32 "
                  f"{row['key tile 64 max diff']:.1e} / {row['key tile 32 max diff']:.1e}", flush=True)
            result[f"{mix} {name}"] = {"mean_tokens": mean, **row}
    return result


def gemm_times() -> dict:
    result = {"CUBLASLT_WORKSPACE_SIZE": os.environ.get("CUBLASLT_WORKSPACE_SIZE", "unset")}
    for name, dtype in DTYPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(TOKENS, 768, device="cuda", dtype=dtype, generator=g)
        wide = torch.randn(TOKENS, 3072, device="cuda", dtype=dtype, generator=g)
        shapes = {"qkv": (2304, 768), "out": (768, 768), "ffn_in": (3072, 768), "ffn_out": (768, 3072)}
        w = {k: torch.randn(*s, device="cuda", dtype=dtype, generator=g) * 0.03 for k, s in shapes.items()}
        b = {k: torch.randn(s[0], device="cuda", dtype=dtype, generator=g) * 0.1 for k, s in shapes.items()}
        row = {
            "qkv": graph_us(lambda: F.linear(x, w["qkv"], b["qkv"]), launches=12),
            "out": graph_us(lambda: F.linear(x, w["out"], b["out"]), launches=12),
            "ffn_in + GELU epilogue": graph_us(
                lambda: torch._addmm_activation(b["ffn_in"], x, w["ffn_in"].t(), use_gelu=True), launches=12),
            "ffn_in, bias only": graph_us(lambda: F.linear(x, w["ffn_in"], b["ffn_in"]), launches=12),
            "ffn_out": graph_us(lambda: F.linear(wide, w["ffn_out"], b["ffn_out"]), launches=12),
        }
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            F.linear(x, w["qkv"], b["qkv"])
            torch.cuda.synchronize()
        row["memsets per GEMM"] = sum("memset" in e.name.lower() for e in prof.events())
        result[name] = row
    return result


def part_gemm() -> list:
    results = [gemm_times()]
    env = {**os.environ, "CUBLASLT_WORKSPACE_SIZE": "0"}
    child = subprocess.run([sys.executable, "-m", "bench.explore.w1_kernel_options", "--gemm-child"], env=env,
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
    line = next((ln for ln in child.stdout.splitlines() if ln.startswith("{")), None)
    results.append(json.loads(line) if line else {"error": child.stderr[-500:]})
    for rec in results:
        for name in DTYPES:
            if name in rec:
                print(f"GEMMs {name}, CUBLASLT_WORKSPACE_SIZE={rec['CUBLASLT_WORKSPACE_SIZE']}: "
                      + ", ".join(f"{k} {v}" for k, v in rec[name].items()), flush=True)
    return results


def part_headstart() -> dict:
    ids, mask = common.w1_batch("w1")
    result = {}
    for name, dtype in DTYPES.items():
        model = to_fast_path(common.bert_base().cuda().to(dtype), cuda_graphs=False)
        seen = []
        real = stack.packed_layer  # what FastStack.layers_on calls for each layer (eager: cuda_graphs=False)
        stack.packed_layer = lambda x, parts, packing, options, qkv=None: seen.append(
            (x, parts, packing, options)) or real(x, parts, packing, options, qkv)
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        finally:
            stack.packed_layer = real
        x0, _, packing, options = seen[0]
        x0 = x0.clone()
        layers = [parts for _, parts, _, _ in seen]

        def run():
            x = x0
            for parts in layers:
                x = real(x, parts, packing, options)
            return x

        with torch.no_grad():
            run()
            graph = capture(run)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            host_us = (time.perf_counter() - t0) * 1e6
            torch.cuda.synchronize()
            row = {"host launches (us)": round(host_us)}
            for cycles in (0, 1_000_000, 4_000_000, 20_000_000):
                for label, fn in (("eager", run), ("graph", graph.replay)):
                    times = []
                    for _ in range(18):
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        if cycles:
                            torch.cuda._sleep(cycles)
                        start.record()
                        fn()
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end) * 1e3)
                    row[f"{label}, sleep {cycles} cycles first"] = round(statistics.median(times[3:]), 1)
        print(f"12 layers {name}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        result[name] = row
    return result


def part_clocks(seconds: float = 4.0) -> dict:
    """HF sdpa and lit_fast's default path on the W1 batch, each called back to back for `seconds` (events around
    each call and a wait after it, as bench/w1_encoder.py times them), twice in turn, with nvidia-smi sampling the SM
    clock and the power every 100 ms (the first 0.5 s of each stretch, the previous one's state, left out)."""
    ids, mask = common.w1_batch("w1")
    result = {}
    for name, dtype in DTYPES.items():
        hf = common.bert_base().cuda().to(dtype)
        models = {"hf_sdpa": hf, "auto": to_fast_path(copy.deepcopy(hf))}
        with torch.inference_mode():
            for _ in range(5):
                for model in models.values():
                    model(input_ids=ids, attention_mask=mask)
            torch.cuda.synchronize()
            for turn in range(2):
                for variant, model in models.items():
                    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw",
                                            "--format=csv,noheader,nounits", "-lms", "100"],
                                           stdout=subprocess.PIPE, text=True)
                    times, stop = [], time.time() + seconds
                    while time.time() < stop:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        model(input_ids=ids, attention_mask=mask)
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end))
                    smi.terminate()
                    samples = [tuple(float(v) for v in line.split(",")) for line in smi.communicate()[0].splitlines()
                               if line.count(",") == 1][5:]
                    row = {"ms": round(statistics.median(times), 2), "calls": len(times),
                           "sm_mhz": statistics.median(s[0] for s in samples) if samples else None,
                           "watts": round(statistics.median(s[1] for s in samples)) if samples else None}
                    print(f"clocks {name} turn {turn} {variant}: {row['ms']} ms ({row['calls']} calls), SM clock "
                          f"{row['sm_mhz']} MHz, {row['watts']} W (medians)", flush=True)
                    result[f"{name} {variant} {turn}"] = row
    return result


PARTS = {"addnorm": part_addnorm, "attention": part_attention, "gemm": part_gemm, "headstart": part_headstart,
         "clocks": part_clocks}


def main() -> None:
    if "--gemm-child" in sys.argv:
        print(json.dumps(gemm_times()))
        return
    if "-h" in sys.argv or "--help" in sys.argv:
        print(__doc__)
        return
    if not torch.cuda.is_available():
        raise SystemExit("w1_kernel_options needs a CUDA GPU")
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    names = [a for a in sys.argv[1:] if a in PARTS] or list(PARTS)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": common.git_commit(),
              "tokens": TOKENS, "environment": common.environment()}
    for name in names:
        report[name] = PARTS[name]()
        if out:
            common.write_json(report, out, quiet=True)


if __name__ == "__main__":
    main()
