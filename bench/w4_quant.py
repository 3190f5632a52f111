"""W4 (bench/README.md): quantized inference, Llama-1B shape, nf4 / fp4 / int8 (...) vs bf16, in one run.

For every mode: weight bytes (packed weights + scales, shared storage once), GPU memory resident after loading,
peak GPU memory while loading and while generating, and W2 decoding speed with HF `generate` (sdpa, dynamic cache;
batch 1, prompt 64 tokens, 128 new tokens, greedy): median of >=10 timed runs after warm-up, CUDA events.
Correctness in the same run: the prompt's logits vs bf16 (cosine, top-1 agreement). Weights are random (fixed
seed), saved once in bf16 and loaded through `lit_fast.models.quantization.bnb_config` like any checkpoint.

Variants (in this order, each skipped with a note if the --budget runs out): bf16, nf4, fp4, int8, nf4+emb
(nf4 plus 4-bit input/output embeddings via `quantize_embeddings`), nf4-dq, fp4-dq.

    python -m bench.w4_quant [--out bench/results/w4_quant_h100_<commit>.json]   # GPU
    .venv/bin/python -m bench.w4_quant --tiny --device cpu                       # smoke test of the script on CPU
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from lit_fast.models.quantization import bnb_config, quantize_embeddings, weight_footprint

VARIANTS = ("bf16", "nf4", "fp4", "int8", "nf4+emb", "nf4-dq", "fp4-dq")
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True)  # Llama-3.2-1B ties the output head to the embedding table
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


class Clock:
    """CUDA events on a GPU (the protocol), a host clock on CPU; seconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        common.synchronize("cuda" if self.cuda else "cpu")
        return common.time_once_ms(fn, self.cuda) / 1e3


