"""The W8 plot: each run's whole process as its loop plus its fixed seconds, one panel per results file.

    python -m bench.plot_w8 bench/results/w8_minilm_h100_100k.json bench/results/w8_minilm_cpu_r3.json \
        --out bench/results/w8_end_to_end.png
"""

from __future__ import annotations

import argparse
import json

LABELS = {"lit_fast_cli": "lit-fast predict (default config)", "lit_fast_old": "lit_fast, defaults of before",
          "lit_fast_encode": "Embedder.encode()", "st_b32": "sentence-transformers, batch 32",
          "st_b256": "sentence-transformers, batch 256"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [json.load(open(path)) for path in args.results]
    height = sum(0.9 + 0.35 * len(r["models"]["minilm"]) for r in reports)
    fig, axes = plt.subplots(len(reports), 1, figsize=(8, height), squeeze=False)
    for ax, report in zip(axes[:, 0], reports):
        runs = report["models"]["minilm"]
        names = list(runs)[::-1]
        loops = [runs[n]["loop_s"] for n in names]
        fixed = [runs[n]["whole_s"] - runs[n]["loop_s"] for n in names]
        ax.barh(range(len(names)), loops, color="#1f77b4", label="predict loop")
        ax.barh(range(len(names)), fixed, left=loops, color="#c7c7c7", label="fixed (start, load, write, exit)")
        for k, n in enumerate(names):
            ax.text(runs[n]["whole_s"], k, f" {runs[n]['whole_s']:.1f} s", va="center", fontsize=8)
        ax.set_yticks(range(len(names)), [LABELS.get(n, n) for n in names], fontsize=8)
        env = report["environment"]
        ax.set_title(f"MiniLM, {report['corpus']['rows']:,} Rotten Tomatoes texts - {env['device']}", fontsize=9)
        ax.set_xlabel("seconds, whole process", fontsize=8)
        ax.set_xlim(0, max(r["whole_s"] for r in runs.values()) * 1.25)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
