#!/usr/bin/env bash
# GPU checks in one script, minutes on one H100: the real-size AuraFlow transformer (random weights, no download)
# at 1024 px, bf16 and int8-quanto. Needs the project installed (make venv, or the image). Table → bench/gpu_results.*
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 "$PY" -m bench.gpu "$@" | tee bench/gpu_results.txt
