#!/usr/bin/env bash
# The GPU kit: one command on a short-lived GPU machine (CUDA torch preinstalled, no network, <= 64 MiB carried
# per command, repository included) runs the job for real on CUDA and then the GPU benchmark, writing one table.
#
#   bash bench/gpu_kit.sh prepare   # here, with network: the pinned wheels the GPU machine lacks -> .whl/
#                                   # (CPython 3.12 manylinux x86_64, ~45 MB), and the same versions built for
#                                   # this interpreter -> .whl-host/ (for the CPU mode and tests/test_bench.py)
#   bash bench/gpu_kit.sh run       # on the GPU machine, one command of < 8 minutes (see below)
#   bash bench/gpu_kit.sh cpu       # here: the same steps on the CPU, tiny sizes (3 to 5 minutes on 2 shared cores)
#
# The device command (the session's `run` tool): carry [".whl"], command `bash bench/gpu_kit.sh run`,
# timeout_s 540. What it writes under $OUT comes back: kit.txt (the table), kit.json, gpu_results.json,
# gpu_results.txt, kit.log (every run's log tail) — 5 files.
#
# `run`: installs .whl/*.whl with `pip install --no-index --no-deps --target /tmp/kit-site` (unpacks them by hand
# where pip is missing) and puts that folder first on PYTHONPATH, so the pinned versions win over the machine's
# own transformers/huggingface_hub/typer while its CUDA torch stays. Then `entrypoint.py demo` (the built-in tiny
# AuraFlow: exercises Triton through optimi, LyCORIS's CUDA kernels, bf16, int8-quanto, group offload with the
# stream), each variant in its own OUTPUT_DIR with its exit code, time and written adapter recorded, then
# bench/gpu.sh (real-size transformer, random weights) on what time is left.
# Knobs: KIT_VARIANTS (comma list of the names below), KIT_STEPS, KIT_BUDGET_S (whole run, default 450),
# KIT_DEMO_S (the demo runs end by then, default 200; the benchmark gets the rest; CPU mode: 1200 and 900),
# KIT_WHEELS (default .whl),
# KIT_PARALLEL (1: after the first demo variant the rest side by side, the default on CUDA; 0: one at a time),
# KIT_BENCH_ARGS (extra bench/gpu.py options), PY (the python with torch), KIT_SITE.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}
START=$(date +%s)
# the time limits are the GPU machine's (< 8 minutes a command); the CPU rehearsal gets more, its numbers are slow
if [ "$MODE" = cpu ]; then BUDGET=${KIT_BUDGET_S:-1200}; DEMO_S=${KIT_DEMO_S:-900}
else BUDGET=${KIT_BUDGET_S:-450}; DEMO_S=${KIT_DEMO_S:-200}; fi
WHL=${KIT_WHEELS:-.whl}  # KIT_WHEELS: another folder (a rehearsal of `run` here with .whl-host)
HOST_WHL=.whl-host
# pip matches each manylinux_2_N tag exactly: name the usual ones (the GPU machine has glibc >= 2.35)
PLATFORMS=(--platform any --platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done

# name|settings (on top of the demo's own: tiny model, toy images, LoKr on every Linear)
ALL_VARIANTS=(
  "demo|"  # the demo as it ships: fp32, adamw, no checkpointing
  "bf16|BASE_MODEL_PRECISION=no_change MIXED_PRECISION=bf16 OPTIMIZER=optimi-lion GRADIENT_CHECKPOINTING=true"
  "int8|BASE_MODEL_PRECISION=int8-quanto MIXED_PRECISION=bf16 OPTIMIZER=optimi-lion GRADIENT_CHECKPOINTING=true"
  "int8-offload|BASE_MODEL_PRECISION=int8-quanto MIXED_PRECISION=bf16 OPTIMIZER=optimi-lion ENABLE_GROUP_OFFLOAD=true GROUP_OFFLOAD_USE_STREAM=false"
  "int8-offload-stream|BASE_MODEL_PRECISION=int8-quanto MIXED_PRECISION=bf16 OPTIMIZER=optimi-lion ENABLE_GROUP_OFFLOAD=true GROUP_OFFLOAD_USE_STREAM=true"
  # CUDA only: without it the job refuses int8 + bf16 + disk offload (torch's CPU int8 kernel crashes there)
  "int8-offload-disk|BASE_MODEL_PRECISION=int8-quanto MIXED_PRECISION=bf16 OPTIMIZER=optimi-lion ENABLE_GROUP_OFFLOAD=true GROUP_OFFLOAD_TO_DISK_PATH=@RUN@/offload"
)
VARIANTS_CUDA=demo,bf16,int8,int8-offload,int8-offload-stream,int8-offload-disk
VARIANTS_CPU=demo,bf16,int8,int8-offload,int8-offload-stream

pick_python() {  # the interpreter that has torch (the GPU machine's may be python or python3)
  if [ -n "${PY:-}" ]; then echo "$PY"; return; fi
  for p in python3 python; do
    if command -v "$p" >/dev/null && "$p" -c "import torch" 2>/dev/null; then echo "$p"; return; fi
  done
  echo "gpu_kit: no python with torch found (set PY)" >&2; exit 2
}

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# the demo runs end DEMO_S after the start, whatever happens (SIGTERM: the job writes its
# checkpoint and exits; 20 s later, SIGKILL): the rest of the budget is the benchmark's
demo_left() { local t=$(( DEMO_S - ($(date +%s) - START) )); echo $(( t > 20 ? t : 20 )); }

prepare() {
  local py=${PY:-.venv/bin/python}
  [ -x "$py" ] || { echo "gpu_kit prepare: $py missing: make venv first (or set PY)" >&2; exit 2; }
  local wanted; wanted=$("$py" -m bench.kit wheels)
  rm -rf "$WHL.new" "$HOST_WHL.new"
  # --no-deps with the resolved list: the closure comes from the venv built from pyproject.toml (bench/kit.py)
  # shellcheck disable=SC2086
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" --dest "$WHL.new" $wanted
  # shellcheck disable=SC2086
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --dest "$HOST_WHL.new" $wanted
  rm -rf "$WHL" "$HOST_WHL"
  mv "$WHL.new" "$WHL"
  mv "$HOST_WHL.new" "$HOST_WHL"
  "$py" -m bench.kit check "$WHL"
  "$py" -m bench.kit check "$HOST_WHL"
  local bytes; bytes=$(cat "$WHL"/*.whl | wc -c)
  echo "gpu_kit prepare: $(ls "$WHL" | wc -l) wheels, $(( bytes / 1048576 )) MiB in $WHL (carry it: the 64 MiB cap" \
       "holds it with the repository)"
  if [ "$bytes" -gt $(( 60 * 1048576 )) ]; then echo "gpu_kit prepare: over 60 MiB, will not travel" >&2; exit 1; fi
}

one_run() {  # python kit steps order name settings: the job's demo in its own OUTPUT_DIR, recorded in record.json
  local py=$1 kit=$2 steps=$3 order=$4 name=$5 settings=$6 out t0 rc=0
  out="$kit/runs/$name"; mkdir -p "$out"
  settings=${settings//@RUN@/$out}  # a path of the run's own
  t0=$(date +%s.%N)
  # the demo's settings, then the variant's; no validation or checkpoint before the end (a short run)
  # shellcheck disable=SC2086
  env OUTPUT_DIR="$out/output" MAX_TRAIN_STEPS="$steps" VALIDATION_STEP_INTERVAL=100000 \
      CHECKPOINT_STEP_INTERVAL=100000 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 $settings \
      timeout -k 20 "$(demo_left)" "$py" entrypoint.py demo > "$out/log.txt" 2>&1 || rc=$?
  "$py" - "$out" "$name" "$rc" "$t0" "$settings" "$order" <<'EOF'
import json, sys, time
out, name, rc, t0, settings, order = sys.argv[1:]
json.dump({"name": name, "order": int(order), "rc": int(rc), "wall_s": round(time.time() - float(t0), 1),
           "settings": settings, "output_dir": f"{out}/output"}, open(f"{out}/record.json", "w"))
EOF
  echo "gpu_kit: demo $name exit $rc"
}

demo_runs() {  # $1: python, $2: kit folder, $3: steps, $4: 1 = after the first, the rest side by side, $5: variants
  local py=$1 kit=$2 steps=$3 parallel=$4 spec name settings order=0
  local want=",${KIT_VARIANTS:-$5},"
  for spec in "${ALL_VARIANTS[@]}"; do
    name=${spec%%|*}; settings=${spec#*|}
    [[ $want == *",$name,"* ]] || continue
    order=$(( order + 1 ))
    if [ "$(demo_left)" -le 20 ]; then  # in the table too, not only in the log
      echo "gpu_kit: $name skipped (time budget)"; mkdir -p "$kit/runs/$name"
      printf '{"name": "%s", "order": %d, "rc": "skipped (time)", "wall_s": 0, "settings": "%s", "output_dir": "%s"}' \
        "$name" "$order" "$settings" "$kit/runs/$name/output" > "$kit/runs/$name/record.json"
      continue
    fi
    echo "gpu_kit: demo $name: ${settings:-as the demo ships}"
    # the first alone (it builds the tiny model and fills Triton's cache), then side by side on the one GPU:
    # tiny runs that check code paths, and minutes of device time saved
    if [ "$parallel" = 1 ] && [ "$order" -gt 1 ]; then
      one_run "$py" "$kit" "$steps" "$order" "$name" "$settings" &
    else
      one_run "$py" "$kit" "$steps" "$order" "$name" "$settings"
    fi
  done
  wait
}

logs() {  # every run's log tail, one file (the device tool brings back at most 8)
  local kit=$1 f
  for f in "$kit"/runs/*/log.txt; do
    [ -f "$f" ] || continue
    echo "===== $f"; tail -n 60 "$f"
  done
}

run_kit() {  # $1: cpu or cuda
  local where=$1 py kit dest site steps how variants
  if [ "$where" = cpu ]; then py=${PY:-.venv/bin/python}; else py=$(pick_python); fi
  dest=${OUT:-bench/kit-out}
  kit=$(mktemp -d "${TMPDIR:-/tmp}/gpu-kit.XXXXXX")
  mkdir -p "$dest"
  export XDG_CACHE_HOME="$kit/cache"  # the built-in tiny model and toy images, built once for all variants
  if [ "$where" = cuda ]; then
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    site=${KIT_SITE:-/tmp/kit-site}
    how=$("$py" -m bench.kit install "$WHL" "$site")
    steps=${KIT_STEPS:-30}
  else
    # the GPU machine's situation, here: a python that sees only torch (and numpy), plus the host wheels
    site="$kit/site"
    if [ -d "$HOST_WHL" ]; then
      "$py" -m venv --without-pip "$kit/venv"
      "$py" -m bench.kit baseline "$kit/torch-only"
      local sp; sp=$("$kit/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
      echo "$kit/torch-only" > "$sp/torch-only.pth"
      how=$("$py" -m bench.kit install "$HOST_WHL" "$site")
      py="$kit/venv/bin/python"
    else
      how="none: $HOST_WHL missing (run prepare), the venv's own packages"
    fi
    steps=${KIT_STEPS:-4}
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ), mode: $where, wheels: $how"
    # one interpreter for all of it (each import of torch costs seconds); an import that fails is the finding
    "$py" - <<'EOF'
import importlib.util as u
import sys

import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
import diffusers, huggingface_hub, lycoris, optimi, optimum.quanto, transformers, typer  # noqa: E401,F401,E402
import job.cli  # noqa: F401,E402

print("diffusers", diffusers.__version__, "| transformers", transformers.__version__, "| huggingface_hub",
      huggingface_hub.__version__, "| from", diffusers.__file__.rsplit("/diffusers/", 1)[0])
print("not importable (left out of the kit):", " ".join(m for m in ("bitsandbytes", "wandb") if not u.find_spec(m)))
EOF
    if [ "$where" = cuda ]; then
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
      echo "PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF"
    fi
  } > "$kit/env.txt" 2>&1 || true
  cat "$kit/env.txt"
  local parallel=0
  [ "$where" = cuda ] && parallel=1
  parallel=${KIT_PARALLEL:-$parallel}
  echo "demo runs: $([ "$parallel" = 1 ] && echo 'the first alone, the rest side by side' || echo 'one at a time')" \
    >> "$kit/env.txt"
  if [ "$where" = cuda ]; then variants=$VARIANTS_CUDA; else variants=$VARIANTS_CPU; fi
  demo_runs "$py" "$kit" "$steps" "$parallel" "$variants"
  local bench_args=(--budget-s "$(( $(left) > 20 ? $(left) - 20 : 0 ))")  # gpu.py starts no variant it cannot end
  [ "$where" = cpu ] && bench_args+=(--cpu-smoke --steps 1 --warmup 0)
  # shellcheck disable=SC2206
  bench_args+=(${KIT_BENCH_ARGS:-})
  local brc=0
  OUT="$dest" PY="$py" bash bench/gpu.sh "${bench_args[@]}" > "$kit/bench.log" 2>&1 || brc=$?
  echo "gpu_kit: bench/gpu.sh exit $brc"
  { logs "$kit"; echo "===== bench/gpu.sh (exit $brc)"; tail -n 80 "$kit/bench.log"; } > "$dest/kit.log"
  "$py" -m bench.kit table "$kit" "$dest"
  echo "gpu_kit: $(( $(date +%s) - START )) s; results in $dest (kit.txt, kit.json, gpu_results.*, kit.log)"
  rm -rf "$kit"
}

case "$MODE" in
  prepare) prepare ;;
  run) run_kit cuda ;;
  cpu) run_kit cpu ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 2 ;;
esac
