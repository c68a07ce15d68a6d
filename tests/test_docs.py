"""The README is the job's contract, and the user-facing files follow the CLI: every setting has a row in the
README's settings tables at its real default, in env.example with a comment and in `--help`; nothing is documented
that does not exist; the README's examples parse; its exit codes are job/errors.py's."""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import typer

from job import errors
from job.cli import typer_app
from job.config import CONFIG_FILE_ENV, SPEC_BY_NAME, SPECS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SETTINGS = {s.env for s in SPECS} | {CONFIG_FILE_ENV}


def section(title: str) -> str:
    """A `## title` section of the README, up to the next `## `."""
    return README.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


def readme_settings() -> dict[str, tuple[str, str]]:
    """{VARIABLE: (default cell, meaning cell)} from every `| variable | default | meaning |` row of the Settings
    section; a variable twice is an error."""
    rows = re.findall(r"^\| ((?:`[A-Z][A-Z0-9_]*`(?:, )?)+) \| ([^|]*) \| (.*) \|$", section("Settings"), re.M)
    found = [(name, default.strip(), meaning) for cell, default, meaning in rows for name in re.findall(r"`(\w+)`", cell)]
    names = [name for name, _, _ in found]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    return {name: (default, meaning) for name, default, meaning in found}


def cli_envvars() -> dict[str, str]:
    """Every option's environment variable, as the real typer command declares it: {VAR: option name}."""
    command = typer.main.get_command(typer_app).commands["train"]
    return {p.envvar: p.name for p in command.params if p.envvar}


def env_example_lines() -> list[str]:
    return (ROOT / "env.example").read_text(encoding="utf-8").splitlines()


def env_example() -> dict[str, str]:
    pairs = [ln.split("=", 1) for ln in env_example_lines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", k) for k, _ in pairs), "every line is NAME=value"
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names)), "no variable twice"
    return dict(pairs)


# ------------------------------------------------------------------ settings: README, env.example, CLI


def test_the_readme_has_a_row_for_every_setting_and_none_other():
    documented = set(readme_settings())
    assert {"LEARNING_RATE", "HF_TOKEN", "CONFIG_FILE", "VALIDATION_SEED"} <= documented  # both tables parsed
    assert sorted(SETTINGS - documented) == [], "settings missing from README's tables"
    assert sorted(documented - SETTINGS) == [], "README documents settings that do not exist"


def test_the_readme_states_each_default_as_it_is():
    for var, (cell, meaning) in readme_settings().items():
        if var == CONFIG_FILE_ENV:
            assert cell == "(empty)"
            continue
        spec = SPEC_BY_NAME[var.lower()]
        if var == "LYCORIS_CONFIG":  # "seed LoKr": the JSON is spelled out in the meaning
            assert cell == "seed LoKr"
            (shown,) = re.findall(r"default `(\{.*\})`", meaning)
            assert json.loads(shown) == json.loads(spec.default)
        elif spec.default == "":
            assert cell == "(empty)", var
        else:
            assert cell == f"`{spec.default}`", (var, cell, spec.default)


def test_every_setting_example_in_the_readme_parses():
    """`NAME=value` in the README's text and in its `my.env` example: a setting's value is one it accepts."""
    examples = re.findall(r"`([A-Z][A-Z0-9_]*)=([^`\s]*)`", README)
    examples += re.findall(r"^([A-Z][A-Z0-9_]*)=(\S+)$", section("Quick start (docker)"), re.M)
    checked = 0
    for name, value in examples:
        spec = SPEC_BY_NAME.get(name.lower())
        if spec is not None and "..." not in value and "…" not in value:
            spec.parse(value)
            checked += 1
    assert checked > 30


def test_env_example_declares_exactly_the_cli_variables():
    assert set(env_example()) == set(cli_envvars()) == SETTINGS


def test_env_example_gives_every_variable_a_comment():
    lines = env_example_lines()
    for i, ln in enumerate(lines):
        if ln and not ln.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("# ") and len(lines[i - 1]) > 10, ln


def test_env_example_values_are_the_defaults():
    for var, value in env_example().items():
        spec = SPEC_BY_NAME.get(var.lower())
        if spec is not None:
            assert spec.parse(value) == spec.parse(spec.default), var


def test_every_command_declares_the_same_settings():
    commands = typer.main.get_command(typer_app).commands
    assert set(commands) == {"train", "check", "demo"}
    declared = [{p.envvar for p in c.params if p.envvar} for c in commands.values()]
    assert all(d == declared[0] for d in declared)


# ------------------------------------------------------------------ exit codes


def test_the_readme_exit_codes_are_the_jobs():
    rows = dict(re.findall(r"^\| ([0-9][0-9 /]*) \| (.+) \|$", section("Exit codes"), re.M))
    meaning = {int(c): text for cell, text in rows.items() for c in cell.split("/")}
    kinds = {cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.JobError)
             and isinstance(vars(cls).get("exit_code"), int)}  # the kinds that fix their own code
    signals = {128 + signal.SIGINT, 128 + signal.SIGTERM}  # errors.Interrupted
    assert set(meaning) == {0} | {cls.exit_code for cls in kinds} | signals
    words = {errors.JobError: "unexpected", errors.Unexpected: "unexpected", errors.ConfigError: "invalid configuration",
             errors.HubAccessError: "Hub access", errors.DataError: "dataset", errors.DivergedError: "diverged",
             errors.PushError: "push failed", errors.DiskFull: "disk full", errors.OutOfMemory: "out of memory",
             errors.DeviceFailed: "GPU failed"}
    assert set(words) == kinds  # a new kind needs its row in the README and its word here
    for cls, word in words.items():
        assert word in meaning[cls.exit_code], (cls.__name__, meaning[cls.exit_code])
    assert "SIGINT" in meaning[128 + signal.SIGINT] and "SIGTERM" in meaning[128 + signal.SIGTERM]


# ------------------------------------------------------------------ the README itself


def test_readme_opens_with_the_two_commands():
    head = README.split("\n## ")[0]
    assert "make demo" in head and "make test" in head


# What a file of the product may not hold: a path up out of the checkout, or a way to build one. (Tests may spell
# "../" as data: the zip-slip entries of test_hub_datasets.py.)
BUILT_OUTSIDE = [r"ROOT\.parent", r"parents\[\d\]\.parent", r"\bshared/"]
OUTSIDE = re.compile("|".join([r"\.\./", *BUILT_OUTSIDE]))
PRODUCT = sorted({*ROOT.glob("*.md"), *ROOT.glob("*.toml"), *ROOT.glob("*.py"), ROOT / "Makefile", ROOT / "Dockerfile",
                  ROOT / "env.example", ROOT / ".ci" / "run", *ROOT.glob("*/*.py"), *ROOT.glob("*/*.sh")})


@pytest.mark.parametrize("path", [p.relative_to(ROOT) for p in PRODUCT if p.is_file()], ids=str)
def test_nothing_points_outside_the_repository(path):
    """A fresh clone has only itself: no file names the checkout's parent or a folder beside it."""
    text = (ROOT / path).read_text(encoding="utf-8")
    found = (re.compile("|".join(BUILT_OUTSIDE)) if path.parts[0] == "tests" else OUTSIDE).search(text)
    assert found is None, f"{path}: {text[max(0, found.start() - 80):found.end() + 80]!r}"
