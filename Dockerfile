# AuraFlow LyCORIS LoKr training job. One file, two CUDA variants, one CUDA stack each (torch's wheels):
#
#   docker build -t auraflow-lokr-job:latest .                                       # CUDA 12.8, torch cu128
#   docker build --build-arg CUDA_VERSION=13.0.2 -t auraflow-lokr-job:cu130 .         # CUDA 13.0, torch cu130
#
# The base is plain Debian 12 (Python 3.11), not nvidia/cuda: torch's wheels bring their own CUDA runtime,
# cuBLAS, cuDNN, NCCL and Triton, the only CUDA torch loads, so an nvidia/cuda base would ship it twice.
# CUDA_VERSION picks the wheel index for torch (PyPI for 13.0, PyTorch's index for 12.8) and, in the build
# stage only, nvcc and the CUDA headers of torch's CUDA release, which compile quanto's kernels: NVIDIA's
# wheels for 13.0, NVIDIA's apt repository for 12.8 (CUDA 12's nvcc wheel holds only ptxas).
# The final stage has the venv, the prebuilt kernels, gcc and the Python headers (Triton compiles its
# C launcher at the first kernel launch; optimi and LyCORIS use Triton on CUDA), but no nvcc.
# BASE_IMAGE (build stage) and RUNTIME_IMAGE (final stage) put the same file on another Debian/Ubuntu base:
# scripts/image_smoke.sh builds it on a debootstrap Debian with local wheelhouses (CPU, and CUDA 13.0).

ARG CUDA_VERSION=12.8.1
ARG BASE_IMAGE=debian:bookworm-slim
ARG RUNTIME_IMAGE=${BASE_IMAGE}

# ---------------------------------------------------------------- build: venv, project, quanto kernels
FROM ${BASE_IMAGE} AS build

# MAJOR.MINOR[.PATCH], or "cpu" for a CPU torch (the smoke test's).
ARG CUDA_VERSION
# The torch every test runs with; pyproject.toml's range must contain it.
ARG TORCH_VERSION=2.13.0
# Empty: PyPI for CUDA 13.0, https://download.pytorch.org/whl/cuXYZ for the others (docker/image_build.py).
ARG TORCH_INDEX_URL=""
# Extra pip options for every install, e.g. "--no-index --find-links http://127.0.0.1:8765/" (the smoke test).
ARG PIP_EXTRA_ARGS=""

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    CUDA_HOME=/usr/local/cuda

SHELL ["/bin/sh", "-eu", "-c"]

# g++ for quanto's C++ kernels and as nvcc's host compiler; python3-dev for their headers.
RUN apt-get -o Acquire::Retries=3 update \
 && apt-get -o Acquire::Retries=3 install -y --no-install-recommends ca-certificates g++ python3 python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# Dependencies first (a layer that survives code changes): torch at TORCH_VERSION from the index for this
# CUDA (it brings its CUDA libraries as nvidia-* wheels), then every other pin of pyproject.toml, then
# ninja for the kernels.
COPY pyproject.toml /src/pyproject.toml
COPY docker/image_build.py docker/cuda_toolchain.sh /opt/
# PIP_EXTRA_ARGS is unquoted on purpose: it holds several options (SC2086).
# hadolint ignore=SC2086
RUN python /opt/image_build.py requirements /src/pyproject.toml /tmp/req "$TORCH_VERSION" \
 && index="${TORCH_INDEX_URL:-$(python /opt/image_build.py torch-index "$CUDA_VERSION")}" \
 && pip install --index-url "$index" $PIP_EXTRA_ARGS -r /tmp/req/torch.txt \
 && python /opt/image_build.py check-torch "$CUDA_VERSION" \
 && pip install $PIP_EXTRA_ARGS -r /tmp/req/deps.txt ninja==1.13.2 \
 && pip check

