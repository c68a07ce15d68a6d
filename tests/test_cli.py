"""End to end through the real command line: `python entrypoint.py ...` as a subprocess.

Each run of the CLI costs a few seconds (torch and diffusers import at start-up), so the runs are
declared once below, started together on a small pool when the module's first test asks for them,
and each test only inspects the result it needs. Nothing touches the network (HF_HUB_OFFLINE=1,
local folders only) and nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CONTRACT, CONTRACT_PENDING
from job.builtin import tiny_model_dir
from job.config import CONFIG_FILE_ENV, SPECS

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_" + "QwErTyUiOpAsDfGhJkLzXcVbNmQwErTyUi"  # token-shaped: hf_ + 34 letters
FAST_S = 10.0  # a bad configuration is refused within seconds, before anything heavy happens
SETTING_ENVS = {s.env for s in SPECS} | {CONFIG_FILE_ENV}


def clean_env(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without anything named like a setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_ENVS}
    env.update({"COLUMNS": "200", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"})
    env.update(settings)
    return env


@dataclass(frozen=True)
class Run:
    args: tuple[str, ...]
    rc: int
    out: str
    err: str
    elapsed: float

    def __str__(self) -> str:  # shown by failed asserts
        return (f"entrypoint.py {' '.join(self.args)} -> rc {self.rc} in {self.elapsed:.1f}s\n"
                f"--- stdout ---\n{self.out[-3000:]}\n--- stderr ---\n{self.err[-3000:]}")


def run_cli(args: list[str], settings: dict[str, str], timeout: float = 120) -> Run:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "entrypoint.py", *args], cwd=ROOT, env=clean_env(settings),
                       capture_output=True, text=True, timeout=timeout, check=False)
    return Run(tuple(args), p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


def names_var(text: str, var: str) -> bool:
    """`var` as a whole variable name (RESOLUTION does not match inside VALIDATION_RESOLUTION)."""
    return re.search(rf"(?<![A-Z0-9_]){re.escape(var)}(?![A-Z0-9_])", text) is not None


# ------------------------------------------------------------------ the runs

# A valid base for the bad-input runs: the one bad thing is what each case adds. A token is always
# present so that every run also checks it never reaches the output.
def _bad_base(data_dir: Path) -> dict[str, str]:
    return {"DATASET_ID": str(data_dir), "PUSH_TO_HUB": "false", "HF_TOKEN": TOKEN}


BAD_CASES: dict[str, tuple[list[str], dict[str, str]]] = {
    # default command (train): validation still comes first
    "learning_rate_not_a_number": ([], {"LEARNING_RATE": "abc"}),
    "learning_rate_empty": (["train"], {"LEARNING_RATE": ""}),
    "group_and_model_cpu_offload": (["check"], {"ENABLE_GROUP_OFFLOAD": "true", "ENABLE_MODEL_CPU_OFFLOAD": "true"}),
    "push_without_hub_model_id": (["check"], {"PUSH_TO_HUB": "true"}),
    # Several bad values at once; it is also the CLI-level check for each parse error below
    # (every one of them is refused on its own in test_config.py).
    "several": (["check"], {"LEARNING_RATE": "abc", "MAX_TRAIN_STEPS": "-5", "OPTIMIZER": "sgd",
                            "LYCORIS_CONFIG": '{"algo": "lokr", "factor": }', "USE_EMA": "maybe"}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[str, Future]]:
    """Start every CLI run of this module on a pool of (at most) two; tests wait on the one they need.

    Two at a time, never more, so that each run's elapsed time is its own and not a queue's: the tiny
    model is built on the pool too, while the bad-input runs (which do not need it) go on beside it."""
    tmp = tmp_path_factory.mktemp("cli")
    data_dir = tmp / "dataset"
    data_dir.mkdir()
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    futures: dict[str, Future] = {}
    try:
        build = pool.submit(tiny_model_dir, tmp / "builtin")
        for name, (args, extra) in BAD_CASES.items():
            futures[name] = pool.submit(run_cli, args, {**_bad_base(data_dir), **extra})
        model = build.result(timeout=600)
        tiny = {"MODEL_ID": str(model), "DATASET_ID": str(data_dir), "PUSH_TO_HUB": "false"}
        futures["resolution_too_large"] = pool.submit(
            run_cli, ["check"], {**tiny, "RESOLUTION": "128", "VALIDATION_RESOLUTION": "64x64"})
        futures["resolution_fits"] = pool.submit(
            run_cli, ["check"], {**tiny, "RESOLUTION": "64", "VALIDATION_RESOLUTION": "64x64"})

        # A SimpleTuner-style config.json with keys this job does not use, beneath env and CLI values;
        # the environment's LEARNING_RATE is bad, the command line's is good.
        config_file = tmp / "config.json"
        config_file.write_text(json.dumps({
            "model_family": "auraflow", "model_id": str(model), "resolution": 64, "resolution_type": "pixel",
            "validation_resolution": "64x64", "validation_torch_compile": "false", "vae_cache_ondemand": True,
            "learning_rate": "3e-3",
        }, indent=4), encoding="utf-8")
        futures["config_file_and_cli_over_env"] = pool.submit(
            run_cli, ["check", "--learning-rate", "1e-4"],
            {"CONFIG_FILE": str(config_file), "DATASET_ID": str(data_dir), "PUSH_TO_HUB": "false",
             "LEARNING_RATE": "abc"})
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def result(runs: dict[str, Future], name: str) -> Run:
    return runs[name].result(timeout=300)


# ------------------------------------------------------------------ --help


def _contract_setting_names() -> set[str]:
    text = CONTRACT.read_text(encoding="utf-8")
    section = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))


@pytest.fixture(scope="module")
def help_run() -> Run:
    return run_cli(["--help"], {})


def test_help_exits_0(help_run):
    assert help_run.rc == 0, help_run
    assert "Usage" in help_run.out


def test_help_lists_every_setting_variable(help_run):
    expected = sorted(SETTING_ENVS)
    missing = [v for v in expected if not re.search(rf"env var:\s+{v}\]", help_run.out)]
    assert missing == [], help_run


def test_help_lists_every_contract_setting(help_run):
    if not CONTRACT.is_file():
        pytest.skip("CONTRACT.md not available")
    names = _contract_setting_names()
    assert {"LEARNING_RATE", "LYCORIS_CONFIG", "HF_TOKEN", "CONFIG_FILE"} <= names  # the section parsed
    missing = sorted(v for v in names - set(CONTRACT_PENDING) if not re.search(rf"env var:\s+{v}\]", help_run.out))
    assert missing == [], help_run


# ------------------------------------------------------------------ bad input: exit 2, named, fast

BAD_EXPECTATIONS = [
    # (run, variable that must be named, a text the message must hold)
    ("learning_rate_not_a_number", "LEARNING_RATE", "'abc'"),
    ("learning_rate_empty", "LEARNING_RATE", "empty"),
    ("group_and_model_cpu_offload", "ENABLE_GROUP_OFFLOAD", "ENABLE_MODEL_CPU_OFFLOAD"),
    ("push_without_hub_model_id", "PUSH_TO_HUB", "HUB_MODEL_ID"),
    ("several", "LEARNING_RATE", "'abc'"),
    ("several", "MAX_TRAIN_STEPS", "'-5'"),
    ("several", "OPTIMIZER", "'sgd'"),
    ("several", "LYCORIS_CONFIG", "JSON"),
    ("several", "USE_EMA", "'maybe'"),
]


@pytest.mark.parametrize("name,var,text", BAD_EXPECTATIONS, ids=[f"{n}-{v}" for n, v, _ in BAD_EXPECTATIONS])
def test_bad_input_exits_2_naming_the_variable_quickly(runs, name, var, text):
    r = result(runs, name)
    assert r.rc == 2, r
    lines = [ln for ln in r.err.splitlines() if names_var(ln, var)]
    assert lines, f"{var} not named\n{r}"
    assert any(text in ln for ln in lines), f"{var} named without {text!r}\n{r}"
    assert r.elapsed < FAST_S, r


def test_several_bad_values_are_reported_in_one_run(runs):
    r = result(runs, "several")
    assert r.rc == 2, r
    named = {var for n, var, _ in BAD_EXPECTATIONS if n == "several" and names_var(r.err, var)}
    assert named == {"LEARNING_RATE", "MAX_TRAIN_STEPS", "OPTIMIZER", "LYCORIS_CONFIG", "USE_EMA"}, r
    assert "5 invalid setting" in r.err, r


def test_bad_input_ends_with_a_message_not_a_traceback(runs):
    for name in BAD_CASES:
        r = result(runs, name)
        assert r.rc == 2, r
        assert "Traceback" not in r.err, r


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_token_never_appears_in_the_output(runs, name):
    r = result(runs, name)
    assert r.rc == 2, r
    assert TOKEN not in r.out and TOKEN not in r.err, r
    assert TOKEN[3:] not in r.out + r.err  # not even without its prefix


# ------------------------------------------------------------------ the model's own patch grid


def test_resolution_beyond_the_tiny_models_grid_is_refused(runs):
    r = result(runs, "resolution_too_large")
    assert r.rc == 2, r
    lines = [ln for ln in r.err.splitlines() if names_var(ln, "RESOLUTION")]
    assert lines and any("128" in ln for ln in lines), r
    assert not names_var(r.err, "VALIDATION_RESOLUTION"), r  # 64x64 fits
    assert r.elapsed < FAST_S * 2, r


def test_resolution_inside_the_tiny_models_grid_passes_check(runs):
    r = result(runs, "resolution_fits")
    assert r.rc == 0, r
    assert "invalid setting" not in r.err, r


# ------------------------------------------------------------------ layering and the config file


def test_cli_option_wins_over_the_environment(runs):
    r = result(runs, "config_file_and_cli_over_env")
    assert r.rc == 0, r  # env LEARNING_RATE=abc would be exit 2
    assert not names_var(r.err, "LEARNING_RATE"), r


def test_config_file_unknown_keys_are_named_in_a_warning(runs):
    r = result(runs, "config_file_and_cli_over_env")
    warnings = [ln for ln in r.err.splitlines() if "WARNING" in ln or "warning" in ln.lower()]
    text = "\n".join(warnings)
    assert "validation_torch_compile" in text and "vae_cache_ondemand" in text, r
    assert "model_family" not in text, r  # a key the job knows is not listed as ignored


def test_the_cuda_allocator_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    """Set before anything can touch CUDA (a run that fails validation has set it too), inherited by the ranks."""
    from job import cli

    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", *(s.env for s in SPECS)):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as e:
        cli.app(["check"])  # no DATASET_ID: exit 2
    assert e.value.code == 2
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        monkeypatch.setenv(var, "max_split_size_mb:128")
        with pytest.raises(SystemExit):
            cli.app(["check"])
        assert os.environ[var] == "max_split_size_mb:128"
        assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128") == "max_split_size_mb:128"
        monkeypatch.delenv(var)
