"""Shared fixtures: the tiny built-in AuraFlow and a runner for the real CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from job import builtin
from job.config import SPECS

ROOT = Path(__file__).resolve().parents[1]
# The team's contract, beside the checkout (where the developers' machines and CI have it); tests skip without it.
CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"
# Settings the contract already names for work not landed yet (the open issue that adds each). The tests check
# every other contract setting exists, and that these do not yet: move a name out when its issue lands.
CONTRACT_PENDING = {
}


@pytest.fixture(scope="session")
def builtin_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("builtin")


@pytest.fixture(scope="session")
def tiny_model(builtin_root) -> Path:
    return builtin.tiny_model_dir(builtin_root)


def clean_env(**settings: str) -> dict[str, str]:
    """The process environment without any job setting, plus `settings` (upper-cased names)."""
    names = {s.env for s in SPECS} | {"CONFIG_FILE"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update({"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
    env.update({k.upper(): str(v) for k, v in settings.items()})
    return env


def run_cli(*args: str, timeout: float = 300, **settings) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), *args], cwd=ROOT, env=clean_env(**settings),
                          capture_output=True, text=True, timeout=timeout)
