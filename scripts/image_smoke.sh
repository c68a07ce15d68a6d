#!/usr/bin/env bash
# Image smoke test (`make image-smoke`; `.ci/run` runs it after `make test`): build the real Dockerfile
# on a plain Debian base, then run the image the way RunPod, Vast.ai and `docker run` users do.
#
#   scripts/image_smoke.sh          the CPU variant: a CPU torch (CUDA_VERSION=cpu)
#   scripts/image_smoke.sh cuda     the CUDA 13.0 variant from PyPI's wheels, quanto's CUDA kernels built by
#                                   nvcc for one GPU architecture (SMOKE_CUDA_ARCH, 9.0), checked without a GPU
#   scripts/image_smoke.sh cleanup  only stop and remove what an aborted run left
#
#  1. a Docker engine: the running one, else Debian's docker.io started here (overlay2 storage where the
#     kernel allows it, else vfs; no iptables, no bridge), stopped again at the end, failure and timeout
#     included
#  2. a base image made with debootstrap from this machine's Debian mirror and `docker import` (the
#     stand-in for debian:bookworm-slim, which the Dockerfile uses by default)
#  3. a wheelhouse (`pip download` on the host) served on 127.0.0.1 for the build's pip (HTTPS from
#     inside the build isn't trusted here, and the image's pip must not reach out anyway): for cpu with
#     this machine's pip settings (its torch==2.13.0 is a CPU build), for cuda from PyPI alone (torch
#     2.13.0's default Linux wheel is the CUDA 13.0 build), with the nvcc and header wheels of torch's
#     CUDA release for the build stage
#  4. `docker build --build-arg BASE_IMAGE=... --build-arg RUNTIME_IMAGE=...` of the Dockerfile; for cuda
#     with CUDA_VERSION=13.0.2, TORCH_CUDA_ARCH_LIST=9.0 and MAX_JOBS=2 (SMOKE_MAX_JOBS)
#  5. checks: no settings at all exits 2 within seconds, naming what is missing; gcc (for Triton's
#     launcher) and no other compiler on the final image's PATH, no /usr/local/cuda; `demo` into a
#     root-owned /workspace lands the adapter there, written by the job's uid 1000; the same with
#     `docker run --user`. For cuda also, as uid 1000 in the image: torch.version.cuda is 13.0,
#     bitsandbytes' CUDA 13 library is there, quanto's CUDA library holds sm_90 code and loads without
#     compiling (its build folder unchanged), no nvcc, Triton builds its C launcher with gcc and loads it
#     (against a stub libcuda), `entrypoint.py --help` runs, NVIDIA_VISIBLE_DEVICES and
#     NVIDIA_DRIVER_CAPABILITIES are set.
# Builds and runs use --network host. Needs root (apt-get, dockerd, debootstrap, mount).
#
# Exit status: 0 passed; 1 the build or a check failed; 77 skipped, with the reason, because what it
# needs is not here (not root, no apt to install docker.io or debootstrap, a dockerd that cannot start
# in this sandbox, no Debian mirror for debootstrap, too little free disk).
#
# Time on 2 cores. cpu: 3.5 min with overlay2 (build 2.5 min, checks 26 s, `pip download` 22 s), 4 min
# with vfs on a quiet machine (checks 35 s: vfs copies the whole image for each container); debootstrap
# adds 25-50 s when not cached.
# cuda: 12.5 min on a fresh clone with the cores to itself (the build 11 min, 6.5 of them nvcc on
# quanto's CUDA kernels at about 3 GB of RAM per nvcc job; the checks 41 s; `pip download` of the ~2.8 GB
# wheelhouse 50 s), 20 min while another test suite shared the cores.
# What is kept between runs, under SMOKE_DIR:
#  - cache/rootfs-SUITE-ARCH-MIRRORHASH.tar, the debootstrap rootfs (made again after SMOKE_ROOTFS_DAYS),
#    cache/wheels-HASH and cache/cuda-wheels-HASH, the wheelhouses for that torch requirement,
#    pyproject's pins and the host's Python: a second run skips debootstrap and `pip download`;
#  - nothing of the daemon's data (with vfs ~35 GB at its peak for cpu, every layer and every
#    container's file system in full; with overlay2 about 21 GB for cuda) unless SMOKE_KEEP=1, which
#    keeps it and with it the build cache. It lives in an ext4 file system in a sparse file, mounted
#    through a loop device where the kernel has one: removing it is removing one file, not a million
#    (a minute on a host file system mounted with `discard`). Without a loop device it is a plain folder.
# Every run first stops what an aborted run left behind (its dockerd, containerd, shims and their
# containers, its wheel server), unmounts its mounts and removes its state;
# `scripts/image_smoke.sh cleanup` does only that.
#
# Settings (environment): SMOKE_DIR (default /var/tmp/auraflow-image-smoke), SMOKE_MIRROR (Debian
# mirror; default: this machine's apt source), SMOKE_SUITE (default: this machine's codename),
# SMOKE_TORCH (default torch==the Dockerfile's TORCH_VERSION), SMOKE_STEPS (default 4), SMOKE_KEEP=1,
# SMOKE_ROOTFS_DAYS (default 30), SMOKE_MIN_FREE_GB (free disk needed unless the daemon's data is
# kept; default 40), SMOKE_DISK_GB (size of the sparse file; default 60), SMOKE_PORT (the wheel
# server's, default 38765 when free), SMOKE_STORAGE (storage drivers to try; default "overlay2 vfs").
# cuda only: SMOKE_CUDA_VERSION (default 13.0.2), SMOKE_CUDA_ARCH (TORCH_CUDA_ARCH_LIST; default 9.0),
# SMOKE_CUDA_INDEX (default https://pypi.org/simple), SMOKE_MAX_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SMOKE_DIR="${SMOKE_DIR:-/var/tmp/auraflow-image-smoke}"
SMOKE_DIR="${SMOKE_DIR%/}"
CACHE="$SMOKE_DIR/cache"
RUN="$SMOKE_DIR/run"
LOGS="$SMOKE_DIR/logs"
DATA="$RUN/docker"
DATA_IMG="$RUN/docker.ext4"
EXEC="$RUN/exec"
SOCK="$RUN/docker.sock"
SUITE="${SMOKE_SUITE:-$(sed -n "s/^VERSION_CODENAME=//p" /etc/os-release 2>/dev/null || true)}"
SUITE="${SUITE:-bookworm}"
# The torch the Dockerfile pins (ARG TORCH_VERSION): the CPU build here, PyPI's CUDA 13.0 build for `cuda`.
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' "$ROOT/Dockerfile")
TORCH_REQ="${SMOKE_TORCH:-torch==$TORCH_VERSION}"
STEPS="${SMOKE_STEPS:-4}"
BASE_TAG="auraflow-smoke-base:${SUITE}"
VARIANT="${1:-cpu}"
case $VARIANT in
    cpu) IMAGE="auraflow-lokr-job:smoke" ;;
    cuda) IMAGE="auraflow-lokr-job:smoke-cuda" ;;
    cleanup) ;;
    *) echo "usage: $0 [cpu|cuda|cleanup]" >&2; exit 2 ;;
