"""Where a packed BERT-base training step's time goes, against HF's padded step (issue 22; docs/PACKED_TRAINING.md,
"W3 on the GPU": packed 48 ms against HF padded 42 ms at steady state on an H100).

For each of `hf_padded` and `lit_fast_packed` (W3's encoder shape and batches, bf16 autocast, fused AdamW): a few
warm steps on the same batch, then torch.profiler over `--steps` steps. Printed: wall ms per step, the device's busy
ms per step (the sum of kernel times: a step whose wall is well above it waits for the host), the host's own ms in
the top operators, and the top kernels. `--attn-dropout 0.1` shows the dropout route.

    python3 -m bench.explore.w3_encoder_profile [--steps 5] [--attn-dropout 0.0] [--out FILE.json]
    python3 -m bench.explore.w3_encoder_profile --device cpu --tiny     # smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.w3_packed_gpu import (PACKED, TINY_ENCODER, EncoderShape, Runner, bert_classifier, encoder_examples,
                                 encoder_loss, encoder_prepare, set_attention)


def profile(variant: str, shape: EncoderShape, runner: Runner, steps: int, dropout: float) -> dict:
    examples = encoder_examples(shape, seed=0)[: shape.batch]
    batch = encoder_prepare(variant, examples, runner.device)
    model = bert_classifier(shape, runner.device, dropout)
    set_attention(model, variant)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=runner.cuda)
    loss_fn = encoder_loss(variant)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with runner.autocast():
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    runner.sync()
    start = time.perf_counter()  # the profiler's own overhead inflates its wall time: time plain steps first
    for _ in range(10):
        step()
    runner.sync()
    plain = (time.perf_counter() - start) / 10
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if runner.cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        runner.sync()
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) \
        if runner.cuda else 0.0
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    kernels = sorted((e for e in events if runner.cuda and e.self_device_time_total > 0),
                     key=lambda e: -e.self_device_time_total)[:15]
    del model, optimizer
    runner.free()
    return {
        "wall_ms_per_step": plain * 1e3,
        "profiled_wall_ms_per_step": wall * 1e3,
        "device_busy_ms_per_step": device_us / 1e3 / steps,
        "tokens": int(batch.num_tokens) if variant == PACKED else int(batch["input_ids"].numel()),
        "top_host_ops": [{"name": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                          "calls_per_step": e.count / steps} for e in host],
        "top_kernels": [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / 1e3 / steps,
                         "calls_per_step": e.count / steps} for e in kernels],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attn-dropout", type=float, default=0.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    runner = Runner(device, bf16=device.type == "cuda")
    shape = TINY_ENCODER if args.tiny else EncoderShape()
    results = {}
    for variant in ("hf_padded", PACKED):
        r = results[variant] = profile(variant, shape, runner, args.steps, args.attn_dropout)
        print(f"\n{variant}: {r['tokens']} tokens, wall {r['wall_ms_per_step']:.1f} ms/step (profiled "
              f"{r['profiled_wall_ms_per_step']:.1f}), device busy {r['device_busy_ms_per_step']:.1f} ms/step")
        for op in r["top_host_ops"][:10]:
            print(f"  host {op['self_cpu_ms_per_step']:7.2f} ms  x{op['calls_per_step']:.0f}  {op['name']}")
        for k in r["top_kernels"][:10]:
            print(f"  kernel {k['ms_per_step']:7.2f} ms  x{k['calls_per_step']:.0f}  {k['name']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
