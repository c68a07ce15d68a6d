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
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import HEAVY, LIST_IMPORTS, SETTING_ENVS, Run, imported, run_cli
from job.config import SPECS

TOKEN = "hf_" + "QwErTyUiOpAsDfGhJkLzXcVbNmQwErTyUi"  # token-shaped: hf_ + 34 letters


def names_var(text: str, var: str) -> bool:
    """`var` as a whole variable name (RESOLUTION does not match inside VALIDATION_RESOLUTION)."""
    return re.search(rf"(?<![A-Z0-9_]){re.escape(var)}(?![A-Z0-9_])", text) is not None


# ------------------------------------------------------------------ the runs

# A valid base for the bad-input runs: the one bad thing is what each case adds. A token is always
# present so that every run also checks it never reaches the output.
def _bad_base(data_dir: Path) -> dict[str, str]:
    return {"DATASET_ID": str(data_dir), "PUSH_TO_HUB": "false", "HF_TOKEN": TOKEN, **LIST_IMPORTS}


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
def cli_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def runs(cli_tmp) -> Iterator[dict[str, Future]]:
    """Start every CLI run of this module on a pool of (at most) two; tests wait on the one they need.

    The bad-input runs go first: they are refused before torch is imported, in seconds (the fast set's)."""
    tmp = cli_tmp
    data_dir = tmp / "dataset"
    data_dir.mkdir()
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    futures: dict[str, Future] = {}
    try:
        for name, (args, extra) in BAD_CASES.items():
            futures[name] = pool.submit(run_cli, *args, **{**_bad_base(data_dir), **extra})
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def model_runs(cli_tmp, tiny_model) -> Iterator[dict[str, Future]]:
    """The runs that read the tiny model (torch and diffusers imported: several seconds each), two at a time."""
    tmp = cli_tmp
    data_dir = tmp / "dataset"
    data_dir.mkdir(exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    futures: dict[str, Future] = {}
    try:
        tiny = {"MODEL_ID": str(tiny_model), "DATASET_ID": str(data_dir), "PUSH_TO_HUB": "false"}
        # `train` on the tiny model's config files alone: a refusal there was decided before any weight was needed
        configs_only = tmp / "configs-only"
        shutil.copytree(tiny_model, configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
        futures["resolution_too_large"] = pool.submit(
            run_cli, "train", **{**tiny, "MODEL_ID": str(configs_only)}, RESOLUTION="128",
            VALIDATION_RESOLUTION="64x64", OUTPUT_DIR=str(tmp / "too-large-out"))
        futures["resolution_fits"] = pool.submit(
            run_cli, "check", **tiny, RESOLUTION="64", VALIDATION_RESOLUTION="64x64")

        # A SimpleTuner-style config.json with keys this job does not use, beneath env and CLI values;
        # the environment's LEARNING_RATE is bad, the command line's is good.
        config_file = tmp / "config.json"
        config_file.write_text(json.dumps({
            "model_family": "auraflow", "model_id": str(tiny_model), "resolution": 64, "resolution_type": "pixel",
            "validation_resolution": "64x64", "validation_torch_compile": "false", "vae_cache_ondemand": True,
            "learning_rate": "3e-3",
        }, indent=4), encoding="utf-8")
        futures["config_file_and_cli_over_env"] = pool.submit(
            run_cli, "check", "--learning-rate", "1e-4",
            CONFIG_FILE=str(config_file), DATASET_ID=str(data_dir), PUSH_TO_HUB="false", LEARNING_RATE="abc")
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def result(runs: dict[str, Future], name: str) -> Run:
    return runs[name].result(timeout=300)


# ------------------------------------------------------------------ --help


@pytest.fixture(scope="module")
def help_run() -> Run:
    return run_cli("--help")


def test_help_exits_0(help_run):
    assert help_run.returncode == 0, help_run
    assert "Usage" in help_run.stdout


def test_help_lists_every_setting_variable(help_run):
    """Every setting, so every one the README documents (test_docs.py: the README's tables are exactly these)."""
    expected = sorted(SETTING_ENVS)
    missing = [v for v in expected if not re.search(rf"env var:\s+{v}\]", help_run.stdout)]
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
def test_bad_input_exits_2_naming_the_variable_before_anything_heavy(runs, name, var, text):
    r = result(runs, name)
    assert r.returncode == 2, r
    lines = [ln for ln in r.stderr.splitlines() if names_var(ln, var)]
    assert lines, f"{var} not named\n{r}"
    assert any(text in ln for ln in lines), f"{var} named without {text!r}\n{r}"
    assert "job" in imported(r) and not HEAVY & imported(r), r  # refused before torch or diffusers was imported


def test_several_bad_values_are_reported_in_one_run(runs):
    r = result(runs, "several")
    assert r.returncode == 2, r
    named = {var for n, var, _ in BAD_EXPECTATIONS if n == "several" and names_var(r.stderr, var)}
    assert named == {"LEARNING_RATE", "MAX_TRAIN_STEPS", "OPTIMIZER", "LYCORIS_CONFIG", "USE_EMA"}, r
    assert "5 invalid setting" in r.stderr, r


def test_bad_input_ends_with_a_message_not_a_traceback(runs):
    for name in BAD_CASES:
        r = result(runs, name)
        assert r.returncode == 2, r
        assert "Traceback" not in r.stderr, r


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_token_never_appears_in_the_output(runs, name):
    r = result(runs, name)
    assert r.returncode == 2, r
    assert TOKEN not in r.stdout and TOKEN not in r.stderr, r
    assert TOKEN[3:] not in r.stdout + r.stderr  # not even without its prefix


# ------------------------------------------------------------------ the model's own patch grid


@pytest.mark.slow
def test_resolution_beyond_the_tiny_models_grid_is_refused_before_anything_heavy(model_runs, cli_tmp):
    """`train` is refused from the model's config files alone (its weights are not there to load), before
    OUTPUT_DIR is created: no weight read, nothing cached, nothing written."""
    r = result(model_runs, "resolution_too_large")
    assert r.returncode == 2, r
    lines = [ln for ln in r.stderr.splitlines() if names_var(ln, "RESOLUTION")]
    assert lines and any("128" in ln for ln in lines), r
    assert not names_var(r.stderr, "VALIDATION_RESOLUTION"), r  # 64x64 fits
    assert "Traceback" not in r.stderr and "safetensors" not in r.stderr, r
    assert not (cli_tmp / "too-large-out").exists(), r


@pytest.mark.slow
def test_resolution_inside_the_tiny_models_grid_passes_check(model_runs):
    r = result(model_runs, "resolution_fits")
    assert r.returncode == 0, r
    assert "invalid setting" not in r.stderr, r


# ------------------------------------------------------------------ layering and the config file


@pytest.mark.slow
def test_cli_option_wins_over_the_environment(model_runs):
    r = result(model_runs, "config_file_and_cli_over_env")
    assert r.returncode == 0, r  # env LEARNING_RATE=abc would be exit 2
    assert not names_var(r.stderr, "LEARNING_RATE"), r


@pytest.mark.slow
def test_config_file_unknown_keys_are_named_in_a_warning(model_runs):
    r = result(model_runs, "config_file_and_cli_over_env")
    warnings = [ln for ln in r.stderr.splitlines() if "WARNING" in ln or "warning" in ln.lower()]
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


# ------------------------------------------------------------------ the test harness itself


@pytest.mark.slow
def test_a_run_forked_from_the_zygote_is_the_run_a_new_interpreter_makes(tiny_model, cli_tmp, monkeypatch):
    """run_cli forks its runs from a process that has imported torch (tests/zygote.py): the same command in a new
    interpreter gives the same exit code and the same output, line for line (clock times aside)."""
    settings = {"MODEL_ID": str(tiny_model), "DATASET_ID": str(cli_tmp / "dataset"), "PUSH_TO_HUB": "false",
                "RESOLUTION": "64", "VALIDATION_RESOLUTION": "64x64", "HF_TOKEN": TOKEN}
    (cli_tmp / "dataset").mkdir(exist_ok=True)
    forked = run_cli("check", **settings)
    monkeypatch.setenv("JOB_TESTS_FRESH_PYTHON", "1")
    fresh = run_cli("check", **settings)

    def lines(text: str) -> list[str]:
        return [re.sub(r"^\d\d:\d\d:\d\d ", "", ln) for ln in text.splitlines()]

    assert forked.returncode == fresh.returncode == 0, (forked, fresh)
    assert lines(forked.stdout) == lines(fresh.stdout) and lines(forked.stderr) == lines(fresh.stderr), (forked, fresh)
    assert "plan:" in forked.stderr and TOKEN not in forked.stderr + forked.stdout


@pytest.mark.slow
def test_a_forked_run_past_its_timeout_is_killed_and_the_next_run_is_unaffected(tiny_model, cli_tmp):
    import subprocess

    from job import builtin

    data = builtin.toy_dataset_dir(cli_tmp, count=4)
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("train", timeout=2, model_id=tiny_model, dataset_id=data, output_dir=cli_tmp / "endless",
                push_to_hub="false", resolution=64, validation_resolution="64x64", max_train_steps=100_000)
    r = run_cli("--help")
    assert r.returncode == 0 and "MAX_TRAIN_STEPS" in r.stdout, r
