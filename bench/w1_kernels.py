"""Per-kernel device times of one W1 forward (`to_fast_path(model)`, bf16) from torch.profiler: the first kernels in
order (us after the first one starts, duration), then the total per kernel name, their sum and the span.

    PYTHONPATH=$PWD python3 bench/w1_kernels.py [scenario]      # a bench/w1_encoder.py scenario, default w1
"""
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from w1_encoder import batch_for, bert_base  # noqa: E402

from lit_fast.fastpath import to_fast_path  # noqa: E402
ids, mask = batch_for(sys.argv[1] if len(sys.argv) > 1 else "w1")
m = to_fast_path(bert_base().cuda().to(torch.bfloat16))
with torch.inference_mode():
    for _ in range(5): m(input_ids=ids, attention_mask=mask)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            m(input_ids=ids, attention_mask=mask); torch.cuda.synchronize()
prof.export_chrome_trace("/tmp/kt.json")
ev = [e for e in json.load(open("/tmp/kt.json"))["traceEvents"] if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
ev.sort(key=lambda e: e["ts"])
per = len(ev) // 3
last = ev[-per:]
t0 = last[0]["ts"]
for e in last[:10]:
    print(f"{e['ts']-t0:8.1f} {e['dur']:7.1f}  {e['name'][:80]}")
tot = collections.defaultdict(float); cnt = collections.Counter()
for e in last:
    k = e["name"][:60]; tot[k] += e["dur"]; cnt[k] += 1
for k, v in sorted(tot.items(), key=lambda kv: -kv[1]):
    print(f"{v:9.1f} us  {cnt[k]:4d}x  {k}")
print("sum", sum(tot.values()), "span", last[-1]["ts"] + last[-1]["dur"] - t0)
