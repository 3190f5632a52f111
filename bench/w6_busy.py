"""W6 on a busy machine, and its memory: the CPU fast path against HF SDPA beside another busy PyTorch process, and
the resident memory of a long run of varied batches (issue "Reliability and safety", item 12).

Each configuration runs in a fresh process, since OpenMP reads OMP_WAIT_POLICY when PyTorch loads. The load is a
second process doing 512x512 matmuls on PyTorch's default threads, which is what a parallel job looks like.

    python -m bench.w6_busy                 # all of it (~10 minutes on 2 cores)
    python -m bench.w6_busy --part speed    # or: memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LOAD = "import time, torch\na = torch.randn(512, 512)\nwhile True:\n    [a @ a for _ in range(50)]\n    time.sleep(0.001)\n"

SPEED = r"""
import json, random, statistics, sys, time
import torch
from bench import common
from lit_fast.fastpath import to_fast_path
low, high, batch = (int(v) for v in sys.argv[1:4])
model = common.bert_model(6, 384, 12, 1536)  # the all-MiniLM-L6-v2 shape
rng = random.Random(0)
batches = []
for _ in range(8):
    lengths = sorted((rng.randint(low, high) for _ in range(batch)), reverse=True)
    ids = torch.randint(1000, 30000, (batch, lengths[0]))
    batches.append((ids, (torch.arange(lengths[0])[None] < torch.tensor(lengths)[:, None]).long()))
def seconds():
    for ids, mask in batches: model(input_ids=ids, attention_mask=mask)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for ids, mask in batches: model(input_ids=ids, attention_mask=mask)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
with torch.inference_mode():
    hf = seconds()
    to_fast_path(model)
    fast = seconds()
print(json.dumps({"hf_sdpa_s": hf, "fast_path_s": fast, "speedup": hf / fast}))
"""

MEMORY = r"""
import ctypes, json, random, sys
import torch
from bench import common
from lit_fast.fastpath import to_fast_path
model = common.bert_model(6, 384, 12, 1536)
if sys.argv[1] == "fast":
    to_fast_path(model)
rng, marks = random.Random(0), []
libc = ctypes.CDLL("libc.so.6")
with torch.inference_mode():
    for step in range(200):
        lengths = torch.tensor([rng.randint(5, 60) for _ in range(64)])
        ids = torch.randint(1000, 30000, (64, int(lengths.max())))
        model(input_ids=ids, attention_mask=(torch.arange(ids.shape[1])[None] < lengths[:, None]).long())
        if step % 50 == 49:
            libc.malloc_trim(0)  # what malloc keeps for reuse is not what the run holds
            marks.append(int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20)
print(json.dumps({"rss_mb_after_50_100_150_200_batches": marks}))
"""


def _child(code: str, args: list[str], policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed() -> list[dict]:
    rows = []
    for busy in (False, True):
        load = subprocess.Popen([sys.executable, "-c", LOAD]) if busy else None
        try:
            time.sleep(1 if busy else 0)
            for lengths in ((5, 60), (3, 12), (32, 256)):
                for policy in (None, "PASSIVE"):
                    batch = 32 if lengths[1] == 256 else 64
                    result = _child(SPEED, [str(lengths[0]), str(lengths[1]), str(batch)], policy)
                    rows.append({"busy": busy, "lengths": lengths, "batch": batch,
                                 "omp_wait_policy": policy or "default", **result})
                    print(rows[-1], flush=True)
        finally:
            if load is not None:
                load.kill()
    return rows


def memory() -> list[dict]:
    rows = [{"path": path, **_child(MEMORY, [path], "PASSIVE")} for path in ("hf", "fast")]
    for row in rows:
        print(row, flush=True)
    return rows


def main() -> None:
    from bench import common

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["speed", "memory", "all"], default="all")
    parser.add_argument("--out", help="results JSON (default bench/results/w6_busy_<commit>.json)")
    args = parser.parse_args()
    report = {"workload": "W6 busy", "environment": common.environment()}
    if args.part in ("speed", "all"):
        report["speed"] = speed()
    if args.part in ("memory", "all"):
        report["memory"] = memory()
    common.write_json(report, args.out or common.default_out("w6_busy", "cpu"))


if __name__ == "__main__":
    main()
