"""Tile-configuration sweep of lit_fast's Triton varlen attention kernel on the W1 shapes, plus kernel variants.

W1: 128 packed sequences, lengths = torch.randint(32, 257, (128,)) after torch.manual_seed(0), hidden 768; q, k, v are
strided views of one (tokens, 2304) projection (token stride 2304, head stride head_dim); cu_seqlens int32; max_len 256.
Rows: (bf16, fp16) x head_dim (64 = W1, 32 and 128 secondary). Each (variant, BLOCK_M, BLOCK_N, warps, stages) is
checked against an fp32 per-sequence SDPA reference and timed inside a CUDA graph (20 back-to-back launches per graph,
3 warm-up replays, median of 10 timed replays / 20 = per-launch us).

Variants (all the same non-causal softmax attention within each sequence):
  base       lit_fast.fastpath.encoder.kernels._varlen_attention_kernel as it is
  prescaled  q * qk_scale once after loading (fp32, cast back to the input dtype); no per-iteration s * qk_scale
  tailmask   full key blocks unmasked; one masked tail block when length % BLOCK_N
  both       prescaled + tailmask (not in the default sweep: --variants base prescaled tailmask both)
  plain      the variant kernel with both flags off (a control: should time like base)

Kernels are compiled ahead by a pool of worker processes (--jobs) into Triton's disk cache while the main process times
the configurations in order, so the sweep costs roughly compile time / jobs. --budget stops timing (remaining configs
reported as 'skipped') so the run ends in about that many seconds; rows run W1 first.

    python -m bench.explore.attn_configs --out $OUT/attn_cfg.json          # default sweep (48 configs/variant)
    python -m bench.explore.attn_configs --quick                            # 17 configs/variant
    python -m bench.explore.attn_configs --full                             # 72 configs/variant
    TRITON_INTERPRET=1 .venv/bin/python -m bench.explore.attn_configs --check-cpu   # needs Triton installed
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench import common

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from lit_fast.fastpath.encoder import kernels

LOG2E = kernels.LOG2E
DEFAULT_CFG = (kernels.ATTN_BLOCK_M, kernels.ATTN_BLOCK_N, kernels.ATTN_WARPS, kernels.ATTN_STAGES)
HIDDEN = 768
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"bf16": 3e-2, "fp16": 5e-3}  # max abs diff vs the fp32 reference above which a row is flagged BAD

# ---- kernel variants -------------------------------------------------------------------------------------------
# One copy of kernels._varlen_attention_kernel with two compile-time switches (dead branches are removed at compile
# time, so each flag combination is its own kernel): PRESCALE (variant a) and SPLIT_TAIL (variant b).
if triton is not None:

    @triton.jit
    def _masked_block(q, K, V, begin, start, length, cols, dims, head, sk_t, sk_h, sv_t, sv_h, qk_scale, m_i, l_i, acc,
                      PRESCALE: tl.constexpr):
        """One key block from `start` on, keys past `length` masked: the online-softmax update of (m_i, l_i, acc)."""
        n = start + cols
        n_ok = n < length
        tok = (begin + n).to(tl.int64)
        k = tl.load(K + tok[:, None] * sk_t + head * sk_h + dims[None, :], mask=n_ok[:, None], other=0.0)
        if PRESCALE:
            s = tl.dot(q, tl.trans(k))
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + tok[:, None] * sv_t + head * sv_h + dims[None, :], mask=n_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return m_new, l_i, acc

    @triton.jit
    def _attn_variant(Q, K, V, Out, CU, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      PRESCALE: tl.constexpr, SPLIT_TAIL: tl.constexpr):
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
        if PRESCALE:  # (a) scale once, in fp32, back to the input dtype for the tensor-core dot
            q = (q.to(tl.float32) * qk_scale).to(Q.dtype.element_ty)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if SPLIT_TAIL:  # (b) full key blocks: every key valid, no mask / where
            full = length - length % BLOCK_N
            for start in range(0, full, BLOCK_N):
                tok = (begin + start + cols).to(tl.int64)
                k = tl.load(K + tok[:, None] * sk_t + head * sk_h + dims[None, :])
                if PRESCALE:
                    s = tl.dot(q, tl.trans(k))
                else:
                    s = tl.dot(q, tl.trans(k)) * qk_scale
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.math.exp2(s - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + tok[:, None] * sv_t + head * sv_h + dims[None, :])
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                m_i = m_new
            if full < length:  # the one partial block, masked
                m_i, l_i, acc = _masked_block(q, K, V, begin, full, length, cols, dims, head, sk_t, sk_h, sv_t, sv_h,
                                              qk_scale, m_i, l_i, acc, PRESCALE)
        else:  # the library's loop: every block masked
            for start in range(0, length, BLOCK_N):
                m_i, l_i, acc = _masked_block(q, K, V, begin, start, length, cols, dims, head, sk_t, sk_h, sv_t, sv_h,
                                              qk_scale, m_i, l_i, acc, PRESCALE)
        out = acc / l_i[:, None]
        tl.store(Out + row_tok[:, None] * so_t + head * so_h + dims[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])

    VARIANTS = {
        "base": (kernels._varlen_attention_kernel, {}),
        "prescaled": (_attn_variant, {"PRESCALE": True, "SPLIT_TAIL": False}),
        "tailmask": (_attn_variant, {"PRESCALE": False, "SPLIT_TAIL": True}),
        "both": (_attn_variant, {"PRESCALE": True, "SPLIT_TAIL": True}),
        "plain": (_attn_variant, {"PRESCALE": False, "SPLIT_TAIL": False}),
    }
else:  # pragma: no cover
    VARIANTS = {}
DEFAULT_VARIANTS = ("base", "prescaled", "tailmask")


# ---- configurations --------------------------------------------------------------------------------------------
def config_grid(args) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, warps, stages), the library default first."""
    if args.quick:
        bms, bns, warps, stages = (64, 128), (32, 64), (4, 8), (2, 3)
    elif args.full:
        bms, bns, warps, stages = (32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3, 4)
    else:
        bms, bns, warps, stages = (32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3)
    bms, bns = args.bm or bms, args.bn or bns
    warps, stages = args.warps or warps, args.stages or stages
    grid = [c for c in itertools.product(bms, bns, warps, stages)
            if args.full or args.bm or args.bn or c[:2] != (32, 32)]  # 32 x 32 pruned unless asked for
    return [DEFAULT_CFG] + [c for c in grid if c != DEFAULT_CFG]