esac
CUDA_VERSION="${SMOKE_CUDA_VERSION:-13.0.2}"
CUDA_ARCH="${SMOKE_CUDA_ARCH:-9.0}"
CUDA_INDEX="${SMOKE_CUDA_INDEX:-https://pypi.org/simple}"
MAX_JOBS="${SMOKE_MAX_JOBS:-2}"
JOB_UID=1000
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

STARTED_DOCKERD=""
HTTP_PID=""
T0=$(date +%s)
PHASE="" PHASE_T0=$T0 TIMES=""

# Messages go to the script's own stdout and stderr (fds 3 and 4), also from inside a command whose
# output goes to a log (a signal's trap runs there).
exec 3>&1 4>&2
say() { local fd=$1; shift; printf '[image-smoke %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&"$fd"; }
log() { say 3 "$@"; }
fail() { say 4 "FAIL: $*"; exit 1; }
skip() {
    say 4 "SKIPPED, the image was not built or run: $*"
    exit 77
}
# A long command in the background, waited for: a signal to this script is handled at once, not after
# the command ends (the trap then stops the daemon, which ends the command).
waitfor() {
    "$@" 3>&- 4>&- 9>&- &
    wait $!
}
phase() {  # phase NAME: the time since the last phase goes to the previous one
    local now; now=$(date +%s)
    [ -n "$PHASE" ] && TIMES="$TIMES $PHASE $(( now - PHASE_T0 ))s,"
    PHASE=$1 PHASE_T0=$now
}

# ---------------------------------------------------------------- what an earlier run left behind
# Processes of this script's daemon: dockerd, containerd and the shims by their command line (which
# names SMOKE_DIR), the wheel server likewise, and every process below a shim (the containers).
leftover_pids() {
    ps -eo pid=,ppid=,args= | awk -v dir="$SMOKE_DIR/" -v self=$$ '
        { pid = $1; ppid[pid] = $2; args = $0; sub(/^ *[0-9]+ +[0-9]+ +/, "", args)
          split(args, w, " "); exe = w[1]; sub(/.*\//, "", exe)
          if (pid != self && index(args, dir) &&
              (exe ~ /^(dockerd|containerd|containerd-shim.*|runc)$/ ||
               (exe ~ /^python/ && index(args, "http.server")))) { mine[pid] = 1; if (exe ~ /^containerd-shim/) shim[pid] = 1 } }
        END { for (p in ppid) { q = p; for (i = 0; i < 64 && q > 1; i++) { q = ppid[q]; if (q in shim) { mine[p] = 1; break } } }
              for (p in mine) print p }'
}

any_alive() {  # any_alive PID...: one of them runs (a zombie, exited but not yet waited for, does not)
    local p s
    for p in "$@"; do
        s=$(ps -o stat= -p "$p" 2>/dev/null) || continue
        case $s in Z*) ;; *) return 0 ;; esac
    done
    return 1
}

