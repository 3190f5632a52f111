"""Variants of lit_fast's Triton varlen attention at W1 shapes, none of them adopted (docs/MEASUREMENTS.md, "Attention").

The variant kernel `_attn_x` is `kernels._varlen_attention_kernel` with two compile-time switches:
  F16EXP  the softmax numerators as `ex2.approx.f16x2` (two fp16 exponentials an instruction, as flash-attention 3
          does to relieve the MUFU unit at head size 64), then used as fp16 in the P @ V product
  TMA     keys and values loaded through host-built tensor descriptors (Hopper's bulk tensor copy) instead of
          masked pointer loads; rows past the sequence are other sequences' keys, masked out of the scores as before
and, per variant, tile configurations (BLOCK_M, BLOCK_N, warps, stages) including BLOCK_N = 256: one key block for
sequences up to 256 tokens, i.e. a plain softmax without the online rescaling.

Scenarios: 128 sequences, head size 64 (hidden 768), q/k/v strided views of one (tokens, 2304) projection; W1
(lengths randint(32, 257) after manual_seed(0)), all 256 (pad0) and randint(32, 97) (pad75); bf16, and fp16 at W1.
(pad60 is W1's pad60 scenario, randint(32, 173); this script once drew randint(32, 177), never in a kept run.)
Each is checked against fp32 SDPA (`attn_configs.reference`) and timed inside CUDA graphs (`attn_configs.time_graph`:
20 launches a graph, 3 warm-up replays, median of 10). Result of the one run (H200, commit 6df8806, run as
scratch/attn_exp.py, the same code): bench/results/attn_variants_h200_6df8806.json.

    python -m bench.explore.attn_variants [--out f.json] [--scenarios w1 pad0 pad75 pad60]
"""
import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from bench import common
from bench.explore.attn_configs import max_diff, reference, time_graph
from lit_fast.fastpath.encoder import kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the module imports, main() says what is missing
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


