#!/bin/sh
# Build stage only (Dockerfile): nvcc, its device compiler and the CUDA headers, at the CUDA release of the
# installed torch, linked into $CUDA_HOME for quanto's kernels. Nothing here reaches the final stage.
#   CUDA 13 on: NVIDIA's wheels (`cuda-toolkit[nvcc,...]` at torch's pin), into /opt/cuda-toolkit, beside
#               the venv and not in it;
#   CUDA 12:    NVIDIA's apt repository for this distribution (CUDA_APT_REPO overrides it): CUDA 12's nvcc
#               wheel holds ptxas alone. Not built in CI (its torch comes from PyTorch's index).
# PIP_EXTRA_ARGS (a build argument) goes to pip, as for every install of the build.
set -eu

site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# shellcheck disable=SC2046 # several words: the kind, then the requirements or packages
set -- $(python /opt/image_build.py cuda-toolkit-req)
kind=$1
shift
case $kind in
    wheels)
        # shellcheck disable=SC2086 # PIP_EXTRA_ARGS holds several options
        pip install --target /opt/cuda-toolkit ${PIP_EXTRA_ARGS:-} "$@"
        tree=/opt/cuda-toolkit ;;
    apt)
        # shellcheck disable=SC1091
        . /etc/os-release
        distro=$(printf '%s%s' "$ID" "$VERSION_ID" | tr -d .)  # debian12, ubuntu2404
        repo=${CUDA_APT_REPO:-https://developer.download.nvidia.com/compute/cuda/repos/$distro/$(uname -m)}
        python -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
            "$repo/cuda-keyring_1.1-1_all.deb" /tmp/cuda-keyring.deb
        dpkg -i /tmp/cuda-keyring.deb
        apt-get -o Acquire::Retries=3 update
        apt-get -o Acquire::Retries=3 install -y --no-install-recommends "$@"
        rm -rf /var/lib/apt/lists/* /tmp/cuda-keyring.deb
        tree=$(find /usr/local -maxdepth 1 -name 'cuda-12.*' -type d | sort | tail -1) ;;
    *)
        echo "cuda_toolchain.sh: unexpected answer from cuda-toolkit-req: $kind $*" >&2
        exit 1 ;;
esac
python /opt/image_build.py cuda-home "$CUDA_HOME" "$tree" "$site"