stop_pids() {  # stop_pids SECONDS PID...: TERM, then KILL whatever still runs after SECONDS
    local wait_s=$1; shift
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    local _
    for _ in $(seq $(( wait_s * 4 ))); do
        any_alive "$@" || return 0
        sleep 0.25
    done
    log "still running after ${wait_s}s, killing: $*"
    kill -KILL "$@" 2>/dev/null || true
    sleep 0.5
}

unmount_state() {  # every mount under SMOKE_DIR, deepest first (netns, shm, the loop file system last)
    local mnt
    awk -v dir="$SMOKE_DIR/" 'index($2, dir) == 1 { print $2 }' /proc/mounts | awk '{ print length, $0 }' |
        sort -rn | cut -d' ' -f2- | while read -r mnt; do
            umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || log "could not unmount $mnt"
        done
}

reap() {  # reap REASON: stop what runs from SMOKE_DIR, unmount, remove the run state (not the caches)
    local pids
    pids=$(leftover_pids | tr '\n' ' ')
    if [ -n "${pids// /}" ]; then
        log "$1: stopping processes left in $SMOKE_DIR: $pids"
        # shellcheck disable=SC2086
        stop_pids 20 $pids
    fi
    unmount_state
    rm -rf "$EXEC" "$SOCK" "$RUN/docker.pid"
    if [ "${SMOKE_KEEP:-0}" != 1 ]; then
        rm -rf "$DATA" "$DATA_IMG"
    fi
}

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
    trap - EXIT INT TERM
    stop_http
    if [ -n "$STARTED_DOCKERD" ]; then
        phase cleanup
        if [ "${SMOKE_KEEP:-0}" = 1 ]; then
            log "stopping the docker daemon started here (pid $STARTED_DOCKERD); SMOKE_KEEP=1 keeps its data"
        else
            log "stopping the docker daemon started here (pid $STARTED_DOCKERD) and removing its data"
        fi
        stop_pids 40 "$STARTED_DOCKERD"
        reap "after the daemon stopped"
    fi
    phase end
    [ -z "$TIMES" ] || log "times:${TIMES%,}"
    case $rc in
        0) log "PASS in $(( $(date +%s) - T0 )) s" ;;
        77) ;;
        *) log "FAILED (exit $rc) after $(( $(date +%s) - T0 )) s; logs in $LOGS" ;;
    esac
    exit "$rc"
}

