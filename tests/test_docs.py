"""The user-facing files follow the CLI: env.example declares exactly the CLI's variables, at their defaults,
and the README opens with the two commands."""
from __future__ import annotations

import re
from pathlib import Path

import typer

from job.cli import typer_app
from job.config import SPEC_BY_NAME

ROOT = Path(__file__).resolve().parents[1]


def cli_envvars() -> dict[str, str]:
    """Every option's environment variable, as the real typer command declares it: {VAR: option name}."""
    command = typer.main.get_command(typer_app).commands["train"]
    return {p.envvar: p.name for p in command.params if p.envvar}


def env_example() -> dict[str, str]:
    pairs = [ln.split("=", 1) for ln in (ROOT / "env.example").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", k) for k, _ in pairs), "every line is NAME=value"
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names)), "no variable twice"
    return dict(pairs)


def test_env_example_declares_exactly_the_cli_variables():
    assert set(env_example()) == set(cli_envvars())


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


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head