# quanto's kernels, built once here instead of on every pod (see docker/image_build.py), by nvcc of torch's
# CUDA release (docker/cuda_toolchain.sh: NVIDIA's wheels for CUDA 13, NVIDIA's apt repository for CUDA 12;
# outside the venv, so the final stage does not get it). On a CPU torch only the C++ kernels.
# One layer: the build stage's layers are full copies of the venv under the vfs storage driver.
# The GPU architectures come here, after the dependencies: another list rebuilds the kernels only.
# Ampere (8.0, 8.6), Ada (8.9), Hopper (9.0), Blackwell (10.0, 12.0); all compile with CUDA 12.8 and 13.0.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0"
# nvcc jobs at once: Marlin's kernels take about 3 GB of RAM per job (measured, one arch); 4 fits 24 GB.
ARG MAX_JOBS=4
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    TORCH_EXTENSION_SKIP_NVCC_GEN_DEPENDENCIES=1 \
    QUANTO_CUDA_ARCH=800 \
    MAX_JOBS=${MAX_JOBS}
RUN python /opt/image_build.py pin-quanto-arch \
 && if python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then sh /opt/cuda_toolchain.sh; fi \
 && python /opt/image_build.py prebuild-extensions

# The project itself, without touching the dependencies installed above.
COPY README.md /src/README.md
COPY job /src/job
# /src is this project, not a registry package: its dependencies are the pins installed above (DL3013).
# hadolint ignore=DL3013,SC2086
RUN pip install --no-deps $PIP_EXTRA_ARGS /src \
 && pip check

# ---------------------------------------------------------------- runtime: the job, non-root
FROM ${RUNTIME_IMAGE}

ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0"

# The TORCH_*, CUDA_HOME and QUANTO_CUDA_ARCH values must equal the build stage's, or quanto recompiles
# (CUDA_HOME is only a string here: no nvcc in this stage). NVIDIA_* tell the NVIDIA container runtime to
# mount the driver's compute libraries and nvidia-smi (the nvidia/cuda images set them).
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    CUDA_HOME=/usr/local/cuda \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    TORCH_EXTENSION_SKIP_NVCC_GEN_DEPENDENCIES=1 \
    TORCH_DONT_CHECK_COMPILER_ABI=1 \
    QUANTO_CUDA_ARCH=800 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/workspace/hf \
    OUTPUT_DIR=/workspace/output

SHELL ["/bin/sh", "-eu", "-c"]

# Few layers after the venv: under the vfs storage driver each one is a full copy of the image, so
# WORKDIR comes first and the job's files arrive in one COPY.
WORKDIR /workspace

# python3 for the venv, setpriv (util-linux) to drop root, tini to reap and forward signals; gcc,
# libc6-dev and python3-dev for Triton's launcher (it looks for gcc or clang, and Python.h).
# An Ubuntu 24.04 base has a user `ubuntu` at uid 1000: the job's user takes that uid instead.
RUN apt-get -o Acquire::Retries=3 update \
 && apt-get -o Acquire::Retries=3 install -y --no-install-recommends ca-certificates python3 tini util-linux \
        gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 trainer \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/sh trainer

COPY --from=build /opt/venv /opt/venv
COPY entrypoint.py docker/entrypoint.sh docker/image_build.py /app/

# Load the prebuilt kernels here and fail the build if loading compiled anything again (rather than every
# pod); build and load Triton's launcher once. The job's user owns the kernels' build folder (the loader
# takes a lock file there); group 0 too, for `docker run --user UID` (such a user's group is 0).
RUN python /app/image_build.py check-extensions \
 && python /app/image_build.py check-triton \
 && for d in /opt/venv/lib/python3*/site-packages/optimum/quanto/library/extensions/*/build; do \
        chown -R trainer:0 "$d" && chmod -R ug+rwX "$d"; \
    done \
 && mv /app/entrypoint.sh /usr/local/bin/job-entrypoint \
 && chmod 0755 /usr/local/bin/job-entrypoint \
 && python /app/entrypoint.py --help > /dev/null

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/job-entrypoint"]
CMD ["train"]