if [ "${1:-}" = cleanup ]; then
    [ "$(id -u)" = 0 ] || { echo "image_smoke.sh cleanup: run as root" >&2; exit 1; }
    [ -d "$SMOKE_DIR" ] || exit 0
    exec 9>"$SMOKE_DIR/lock"
    flock -w 60 9 || { echo "image_smoke.sh cleanup: a run holds $SMOKE_DIR/lock" >&2; exit 1; }
    reap cleanup
    exit 0
fi

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" = 0 ] || skip "not root: it installs packages, starts dockerd, mounts and runs debootstrap"
mkdir -p "$SMOKE_DIR" "$CACHE" "$RUN" "$LOGS"
# One run at a time per SMOKE_DIR: a second one would take the first one's daemon for a leftover.
exec 9>"$SMOKE_DIR/lock"
flock -w 600 9 || fail "another image smoke has held $SMOKE_DIR/lock for 10 minutes"

APT_UPDATED=""
apt_install() {  # apt_install PACKAGE...
    command -v apt-get >/dev/null || skip "no apt-get to install $*"
    log "installing $* (apt)"
    if [ -z "$APT_UPDATED" ]; then
        apt-get update -q >"$LOGS/apt.log" 2>&1 || { tail -5 "$LOGS/apt.log"; skip "apt-get update failed"; }
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >>"$LOGS/apt.log" 2>&1 \
        || { tail -10 "$LOGS/apt.log"; skip "apt-get cannot install $*"; }
}

# ---------------------------------------------------------------- 1. docker engine
phase engine
DOCKER=docker
if docker info >/dev/null 2>&1; then
    log "using the running docker engine"
    if docker buildx version >/dev/null 2>&1; then
        export DOCKER_BUILDKIT=1
    else
        export DOCKER_BUILDKIT=0  # no buildx plugin: the classic builder does multi-stage builds too
    fi
