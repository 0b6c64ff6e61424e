#!/usr/bin/env bash
# The GPU throughput tables, as one prepared run: `benchmarks/throughput.py` on CUDA with bf16 autocast,
# first every implementation eagerly (all shapes, plus scaling and levers), then compiled.
# Usage: benchmarks/gpu.sh OUT_DIR. Needs vit-mqa importable (pip install -e . or
# PYTHONPATH=src) and, for the peers, transformers and vit-pytorch.
set -uo pipefail
out=${1:-bench-gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export VIT_MQA_VERBOSE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  | tee "$out/gpu.txt"
"$py" -c "import torch, sys; print(torch.__version__, torch.version.cuda, sys.version)" \
  | tee -a "$out/gpu.txt"
timeout "${EAGER_LIMIT:-260}" "$py" "$(dirname "$0")/throughput.py" --device cuda --scaling \
  --impls vit-mqa-mqa,vit-mqa-gqa,vit-mqa-mha,vit-pytorch,hf-vit \
  --json-out "$out/eager.json" --markdown-out "$out/eager.md" >/dev/null
echo "eager: exit $?"
timeout "${LEVERS_LIMIT:-90}" "$py" "$(dirname "$0")/throughput.py" --device cuda --shapes vit-ti-32 \
  --impls vit-mqa-mqa --levers --repeats 3 --min-time 0.3 \
  --json-out "$out/levers.json" --markdown-out "$out/levers.md" >/dev/null
echo "levers: exit $?"
# Which fused formulation to make the default on CUDA (GROUPING_BY_DEVICE in attention.py):
# SDPA's enable_gqa against the folded query groups, at every shape, training and inference.
timeout "${GROUPING_LIMIT:-60}" "$py" "$(dirname "$0")/throughput.py" --device cuda \
  --impls vit-mqa-mqa --levers native-gqa --repeats 3 --min-time 0.3 \
  --json-out "$out/grouping.json" --markdown-out "$out/grouping.md" >/dev/null
echo "grouping: exit $?"
timeout "${COMPILED_LIMIT:-150}" "$py" "$(dirname "$0")/throughput.py" --device cuda --compile \
  --shapes mnist-fast,vit-ti-32 --impls vit-mqa-mqa,hf-vit,vit-pytorch --repeats 3 \
  --min-time 0.3 --json-out "$out/compiled.json" --markdown-out "$out/compiled.md" >/dev/null
echo "compiled: exit $?"
