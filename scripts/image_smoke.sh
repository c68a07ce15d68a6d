#!/usr/bin/env bash
# Image smoke test (`make image-smoke`): build the real Dockerfile on a plain Debian base with a CPU
# torch, then run the image the way RunPod, Vast.ai and `docker run` users do.
#
#  1. a Docker engine: the running one, else Debian's docker.io started here (vfs storage, no iptables,
#     no bridge; stopped again at the end)
#  2. a base image made with debootstrap from this machine's Debian mirror and `docker import`
#  3. a wheelhouse (`pip download` on the host, CPU torch) served on 127.0.0.1 for the build's pip
#     (HTTPS from inside the build isn't trusted here, and the image's pip must not reach out anyway)
#  4. `docker build --build-arg BASE_IMAGE=... --build-arg RUNTIME_IMAGE=...` of the Dockerfile
#  5. checks: `demo` into a root-owned /workspace lands the adapter there, written by the job's uid;
#     the same with `docker run --user`; no compiler in the final image; no settings at all exits 2
#     within seconds.
# Builds and runs use --network host. Needs root (apt-get, dockerd, debootstrap).
#
# Settings (environment): SMOKE_DIR (state: rootfs, wheelhouse, docker data; default
# /var/tmp/auraflow-image-smoke), SMOKE_MIRROR (Debian mirror; default: this machine's apt source),
# SMOKE_SUITE (default: this machine's codename), SMOKE_TORCH (default torch==2.13.0, the CPU wheel
# on this machine), SMOKE_STEPS (default 4), SMOKE_KEEP=1 keeps the docker data of a daemon started
# here for a faster next run (vfs stores every layer in full: several GB).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SMOKE_DIR="${SMOKE_DIR:-/var/tmp/auraflow-image-smoke}"
SUITE="${SMOKE_SUITE:-$(sed -n "s/^VERSION_CODENAME=//p" /etc/os-release)}"
SUITE="${SUITE:-bookworm}"
TORCH_REQ="${SMOKE_TORCH:-torch==2.13.0}"
STEPS="${SMOKE_STEPS:-4}"
BASE_TAG="auraflow-smoke-base:${SUITE}"
IMAGE="auraflow-lokr-job:smoke"
JOB_UID=1000
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

STARTED_DOCKERD=""
HTTP_PID=""
T0=$(date +%s)

