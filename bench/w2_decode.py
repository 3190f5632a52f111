"""W2 - decoder generation: transformers `generate` (sdpa, dynamic cache) vs lit_fast's FastDecoder.

W2 (bench/README.md): batch 1, prompt 64 tokens, 128 new tokens, greedy, bf16; OPT-350m and Llama-1B shapes, random
init from a fixed seed; also batch 16. Ratios are measured in this run against HF in this run; the floor is the
weight bytes read per decode step over the copy bandwidth measured in this run. Correctness in the same run:
fp32 greedy tokens must equal HF's exactly (batch 1 and a left-padded batch of 4); at bf16 the agreement with
HF's tokens is reported (position-wise rate and the length of the common prefix).

    python -m bench.w2_decode [--out bench/results/w2_h100_<commit>.json]   # the full protocol
    python -m bench.w2_decode --quick                                        # 1 warm-up, 3 timed runs
    python -m bench.w2_decode --dry-run --shapes opt-350m --batches 1        # CPU, 2 layers: checks the script

Variants of ours: `graph-unfused` (the decode step captured as a CUDA graph, q/k/v as three matmuls), `graph`
(FastDecoder's CUDA default: q/k/v in one matmul), `graph+compile` (the step compiled by torch.compile, then
captured; `model.compile: true`). `step_ms` is one replay alone; tok/s counts the whole generate call (prefill,
128 steps, stop checks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from bench import common
from lit_fast.fastpath.decoder.loop import FastDecoder, SamplingConfig, hf_generate

PROMPT, NEW, BIG_BATCH = 64, 128, 16
SHAPES = {
    "opt-350m": lambda: OPTConfig(vocab_size=50272, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096,
                                  num_attention_heads=16, word_embed_proj_dim=512, do_layer_norm_before=False,
                                  max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "llama-1b": lambda: LlamaConfig(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                    max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2),
}
VARIANTS = {"graph-unfused": dict(fuse_qkv=False), "graph": dict(), "graph+compile": dict(compile=True)}


DEVICE = "cuda"  # `--dry-run` switches to the CPU with tiny shapes, to check this script itself


def timed(fn, warmup: int, reps: int) -> tuple[float, list[float]]:
    """Median seconds of `reps` calls after `warmup` calls, timed with CUDA events (host clock on CPU)."""
    times = [ms / 1e3 for ms in common.time_ms(fn, warmup, reps, DEVICE == "cuda")]
    return statistics.median(times), times


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write counted; 4 MiB on the CPU)."""
    return common.copy_bandwidth(DEVICE, 2 << 30 if DEVICE == "cuda" else 4 << 20)


def gpu_busy(fn) -> dict | None:
    """Sum of GPU kernel time over the wall time of one call (torch.profiler): how idle the GPU is."""
    if DEVICE != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        kernels = sum(e.self_device_time_total for e in events) / 1e6
        top = sorted(events, key=lambda e: -e.self_device_time_total)[:16]  # where a call's device time goes
        return {"kernel_s": round(kernels, 5), "wall_s": round(wall, 5), "pct": round(100 * kernels / wall, 1),
                "launches": sum(e.count for e in events),
                "top": [[e.key[:90], e.count, round(e.self_device_time_total)] for e in top]}
    except Exception as err:  # diagnostics only
        return {"error": str(err)[:200]}


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    same = (a == b).float()
    prefix = [int((row == 0).nonzero()[0]) if (row == 0).any() else row.numel() for row in same]
    return {"rate": round(same.mean().item(), 4), "common_prefix_min": min(prefix),
            "common_prefix_mean": round(sum(prefix) / len(prefix), 1)}