def measure_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (read + write, 1 GiB), median of 10; None on CPU."""
    return common.copy_bandwidth(device, 1 << 30) if device.type == "cuda" else None


def make_checkpoint(shape: dict, directory: str, device: torch.device) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model


def load(directory: str, variant: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    mode = variant.removesuffix("+emb")
    config = None if mode == "bf16" else bnb_config(mode, torch.bfloat16, device.type)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 quantization_config=config, device_map=str(device))
    if variant.endswith("+emb"):
        quantize_embeddings(model, mode)
    return model.eval()


def fast_decode(model, prompt: torch.Tensor, args, clock: Clock, hf_tokens: torch.Tensor) -> dict:
    """lit_fast's FastDecoder (static cache + CUDA graph) on the same model, when it runs bitsandbytes layers."""
    from lit_fast.fastpath.decoder.loop import FastDecoder, SamplingConfig

    cfg = SamplingConfig(max_new_tokens=args.new_tokens, pad_token_id=0)
    mask = torch.ones_like(prompt)
    try:
        decoder = FastDecoder(model, batch_size=1, max_len=args.prompt + args.new_tokens)
        tokens = decoder.generate(prompt, mask, cfg)
        for _ in range(2):
            decoder.generate(prompt, mask, cfg)
        times = [clock.time(lambda: decoder.generate(prompt, mask, cfg)) for _ in range(args.repeats)]
    except Exception as exc:  # noqa: BLE001 - a bench reports what failed and goes on with the next variant
        return {"fast_error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
    same = (tokens[0] == hf_tokens).int()
    prefix = int(same.argmin()) if not bool(same.all()) else int(same.numel())
    return {"fast_median_s": statistics.median(times), "fast_tok_per_s": args.new_tokens / statistics.median(times),
            "fast_same_tokens_as_hf_prefix": prefix}


def run_variant(variant: str, directory: str, device: torch.device, prompt: torch.Tensor, args, clock: Clock,
                bandwidth: float | None, refs: dict) -> dict:
    """Load one variant, check it against bf16 (the first variant), time HF generate and FastDecoder."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    model = load(directory, variant, device)
    fp = weight_footprint(model)
    resident = torch.cuda.memory_allocated(device) - base if cuda else None
    load_peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    gen_kw = dict(do_sample=False, num_beams=1, pad_token_id=0)

    def generate(n: int = args.new_tokens):
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **gen_kw)

    with torch.inference_mode():
        logits = model(prompt).logits.float()
        ref_logits = refs.setdefault("logits", logits)
        cos = torch.nn.functional.cosine_similarity(logits[0], ref_logits[0], dim=-1)
        top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        finite = bool(torch.isfinite(logits).all())
        # warm-up: one full-length run (allocator and cache sizes) and two short ones
        new = generate()[0, args.prompt:]
        generate(16), generate(16)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = [clock.time(generate) for _ in range(args.repeats)]
        gen_peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
        fast = fast_decode(model, prompt, args, clock, new)
    same = (new == refs.setdefault("tokens", new)).int()
    first_diff = int(same.argmin()) if not bool(same.all()) else len(new)
    seconds = statistics.median(times)
    return {"variant": variant, "weight_bytes": fp.total_bytes, "quantized_bytes": fp.quantized_bytes,
            "full_precision_bytes": fp.full_precision_bytes, "quantized_layers": fp.quantized_modules,
            "resident_bytes": resident, "load_peak_bytes": load_peak, "generate_peak_bytes": gen_peak,
            "median_s": seconds, "times_s": times, "tok_per_s": args.new_tokens / seconds,
            "floor_tok_per_s": bandwidth / fp.total_bytes if bandwidth else None,
            "logits_cos_mean": float(cos.mean()), "logits_cos_min": float(cos.min()), "top1_agree": top1,
            "finite": finite, "new_tokens": int(new.numel()), "first_token_diff_vs_bf16": first_diff,
            "_base": base, **fast}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy shape (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=330.0, help="seconds; later variants are skipped past it")
    parser.add_argument("--out", help="results JSON (default bench/results/w4_quant_<device>_<commit>.json; --tiny: "
                                      "the temp dir)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = TINY if args.tiny else LLAMA_1B
    clock = Clock(device)

    import bitsandbytes
    import transformers

    if args.tiny:  # a smoke test, not a measurement: never into bench/results by default
        args.out = args.out or str(Path(tempfile.gettempdir()) / "w4_quant_tiny.json")
    args.out = args.out or common.default_out("w4_quant", device)
    commit = common.git_commit()  # LIT_FAST_COMMIT wins: the GPU machine's copy of the tree may carry a stale .git
    bandwidth = measure_bandwidth(device)
    result = {"benchmark": "W4", "shape": "tiny" if args.tiny else "llama-1b", "config": shape,
              "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "bitsandbytes": bitsandbytes.__version__, "commit": commit or "unknown",
              "batch": 1, "prompt": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "copy_bandwidth_bytes_per_s": bandwidth, "rows": [], "skipped": []}

    def save() -> None:
        common.write_json(result, args.out, quiet=True)

    directory = tempfile.mkdtemp(prefix="w4-")
    make_checkpoint(shape, directory, device)
    torch.manual_seed(1)
    prompt = torch.randint(0, shape["vocab_size"], (1, args.prompt), device=device)
    refs: dict = {}
    for variant in args.variants.split(","):
        if time.perf_counter() - t0 > args.budget:
            result["skipped"].append(variant)
            print(f"{variant}: skipped (budget of {args.budget:.0f}s used)", flush=True)
            continue
        # one function call per variant: the model and everything that refers to it (closures, decoders) are
        # gone before the next variant's baseline is taken (the first H100 run measured with a stale model)
        row = run_variant(variant, directory, device, prompt, args, clock, bandwidth, refs)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            row["leftover_bytes"] = torch.cuda.memory_allocated(device) - row.pop("_base")
        result["rows"].append(row)
        save()
        fast_note = f"{row['fast_tok_per_s']:.1f} tok/s" if "fast_tok_per_s" in row else row.get("fast_error")
        print(f"{variant}: HF {row['tok_per_s']:.1f} tok/s, FastDecoder {fast_note}, weights "
              f"{row['weight_bytes'] / 2**20:.1f} MiB, cos {row['logits_cos_mean']:.4f}", flush=True)
    save()
    print(f"wrote {args.out}")

    rows = result["rows"]
    base_row = next((r for r in rows if r["variant"] == "bf16"), rows[0])
    mb = lambda b: f"{b / 2**20:9.1f}" if b is not None else f"{'-':>9s}"  # noqa: E731
    print(f"\nW4 on {result['device']} ({result['shape']}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, bitsandbytes {bitsandbytes.__version__}; HF generate sdpa, batch 1, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens, greedy, median of {args.repeats})")
    print("| variant | weights MiB | x bf16 | resident MiB | load peak MiB | gen peak MiB | HF tok/s | x bf16 | "
          "fast tok/s | x bf16 HF | x bf16 fast | floor tok/s | logits cos | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        floor = f"{r['floor_tok_per_s']:.0f}" if r["floor_tok_per_s"] else "-"
        fast_base = base_row.get("fast_tok_per_s")
        fast = (f"{r['fast_tok_per_s']:.1f} | {r['fast_tok_per_s'] / base_row['tok_per_s']:.2f} | "
                + (f"{r['fast_tok_per_s'] / fast_base:.2f}" if fast_base else "-")
                if "fast_tok_per_s" in r else "failed | - | -")
        print(f"| {r['variant']} | {mb(r['weight_bytes'])} | {r['weight_bytes'] / base_row['weight_bytes']:.2f} | "
              f"{mb(r['resident_bytes'])} | {mb(r['load_peak_bytes'])} | {mb(r['generate_peak_bytes'])} | "
              f"{r['tok_per_s']:.1f} | {r['tok_per_s'] / base_row['tok_per_s']:.2f} | {fast} | {floor} | "
              f"{r['logits_cos_mean']:.4f} | {r['top1_agree']:.2f} |")
    for r in rows:
        if "fast_error" in r:
            print(f"FastDecoder on {r['variant']}: {r['fast_error']}")
    if result["skipped"]:
        print(f"skipped (time budget): {', '.join(result['skipped'])}")
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