log() { printf '[image-smoke %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
fail() { log "FAIL: $*"; exit 1; }

stop_http() {
    if [ -n "$HTTP_PID" ]; then
        kill "$HTTP_PID" 2>/dev/null || true
        wait "$HTTP_PID" 2>/dev/null || true
        HTTP_PID=""
    fi
}

cleanup() {
    local rc=$?
    set +e
    stop_http
    if [ -n "$STARTED_DOCKERD" ]; then
        log "stopping the docker daemon started here (pid $STARTED_DOCKERD)"
        kill "$STARTED_DOCKERD" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 0.5; done
        # dockerd leaves its default network namespace mounted under the exec root
        awk -v root="$SMOKE_DIR/exec/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r |
            while read -r mnt; do umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null; done
        rm -rf "$SMOKE_DIR/exec"
        if [ "${SMOKE_KEEP:-0}" != 1 ]; then
            rm -rf "$SMOKE_DIR/docker"
        fi
    fi
    if [ "$rc" = 0 ]; then log "PASS in $(( $(date +%s) - T0 )) s"; else log "failed (exit $rc)"; fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || fail "run as root: it installs packages, starts dockerd and runs debootstrap"
mkdir -p "$SMOKE_DIR"

apt_install() {  # apt_install COMMAND PACKAGE...
    local cmd=$1; shift
    command -v "$cmd" >/dev/null && return 0
    log "installing $* (apt)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# ---------------------------------------------------------------- 1. docker engine
DOCKER=docker
if docker info >/dev/null 2>&1; then
    log "using the running docker engine"
    if docker buildx version >/dev/null 2>&1; then
        export DOCKER_BUILDKIT=1
    else
        export DOCKER_BUILDKIT=0  # no buildx plugin: the classic builder does multi-stage builds too
    fi
else
    apt_install dockerd docker.io
    apt_install debootstrap debootstrap
    # docker.io's own client matches its daemon and has BuildKit built in (a newer client would need buildx).
    DOCKER=/usr/bin/docker
    export DOCKER_BUILDKIT=1
    sock="$SMOKE_DIR/docker.sock"
    mkdir -p "$SMOKE_DIR/docker" "$SMOKE_DIR/exec"
    log "starting dockerd (vfs, no iptables, no bridge) on $sock"
    dockerd --storage-driver vfs --iptables=false --ip6tables=false --bridge=none \
        --data-root "$SMOKE_DIR/docker" --exec-root "$SMOKE_DIR/exec" \
        --pidfile "$SMOKE_DIR/docker.pid" -H "unix://$sock" >"$SMOKE_DIR/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    export DOCKER_HOST="unix://$sock"
    for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
    "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$SMOKE_DIR/dockerd.log"; fail "dockerd did not start"; }
fi
docker() { "$DOCKER" "$@"; }

# ---------------------------------------------------------------- 2. Debian base image
if ! docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    apt_install debootstrap debootstrap
    mirror="${SMOKE_MIRROR:-$(grep -rhoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
        /etc/apt/sources.list.d/*.list 2>/dev/null | head -1 || true)}"
    mirror="${mirror:-http://deb.debian.org/debian}"
    rootfs="$SMOKE_DIR/rootfs-$SUITE"
    if [ ! -x "$rootfs/usr/bin/apt-get" ]; then
        log "debootstrap $SUITE from $mirror"
        rm -rf "$rootfs"
        debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$SMOKE_DIR/debootstrap.log" 2>&1 \
            || { tail -20 "$SMOKE_DIR/debootstrap.log"; fail "debootstrap failed"; }
    fi
    log "docker import $BASE_TAG"
    tar -C "$rootfs" -c . | docker import - "$BASE_TAG" >/dev/null
fi

# ---------------------------------------------------------------- 3. wheelhouse, served on loopback
wheels="$SMOKE_DIR/wheelhouse"
mkdir -p "$wheels" "$SMOKE_DIR/req"
"$PY" "$ROOT/docker/image_build.py" requirements "$ROOT/pyproject.toml" "$SMOKE_DIR/req" >/dev/null
log "pip download into $wheels ($TORCH_REQ, pyproject's pins, build tools)"
"$PY" -m pip download -q --disable-pip-version-check -d "$wheels" "$TORCH_REQ" -r "$SMOKE_DIR/req/deps.txt" \
    ninja==1.13.2 'setuptools>=68' wheel 2>&1 | grep -v "is ignored: it is neither" || true
ls "$wheels"/torch-* >/dev/null 2>&1 || fail "pip download brought no torch wheel"
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" >/dev/null 2>&1 &
HTTP_PID=$!
for _ in $(seq 20); do "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" \
    2>/dev/null && break; sleep 0.25; done

# ---------------------------------------------------------------- 4. build
log "docker build $IMAGE on $BASE_TAG (log: $SMOKE_DIR/build.log)"
progress=()
[ "$DOCKER_BUILDKIT" = 1 ] && progress=(--progress plain)
if ! docker build "${progress[@]}" --network host -t "$IMAGE" \
        --build-arg BASE_IMAGE="$BASE_TAG" --build-arg RUNTIME_IMAGE="$BASE_TAG" \
        --build-arg PIP_EXTRA_ARGS="--no-index --find-links http://127.0.0.1:$port/" \
        "$ROOT" >"$SMOKE_DIR/build.log" 2>&1; then
    tail -40 "$SMOKE_DIR/build.log"
    fail "docker build failed"
fi
stop_http
log "built: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"

# ---------------------------------------------------------------- 5. checks
log "check: no compiler in the final image"
docker run --rm --network host --entrypoint sh "$IMAGE" -c \
    'for c in cc gcc g++ c++ nvcc; do if command -v "$c"; then exit 1; fi; done' \
    || fail "a compiler is in the final image"

log "check: no settings at all exits 2 within seconds"
# Created first: with vfs, making the container's file system takes longer than the job itself.
cid=$(docker create --network host "$IMAGE")
start=$(date +%s%N)
set +e
docker start -a "$cid" >"$SMOKE_DIR/no-settings.log" 2>&1
rc=$?
set -e
took_ms=$(( ($(date +%s%N) - start) / 1000000 ))
docker rm "$cid" >/dev/null
[ "$rc" = 2 ] || { cat "$SMOKE_DIR/no-settings.log"; fail "exit $rc without settings, expected 2"; }
[ "$took_ms" -le 20000 ] || fail "exit 2 took $took_ms ms"
grep -q "DATASET_ID" "$SMOKE_DIR/no-settings.log" || fail "the exit-2 message does not name DATASET_ID"
log "exit 2 after $took_ms ms (container start included)"

ws="$SMOKE_DIR/workspace-root"
rm -rf "$ws" && mkdir -p "$ws" && chown 0:0 "$ws" && chmod 0755 "$ws"
log "check: demo ($STEPS steps) into a root-owned /workspace, started as root (log: $SMOKE_DIR/demo-root.log)"
docker run --rm --network host --stop-timeout 30 -v "$ws:/workspace" -e MAX_TRAIN_STEPS="$STEPS" \
    "$IMAGE" demo >"$SMOKE_DIR/demo-root.log" 2>&1 \
    || { tail -30 "$SMOKE_DIR/demo-root.log"; fail "demo as root exited non-zero"; }
adapter="$ws/output/pytorch_lora_weights.safetensors"
[ -s "$adapter" ] || { find "$ws" -maxdepth 3 -printf "%u %p\n" | head -40; fail "no adapter at $adapter"; }
[ "$(stat -c %u "$adapter")" = "$JOB_UID" ] || fail "adapter owned by uid $(stat -c %u "$adapter"), not $JOB_UID"
bad=$(find "$ws/output" ! -user "$JOB_UID" | head -5)
[ -z "$bad" ] || fail "written by another uid than $JOB_UID: $bad"
[ "$(stat -c %u "$ws")" = 0 ] || fail "the volume's root changed owner"
log "adapter $(stat -c %s "$adapter") bytes, owned by uid $JOB_UID"

ws2="$SMOKE_DIR/workspace-user"
rm -rf "$ws2" && mkdir -p "$ws2" && chown 4321:4321 "$ws2"
log "check: demo started as --user 4321:4321 (log: $SMOKE_DIR/demo-user.log)"
docker run --rm --network host --user 4321:4321 -v "$ws2:/workspace" -e MAX_TRAIN_STEPS=2 \
    "$IMAGE" demo >"$SMOKE_DIR/demo-user.log" 2>&1 \
    || { tail -30 "$SMOKE_DIR/demo-user.log"; fail "demo as --user exited non-zero"; }
adapter2="$ws2/output/pytorch_lora_weights.safetensors"
[ -s "$adapter2" ] || fail "no adapter at $adapter2"
[ "$(stat -c %u "$adapter2")" = 4321 ] || fail "adapter owned by uid $(stat -c %u "$adapter2"), not 4321"
log "adapter written by uid 4321"
