"""Per-kernel device times of one W1 forward (`to_fast_path(model)`, bf16) from torch.profiler: the first kernels in
order (us after the first one starts, duration), then the total per kernel name, their sum and the span.

    python -m bench.explore.w1_kernels [scenario]      # a bench/w1_encoder.py scenario, default w1
"""

import argparse
import collections
import json
import tempfile
from pathlib import Path

import torch

from bench import common
from lit_fast.fastpath import to_fast_path

FORWARDS = 3  # profiled; the last one is reported
DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", default="w1", choices=list(common.W1_ALL_SCENARIOS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("w1_kernels needs a CUDA GPU")
    ids, mask = common.w1_batch(args.scenario)
    model = to_fast_path(common.bert_base().cuda().to(torch.bfloat16))
    with torch.inference_mode():
        for _ in range(5):  # warm up, CUDA graphs captured
            model(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(FORWARDS):
                model(input_ids=ids, attention_mask=mask)
                torch.cuda.synchronize()
    trace = Path(tempfile.mkdtemp()) / "w1_kernels.json"
    prof.export_chrome_trace(str(trace))
    events = sorted((e for e in json.loads(trace.read_text())["traceEvents"]
                     if e.get("ph") == "X" and e.get("cat") in DEVICE_EVENTS), key=lambda e: e["ts"])
    last = events[-(len(events) // FORWARDS):]
    start = last[0]["ts"]
    for event in last[:10]:
        print(f"{event['ts'] - start:8.1f} {event['dur']:7.1f}  {event['name'][:80]}")
    total, count = collections.defaultdict(float), collections.Counter()
    for event in last:
        total[event["name"][:60]] += event["dur"]
        count[event["name"][:60]] += 1
    for name, us in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"{us:9.1f} us  {count[name]:4d}x  {name}")
    print("sum", sum(total.values()), "span", last[-1]["ts"] + last[-1]["dur"] - start)


if __name__ == "__main__":
    main()