if triton is not None:  # the variant kernel (defined where Triton is)

    @triton.jit
    def _exp2_f16(x):
        return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)], dtype=tl.float16,
                                         is_pure=True, pack=2)

    @triton.jit
    def _attn_x(Q, K, V, Out, CU, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, qk_scale, KD, VD,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, F16EXP: tl.constexpr,
                TMA: tl.constexpr):
        block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        begin = tl.load(CU + seq)
        length = tl.load(CU + seq + 1) - begin
        if block * BLOCK_M >= length:
            return
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < length
        row_tok = (begin + rows).to(tl.int64)
        q = tl.load(Q + row_tok[:, None] * sq_t + head * sq_h + dims[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, length, BLOCK_N):
            n = start + cols
            n_ok = n < length
            tok = (begin + n).to(tl.int64)
            if TMA:
                k = KD.load([begin + start, head * HEAD_DIM])
            else:
                k = tl.load(K + tok[:, None] * sk_t + head * sk_h + dims[None, :], mask=n_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if F16EXP:
                p16 = _exp2_f16(s - m_new[:, None])
                p = p16.to(tl.float32)
            else:
                p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if TMA:
                v = VD.load([begin + start, head * HEAD_DIM])
            else:
                v = tl.load(V + tok[:, None] * sv_t + head * sv_h + dims[None, :], mask=n_ok[:, None], other=0.0)
            if F16EXP:
                acc = tl.dot(p16.to(v.dtype), v, acc * alpha[:, None])
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + row_tok[:, None] * so_t + head * so_h + dims[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])


def _launched(out, launch):
    """Launch, then return the output (what time_graph and max_diff need)."""
    launch()
    return out


def scenario_lengths(name):
    """The 128 lengths of a bench/w1_encoder.py scenario (common.w1_lengths)."""
    return common.w1_lengths(name)


CONFIGS = {
    "base": [(64, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (64, 128, 8, 2), (64, 256, 8, 1), (64, 256, 8, 2),
             (128, 64, 8, 2), (128, 128, 8, 2)],
    "f16exp": [(64, 32, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2), (64, 256, 8, 1), (128, 64, 8, 2)],
    "tma": [(64, 32, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2), (64, 256, 8, 1)],
    "tma_f16exp": [(64, 32, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2)],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--scenarios", nargs="+", default=["w1", "pad0", "pad75"],
                    choices=["w1", "pad0", "pad25", "pad60", "pad75"])
    args = ap.parse_args()
    if triton is None or not torch.cuda.is_available():
        raise SystemExit("attn_variants needs a CUDA GPU and Triton")
    dev = torch.device("cuda")
    results = []
    hidden, hd = 768, 64
    heads = hidden // hd
    for dname, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for scen in args.scenarios:
            if dname == "fp16" and scen != "w1":
                continue
            lengths = scenario_lengths(scen)
            torch.manual_seed(1)
            tokens = int(lengths.sum())
            qkv = torch.randn(tokens, 3 * hidden, device=dev, dtype=dtype)
            q, k, v = qkv.unflatten(-1, (3, heads, hd)).unbind(1)
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(dev)
            max_len = int(lengths.max())
            ref = reference(q, k, v, lengths)
            out = torch.empty(tokens, heads, hd, device=dev, dtype=dtype)
            lib = kernels.varlen_attention(q, k, v, cu, max_len)
            rec = time_graph(partial(kernels.varlen_attention, q, k, v, cu, max_len), 20, 3, 10)
            row = {"dtype": dname, "scenario": scen, "tokens": tokens,
                   "library": {"us": round(rec["us"], 2), "diff": max_diff(lib, ref)}, "variants": []}
            print(f"== {dname} {scen} tokens {tokens}: library {rec['us']:.1f} us diff {row['library']['diff']:.2e}",
                  flush=True)
            for variant, cfgs in CONFIGS.items():
                tma = variant.startswith("tma")
                f16 = variant.endswith("f16exp")
                for bm, bn, warps, stages in cfgs:
                    entry = {"variant": variant, "cfg": [bm, bn, warps, stages]}
                    try:
                        kd = vd = None
                        if tma:
                            if TensorDescriptor is None:
                                raise RuntimeError("no TensorDescriptor")
                            kd = TensorDescriptor.from_tensor(qkv[:, hidden:2 * hidden], [bn, hd])
                            vd = TensorDescriptor.from_tensor(qkv[:, 2 * hidden:], [bn, hd])
                        grid = (-(-max_len // bm), lengths.numel(), heads)

                        fn = partial(_launched, out, partial(
                            _attn_x[grid], q, k, v, out, cu, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                            v.stride(0), v.stride(1), out.stride(0), out.stride(1), hd ** -0.5 * kernels.LOG2E, kd,
                            vd, HEAD_DIM=hd, BLOCK_M=bm, BLOCK_N=bn, F16EXP=f16, TMA=tma, num_warps=warps,
                            num_stages=stages))
                        t0 = time.perf_counter()
                        out.zero_()
                        fn()
                        torch.cuda.synchronize()
                        entry["compile_s"] = round(time.perf_counter() - t0, 2)
                        entry["diff"] = max_diff(out, ref)
                        entry["us"] = round(time_graph(fn, 20, 3, 10)["us"], 2)
                    except Exception as err:  # noqa: BLE001
                        entry["error"] = f"{type(err).__name__}: {err}"[:400]
                    row["variants"].append(entry)
                    print(f"  {variant:11s} {entry['cfg']}: {entry.get('us', '-')} us diff "
                          f"{entry.get('diff', float('nan')):.2e} {entry.get('error', '')}", flush=True)
            results.append(row)
    if args.out:
        common.write_json({"device": torch.cuda.get_device_name(), "triton": triton.__version__,
                           "environment": common.environment(), "rows": results}, args.out)


if __name__ == "__main__":
    main()
