#!/usr/bin/env bash
# GPU checks in one script, minutes on one H100 (bench/gpu.py keeps to --budget-s, default 420 s): the real-size
# AuraFlow transformer (random weights, no download) at 1024 px, bf16 and int8-quanto, each without offload, with
# group offload and with group offload + stream. Needs the project installed (make venv, the image, or the GPU
# kit's wheels: bench/gpu_kit.sh). Table and JSON -> $OUT (the device tool's folder) or bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=${OUT:-bench}
mkdir -p "$DEST"
# as the job sets it (unless the user did): freed bf16 segments are reused after quantisation
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 "$PY" -m bench.gpu --out "$DEST/gpu_results.json" "$@" | tee "$DEST/gpu_results.txt"
