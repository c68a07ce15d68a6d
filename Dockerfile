# AuraFlow LyCORIS LoKr training job. One file, two CUDA variants:
#
#   docker build -t auraflow-lokr-job:latest .                                       # CUDA 12.8, torch cu128
#   docker build --build-arg CUDA_VERSION=13.0.2 -t auraflow-lokr-job:cu130 .         # CUDA 13.0, torch cu130
#
# CUDA_VERSION picks the nvidia/cuda base images (cuDNN, Ubuntu 24.04) and the PyTorch wheel index
# (cuMAJORMINOR). BASE_IMAGE (build stage) and RUNTIME_IMAGE (final stage) put the same file on another
# base: scripts/image_smoke.sh builds it on plain Debian with a CPU torch from a local wheelhouse.
# The final stage carries the venv and the prebuilt quanto kernels, not the compiler that built them.

ARG CUDA_VERSION=12.8.1
ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu24.04
ARG RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- build: venv, project, quanto kernels
FROM ${BASE_IMAGE} AS build

ARG CUDA_VERSION
# Empty: https://download.pytorch.org/whl/cuXYZ for CUDA_VERSION.
ARG TORCH_INDEX_URL=""
# Extra pip options for every install, e.g. "--no-index --find-links http://127.0.0.1:8765/" (the smoke test).
ARG PIP_EXTRA_ARGS=""
# Ampere (8.0, 8.6), Ada (8.9), Hopper (9.0), Blackwell (10.0, 12.0); all compile with CUDA 12.8 and 13.0.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0"
ARG MAX_JOBS=4

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    CUDA_HOME=/usr/local/cuda \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    TORCH_EXTENSION_SKIP_NVCC_GEN_DEPENDENCIES=1 \
    QUANTO_CUDA_ARCH=800 \
    MAX_JOBS=${MAX_JOBS}

SHELL ["/bin/sh", "-eu", "-c"]

# g++ for quanto's C++ kernels (the CUDA devel images have it already); python3-dev for their headers.
RUN apt-get -o Acquire::Retries=3 update \
 && apt-get -o Acquire::Retries=3 install -y --no-install-recommends ca-certificates g++ python3 python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# Dependencies first (a layer that survives code changes): torch from the PyTorch index for this CUDA,
# within pyproject's range, then every other pin of pyproject.toml, then ninja for the kernels.
COPY pyproject.toml /src/pyproject.toml
COPY docker/image_build.py /opt/image_build.py
# PIP_EXTRA_ARGS is unquoted on purpose: it holds several options (SC2086).
# hadolint ignore=SC2086
RUN python /opt/image_build.py requirements /src/pyproject.toml /tmp/req \
 && index="${TORCH_INDEX_URL:-$(python /opt/image_build.py torch-index "$CUDA_VERSION")}" \
 && pip install --index-url "$index" $PIP_EXTRA_ARGS -r /tmp/req/torch.txt \
 && pip install $PIP_EXTRA_ARGS -r /tmp/req/deps.txt ninja==1.13.2 \
 && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# quanto's kernels, built once here instead of on every pod (see docker/image_build.py). The CUDA
# extension is skipped on a CPU torch.
RUN python /opt/image_build.py pin-quanto-arch \
 && python /opt/image_build.py prebuild-extensions

# The project itself, without touching the dependencies installed above.
COPY README.md /src/README.md
COPY job /src/job
# /src is this project, not a registry package: its dependencies are the pins installed above (DL3013).
# hadolint ignore=DL3013,SC2086
RUN pip install --no-deps $PIP_EXTRA_ARGS /src

# ---------------------------------------------------------------- runtime: no compiler, non-root job
FROM ${RUNTIME_IMAGE}

ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0"

# The TORCH_*, CUDA_HOME and QUANTO_CUDA_ARCH values must equal the build stage's, or quanto recompiles.
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    CUDA_HOME=/usr/local/cuda \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    TORCH_EXTENSION_SKIP_NVCC_GEN_DEPENDENCIES=1 \
    TORCH_DONT_CHECK_COMPILER_ABI=1 \
    QUANTO_CUDA_ARCH=800 \
    HF_HOME=/workspace/hf \
    OUTPUT_DIR=/workspace/output

SHELL ["/bin/sh", "-eu", "-c"]

# Few layers after the venv: each one is a full copy of the image under the vfs storage driver (the
# smoke test's), so WORKDIR comes first and the job's files arrive in one COPY.
WORKDIR /workspace

# python3 for the venv, setpriv (util-linux) to drop root, tini to reap and forward signals.
# The Ubuntu 24.04 base has a user `ubuntu` at uid 1000: the job's user takes that uid instead.
RUN apt-get -o Acquire::Retries=3 update \
 && apt-get -o Acquire::Retries=3 install -y --no-install-recommends ca-certificates python3 tini util-linux \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 trainer \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/sh trainer

COPY --from=build /opt/venv /opt/venv
COPY entrypoint.py docker/entrypoint.sh docker/image_build.py /app/

# Load the prebuilt kernels here, where no compiler exists: a rebuild would fail the image build
# instead of every pod. The job's user owns their build folder (the loader takes a lock file there);
# group 0 too, for `docker run --user UID` (such a user's group is 0).
RUN python /app/image_build.py check-extensions \
 && for d in /opt/venv/lib/python3*/site-packages/optimum/quanto/library/extensions/*/build; do \
        chown -R trainer:0 "$d" && chmod -R ug+rwX "$d"; \
    done \
 && mv /app/entrypoint.sh /usr/local/bin/job-entrypoint \
 && chmod 0755 /usr/local/bin/job-entrypoint \
 && python /app/entrypoint.py --help > /dev/null

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/job-entrypoint"]
CMD ["train"]
