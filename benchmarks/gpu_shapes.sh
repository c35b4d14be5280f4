#!/usr/bin/env bash
# Issue 28's GPU figures in one run, for a lent GPU machine (about 8 minutes on an H200):
# the card, then for each shape policy (exact, buckets) and each option the static shapes
# allow (cudnn.benchmark; torch.compile default, CUDA graphs, max-autotune; torch-tensorrt,
# or the line saying it fell back), the stage's and the network's images/s, the images per
# forward pass, and parity on the GPU. Results in $OUT/bench_gpu_mine.json (copy them to
# docs/gpu_mining/). Options left when --options-budget-s has passed are marked skipped.
#
#     OUT=/tmp/gpu_shapes bash benchmarks/gpu_shapes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_shapes}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.csv"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
  | tee "$OUT/versions.txt"
python benchmarks/bench_gpu_mine.py --options --images 2000 --batch-sizes 256 --parity-images 32 \
  --options-budget-s "${BUDGET_S:-420}" --out "$OUT"