def w1_lengths(seed: int = 0) -> torch.Tensor:
    """W1's 128 lengths (common.w1_lengths) or, for another seed, the same draw after torch.manual_seed(seed)."""
    if seed == 0:
        return common.w1_lengths("w1")
    torch.manual_seed(seed)
    return torch.randint(32, 257, (128,))


def make_inputs(dtype: torch.dtype, head_dim: int, lengths: torch.Tensor, device, hidden: int = HIDDEN, seed: int = 1):
    """q, k, v as the model has them: strided views of one (tokens, 3 * hidden) projection output."""
    heads = hidden // head_dim
    torch.manual_seed(seed)
    qkv = torch.randn(int(lengths.sum()), 3 * hidden, device=device, dtype=dtype)
    q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).unbind(1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(device)
    return qkv, q, k, v, cu


def reference(q, k, v, lengths) -> torch.Tensor:
    """fp32 softmax attention per sequence (SDPA math backend, no TF32)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover
        import contextlib
        ctx = contextlib.nullcontext()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with ctx:
            start = 0
            for length in lengths.tolist():
                sl = slice(start, start + length)
                o = F.scaled_dot_product_attention(*(t[sl].transpose(0, 1).float() for t in (q, k, v)))
                out[sl] = o.transpose(0, 1)
                start += length
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def max_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref).abs().max().item()


def kernel_call(variant: str, q, k, v, out, cu, max_len: int, cfg):
    """A no-argument closure that launches one configuration of one variant (Triton's ordinary launch path)."""
    kernel, extra = VARIANTS[variant]
    bm, bn, warps, stages = cfg
    head_dim = q.shape[-1]
    grid = (-(-max_len // bm), cu.numel() - 1, q.shape[1])
    qk_scale = head_dim ** -0.5 * LOG2E
    call_args = (q, k, v, out, cu, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 out.stride(0), out.stride(1), qk_scale)
    kw = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **extra)
    return lambda: kernel[grid](*call_args, **kw)


# ---- timing ----------------------------------------------------------------------------------------------------
def time_graph(fn, launches: int, warmup: int, reps: int) -> dict:
    """Per-launch us of `fn`: `launches` calls captured in one CUDA graph (common.time_graph_us), `warmup` replays,
    median of `reps` timed replays / launches."""
    us = common.time_graph_us(fn, launches, warmup, reps)
    return {"us": statistics.median(us), "us_min": min(us), "graph": True}


def time_eager(fn, launches: int, warmup: int, reps: int) -> dict:
    """The same without a graph (host launch overhead included; for what cannot be captured)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    us = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(launches):
            fn()
        end.record()
        torch.cuda.synchronize()
        us.append(start.elapsed_time(end) * 1e3 / launches)
    return {"us": statistics.median(us), "us_min": min(us), "graph": False}


def time_reference(name: str, fn, ref, args) -> dict:
    """Correctness + graph timing of a reference, falling back to eager timing when capture fails."""
    rec = {"name": name}
    try:
        rec["max_diff"] = max_diff(fn(), ref)
    except Exception as err:  # noqa: BLE001
        rec.update(status="failed", error=f"{type(err).__name__}: {err}"[:300])
        return rec
    try:
        rec.update(time_graph(fn, args.launches, args.warmup, args.reps), status="ok")
    except Exception as err:  # noqa: BLE001
        rec["graph_error"] = f"{type(err).__name__}: {err}"[:300]
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        try:
            rec.update(time_eager(fn, args.launches, args.warmup, args.reps), status="ok")
        except Exception as err2:  # noqa: BLE001
            rec.update(status="failed", error=f"{type(err2).__name__}: {err2}"[:300])
    return rec


def references(q, k, v, cu, max_len: int, ref, args) -> list[dict]:
    recs = []
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        recs.append({"name": "varlen_attn", "status": "unavailable", "error": str(err)[:200]})
    else:
        recs.append(time_reference("varlen_attn", lambda: varlen_attn(q, k, v, cu, cu, max_len, max_len), ref, args))
    flash = torch.ops.aten._flash_attention_forward
    recs.append(time_reference("aten._flash_attention_forward",
                               lambda: flash(q, k, v, cu, cu, max_len, max_len, 0.0, False, False)[0], ref, args))
    recs.append(time_reference("kernels.varlen_attention (wrapper, default cfg)",
                               lambda: kernels.varlen_attention(q, k, v, cu, max_len), ref, args))
    return recs


# ---- ahead-of-time compilation in worker processes -------------------------------------------------------------
def _precompile(job: tuple) -> tuple:
    """Worker: compile one (variant, dtype, head_dim, cfg) into Triton's disk cache with the exact specialization the
    main process launches (16-byte aligned pointers; strides 3*HIDDEN / head_dim / HIDDEN, all multiples of 16)."""
    variant, dtype_name, head_dim, cfg = job
    t0 = time.perf_counter()
    try:
        kernel, extra = VARIANTS[variant]
        dt = DTYPES[dtype_name]
        bm, bn, warps, stages = cfg
        kernel.warmup(dt, dt, dt, dt, torch.int32, 3 * HIDDEN, head_dim, 3 * HIDDEN, head_dim, 3 * HIDDEN, head_dim,
                      HIDDEN, head_dim, 0.5, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                      num_stages=stages, grid=(1, 1, 1), **extra)
        return job, time.perf_counter() - t0, None
    except Exception as err:  # noqa: BLE001
        return job, time.perf_counter() - t0, f"{type(err).__name__}: {err}"[:300]


def start_precompile(jobs: list[tuple], workers: int):
    if workers <= 0 or not jobs:
        return None, {}
    import concurrent.futures as cf
    import multiprocessing as mp
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    return pool, {job: pool.submit(_precompile, job) for job in jobs}


# ---- the sweep -------------------------------------------------------------------------------------------------
def fmt_us(rec) -> str:
    return f"{rec['us']:.1f} us" if rec.get("status") == "ok" else rec.get("status", "?")


def print_row(row: dict, top: int) -> None:
    print(f"\n== {row['dtype']} head_dim {row['head_dim']} ({row['heads']} heads): {row['sequences']} sequences, "
          f"{row['tokens']} tokens, max_len {row['max_len']}; ref fp32 |out| max {row['ref_absmax']:.2f} ==")
    for rec in row["references"]:
        extra = "" if rec.get("graph", True) else " [NO GRAPH: host-bound]"
        diff = f", diff {rec['max_diff']:.1e}" if "max_diff" in rec else ""
        err = f" ({rec.get('error') or rec.get('graph_error')})" if rec.get("status") != "ok" or "graph_error" in rec else ""
        print(f"  ref {rec['name']}: {fmt_us(rec)}{extra}{diff}{err}")
    base_default = next((r for r in row["results"] if r["variant"] == "base" and tuple(r["cfg"]) == DEFAULT_CFG
                         and r["status"] == "ok"), None)
    for variant in row["variants"]:
        recs = [r for r in row["results"] if r["variant"] == variant]
        ok = sorted((r for r in recs if r["status"] == "ok"), key=lambda r: r["us"])
        failed = [r for r in recs if r["status"] == "failed"]
        skipped = sum(r["status"] == "skipped" for r in recs)
        default = next((r for r in recs if tuple(r["cfg"]) == DEFAULT_CFG), None)
        rank = next((i + 1 for i, r in enumerate(ok) if tuple(r["cfg"]) == DEFAULT_CFG), None)
        bad = [r for r in ok if r.get("bad")]
        print(f"  -- {variant}: default {DEFAULT_CFG} {fmt_us(default) if default else 'not run'}"
              f"{f' (rank {rank}/{len(ok)})' if rank else ''}; ok {len(ok)}, failed {len(failed)}, skipped {skipped}"
              f"{f', BAD diff {len(bad)}' if bad else ''}")
        if ok:
            print("     BM  BN  w  s      us    min   vs base-default  max_diff")
        for r in ok[:top]:
            rel = f"{base_default['us'] / r['us']:.2f}x" if base_default else "-"
            print(f"    {r['cfg'][0]:3d} {r['cfg'][1]:3d} {r['cfg'][2]:2d} {r['cfg'][3]:2d} {r['us']:7.1f} "
                  f"{r['us_min']:6.1f}   {rel:>14}  {r['max_diff']:.1e}{'  BAD' if r.get('bad') else ''}")
        for r in failed[:3]:
            print(f"     failed {tuple(r['cfg'])}: {r['error'][:150]}")
        if len(failed) > 3:
            print(f"     ... {len(failed) - 3} more failed")


def run_sweep(args) -> None:
    assert torch.cuda.is_available(), "the sweep needs CUDA (use --check-cpu for the interpreter check)"
    assert triton is not None, "triton is not importable"
    t_start = time.perf_counter()
    configs = config_grid(args)
    lengths = w1_lengths(args.seed)
    max_len = args.max_len
    assert int(lengths.max()) <= max_len
    rows = [(dt, hd) for hd in args.head_dims for dt in args.dtypes]  # W1's head_dim first (the default order)
    jobs = [(variant, dt, hd, cfg) for dt, hd in rows for variant in args.variants for cfg in configs]
    out_path = args.out
    report = {
        "torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name(),
        "default_cfg": DEFAULT_CFG, "configs": configs, "variants": args.variants, "lengths_seed": args.seed,
        "tokens": int(lengths.sum()), "max_len": max_len, "launches_per_graph": args.launches, "reps": args.reps,
        "argv": sys.argv[1:], "rows": [],
    }
    print(f"{report['device']}, torch {torch.__version__}, triton {triton.__version__}; {len(configs)} configs x "
          f"{len(args.variants)} variants x {len(rows)} rows = {len(jobs)} kernels; default cfg {DEFAULT_CFG}; "
          f"precompile workers {args.jobs}; budget {args.budget:.0f} s", flush=True)

    # Build Triton's runtime pieces (driver utils, launcher) once here, before the workers start.
    _, q, k, v, cu = make_inputs(DTYPES[rows[0][0]], rows[0][1], lengths, "cuda")
    out = torch.empty(q.shape, dtype=q.dtype, device="cuda")
    kernel_call("base", q, k, v, out, cu, max_len, DEFAULT_CFG)()
    torch.cuda.synchronize()
    pool, futures = start_precompile(jobs, args.jobs)
    compile_errors = {}
    try:
        for dtype_name, head_dim in rows:
            t_row = time.perf_counter()
            dtype = DTYPES[dtype_name]
            _, q, k, v, cu = make_inputs(dtype, head_dim, lengths, "cuda")
            assert q.stride(0) == 3 * HIDDEN and q.stride(1) == head_dim and q.stride(2) == 1
            out = torch.empty(q.shape, dtype=dtype, device="cuda")
            ref = reference(q, k, v, lengths)
            row = {"dtype": dtype_name, "head_dim": head_dim, "heads": q.shape[1], "sequences": len(lengths),
                   "tokens": q.shape[0], "max_len": max_len, "ref_absmax": ref.abs().max().item(),
                   "variants": list(args.variants), "references": references(q, k, v, cu, max_len, ref, args),
                   "results": []}
            for variant, cfg in itertools.product(args.variants, configs):
                rec = {"variant": variant, "cfg": list(cfg)}
                row["results"].append(rec)
                if time.perf_counter() - t_start > args.budget:
                    rec["status"] = "skipped"
                    continue
                job = (variant, dtype_name, head_dim, cfg)
                if job in futures:
                    try:
                        _, seconds, error = futures[job].result(timeout=max(1.0, args.budget))
                        rec["compile_s"] = round(seconds, 3)
                        if error:
                            compile_errors[job] = error
                    except Exception as err:  # noqa: BLE001  (a broken pool: compile here instead)
                        rec["precompile_error"] = f"{type(err).__name__}: {err}"[:200]
                call = kernel_call(variant, q, k, v, out, cu, max_len, cfg)
                try:
                    out.fill_(float("nan"))
                    t0 = time.perf_counter()
                    call()
                    torch.cuda.synchronize()
                    rec["first_launch_s"] = round(time.perf_counter() - t0, 3)
                    rec["max_diff"] = max_diff(out, ref)
                    rec["bad"] = not rec["max_diff"] <= TOL[dtype_name]
                    rec.update(time_graph(call, args.launches, args.warmup, args.reps), status="ok")
                except Exception as err:  # noqa: BLE001  (does not compile / out of resources)
                    rec.update(status="failed", error=f"{type(err).__name__}: {err}".replace("\n", " ")[:300])
                    try:
                        torch.cuda.synchronize()
                    except Exception:  # noqa: BLE001
                        pass
            row["seconds"] = round(time.perf_counter() - t_row, 1)
            report["rows"].append(row)
            print_row(row, args.top)
            print(f"  (row {row['seconds']} s; elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)
            if out_path:  # rewritten after every row: a partial run still leaves its results
                write_json(report, out_path)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    first = [r["first_launch_s"] for row in report["rows"] for r in row["results"] if "first_launch_s" in r]
    summary(report)
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    report["first_launch_s_median"] = statistics.median(first) if first else None
    print(f"\nelapsed {report['elapsed_s']} s; first launch (cache load or compile) median "
          f"{report['first_launch_s_median']} s, max {max(first, default=0):.2f} s")
    if out_path:
        write_json(report, out_path)
        print(f"wrote {out_path}")


def summary(report: dict) -> None:
    print("\n== summary: best per variant (per-launch us, graph) vs base at the default config ==")
    for row in report["rows"]:
        base = next((r for r in row["results"] if r["variant"] == "base" and tuple(r["cfg"]) == DEFAULT_CFG
                     and r["status"] == "ok"), None)
        flash = next((r for r in row["references"] if r["name"].startswith("aten") and r.get("status") == "ok"), None)
        parts = [f"base default {base['us']:.1f}" if base else "base default -",
                 f"flash {flash['us']:.1f}{'' if flash.get('graph') else '(eager)'}" if flash else "flash -"]
        for variant in row["variants"]:
            ok = [r for r in row["results"] if r["variant"] == variant and r["status"] == "ok" and not r.get("bad")]
            if ok:
                best = min(ok, key=lambda r: r["us"])
                parts.append(f"{variant} {tuple(best['cfg'])} {best['us']:.1f}")
        print(f"  {row['dtype']} d{row['head_dim']}: " + " | ".join(parts))


def write_json(report: dict, path: str) -> None:
    common.write_json(report, path, quiet=True)


# ---- CPU correctness check under TRITON_INTERPRET=1 ------------------------------------------------------------
def check_cpu(args) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("warning: TRITON_INTERPRET is not set; CPU tensors will not launch")
    assert triton is not None, "triton is not importable"
    lengths = torch.tensor([5, 32, 64, 70])  # tail-only, exact multiples of 16 / 32 / 64, full blocks + tail
    max_len = 80  # more than the longest: programs past every length exit early
    heads = 2
    configs = [(16, 16, 4, 1), (32, 32, 4, 2), (64, 16, 4, 3), (16, 64, 8, 2)]
    variants = list(VARIANTS)
    worst, report = 0.0, []
    for head_dim in (16, 64):
        _, q, k, v, cu = make_inputs(torch.float16, head_dim, lengths, "cpu", hidden=heads * head_dim)
        assert q.stride(0) == 3 * heads * head_dim and q.stride(1) == head_dim
        ref = reference(q, k, v, lengths)
        base = {}
        for variant, cfg in itertools.product(variants, configs):
            out = torch.full(q.shape, float("nan"), dtype=q.dtype)
            kernel_call(variant, q, k, v, out, cu, max_len, cfg)()
            diff = max_diff(out, ref)
            worst = max(worst, diff) if not math.isnan(diff) else float("inf")
            if variant == "base":
                base[cfg] = out
            vs_base = max_diff(out, base[cfg].float()) if cfg in base else float("nan")
            report.append({"head_dim": head_dim, "variant": variant, "cfg": cfg, "max_diff": diff, "vs_base": vs_base})
            print(f"head_dim {head_dim:3d} {variant:9s} BM {cfg[0]:3d} BN {cfg[1]:3d}: max |out - fp32 ref| {diff:.2e}, "
                  f"|out - base| {vs_base:.2e}", flush=True)
    ok = worst <= TOL["fp16"]
    print(f"worst {worst:.2e} ({'OK' if ok else 'FAIL'}, fp16 tolerance {TOL['fp16']:.0e})")
    if args.out:
        write_json({"check_cpu": report, "worst": worst}, args.out)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    default_out = os.path.join(os.environ["OUT"], "attn_cfg.json") if os.environ.get("OUT") else None
    parser.add_argument("--out", default=default_out, help="JSON path (default $OUT/attn_cfg.json when OUT is set)")
    parser.add_argument("--check-cpu", action="store_true", help="interpreter correctness check of every variant")
    parser.add_argument("--quick", action="store_true", help="BM {64,128} x BN {32,64} x warps {4,8} x stages {2,3}")
    parser.add_argument("--full", action="store_true", help="the whole grid: stages 1-4, 32 x 32 included")
    parser.add_argument("--bm", type=int, nargs="+", help="override the BLOCK_M values")
    parser.add_argument("--bn", type=int, nargs="+", help="override the BLOCK_N values")
    parser.add_argument("--warps", type=int, nargs="+", help="override the num_warps values")
    parser.add_argument("--stages", type=int, nargs="+", help="override the num_stages values")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS) or None)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 32, 128])
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed before drawing the lengths")
    parser.add_argument("--launches", type=int, default=20, help="launches captured per graph")
    parser.add_argument("--warmup", type=int, default=3, help="untimed graph replays")
    parser.add_argument("--reps", type=int, default=10, help="timed graph replays (median reported)")
    parser.add_argument("--top", type=int, default=8, help="configs listed per variant")
    parser.add_argument("--jobs", type=int, default=max(0, min(16, (os.cpu_count() or 2) - 2)),
                        help="compile worker processes (0: compile in the main process)")
    parser.add_argument("--budget", type=float, default=170.0,
                        help="seconds after which remaining configs are skipped")
    args = parser.parse_args()
    if args.check_cpu:
        return check_cpu(args)
    run_sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
