"""The command line: every setting as an option with its environment variable; exceptions → exit codes.

The only module that reads the environment. Options are generated from `config.SPECS`, so the CLI,
`--help`, env.example and validation cannot drift apart. Values are taken as raw strings and parsed
by `config`, which reports every bad value at once (typer would stop at the first).
"""
from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import typer

from job import cloud, config, launch, log
from job.errors import ConfigError, JobError, RankZeroFailed

COMMANDS = ("train", "check", "demo")
typer_app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Train an AuraFlow LyCORIS LoKr adapter as an unattended job. Commands: train (default), check, demo.",
    context_settings={"max_content_width": 120},
)

_GROUP_TITLES = {g: f"{g.capitalize()} settings" for g in config.GROUPS}


def _options() -> list[inspect.Parameter]:
    params = []
    for spec in config.SPECS:
        default = "(empty)" if spec.default == "" else spec.default
        if spec.name == "lycoris_config":
            default = "the seed's LoKr config"
        params.append(inspect.Parameter(
            spec.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
            default=typer.Option(None, spec.option, envvar=spec.env, show_envvar=True, show_default=False,
                                 help=f"{spec.help} (default: {default})", rich_help_panel=_GROUP_TITLES[spec.group]),
        ))
    params.append(inspect.Parameter(
        "config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
        default=typer.Option(None, "--config-file", envvar=config.CONFIG_FILE_ENV, show_envvar=True,
                             help="SimpleTuner-style config.json; explicit options and variables override it"),
    ))
    return params


def _raw_values(given: dict[str, str | None]) -> dict[str, str | None]:
    # click treats an empty variable as absent; we want to see it (an empty LEARNING_RATE is an error).
    for spec in config.SPECS:
        if given.get(spec.name) is None and os.environ.get(spec.env) == "":
            given[spec.name] = ""
    return given


# Standard variables that libraries read themselves: an empty one (an empty template field) must be absent,
# or huggingface_hub takes "" as its endpoint or cache folder.
_LIBRARY_VARS = {"hf_token": "HF_TOKEN", "hf_home": "HF_HOME", "hf_endpoint": "HF_ENDPOINT",
                 "wandb_api_key": "WANDB_API_KEY", "wandb_mode": "WANDB_MODE"}


def _export_library_vars(raw: dict[str, str | None]) -> None:
    """Before huggingface_hub is imported: options given on the command line reach the libraries too."""
    for name, var in _LIBRARY_VARS.items():
        value = raw.get(name)
        if value:
            os.environ[var] = value
        elif os.environ.get(var) == "":
            del os.environ[var]


# Read by torch's CUDA caching allocator at its first allocation (the ranks inherit it). With expandable segments,
# memory freed in one shape (the bf16 weights quantised block by block, the encoders after caching) serves the next,
# so reserved memory stays near what is allocated. A user's own setting, under either name, wins.
CUDA_ALLOC_DEFAULT = "expandable_segments:True"


def _allocator_defaults() -> None:
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_DEFAULT


# DEBUG=true: a failure's traceback on the terminal too (it always goes to OUTPUT_DIR/logs/). JOB_TEST_FAULT: for the
# tests alone, a fault injected into the run (see faults.Injection); never set it for a real run.
DEBUG_ENV, TEST_FAULT_ENV = "DEBUG", "JOB_TEST_FAULT"


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")


def _builtin_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "auraflow-lokr-job"


def _in_rank() -> bool:
    """A process that torchrun (or accelerate, deepspeed) started: they set LOCAL_RANK. WORLD_SIZE alone is a
    platform's count (RunPod's clusters set it to their GPUs in every pod), not a rank's."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def _ranks(settings: config.Settings):
    """torchrun's variables in a process it started; None in the parent. GROUP_RANK/GROUP_WORLD_SIZE: which of how
    many machines, in the rendezvous' order; messages name a machine by its MACHINE_RANK when the job was given one."""
    from job.distributed import Ranks

    if not _in_rank():
        return None
    env = os.environ
    node = int(env.get("GROUP_RANK", "0"))
    machine = settings.scale.machine_rank
    return Ranks(rank=int(env.get("RANK", "0")), world=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]),
                 master_addr=env.get("MASTER_ADDR", ""), node=node, nodes=int(env.get("GROUP_WORLD_SIZE", "1")),
                 machine=node if machine is None else machine)


# The cluster settings under the names launchers and platforms set: Kubernetes' PyTorchJob (PET_*, torchrun's own
# defaults), torchrun's and accelerate's conventions, RunPod's Instant Clusters (NUM_NODES, NODE_RANK, MASTER_*).
# For a setting the job is not given under its own name (variable, option or CONFIG_FILE), the first one set counts.
LAUNCHER_VARS = {
    "num_machines": ("PET_NNODES", "NNODES", "NUM_NODES"),
    "machine_rank": ("PET_NODE_RANK", "NODE_RANK"),
    "main_process_ip": ("PET_MASTER_ADDR", "MASTER_ADDR"),
    "main_process_port": ("PET_MASTER_PORT", "MASTER_PORT"),
}


def launcher_layer(env: Mapping[str, str]) -> dict[str, str]:
    """The raw cluster settings that a launcher's variables give, beneath every other layer."""
    layer = {}
    for name, variables in LAUNCHER_VARS.items():
        value = next((env[v].strip() for v in variables if env.get(v, "").strip()), None)
        if value is not None:
            layer[name] = value
    low, colon, high = layer.get("num_machines", "").partition(":")  # torchrun's MIN:MAX form, for a fixed size
    if colon and low == high:
        layer["num_machines"] = high
    return layer


