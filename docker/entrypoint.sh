#!/bin/sh
# The image's entrypoint: `python /app/entrypoint.py "$@"`, run as the unprivileged user `trainer`.
#
# RunPod and Vast.ai mount the /workspace volume owned by root, and `docker run -v /data:/workspace`
# often does too. Started as root (the default), this script creates the folders the job writes
# (OUTPUT_DIR, HF_HOME, GROUP_OFFLOAD_TO_DISK_PATH, from the environment or the matching options),
# hands them to `trainer`, and only then drops privileges with setpriv. Started as another user
# (`docker run --user 1234:1234`), it runs the job as that user and changes nothing.
set -eu

JOB_USER=trainer
JOB="/app/entrypoint.py"

say() { printf 'entrypoint: %s\n' "$*" >&2; }

# The folders the job writes into, one a line: the environment's, then any given as options.
job_dirs() {
    printf '%s\n' "${OUTPUT_DIR:-./output}" "${HF_HOME:-}" "${GROUP_OFFLOAD_TO_DISK_PATH:-}"
    prev=""
    for arg in "$@"; do
        case $prev in
            --output-dir | --hf-home | --group-offload-to-disk-path) printf '%s\n' "$arg" ;;
        esac
        case $arg in
            --output-dir=* | --hf-home=* | --group-offload-to-disk-path=*) printf '%s\n' "${arg#*=}" ;;
        esac
        prev=$arg
    done
}

wants_help() {
    for arg in "$@"; do
        case $arg in --help | -h) return 0 ;; esac
    done
    return 1
}

# A home the job can write (caches of the demo model, triton, matplotlib): `docker run --user` with a
# uid the image doesn't know gets HOME=/.
writable_home() {
    if [ -z "${HOME:-}" ] || [ "$HOME" = / ] || ! [ -w "$HOME" ]; then
        HOME="${TMPDIR:-/tmp}/home-$(id -u)"
        mkdir -p "$HOME"
        export HOME
    fi
}

if [ "$(id -u)" != 0 ]; then
    writable_home
    exec python "$JOB" "$@"
fi

uid=$(id -u "$JOB_USER")
gid=$(id -g "$JOB_USER")
problems=""
dirs=$(job_dirs "$@")
old_ifs=$IFS
IFS='
'
for dir in $dirs; do
    [ -n "$dir" ] || continue
    if ! mkdir -p "$dir" 2>/dev/null; then
        problems="$problems $dir"
        continue
    fi
    real=$(cd "$dir" && pwd -P)
    case $real in
        / | /bin | /boot | /dev | /etc | /home | /lib* | /proc | /root | /run | /sbin | /sys | /usr | /var)
            say "not taking ownership of $real (named by a setting): choose a folder of its own"
            continue ;;
    esac
    # Only what is not trainer's yet, so a restart over a full HF_HOME costs one directory walk.
    find "$real" -xdev ! -user "$uid" -exec chown -h "$uid:$gid" {} + 2>/dev/null || true
    if ! setpriv --reuid="$uid" --regid="$gid" --init-groups test -w "$real"; then
        problems="$problems $dir"
    fi
done
IFS=$old_ifs

if [ -n "$problems" ] && ! wants_help "$@"; then
    say "cannot make these folders writable for the job's user $JOB_USER (uid $uid):$problems"
    say "mount a volume that root may chown, or start the container with --user set to the volume's owner"
    exit 2
fi

export HOME="/home/$JOB_USER" USER="$JOB_USER" LOGNAME="$JOB_USER"
exec setpriv --reuid="$uid" --regid="$gid" --init-groups python "$JOB" "$@"
