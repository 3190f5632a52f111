"""CPU attention on a packed row, forward + backward of one layer: SDPA per example against one SDPA call over a
block-diagonal mask (what transformers builds from restarted position ids) and against padded groups of similar
lengths (the inference fast path's CPU trick). Behind `lit_fast.training.attention`'s CPU choice
(docs/PACKED_TRAINING.md).

The W6 shape: 32 examples, lengths `torch.randint(32, 257, (32,))` after `torch.manual_seed(0)`, 8 heads of 64,
fp32; with and without attention dropout (0.1). Median of `--reps` after one warm-up call.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m bench.explore.packed_attention_cpu [--reps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench import common
from lit_fast.training.attention import _sdpa_per_example

HEADS, HEAD_DIM = 8, 64


def lengths_w6() -> list[int]:
    torch.manual_seed(0)
    return torch.randint(32, 257, (32,)).tolist()


def variants(lengths: list[int]) -> dict:
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    example = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def per_example(q, k, v, p):
        return _sdpa_per_example(q, k, v, bounds, p, None, False)

    def block_diagonal(q, k, v, p):
        mask = (example[:, None] == example[None, :])[None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p).transpose(1, 2)

    def grouped(q, k, v, p, groups: int = 4):
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        outs: list = [None] * len(lengths)
        size = -(-len(order) // groups)
        for g in range(0, len(order), size):
            members = order[g:g + size]
            width = max(lengths[i] for i in members)

            def pad(x):
                return torch.stack([F.pad(x[0, :, bounds[i]:bounds[i + 1]], (0, 0, 0, width - lengths[i]))
                                    for i in members])

            keep = torch.arange(width)[None] < torch.tensor([lengths[i] for i in members])[:, None]
            out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=keep[:, None, None], dropout_p=p)
            for j, i in enumerate(members):
                outs[i] = out[j, :, :lengths[i]].transpose(0, 1)
        return torch.cat(outs)[None]

    return {"per_example": per_example, "grouped4": grouped, "block_diagonal": block_diagonal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", help="results JSON (default: print only)")
    args = parser.parse_args()
    lengths = lengths_w6()
    total = sum(lengths)
    rows, found = [], []
    for dropout in (0.0, 0.1):
        for name, fn in variants(lengths).items():
            times = []
            for _ in range(args.reps + 1):
                q, k, v = (torch.randn(1, HEADS, total, HEAD_DIM, requires_grad=True) for _ in range(3))
                start = time.perf_counter()
                fn(q, k, v, dropout).sum().backward()
                times.append(time.perf_counter() - start)
            ms = statistics.median(times[1:]) * 1e3
            found.append({"variant": name, "dropout": dropout, "median_ms": ms, "times_ms": [t * 1e3 for t in times]})
            rows.append([name, dropout, f"{ms:.0f}"])
    if args.out:
        common.write_json({"environment": common.environment("cpu", threads=torch.get_num_threads()),
                           "tokens": total, "results": found}, args.out)
    print(common.markdown_table(["variant", "attention dropout", "median ms, fwd+bwd of one layer"], rows))


if __name__ == "__main__":
    main()
