"""W1 on the GPU: where the device idles inside one forward, and what the host was doing then.

`bench/explore/w1_profile.py` says how long each kernel runs; this says when. For HF sdpa and lit_fast's default path
(bf16 and fp16, the W1 batch), it records a few forwards under torch.profiler (host ops and kernels), each timed
the way `bench/w1_encoder.py` times them (start event, call, end event, wait), with the fast path's main steps
marked as host ranges (the marks are patched in here, not in the library). Per forward it then reports

  - device time (start event to end event), kernel time (the union of kernel intervals) and idle = the rest;
  - every device gap over `--gap` us: when it starts (us after the call began), how long, the kernel that ends
    it, and the host ranges open when that kernel was launched;
  - when each marked host range began and ended.

The profiler slows the host (each op is recorded), so idle time here is an upper bound: compare the device time
with the unprofiled median printed first. With `--out-trace`, the chrome traces are kept for ui.perfetto.dev.

    python -m bench.explore.w1_timeline [--dtypes bf16] [--out-trace /tmp/w1] [--out FILE]

The marked steps follow the library's current names (MARKS below); earlier results name the steps of their commit
(`prepare` is today's `plan`, `stack.run` today's `layers_on`; `serve_front` is gone: the front runs the layers
itself).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from lit_fast.fastpath import to_fast_path
from lit_fast.fastpath.encoder import front, front_graphs, layer_graphs, padding, rows, stack
from lit_fast.fastpath.encoder.embeddings import EmbeddingInputs

# (owner, attribute, label): the host steps marked as ranges in the trace. Module functions are marked where the
# caller looks them up (front calls rows.row_plan, padding.finish_rows, padding.unpack and its own imported
# raise_if_out_of_range; the stack its imported packed_layer).
MARKS = [
    (front.FastFront, "_plan", "plan"),
    (stack.FastStack, "first_parts", "first_parts"),
    (rows, "row_plan", "row_plan"),
    (EmbeddingInputs, "of", "embedding_inputs"),
    (EmbeddingInputs, "embed_ahead", "embed_ahead"),
    (EmbeddingInputs, "embed", "embed"),
    (padding, "finish_rows", "finish_rows"),
    (front, "raise_if_out_of_range", "range_check"),
    (front_graphs.FrontGraphs, "replay", "front_graph_replay"),
    (rows.HostCopy, "tolist", "wait"),
    (stack.FastStack, "layers_on", "layers_on"),
    (layer_graphs.LayerGraphs, "__call__", "layer_graphs"),
    (stack, "packed_layer", "layer"),
    (padding, "unpack", "unpack"),
    (front.FastFront, "_finish", "finish"),
    (front.FastFront, "hf_forward", "hf_forward"),
]


HOST: list | None = None  # (label, start ns, end ns) of marked steps, when timing the host without the profiler


@contextlib.contextmanager
def marked(clock: bool = False):
    """Mark the steps: as profiler ranges, or (`clock`) as host clock readings appended to HOST."""
    saved = []
    for owner, name, label in MARKS:
        original = owner.__dict__[name]
        is_class = isinstance(original, classmethod)
        target = original.__func__ if is_class else original

        if clock:
            def wrapper(*args, _target=target, _label=label, **kwargs):
                begin = time.perf_counter_ns()
                try:
                    return _target(*args, **kwargs)
                finally:
                    HOST.append((_label, begin, time.perf_counter_ns()))
        else:
            def wrapper(*args, _target=target, _label=label, **kwargs):
                with torch.profiler.record_function(f"lf:{_label}"):
                    return _target(*args, **kwargs)

        functools.update_wrapper(wrapper, target)
        setattr(owner, name, classmethod(wrapper) if is_class else wrapper)
        saved.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def host_steps(model, ids, mask, forwards: int) -> dict:
    """Median (first start, last end) of every marked step, us after the call began, from the host clock alone
    (no profiler: the wrappers cost ~1 us each), and the median time of the whole call (it returns when its
    kernels are queued)."""
    global HOST
    per_step, calls = {}, []
    with marked(clock=True), torch.inference_mode():
        for _ in range(forwards):
            torch.cuda.synchronize()
            HOST = []
            begin = time.perf_counter_ns()
            model(input_ids=ids, attention_mask=mask)
            calls.append((time.perf_counter_ns() - begin) / 1e3)
            seen = {}
            for label, lo, hi in HOST:
                first, last = seen.get(label, (lo, hi))
                seen[label] = (min(first, lo), max(last, hi))
            for label, (lo, hi) in seen.items():
                per_step.setdefault(label, []).append(((lo - begin) / 1e3, (hi - begin) / 1e3))
    torch.cuda.synchronize()
    steps = {label: (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
             for label, values in per_step.items()}
    return {"call_us": statistics.median(calls), "steps": steps}


def prewait_block_us(model, ids, mask, reps: int = 40) -> dict:
    """Host time of the front's work before its wait (plan kernel, copy to the host, embeddings, the wait) in a
    tight loop, and right after a 7 ms device wait as between the forwards timed here (median us). The eager
    steps of FastFront._plan_rows, outside its CUDA graph."""
    fast = vars(model)["forward"]  # the FastFront installed on the base model (here the model itself)
    options = fast.options
    inputs = EmbeddingInputs.of(fast.embeddings, ids, None, None, *ids.shape, kernel=options.embed_kernel)
    copy = rows.HostCopy()

    def block():
        checks = inputs.checks(with_ids=False)
        if checks is None:  # the plan kernel sends its values to the host itself
            plan = rows.row_plan(mask, ids, copy)
        else:
            plan = rows.row_plan(mask, ids)
            copy.start(rows.with_checks(plan, checks))
        inputs.embed_ahead(plan)
        return copy.tolist()

    result = {}
    with torch.inference_mode():
        block()
        for label in ("tight loop", "after a 7 ms device wait"):
            samples = []
            for _ in range(reps):
                if label != "tight loop":
                    torch.cuda._sleep(7_000_000)  # ~7 ms of device time at ~1 GHz
                torch.cuda.synchronize()
                begin = time.perf_counter_ns()
                block()
                samples.append((time.perf_counter_ns() - begin) / 1e3)
            result[label] = statistics.median(samples)
    return result


def record(model, ids, mask, forwards: int, path: Path) -> None:
    with torch.inference_mode(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(forwards):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.profiler.record_function("lf:forward"):
                start.record()
                model(input_ids=ids, attention_mask=mask)
                end.record()
            end.synchronize()
    prof.export_chrome_trace(str(path))


def analyse(path: Path, gap_us: float) -> list[dict]:
    events = json.loads(path.read_text())["traceEvents"]
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = sorted((e for e in complete if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in complete
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    marks = [e for e in complete if e.get("cat") == "user_annotation" and e["name"].startswith("lf:")]
    forwards = sorted((e for e in marks if e["name"] == "lf:forward"), key=lambda e: e["ts"])
    reports = []
    for i, fwd in enumerate(forwards):
        t0 = fwd["ts"]
        t_end = forwards[i + 1]["ts"] if i + 1 < len(forwards) else float("inf")
        kernels = [k for k in device if t0 <= k["ts"] < t_end]
        inside = [m for m in marks if t0 <= m["ts"] < t_end and m is not fwd]
        if not kernels:
            continue
        busy, cursor, gaps = 0.0, kernels[0]["ts"], []
        first = kernels[0]["ts"] - t0
        for k in kernels:
            if k["ts"] > cursor + gap_us:
                launch = launches.get(k.get("args", {}).get("correlation"))
                at = launch["ts"] if launch else None
                open_ranges = [m["name"][3:] for m in inside if at is not None and m["ts"] <= at <= m["ts"] + m["dur"]]
                gaps.append({"from_us": cursor - t0, "gap_us": k["ts"] - cursor, "next": k["name"][:60],
                             "launched_us": None if at is None else at - t0, "host_in": open_ranges})
            start = max(k["ts"], cursor)
            busy += max(0.0, k["ts"] + k["dur"] - start)
            cursor = max(cursor, k["ts"] + k["dur"])
        span = cursor - t0
        steps = {}
        for m in inside:  # first start and last end of each marked step
            name = m["name"][3:]
            lo, hi = steps.get(name, (float("inf"), 0.0))
            steps[name] = (min(lo, m["ts"] - t0), max(hi, m["ts"] + m["dur"] - t0))
        reports.append({"span_us": span, "first_kernel_us": first, "busy_us": busy, "idle_us": span - busy,
                        "gaps": gaps, "steps": steps, "kernels": len(kernels)})
    return reports


def show(label: str, reports: list[dict]) -> None:
    print(f"\n## {label}: {len(reports)} forwards (profiled)")
    for key in ("span_us", "first_kernel_us", "busy_us", "idle_us", "kernels"):
        print(f"  {key:16s} median {statistics.median(r[key] for r in reports):9.1f}")
    last = reports[-1]
    print("  last forward, host steps (us after the call began):")
    for name, (lo, hi) in sorted(last["steps"].items(), key=lambda kv: kv[1][0]):
        print(f"    {name:20s} {lo:9.1f} .. {hi:9.1f}")
    print(f"  last forward, device gaps: {len(last['gaps'])}, {sum(g['gap_us'] for g in last['gaps']):.1f} us in all")
    for g in last["gaps"][:40]:
        launched = "?" if g["launched_us"] is None else f"{g['launched_us']:.1f}"
        print(f"    at {g['from_us']:8.1f} gap {g['gap_us']:7.1f} -> {g['next']:60s} launched {launched:>8s} "
              f"host in {','.join(g['host_in']) or '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    parser.add_argument("--forwards", type=int, default=4)
    parser.add_argument("--gap", type=float, default=3.0, help="report device gaps longer than this (us)")
    parser.add_argument("--out-trace", help="keep the chrome traces: path prefix")
    parser.add_argument("--out", help="write the reports as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("w1_timeline needs a CUDA GPU")
    ids, mask = common.w1_batch("w1")
    results = {}
    for name in args.dtypes:
        base = common.bert_base().cuda().to(common.DTYPES[name])
        models = {"hf_sdpa": base, "default": to_fast_path(copy.deepcopy(base), "packed")}
        for label, model in models.items():
            with torch.inference_mode():
                plain = common.median_ms(lambda: model(input_ids=ids, attention_mask=mask), 5, 20)
            print(f"{name} {label}: {plain:.2f} ms unprofiled", flush=True)
            with marked():
                with torch.inference_mode():
                    common.time_ms(lambda: model(input_ids=ids, attention_mask=mask), 3, 3)
                folder = Path(args.out_trace).parent if args.out_trace else Path(tempfile.mkdtemp())
                path = folder / f"{Path(args.out_trace).name if args.out_trace else 'w1'}.{name}.{label}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                record(model, ids, mask, args.forwards, path)
            reports = analyse(path, args.gap)
            host = host_steps(model, ids, mask, 20)
            results[f"{name} {label}"] = {"unprofiled_ms": plain, "forwards": reports, "host": host}
            show(f"{name} {label} (unprofiled {plain:.2f} ms)", reports)
            print(f"  host clock, no profiler (median of 20): the call returns at {host['call_us']:.1f} us")
            for step, (lo, hi) in sorted(host["steps"].items(), key=lambda kv: kv[1][0]):
                print(f"    {step:20s} {lo:9.1f} .. {hi:9.1f}")
            if label == "default":
                block = prewait_block_us(model, ids, mask)
                results[f"{name} {label}"]["prewait_block_us"] = block
                print("  the steps before the wait, alone: " + ", ".join(f"{k} {v:.1f} us" for k, v in block.items()))
        del models, base
        torch.cuda.empty_cache()
    if args.out:
        results["environment"] = common.environment()
        common.write_json(results, args.out)


if __name__ == "__main__":
    main()
