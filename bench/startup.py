"""Start-up cost: wall time from process start to the first optimizer step of `demo`, where it goes (phases from
status.json), the import time of the job alone, and the fail-fast time of `check` with an invalid setting.
Targets: first step within 10 s of process start; a bad setting answered in under 2 s."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "XDG_CACHE_HOME", "LANG")}
    return {**env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **kw}


def _timed(args: list[str], **env) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True)
    return time.perf_counter() - t0, r


def run() -> dict:
    imports = statistics.median(_timed(["-c", "import job.pipeline"])[0] for _ in range(3))
    python = statistics.median(_timed(["-c", "pass"])[0] for _ in range(3))
    fail_fast = statistics.median(_timed(["entrypoint.py", "check"], LEARNING_RATE="abc")[0] for _ in range(3))
    _timed(["entrypoint.py", "demo"], OUTPUT_DIR=tempfile.mkdtemp(), MAX_TRAIN_STEPS="1")  # builds the tiny model
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        _, r = _timed(["entrypoint.py", "demo"], OUTPUT_DIR=out, MAX_TRAIN_STEPS="1", VALIDATION_STEP_INTERVAL="0")
        assert r.returncode == 0, r.stderr[-2000:]
        first_step = json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[0])["time"]
        phases = json.loads(Path(out, "status.json").read_text())["phase_started"]
    return {
        "startup_s_to_first_step": round(first_step - t0, 2),
        "startup_s_imports_and_preflight": round(phases["download"] - t0, 2),
        "startup_s_caching": round(phases["training"] - phases["caching"], 2),
        "startup_s_training_phase_to_first_step": round(first_step - phases["training"], 2),
        "import_s_job_pipeline": round(imports - python, 2),
        "fail_fast_s_check_invalid": round(fail_fast, 2),
    }