def bench_shape(name: str, args, bandwidth: float, deadline: float) -> dict:
    result: dict = {"shape": name}
    torch.manual_seed(0)
    config = SHAPES[name]()
    if args.dry_run:
        config.num_hidden_layers, config.vocab_size = 2, 512
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.eval().generation_config.eos_token_id = None  # random weights: always generate all NEW tokens
    cfg = SamplingConfig(max_new_tokens=NEW, pad_token_id=model.config.pad_token_id)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    prompt = torch.randint(3, model.config.vocab_size, (1, PROMPT), device=DEVICE, generator=g)
    ones = torch.ones_like(prompt)
    big = torch.randint(3, model.config.vocab_size, (BIG_BATCH, PROMPT), device=DEVICE, generator=g)

    # fp32: exact parity, batch 1 and a left-padded batch of 4
    padded, mask = big[:4].clone(), torch.ones_like(big[:4])
    for row, n in enumerate((64, 50, 33, 9)):
        mask[row, : PROMPT - n] = 0
        padded[row, : PROMPT - n] = model.config.pad_token_id
    with torch.inference_mode():  # batch 1 and 4 decoders: the same matmul shapes as HF's, so the same rounding
        ref1, ref4 = hf_generate(model, prompt, ones, cfg), hf_generate(model, padded, mask, cfg)
        ref16 = hf_generate(model, big, torch.ones_like(big), cfg)  # fp32 truth for the bf16 agreement below
        ours1 = FastDecoder(model, 1, PROMPT + NEW, fuse_qkv=False).generate(prompt, ones, cfg)
        ours4 = FastDecoder(model, 4, PROMPT + NEW, fuse_qkv=False).generate(padded, mask, cfg)
    result["fp32_same_tokens"] = bool(torch.equal(ours1, ref1) and torch.equal(ours4, ref4))
    result["fp32_agreement"] = agreement(torch.cat([ours1, ours4]), torch.cat([ref1, ref4]))
    fp32_truth = {1: ref1, BIG_BATCH: ref16}

    model.to(torch.bfloat16)
    params = {p.data_ptr(): p for p in model.parameters()}.values()  # tied weights once
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    floor = bandwidth / weight_bytes
    result.update(weight_bytes=weight_bytes, floor_tok_s_b1=round(floor, 1))
    for batch, ids in ((1, prompt), (BIG_BATCH, big)):
        if str(batch) not in args.batches.split(","):
            continue
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            hf_tokens = hf_generate(model, ids, mask, cfg)
            t, times = timed(lambda: hf_generate(model, ids, mask, cfg), args.warmup, args.reps)
        row = {"hf": {"s": t, "tok_s": batch * NEW / t, "times": times,
                      "bf16_vs_fp32": agreement(hf_tokens, fp32_truth[batch])}}
        names = (args.variants if batch == 1 else args.big_variants).split(",")
        for variant, options in ((n, VARIANTS[n]) for n in names if n in VARIANTS):
            if time.time() > deadline:
                row[variant] = {"skipped": "time budget"}
                continue
            try:
                start = time.perf_counter()
                decoder = FastDecoder(model, batch, PROMPT + NEW, **options)
                build = time.perf_counter() - start
                with torch.inference_mode():
                    ours = decoder.generate(ids, mask, cfg)
                    t, times = timed(lambda: decoder.generate(ids, mask, cfg), args.warmup, args.reps)
                    # one replay alone (the slot is reset so that 50 replays stay inside the cache)
                    step, _ = timed(lambda: (decoder.slot.fill_(PROMPT), decoder.step()), 3, 50)
                    busy = gpu_busy(lambda: decoder.generate(ids, mask, cfg)) if variant != "graph-unfused" else None
                row[variant] = {"s": t, "tok_s": batch * NEW / t, "ratio_vs_hf": row["hf"]["s"] / t,
                                "build_s": round(build, 1), "step_ms": round(step * 1e3, 3),
                                "bf16_agreement": agreement(ours, hf_tokens),
                                "bf16_vs_fp32": agreement(ours, fp32_truth[batch]), "gpu_busy": busy,
                                "times": times}
                if batch == 1:
                    row[variant]["pct_of_floor"] = round(100 * row[variant]["tok_s"] / floor, 1)
                del decoder
            except Exception as err:  # a benchmark records a failing variant and goes on with the others
                row[variant] = {"error": f"{type(err).__name__}: {err}"[:500]}
        result[f"batch{batch}"] = row
        print(json.dumps({name: {f"batch{batch}": {k: {kk: vv for kk, vv in v.items() if kk not in ("times", "gpu_busy")}
                                                    for k, v in row.items()}}}), flush=True)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="results JSON (default bench/results/w2_<device>_<commit>.json; --dry-run: "
                                      "the temp dir)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed runs (exploration only)")
    parser.add_argument("--budget", type=float, default=420, help="seconds; later variants are skipped past it")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--batches", default=f"1,{BIG_BATCH}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="variants of ours at batch 1")
    parser.add_argument("--big-variants", default=",".join(VARIANTS), help=f"variants of ours at batch {BIG_BATCH}")
    parser.add_argument("--dry-run", action="store_true", help="CPU, 2 layers, no compile: checks the script only")
    args = parser.parse_args()
    if args.dry_run:
        global DEVICE
        DEVICE = "cpu"
        VARIANTS.pop("graph+compile")
        for options in VARIANTS.values():
            options["cuda_graph"] = False
    args.warmup, args.reps = (1, 3) if args.quick else (3, 10)
    deadline = time.time() + args.budget
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means real fp32 matmuls
    bandwidth = copy_bandwidth()
    if args.dry_run:  # a check of the script, not a measurement: never into bench/results by default
        args.out = args.out or str(Path(tempfile.gettempdir()) / "w2_dry_run.json")
    args.out = args.out or common.default_out("w2", DEVICE)
    env = common.environment(DEVICE)
    report = {"workload": "W2", "device": env["device"] + (" (dry run)" if args.dry_run else ""),
              "torch": torch.__version__, "transformers": transformers.__version__, "python": env["python"],
              "commit": env["commit"], "environment": env, "quick": args.quick,
              "protocol": f"warmup {args.warmup}, median of {args.reps}, CUDA events; prompt {PROMPT}, "
                          f"{NEW} new tokens, greedy, bf16",
              "copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "shapes": []}
    for name in args.shapes.split(","):
        report["shapes"].append(bench_shape(name, args, bandwidth, deadline))
        common.write_json(report, args.out, quiet=True)  # after each shape: a run cut short keeps what it measured
    print(f"wrote {args.out}")

    print(f"\nW2 on {report['device']} (torch {torch.__version__}, transformers {transformers.__version__}), "
          f"copy bandwidth {report['copy_bandwidth_GBps']} GB/s, {report['protocol']}")
    print("| shape | batch | variant | tok/s | x HF | % floor | step ms | fp32 same tokens | bf16: same as HF bf16 "
          "| bf16: same as fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in report["shapes"]:
        for batch in (1, BIG_BATCH):
            for variant, r in shape.get(f"batch{batch}", {}).items():
                if "tok_s" not in r:
                    print(f"| {shape['shape']} | {batch} | {variant} | {r} | | | | | | |")
                    continue
                agree, truth = r.get("bf16_agreement", {}), r.get("bf16_vs_fp32", {})
                print(f"| {shape['shape']} | {batch} | {variant} | {r['tok_s']:.0f} | {r.get('ratio_vs_hf', 1):.1f} | "
                      f"{r.get('pct_of_floor', '')} | {r.get('step_ms', '')} | {shape['fp32_same_tokens']} | "
                      f"{agree.get('rate', '-')} (prefix {agree.get('common_prefix_min', '-')}) | "
                      f"{truth.get('rate')} (prefix {truth.get('common_prefix_min')}) |")
        print(f"floor ({shape['shape']}, batch 1): {shape['floor_tok_s_b1']} tok/s")


if __name__ == "__main__":
    main()
