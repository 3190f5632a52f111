"""Plot the fast path's speed-up over HF SDPA against the share of padding, from bench/w1_encoder.py's JSON.

One panel per dtype; one line per variant (speed-up = HF sdpa median / variant median, same run). Needs
matplotlib (the `bench` extra). The README's plot, bench/results/w1_speedup.png, is this of
bench/results/w1_h200_c3e80e2.json:

    python -m bench.plot_fastpath bench/results/w1_h200_c3e80e2.json --out bench/results/w1_speedup.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import RESULTS  # noqa: E402

LINES = {"auto": "-o", "packed+graphs": "--s", "fused": ":^", "hf_eager": "-.x"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="JSON written by bench/w1_encoder.py")
    parser.add_argument("--out", default=str(RESULTS / "w1_speedup.png"))
    args = parser.parse_args()
    report = json.loads(Path(args.results).read_text())
    dtypes = [d for d in ("fp16", "bf16") if any(r["dtype"] == d for r in report["results"])]
    figure, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4.2), sharey=True, squeeze=False)
    for axis, dtype in zip(axes[0], dtypes):
        rows = sorted((r for r in report["results"] if r["dtype"] == dtype and not r["scenario"].startswith("w1_batch")),
                      key=lambda r: r["padding_fraction"])
        padding = [100 * r["padding_fraction"] for r in rows]
        for variant, style in LINES.items():
            speedups = [r["variants"][variant]["speedup_vs_hf_sdpa"] for r in rows if variant in r["variants"]]
            axis.plot(padding[: len(speedups)], speedups, style, label=variant)
        floor = [r["variants"]["hf_sdpa"]["median_ms"] / r["floor_ms"] for r in rows]
        axis.plot(padding, floor, color="grey", linewidth=0.8, label="floor (real-token FLOPs / peak)")
        axis.axhline(1.0, color="black", linewidth=0.6)
        axis.set_title(f"W1, BERT-base shape, batch 128, {dtype}")
        axis.set_xlabel("padding in the batch (%)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up over HF sdpa (x)")
    axes[0][-1].legend(loc="upper left", fontsize=8)
    environment = report["environment"]
    figure.suptitle(f"lit_fast encoder fast path on {environment['device']} "
                    f"(torch {environment['torch']}, transformers {environment['transformers']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
