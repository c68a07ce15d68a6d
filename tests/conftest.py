"""Shared fixtures and helpers: the tiny built-in AuraFlow, the settings that train it in seconds, and a runner
for the real CLI (`python entrypoint.py ...` in a subprocess, with no job setting inherited from this process)."""
from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from job import builtin
from job.config import CONFIG_FILE_ENV, SPECS
from job.pipeline import DEMO_LYCORIS

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # the same for the tests that train in this process (see clean_env)
SETTING_ENVS = {s.env for s in SPECS} | {CONFIG_FILE_ENV}

# The tiny model at its full 64 px, in fp32 without checkpointing, with AdamW: a step takes milliseconds.
TINY = dict(resolution=64, resolution_type="pixel", validation_resolution="64x64", push_to_hub="false",
            mixed_precision="no", gradient_checkpointing="false", optimizer="adamw", flow_schedule_shift="1.0",
            validation_num_inference_steps="2")
ALL_LINEAR = json.dumps(DEMO_LYCORIS)  # LoKr over every Linear of the tiny transformer


@pytest.fixture(scope="session")
def builtin_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("builtin")


@pytest.fixture(scope="session")
def tiny_model(builtin_root) -> Path:
    return builtin.tiny_model_dir(builtin_root)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


HUB_MODEL, HUB_DATA = "tester/tiny-auraflow", "tester/one-circle"


@pytest.fixture(scope="module")
def hub(tiny_model, tmp_path_factory):
    """A Hub look-alike on 127.0.0.1 (tests/hubserver.py, a free port) with the tiny model, a one-image dataset and
    a gated copy of the model; the adapter goes the LFS way, configs the regular way."""
    from hubserver import start_hub

    server = start_hub(lfs_threshold=8 * 1024)
    server.model_commit = server.add_repo(HUB_MODEL, tree(tiny_model))
    server.add_repo(HUB_DATA, tree(builtin.single_image_dataset_dir(tmp_path_factory.mktemp("d"))), repo_type="dataset")
    server.add_repo("mallory/gated-auraflow", tree(tiny_model), gated=True)
    yield server
    server.stop()


def losses(out: Path) -> list[float]:
    """The training loss of every step a run logged to OUTPUT_DIR/metrics.jsonl."""
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    """The adapter a run wrote to OUTPUT_DIR `out`."""
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def wait_for_steps(out: Path, procs: list[subprocess.Popen], logs: list[Path], n: int = 1,
                   timeout: float = 120) -> None:
    """Until OUTPUT_DIR `out` has `n` rows of metrics; a process that exits first fails the test with its log."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs):
            assert p.poll() is None, log.read_text()[-3000:]
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step after {timeout}s")


@pytest.fixture
def receiver():
    """An HTTP server on 127.0.0.1 that takes POSTs: `.url`, `.got` [(path, content type, body)], `.events()`."""
    got: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.path, self.headers["Content-Type"], body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.got, server.url = got, f"http://127.0.0.1:{server.server_address[1]}"
    server.events = lambda: [json.loads(body) for _, _, body in got]
    yield server
    server.shutdown()


def clean_env(**settings) -> dict[str, str]:
    """This process's environment without anything named like a setting, plus `settings` (names upper-cased)."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_ENVS}
    # One compute thread: the tiny model's ops are too small to split, and with pytest-xdist every core already runs
    # a test (two threads per run made a 24-step run 3x slower on 2 busy cores: OpenMP's idle threads spin).
    env.update({"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1",
                "OMP_NUM_THREADS": "1"})
    env.update({k.upper(): str(v) for k, v in settings.items()})
    return env


@dataclass(frozen=True)
class Run:
    """A finished CLI run: what subprocess.run gives, plus its wall time, printed whole by a failed assert."""
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    def __str__(self) -> str:
        return (f"entrypoint.py {' '.join(self.args)} -> rc {self.returncode} in {self.elapsed:.1f}s\n"
                f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}")


# What makes a run heavy: a refusal that comes before any of these are imported came within a second or two.
HEAVY = {"torch", "diffusers", "transformers", "numpy"}
# Set in a run's environment, Python lists every module it imports on stderr (`import time: ... | module`).
LIST_IMPORTS = {"PYTHONPROFILEIMPORTTIME": "1"}


def imported(run: Run) -> set[str]:
    """The top-level packages a run started with LIST_IMPORTS imported."""
    return {ln.rsplit("|", 1)[-1].strip().split(".")[0] for ln in run.stderr.splitlines() if ln.startswith("import time:")}


def run_cli(*args: str, timeout: float = 300, **settings) -> Run:
    """`python entrypoint.py *args` with `settings` as environment variables (lower-case names are fine).

    Forked from this test process's zygote (tests/zygote.py: torch already imported, nothing that reads a setting),
    or a new interpreter where the run lists its imports (LIST_IMPORTS) or JOB_TESTS_FRESH_PYTHON=1 is set."""
    env = clean_env(**settings)
    t0 = time.monotonic()
    if "PYTHONPROFILEIMPORTTIME" in env or os.environ.get("JOB_TESTS_FRESH_PYTHON") == "1":
        p = subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout, check=False)
        return Run(tuple(args), p.returncode, p.stdout, p.stderr, time.monotonic() - t0)
    returncode, stdout, stderr = _zygote().run([str(ROOT / "entrypoint.py"), *args], env, timeout)
    return Run(tuple(args), returncode, stdout, stderr, time.monotonic() - t0)


class Zygote:
    """The client side of tests/zygote.py; one per test process, started at its first run_cli."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="zygote-"))
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zygote.py"))], cwd=ROOT,
                                     env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=(self.folder / "zygote.log").open("w"))
        self.lock, self.pending = threading.Lock(), b""
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str]:
        out, err = self.folder / "stdout", self.folder / "stderr"
        with self.lock:
            self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "cwd": str(ROOT), "stdout": str(out),
                                              "stderr": str(err)}).encode() + b"\n")
            self.proc.stdin.flush()
            pid = self._answer(300)["pid"]  # the first answer waits for the zygote's imports
            try:
                returncode = self._answer(timeout)["returncode"]
            except BaseException:  # our timeout, or pytest-timeout's: the run must not outlive the test
                os.kill(pid, signal.SIGKILL)
                self._answer(60)  # its return code, so the next run reads its own answers
                raise
            return returncode, out.read_text(errors="replace"), err.read_text(errors="replace")

    def _answer(self, timeout: float) -> dict:
        """The zygote's next line (read unbuffered: the pid and the return code can arrive together)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            if not select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise subprocess.TimeoutExpired(self.proc.args, timeout)
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("the zygote exited: " + (self.folder / "zygote.log").read_text()[-3000:])
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)


_zygotes: dict[int, Zygote] = {}


def _zygote() -> Zygote:
    if os.getpid() not in _zygotes:  # per process: a test that forks must not share this one's pipes
        _zygotes[os.getpid()] = Zygote()
    return _zygotes[os.getpid()]