def _rank_env(raw: dict[str, str | None], config_file: str | None, settings: config.Settings) -> dict[str, str]:
    """The environment the ranks re-read the settings from: options given on this command line become variables
    there, so a token never appears on a command line. The cluster settings go as resolved here: in a rank,
    MASTER_ADDR/MASTER_PORT are torchrun's, not the launcher's."""
    env = dict(os.environ)
    env.update({spec.env: value for spec in config.SPECS if (value := raw.get(spec.name)) is not None})
    env.update({config.SPEC_BY_NAME[name].env: str(value) for name in LAUNCHER_VARS
                if (value := getattr(settings.scale, name)) is not None})
    if config_file:
        env[config.CONFIG_FILE_ENV] = config_file
    return env


def _cluster(settings: config.Settings):
    scale = settings.scale
    if scale.num_machines == 1:
        return None
    return launch.Cluster(machines=scale.num_machines, machine_rank=scale.machine_rank or 0,
                          host=scale.main_process_ip, port=scale.main_process_port, timeout=scale.rendezvous_timeout)


def register_secrets(raw: dict[str, str | None]) -> None:
    """Every setting declared secret=True, as given here, masked in every log line from now on."""
    for spec in config.SPECS:
        if spec.secret:
            log.register_secret(raw.get(spec.name))


def _run(command: str, given: dict[str, str | None]) -> None:
    rank = int(os.environ.get("RANK", "0")) if _in_rank() else 0  # torchrun's, in a process it started
    log.setup(verbose=os.environ.get("JOB_VERBOSE", "") not in ("", "0"), rank=rank)
    _allocator_defaults()
    raw = _raw_values(given)
    config_file = raw.pop("config_file", None)
    register_secrets(raw)
    _export_library_vars(raw)
    creds = cloud.Credentials.from_env(os.environ)
    log.register_secret(creds.api_key)
    try:
        file_layer: dict[str, str] = {}
        if config_file:
            file_layer, ignored, problems = config.read_config_file(config_file)
            if problems:
                raise ConfigError(problems)
            if ignored and rank == 0:
                log.log.warning("CONFIG_FILE: %d key(s) not used by this job, ignored: %s", len(ignored),
                                ", ".join(ignored))
        # in a rank, the parent has resolved the cluster settings into the job's own variables
        layers = [{} if _in_rank() else launcher_layer(os.environ), file_layer, raw]
        if command == "demo":  # builds the tiny model first: its folder is the demo's MODEL_ID
            from job import pipeline

            defaults, forced = pipeline.demo_layers(_builtin_root())
            layers = [defaults, *layers, forced]
        settings = config.build_settings(layers)  # bad values fail here, before torch is even imported
        for secret in settings.secrets():  # those given in CONFIG_FILE too
            log.register_secret(secret)
        # the download watchdog: huggingface_hub re-requests a file body that stalls this long (read at import)
        os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = f"{settings.output.download_stall_timeout:g}"
        import torch

        from job import pipeline
        from job.distributed import Ranks

        ranks = _ranks(settings)
        if ranks is None:  # the parent: the run itself, or torchrun's with one process per GPU (on each machine)
            processes = launch.process_count(settings.scale.num_processes, torch.cuda.device_count())
            cluster = _cluster(settings)
            if cluster and (problems := launch.cluster_problems(cluster, resolve=command == "check")):
                raise ConfigError(problems)
            if (processes > 1 or cluster) and command != "check":
                raise typer.Exit(launch.relaunch([command], processes, _rank_env(raw, config_file, settings), cluster))
            machines = settings.scale.num_machines
            ranks = Ranks(world=processes * machines, nodes=machines)  # `check` plans for them
        pipeline.run(command, settings, creds, ranks, debug=_truthy(os.environ.get(DEBUG_ENV, "")),
                     test_fault=os.environ.get(TEST_FAULT_ENV, ""))
    except JobError as e:
        if not isinstance(e, RankZeroFailed):  # rank 0 has reported that one
            log.log.error("%s", e)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        log.log.error("interrupted")
        raise typer.Exit(130) from None


def _command(name: str, doc: str):
    def handler(**given):
        _run(name, given)

    handler.__signature__ = inspect.Signature(_options())
    handler.__doc__ = doc
    handler.__name__ = name
    typer_app.command(name)(handler)


_command("train", "Preflight, pull model and dataset, cache, train, sample, push (the default command).")
_command("check", "Preflight only: validate every setting, check Hub access and disk, print the plan. "
                  "Downloads no weights.")
_command("demo", "Train on the embedded tiny AuraFlow and a generated toy image set (CPU-friendly, no Hub) "
                 "into ./output/demo.")


def app(argv: list[str] | None = None) -> None:
    """Entry point: no command (or only options) means `train`, as in the image's default command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("--help", "-h")):
        args.insert(0, "train")
    elif args[0] in ("--help", "-h"):
        args = ["train", "--help"]
    ranks_dir, rank = os.environ.get(launch.RANKS_DIR_ENV), os.environ.get("RANK")
    if not ranks_dir or rank is None:
        typer_app(args=args, prog_name="entrypoint.py")
        return
    # a rank started by launch.relaunch: tell the parent where signals go, and how this rank ended
    launch.record_start(ranks_dir, int(rank))
    code = 1
    try:
        typer_app(args=args, prog_name="entrypoint.py")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    finally:
        launch.record_exit(ranks_dir, int(rank), code)
