#!/usr/bin/env bash
# GPU checks in one script, minutes on one H100: the real-size AuraFlow transformer (random weights, no download)
# at 1024 px, bf16 and int8-quanto, each without offload, with group offload and with group offload + stream.
# Needs the project installed (make venv, or the image). Table and JSON → $OUT (the device tool's folder) or bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=${OUT:-bench}
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 "$PY" -m bench.gpu --out "$DEST/gpu_results.json" "$@" | tee "$DEST/gpu_results.txt"