else
    reap "before starting"
    # docker.io's own client matches its daemon and has BuildKit built in (a newer client would need buildx).
    if ! command -v dockerd >/dev/null || ! [ -x /usr/bin/docker ]; then apt_install docker.io; fi
    if ! command -v dockerd >/dev/null || ! [ -x /usr/bin/docker ]; then skip "docker.io installed no dockerd or docker"; fi
    DOCKER=/usr/bin/docker
    export DOCKER_BUILDKIT=1
    kept=""
    [ "${SMOKE_KEEP:-0}" = 1 ] && [ -s "$DATA_IMG" ] && kept=1
    if [ -z "$kept" ]; then
        free_gb=$(( $(df -Pk "$RUN" | awk 'NR == 2 { print $4 }') / 1048576 ))
        [ "$free_gb" -ge "${SMOKE_MIN_FREE_GB:-40}" ] \
            || skip "only $free_gb GB free under $RUN; the build needs ${SMOKE_MIN_FREE_GB:-40} GB (SMOKE_MIN_FREE_GB)"
    fi
    mkdir -p "$DATA" "$EXEC"
    # The data on ext4 in a sparse file through a loop device if this kernel has one, else a folder.
    if command -v mkfs.ext4 >/dev/null; then
        if [ -z "$kept" ]; then
            rm -f "$DATA_IMG"
            if ! { truncate -s "${SMOKE_DISK_GB:-60}G" "$DATA_IMG" &&
                   mkfs.ext4 -q -F -O ^has_journal -E lazy_itable_init=1 -m 0 "$DATA_IMG" >"$LOGS/mkfs.log" 2>&1; }; then
                rm -f "$DATA_IMG"
            fi
        fi
        if [ -s "$DATA_IMG" ] && mount -o loop,noatime "$DATA_IMG" "$DATA" 2>"$LOGS/mount.log"; then
            log "docker data on a loop-mounted ext4 file ($DATA_IMG, sparse)"
        else
            rm -f "$DATA_IMG"
            log "no loop device here ($(head -1 "$LOGS/mount.log" 2>/dev/null)): docker data in the folder $DATA"
        fi
    fi
    export DOCKER_HOST="unix://$SOCK"
    # overlay2 where this kernel and file system allow it (layers and containers cost only what they add;
    # the CUDA image is ~10 GB), else vfs (every layer and container a full copy).
    : >"$LOGS/dockerd.log"
    for driver in ${SMOKE_STORAGE:-overlay2 vfs}; do
        log "starting dockerd ($driver storage, no iptables, no bridge) on $SOCK"
        dockerd --storage-driver "$driver" --iptables=false --ip6tables=false --bridge=none \
            --data-root "$DATA" --exec-root "$EXEC" \
            --pidfile "$RUN/docker.pid" -H "unix://$SOCK" >>"$LOGS/dockerd.log" 2>&1 3>&- 4>&- 9>&- &
        STARTED_DOCKERD=$!
        for _ in $(seq 120); do
            "$DOCKER" info >/dev/null 2>&1 && break
            kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
            sleep 0.5
        done
        if [ "$("$DOCKER" info -f '{{.Driver}}' 2>/dev/null)" = "$driver" ]; then
            break
        fi
        grep -E 'level=(error|fatal)|failed' "$LOGS/dockerd.log" | tail -3 >&2
        log "dockerd does not run with $driver here"
        stop_pids 20 "$STARTED_DOCKERD"
        STARTED_DOCKERD=""
        rm -rf "${DATA:?}"/* "$EXEC" "$RUN/docker.pid" "$SOCK"
        mkdir -p "$EXEC"
    done
    if [ -z "$STARTED_DOCKERD" ] || ! "$DOCKER" info >/dev/null 2>&1; then
        skip "dockerd does not start in this sandbox (log: $LOGS/dockerd.log)"
    fi
fi
docker() { "$DOCKER" "$@"; }

# ---------------------------------------------------------------- 2. Debian base image
phase base
if ! docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    mirror="${SMOKE_MIRROR:-$(grep -rhoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
        /etc/apt/sources.list.d/*.list 2>/dev/null | head -1 || true)}"
    mirror="${mirror:-http://deb.debian.org/debian}"
    arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
    rootfs_tar="$CACHE/rootfs-$SUITE-$arch-$(printf '%s' "$mirror" | sha256sum | cut -c1-12).tar"
    if [ -s "$rootfs_tar" ] && [ -n "$(find "$rootfs_tar" -mtime "+${SMOKE_ROOTFS_DAYS:-30}")" ]; then
        log "the cached rootfs is older than ${SMOKE_ROOTFS_DAYS:-30} days: debootstrap again"
        rm -f "$rootfs_tar"
    fi
    if [ ! -s "$rootfs_tar" ]; then
        command -v debootstrap >/dev/null || apt_install debootstrap
        rootfs="$CACHE/rootfs.tmp"
        rm -rf "$rootfs" "$rootfs_tar.tmp"
        log "debootstrap $SUITE ($arch) from $mirror (log: $LOGS/debootstrap.log)"
        if ! waitfor debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$LOGS/debootstrap.log" 2>&1; then
            tail -15 "$LOGS/debootstrap.log" >&2
            rm -rf "$rootfs"
            skip "debootstrap $SUITE from $mirror failed: no usable Debian mirror"
        fi
        tar -C "$rootfs" --numeric-owner -cf "$rootfs_tar.tmp" . && mv "$rootfs_tar.tmp" "$rootfs_tar"
        rm -rf "$rootfs"
    else
        log "rootfs from the cache: $rootfs_tar"
    fi
    log "docker import $BASE_TAG"
    docker import "$rootfs_tar" "$BASE_TAG" >/dev/null
fi

# ---------------------------------------------------------------- 3. wheelhouse, served on loopback
phase wheels
req="$RUN/req"
"$PY" "$ROOT/docker/image_build.py" requirements "$ROOT/pyproject.toml" "$req" >/dev/null
build_tools=(ninja==1.13.2 'setuptools>=68' wheel)
# cpu: this machine's pip as configured (its torch==2.13.0 is the local CPU build). cuda: PyPI alone
# (CUDA_INDEX), without this machine's pip configuration (its local CPU torch would win), plus nvcc and
# the CUDA headers that torch's CUDA release needs for quanto's kernels (~3 GB in all).
prefix=wheels
pip_dl=("$PY" -m pip download -q --disable-pip-version-check)
if [ "$VARIANT" = cuda ]; then
    prefix=cuda-wheels
    cert=$("$PY" -m pip config get global.cert 2>/dev/null || true)
    pip_dl=(env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX
            PIP_CONFIG_FILE=/dev/null "${pip_dl[@]}" --index-url "$CUDA_INDEX" ${cert:+--cert "$cert"})
fi
index_key=""
[ "$VARIANT" = cuda ] && index_key="$CUDA_INDEX"
key=$({ echo "$TORCH_REQ"; [ -z "$index_key" ] || echo "$index_key"; cat "$req/deps.txt"; echo "${build_tools[*]}"
        "$PY" -c 'import platform, sys; print(sys.version_info[:2], platform.machine())'; } | sha256sum | cut -c1-16)
wheels="$CACHE/$prefix-$key"
if [ -f "$wheels/.complete" ]; then
    log "wheelhouse from the cache: $wheels"
else
    log "pip download into $wheels ($TORCH_REQ, pyproject's pins, build tools)"
    rm -rf "$wheels.tmp"
    mkdir -p "$wheels.tmp"
    toolkit=()
    if [ "$VARIANT" = cuda ]; then
        waitfor "${pip_dl[@]}" --no-deps -d "$wheels.tmp" "$TORCH_REQ" >"$LOGS/pip-download.log" 2>&1 \
            || { tail -15 "$LOGS/pip-download.log"; fail "pip download $TORCH_REQ from $CUDA_INDEX failed"; }
        torch_whl=$(ls "$wheels.tmp"/torch-*.whl)
        case $torch_whl in *+cpu*) fail "$CUDA_INDEX gave a CPU torch: $torch_whl" ;; esac
        read -ra toolkit <<<"$("$PY" "$ROOT/docker/image_build.py" cuda-toolkit-req "$torch_whl")"
        log "CUDA toolchain for the build stage: ${toolkit[*]}"
        [ "${toolkit[0]}" = wheels ] || fail "torch's CUDA release has no nvcc wheel: ${toolkit[*]}"
        toolkit=("${toolkit[@]:1}")
    fi
    waitfor "${pip_dl[@]}" -d "$wheels.tmp" "$TORCH_REQ" -r "$req/deps.txt" "${toolkit[@]}" \
        "${build_tools[@]}" >>"$LOGS/pip-download.log" 2>&1 \
        || { grep -v "is ignored: it is neither" "$LOGS/pip-download.log" | tail -15; fail "pip download failed"; }
    ls "$wheels.tmp"/torch-* >/dev/null 2>&1 || fail "pip download brought no torch wheel"
    touch "$wheels.tmp/.complete"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
    # Only the current wheelhouse of this variant is kept (CPU ~350 MB, CUDA ~3 GB).
    find "$CACHE" -maxdepth 1 -name "$prefix-*" ! -name "$prefix-$key" -exec rm -rf {} +
fi
log "wheelhouse: $(du -sh "$wheels" | cut -f1)"
# A fixed port when it is free: the port is part of a build argument, so of the build cache (SMOKE_KEEP=1).
port="${SMOKE_PORT:-38765}"
"$PY" -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null ||
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" >"$LOGS/wheel-server.log" 2>&1 3>&- 4>&- 9>&- &
HTTP_PID=$!
for _ in $(seq 40); do "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" \
    2>/dev/null && break; sleep 0.25; done
"$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null \
    || { cat "$LOGS/wheel-server.log"; fail "the wheel server on 127.0.0.1:$port did not start"; }

# ---------------------------------------------------------------- 4. build
phase build
log "docker build $IMAGE on $BASE_TAG (log: $LOGS/build.log)"
progress=()
[ "$DOCKER_BUILDKIT" = 1 ] && progress=(--progress plain)
variant_args=(--build-arg CUDA_VERSION=cpu)
if [ "$VARIANT" = cuda ]; then
    # One GPU architecture (the full list multiplies the kernel build); MAX_JOBS nvcc jobs (2 cores here,
    # and Marlin's kernels take several GB of RAM per job).
    variant_args=(--build-arg CUDA_VERSION="$CUDA_VERSION" --build-arg TORCH_CUDA_ARCH_LIST="$CUDA_ARCH"
                  --build-arg MAX_JOBS="$MAX_JOBS")
fi
log "build arguments: ${variant_args[*]}"
if ! waitfor docker build "${progress[@]}" --network host -t "$IMAGE" "${variant_args[@]}" \
        --build-arg BASE_IMAGE="$BASE_TAG" --build-arg RUNTIME_IMAGE="$BASE_TAG" \
        --build-arg PIP_EXTRA_ARGS="--no-index --find-links http://127.0.0.1:$port/" \
        "$ROOT" >"$LOGS/build.log" 2>&1; then
    tail -40 "$LOGS/build.log"
    fail "docker build failed"
fi
stop_http
log "built: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"

# ---------------------------------------------------------------- 5. checks
phase checks
# With vfs each container's file system is two full copies of the image (~2 x 1.8 GB), which takes far
# longer than any of these jobs: the three containers are made at once, before anything is timed.
ws="$RUN/workspace-root"
rm -rf "$ws" && mkdir -p "$ws" && chown 0:0 "$ws" && chmod 0755 "$ws"
ws2="$RUN/workspace-user"
rm -rf "$ws2" && mkdir -p "$ws2" && chown 4321:4321 "$ws2"
NS=smoke-no-settings DR=smoke-demo-root DU=smoke-demo-user
docker rm -f "$NS" "$DR" "$DU" >/dev/null 2>&1 || true
log "creating the containers: no settings; demo as root; demo as --user 4321:4321"
creates=()
docker create --name "$NS" --network host "$IMAGE" >/dev/null 2>"$LOGS/create-$NS.log" 3>&- 4>&- 9>&- &
creates+=($!)
docker create --name "$DR" --network host --stop-timeout 30 -v "$ws:/workspace" -e MAX_TRAIN_STEPS="$STEPS" \
    "$IMAGE" demo >/dev/null 2>"$LOGS/create-$DR.log" 3>&- 4>&- 9>&- &
creates+=($!)
docker create --name "$DU" --network host --stop-timeout 30 --user 4321:4321 -v "$ws2:/workspace" \
    -e MAX_TRAIN_STEPS=2 "$IMAGE" demo >/dev/null 2>"$LOGS/create-$DU.log" 3>&- 4>&- 9>&- &
creates+=($!)
for pid in "${creates[@]}"; do
    wait "$pid" || { cat "$LOGS"/create-smoke-*.log; fail "docker create failed"; }
done

log "check: no settings at all exits 2 within seconds"
start=$(date +%s%N)
set +e
waitfor docker start -a "$NS" >"$LOGS/no-settings.log" 2>&1
rc=$?
set -e
took_ms=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$rc" = 2 ] || { cat "$LOGS/no-settings.log"; fail "exit $rc without settings, expected 2"; }
[ "$took_ms" -le 20000 ] || fail "exit 2 took $took_ms ms"
grep -q "DATASET_ID" "$LOGS/no-settings.log" || fail "the exit-2 message does not name DATASET_ID"
log "exit 2 after $took_ms ms (container start included)"

# Read from that container's file system (the image's) with `docker cp` rather than a fourth container:
# every folder on the image's PATH ("DIR/." follows a link such as /bin -> usr/bin), and any name there
# that is a C/C++/CUDA compiler driver, versioned or with a target prefix (gcc-12, x86_64-linux-gnu-g++).
# The final image carries gcc (Triton compiles its launcher with it at the first kernel launch), and
# nothing else: no C++ compiler, no nvcc (quanto's kernels are prebuilt in the build stage).
log "check: gcc and no other compiler on the image's PATH"
img_path=$(docker image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed -n 's/^PATH=//p')
[ -n "$img_path" ] || fail "the image sets no PATH"
IFS=: read -ra path_dirs <<<"$img_path"
compilers="" listed=0
for d in "${path_dirs[@]}"; do
    if ! docker cp "$NS:$d/." - >"$RUN/path-dir.tar" 2>"$LOGS/cp.log"; then
        grep -qE "No such container:path|Could not find the file" "$LOGS/cp.log" \
            || { cat "$LOGS/cp.log"; fail "cannot read $d from the container"; }
        continue
    fi
    listed=$(( listed + 1 ))
    compilers+=$(tar -tf "$RUN/path-dir.tar" | sed -n 's|^\./||p' | grep -v / |
        grep -E '(^|-)(cc|gcc|g\+\+|c\+\+|clang|clang\+\+|nvcc)(-[0-9.]+)?$' | sed "s|^| $d/|" || true)
done
rm -f "$RUN/path-dir.tar"
[ "$listed" -gt 0 ] || fail "none of the image's PATH folders could be read ($img_path)"
c_drivers=$(tr ' ' '\n' <<<"$compilers" | grep -E '/((.*-)?gcc(-[0-9.]+)?|cc)$' || true)
others=$(tr ' ' '\n' <<<"$compilers" | grep -vE '/((.*-)?gcc(-[0-9.]+)?|cc)$' | grep . || true)
[ -n "$c_drivers" ] || fail "no gcc in the final image: Triton cannot build its launcher"
[ -z "$others" ] || fail "a compiler other than gcc is in the final image: $(tr '\n' ' ' <<<"$others")"
docker cp "$NS:/usr/local/cuda" - >/dev/null 2>&1 && fail "the final image has /usr/local/cuda (the build stage's toolkit)"
docker rm "$NS" >/dev/null
log "gcc only ($(awk -F/ '{ print $NF }' <<<"$c_drivers" | sort -u | tr '\n' ' ')) in the $listed folders of $img_path"

if [ "$VARIANT" = cuda ]; then
    env_lines=$(docker image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE")
    for kv in NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility; do
        grep -qx "$kv" <<<"$env_lines" || fail "the image does not set $kv (the NVIDIA runtime would mount no driver)"
    done
    cuda_mm=$(cut -d. -f1,2 <<<"$CUDA_VERSION")
    log "check (as uid $JOB_UID): torch for CUDA $cuda_mm, bitsandbytes' CUDA library, quanto's kernels for sm_$CUDA_ARCH"
    log "  that load without compiling, no nvcc, Triton's C launcher builds and loads; --help (log: $LOGS/cuda-checks.log)"
    # shellcheck disable=SC2016
    if ! waitfor docker run --rm --network host --user "$JOB_UID:$JOB_UID" --entrypoint /bin/sh "$IMAGE" -euc '
            python /app/image_build.py check-cuda "$1" "$2"
            python /app/image_build.py check-extensions
            python /app/image_build.py check-triton
            python /app/entrypoint.py --help >/dev/null && echo "entrypoint.py --help: ok"' \
            sh "$cuda_mm" "$CUDA_ARCH" >"$LOGS/cuda-checks.log" 2>&1; then
        tail -30 "$LOGS/cuda-checks.log"
        fail "the CUDA image's checks failed"
    fi
    while IFS= read -r line; do log "  $line"; done < <(grep -vE '^\s*$|Warning|warn\(' "$LOGS/cuda-checks.log" | tail -12)
fi

log "check: demo ($STEPS steps) into a root-owned /workspace, started as root (log: $LOGS/demo-root.log)"
waitfor docker start -a "$DR" >"$LOGS/demo-root.log" 2>&1 \
    || { tail -30 "$LOGS/demo-root.log"; fail "demo as root exited non-zero"; }
docker rm "$DR" >/dev/null
adapter="$ws/output/pytorch_lora_weights.safetensors"
[ -s "$adapter" ] || { find "$ws" -maxdepth 3 -printf "%u %p\n" | head -40; fail "no adapter at $adapter"; }
[ "$(stat -c %u "$adapter")" = "$JOB_UID" ] || fail "adapter owned by uid $(stat -c %u "$adapter"), not $JOB_UID"
bad=$(find "$ws/output" ! -user "$JOB_UID" | head -5)
[ -z "$bad" ] || fail "written by another uid than $JOB_UID: $bad"
[ "$(stat -c %u "$ws")" = 0 ] || fail "the volume's root changed owner"
log "adapter $(stat -c %s "$adapter") bytes, owned by uid $JOB_UID"

log "check: demo started as --user 4321:4321 (log: $LOGS/demo-user.log)"
waitfor docker start -a "$DU" >"$LOGS/demo-user.log" 2>&1 \
    || { tail -30 "$LOGS/demo-user.log"; fail "demo as --user exited non-zero"; }
docker rm "$DU" >/dev/null
adapter2="$ws2/output/pytorch_lora_weights.safetensors"
[ -s "$adapter2" ] || fail "no adapter at $adapter2"
[ "$(stat -c %u "$adapter2")" = 4321 ] || fail "adapter owned by uid $(stat -c %u "$adapter2"), not 4321"
log "adapter written by uid 4321"
