#!/bin/bash
# One device call that measures W8 on the GPU machine and says where its seconds go (docs/MEASUREMENTS.md, W8).
# Needs .gpu_assets/ (bench/explore/gpu_assets.sh) carried; writes at most 6 files under $OUT (the device returns
# 8 at most). From the repository root there:  bash bench/explore/w8_gpu.sh   (about 8 minutes on an H100)
A=$PWD/.gpu_assets
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $A/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
M=$A/minilm_fp16; S=$A/rotten_tomatoes_corpus_full.csv.bz2; T0=$(date +%s); TIMEFORMAT="%R s"
step() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name --format=csv,noheader
# Does this Python compile every module it imports on every start (no .pyc kept)? Both libraries pay for it.
T=$(python3 -c "import os, torch; print(os.path.dirname(torch.__file__))")
echo "dont_write_bytecode=$(python3 -c 'import sys; print(sys.dont_write_bytecode)') torch pyc files: $(ls $T/__pycache__ 2>/dev/null | wc -l)"
for k in 1 2; do echo "import torch+transformers+lightning ($k):"; time python3 -c "import torch, transformers, lightning.pytorch"; done
step "gpu tests"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/cli/test_predict_cli.py tests/fastpath/encoder/test_gpu.py \
  tests/fastpath/test_cuda_graphs.py > $OUT/gpu_tests.log 2>&1; tail -2 $OUT/gpu_tests.log
step "W8 MiniLM"
timeout 150 python3 -m bench.w8_end_to_end --model $M --source $S --rows 100000 --runs lit_fast_cli lit_fast_encode st_b256 \
  --out $OUT/w8_minilm.json > /tmp/w8.log 2>&1; tail -5 /tmp/w8.log
python3 -c "from bench.w8_end_to_end import build_corpus; from pathlib import Path; build_corpus('$S', 100000, Path('/tmp/corpus.parquet'))"
step "the command with CUDA graphs off"
time python3 -m lit_fast predict --config embed-minilm --model.pretrained $M --data.path /tmp/corpus.parquet --output /tmp/o.jsonl \
  --overwrite true --trainer.enable_progress_bar false --model.cuda_graphs off 2>&1 | grep -E "predicted"
# W8 plans 264 batches of at most 512 rows; the short texts' batches hold 8-16k of the 64k-token budget, and the loop
# pays the host per batch: fewer, fuller batches?
step "the command with up to 2,048 rows a batch"
time python3 -m lit_fast predict --config embed-minilm --model.pretrained $M --data.path /tmp/corpus.parquet --output /tmp/o.jsonl \
  --overwrite true --trainer.enable_progress_bar false --data.batch_size 2048 2>&1 | grep -E "predicted|batches"
step "encode() under the profilers"
timeout 90 python3 -m bench.explore.w8_profile --model $M --source $S --out $OUT/w8_profile.json > /tmp/prof.log 2>&1
grep -E "CUDA graphs|timed_s" /tmp/prof.log | head -4
step "cold start"
timeout 120 python3 -m bench.cold_start --model $M --repeats 1 --out $OUT/cold_start.json > /tmp/cold.log 2>&1; tail -9 /tmp/cold.log
step "W8 BERT-base"
timeout $(( 560 - ($(date +%s)-T0) )) python3 -m bench.w8_end_to_end --model $M --source $S --rows 100000 --only-bert-base \
  --runs lit_fast_cli lit_fast_encode st_b256 --out $OUT/w8_bert.json > /tmp/bert.log 2>&1; tail -5 /tmp/bert.log
step "done"
