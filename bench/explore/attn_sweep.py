"""Varlen attention kernels alone on W1's packed shapes: torch's flash varlen vs lit_fast's Triton kernel per tile
configuration (BLOCK_M, BLOCK_N, warps, stages). bf16, hidden 768 (heads x head_dim); CUDA events, median of 50.

    python -m bench.explore.attn_sweep [--head-dims 64] [--cases w1 short long] [--configs 0 1 ...]

Its one kept output, bench/results/attn_sweep_h100.txt (H100, 2026-11-25: `--head-dims 32 64 128 --cases w1 long
--configs 0 1 3 4`), backs docs/FAST_PATH.md's "1.1-1.7x FA2's 128-token tiles". The tiles are set through
kernels.ATTN_BLOCK_M / _N / _WARPS / _STAGES, which the library reads at each call; the narrower key tile the
library has since used for short sequences (kernels.ATTN_SHORT_*) is switched off while sweeping, so that every
row runs the configuration it names.
"""

from __future__ import annotations

import argparse

import torch

from bench import common
from lit_fast.fastpath.encoder import kernels
from lit_fast.fastpath.encoder.layers import varlen_attn

CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2),
           (128, 128, 8, 2), (32, 64, 4, 2), (64, 128, 4, 2)]
CASES = {"w1": (32, 257), "short": (16, 129), "long": (256, 513)}  # lengths drawn in [low, high)
HEAD_DIMS = (64,)


def median_ms(fn) -> float:
    """Median of 50 timed calls after 5 warm-ups (CUDA events, common.time_ms)."""
    return common.median_ms(fn, warmup=5, reps=50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--configs", type=int, nargs="+", default=None, help="indices into CONFIGS")
    args = parser.parse_args()
    if not torch.cuda.is_available() or varlen_attn is None:
        raise SystemExit("attn_sweep needs a CUDA GPU (torch's varlen_attn and lit_fast's Triton kernel)")
    configs = [CONFIGS[i] for i in args.configs] if args.configs is not None else CONFIGS
    for name, head_dim in ((n, d) for n in args.cases for d in args.head_dims):
        low, high = CASES[name]
        name = f"{name} ({low}-{high - 1} tokens), head_dim {head_dim}"
        torch.manual_seed(0)
        lengths = torch.randint(low, high, (128,))
        qkv = torch.randn(int(lengths.sum()), 3, 768 // head_dim, head_dim, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.unbind(1)
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
        longest = int(lengths.max())
        flash_out = varlen_attn(q, k, v, cu, cu, longest, longest)
        flash = median_ms(lambda: varlen_attn(q, k, v, cu, cu, longest, longest))
        row = [f"{name}: flash {flash * 1e3:.0f} us"]
        saved = (kernels.ATTN_BLOCK_M, kernels.ATTN_BLOCK_N, kernels.ATTN_WARPS, kernels.ATTN_STAGES)
        short_dims, kernels.ATTN_SHORT_HEAD_DIMS = kernels.ATTN_SHORT_HEAD_DIMS, ()
        for config in configs:
            kernels.ATTN_BLOCK_M, kernels.ATTN_BLOCK_N, kernels.ATTN_WARPS, kernels.ATTN_STAGES = config
            try:
                out = kernels.varlen_attention(q, k, v, cu, longest)
                diff = (out.float() - flash_out.float()).abs().max().item()
                ms = median_ms(lambda: kernels.varlen_attention(q, k, v, cu, longest))
                row.append(f"{config}: {ms * 1e3:.0f} us ({flash / ms:.2f}x, diff {diff:.1e})")
            except Exception as err:  # a configuration this GPU cannot compile (shared memory)
                row.append(f"{config}: failed {type(err).__name__}")
        kernels.ATTN_BLOCK_M, kernels.ATTN_BLOCK_N, kernels.ATTN_WARPS, kernels.ATTN_STAGES = saved
        kernels.ATTN_SHORT_HEAD_DIMS = short_dims
        print("\n  ".join(row), flush=True)


if __name__ == "__main__":
    main()
