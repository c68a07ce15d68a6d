"""Typed, frozen settings: declared once, parsed from raw strings, validated all at once.

Every setting is a field of one of the group dataclasses below; its metadata (raw default, help,
allowed values) is the single source for the CLI options, `--help`, env.example and validation.
Raw values arrive as strings (from the CLI, the environment or a SimpleTuner `config.json`) and go
through one parser, so `LEARNING_RATE=abc` and `"learning_rate": "abc"` fail the same way.
No torch, no environment reads, no network: a bad config fails in well under a second.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job import log, precision
from job.errors import ConfigError
from job.precision import BASE_PRECISIONS, MIXED_PRECISIONS

FLAVOURS = {
    "v0.1": "fal/AuraFlow",
    "v0.2": "fal/AuraFlow-v0.2",
    "v0.3": "terminusresearch/auraflow-v0.3",
    "pony": "purplesmartai/pony-v7-base",
}
# TOKENIZER_MAX_LENGTH=0: AuraFlowPipeline's own default (256) for fal's releases, so the pipeline called without
# max_sequence_length matches training; Pony v7 is trained on long tag prompts (SimpleTuner allows it 768).
TOKENIZER_MAX_LENGTH_DEFAULTS = {"v0.1": 256, "v0.2": 256, "v0.3": 256, "pony": 768}
OPTIMIZERS = (
    "adamw", "adamw_bf16", "optimi-adamw", "optimi-lion",
    "bnb-adamw8bit", "bnb-lion8bit", "bnb-adamw8bit-paged", "bnb-lion8bit-paged",
)
LYCORIS_ALGOS = ("lokr", "locon", "loha", "lora", "full", "diag-oft", "boft", "glora", "ia3", "dylora")
SEED_LYCORIS_CONFIG = {
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 16,
    "apply_preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 8}}},
}


class Invalid(ValueError):
    """A parser's complaint: what is allowed (the caller adds the variable and the value)."""


# ---------------------------------------------------------------- parsers (str -> value)

def _bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise Invalid("expected a boolean: true/false/1/0/yes/no")


def _number(cast: type, lo: float | None, hi: float | None, lo_open: bool) -> Callable[[str], Any]:
    noun = "an integer" if cast is int else "a number"
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        bounds.append(f"<= {hi:g}")
    allowed = noun + (" " + " and ".join(bounds) if bounds else "")

    def parse(raw: str):
        try:
            value = cast(raw.strip())
        except ValueError:
            raise Invalid(f"expected {allowed}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise Invalid(f"expected {allowed}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise Invalid(f"out of range; expected {allowed}")
        if hi is not None and value > hi:
            raise Invalid(f"out of range; expected {allowed}")
        return value

    parse.allowed = allowed
    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        v = raw.strip()
        if v not in choices:
            raise Invalid("expected one of: " + ", ".join(choices))
        return v

    parse.allowed = "one of: " + ", ".join(choices)
    return parse


def _text(raw: str) -> str:
    return raw.strip()


def _strip_trailing_commas(text: str) -> str:
    """Drop commas that directly precede a closing bracket, outside string literals only."""
    out, i, in_str = [], 0, False
    while i < len(text):
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\":
                out.append(text[i + 1:i + 2])
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            out.append(c)
        elif c == ",":
            j = i + 1
            while j < len(text) and text[j] in " \t\r\n":
                j += 1
            if j >= len(text) or text[j] not in "]}":
                out.append(c)
        else:
            out.append(c)
        i += 1
    return "".join(out)


def loads_lenient(text: str) -> Any:
    """json.loads that also takes the trailing commas of the seed document's own examples."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        try:
            return json.loads(_strip_trailing_commas(text))
        except json.JSONDecodeError:
            raise Invalid(f"not valid JSON ({first.msg} at line {first.lineno} column {first.colno})") from None


def _json_or_path(kind: type, what: str) -> Callable[[str], Any]:
    """Inline JSON, or the path of a JSON file; the parsed object must be a `kind`."""

    def parse(raw: str):
        text = raw.strip()
        if not text:
            return kind()
        if text[0] not in "{[":
            path = Path(text).expanduser()
            if not path.is_file():
                raise Invalid(f"no such file; expected inline JSON or the path of a JSON file ({what})")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise Invalid(f"cannot read the file: {e.__class__.__name__}") from None
        value = loads_lenient(text)
        if not isinstance(value, kind):
            raise Invalid(f"expected a JSON {'object' if kind is dict else 'list'} ({what})")
        return value

    parse.allowed = f"inline JSON or a JSON file path ({what})"
    return parse


def _resolutions(raw: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in raw.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", part)
        if not match:
            raise Invalid("expected WxH or a side length, comma-separated (e.g. 1024x1024,1280x768)")
        w = int(match.group(1))
        h = int(match.group(2) or w)
        if w <= 0 or h <= 0:
            raise Invalid("sides must be positive")
        out.append((w, h))
    return tuple(out)


def _num_processes(raw: str) -> int:
    if raw.strip().lower() == "auto":
        return 0  # resolved at launch: one per visible GPU, 1 on CPU
    return _number(int, 1, None, False)(raw)


_num_processes.allowed = "auto or an integer >= 1"


def _auto_bool(raw: str) -> bool | None:
    """auto → None: the job decides from the hardware (see the setting's help)."""
    return None if raw.strip().lower() == "auto" else _bool(raw)


_auto_bool.allowed = "auto or a boolean: true/false/1/0/yes/no"


def _machine_rank(raw: str) -> int | None:
    """Empty → None: not given (required once NUM_MACHINES > 1, which cross_check says)."""
    return None if raw.strip() == "" else _number(int, 0, None, False)(raw)


_machine_rank.allowed = "an integer >= 0"


def opt(default: str, help: str, parse: Callable[[str], Any] | None = None, *, secret: bool = False):
    """A setting: its raw default (as a user would type it), help text and parser.

    parse=None means: infer from the annotation (str/bool) at class creation."""
    return field(metadata={"default": default, "help": help, "parse": parse, "secret": secret}, repr=not secret)


def _pos_int(lo: int = 1):
    return _number(int, lo, None, False)


# ---------------------------------------------------------------- the settings, grouped by concern

@dataclass(frozen=True)
class ModelSettings:
    model_id: str = opt("", "Hub repo id or local folder of the base AuraFlow pipeline; empty = MODEL_FLAVOUR's default")
    model_flavour: str = opt("v0.3", "Picks the default MODEL_ID: " + ", ".join(f"{k} -> {v}" for k, v in FLAVOURS.items()),
                             _choice(*FLAVOURS))
    model_revision: str = opt("main", "Branch, tag or commit of MODEL_ID on the Hub")
    model_family: str = opt("auraflow", "SimpleTuner compatibility: only auraflow", _choice("auraflow"))
    model_type: str = opt("lora", "SimpleTuner compatibility: only lora (an adapter, never a full fine-tune)",
                          _choice("lora"))
    lora_type: str = opt("lycoris", "SimpleTuner compatibility: only lycoris", _choice("lycoris"))


@dataclass(frozen=True)
class DataSettings:
    dataset_id: str = opt("", "Hub dataset repo id or local folder of images (required unless DATA_BACKEND_CONFIG)")
    dataset_revision: str = opt("main", "Branch, tag or commit of DATASET_ID on the Hub")
    dataset_split: str = opt("train", "Split of a parquet dataset (the datasets layout: data/<split>-*.parquet); "
                             "only its shards are downloaded")
    image_column: str = opt("", "Parquet: the image column (an image {bytes, path} or binary column); empty = the "
                            "column typed as an image")
    caption_column: str = opt("", "Parquet: the caption column (text or a list of texts); empty = the first of "
                              "text, caption, prompt")
    caption_strategy: str = opt("textfile", "Where captions come from: textfile (sibling .txt), filename, "
                                "instanceprompt (INSTANCE_PROMPT), metadata (metadata.jsonl/.csv), huggingface (a "
                                "parquet dataset's CAPTION_COLUMN; a folder's metadata.jsonl/.csv)",
                                _choice("textfile", "filename", "instanceprompt", "metadata", "huggingface"))
    instance_prompt: str = opt("", "Caption for every image with CAPTION_STRATEGY=instanceprompt; shown in the model card")
    resolution: int = opt("1024", "Training resolution in pixels (short side for pixel, sqrt of area for pixel_area)",
                          _pos_int(16))
    resolution_type: str = opt("pixel_area", "How RESOLUTION is read: pixel (short side) or pixel_area (area)",
                               _choice("pixel", "pixel_area"))
    crop: bool = opt("false", "Crop images to the bucket instead of resizing the whole image into it")
    crop_style: str = opt("center", "Where to crop: center, random, corner", _choice("center", "random", "corner"))
    crop_aspect: str = opt("square", "Bucket shape when cropping: square or preserve (aspect buckets)",
                           _choice("square", "preserve"))
    repeats: int = opt("0", "Extra passes over the dataset per epoch (0 = each image once)", _pos_int(0))
    tokenizer_max_length: int = opt("0", "Text tokens per caption (longer captions are truncated, and the log "
                                    "counts them); 0 = MODEL_FLAVOUR's default: "
                                    + ", ".join(f"{k} {v}" for k, v in TOKENIZER_MAX_LENGTH_DEFAULTS.items()),
                                    _pos_int(0))
    caption_dropout_probability: float = opt("0.0", "Probability of training a sample with the empty prompt",
                                             _number(float, 0.0, 1.0, False))
    minimum_image_size: int = opt("0", "Skip images smaller than this (short side for pixel, sqrt of area for "
                                  "pixel_area; 0 = keep all)", _pos_int(0))
    data_backend_config: list = opt("", "SimpleTuner multi-dataset JSON (inline or a file path); replaces DATASET_ID",
                                    _json_or_path(list, "a list of dataset entries"))
    vae_batch_size: int = opt("4", "Images per VAE batch while caching latents", _pos_int())


@dataclass(frozen=True)
class AdapterSettings:
    lycoris_config: dict = opt(json.dumps(SEED_LYCORIS_CONFIG), "LyCORIS config (inline JSON or a file path); "
                               "default: the seed's LoKr (factor 16, Attention at factor 8)",
                               _json_or_path(dict, "a LyCORIS config object"))


@dataclass(frozen=True)
class TrainingSettings:
    max_train_steps: int = opt("1000", "Optimizer steps to train (0 = use NUM_TRAIN_EPOCHS)", _pos_int(0))
    num_train_epochs: int = opt("0", "Epochs to train when MAX_TRAIN_STEPS is 0", _pos_int(0))
    train_batch_size: int = opt("1", "Images per micro-batch", _pos_int())
    gradient_accumulation_steps: int = opt("1", "Micro-batches per optimizer step", _pos_int())
    learning_rate: float = opt("4e-5", "Peak learning rate", _number(float, 0.0, None, True))
    optimizer: str = opt("optimi-lion", "Optimizer: " + ", ".join(OPTIMIZERS), _choice(*OPTIMIZERS))
    lr_scheduler: str = opt("constant", "Learning-rate schedule after warm-up",
                            _choice("constant", "constant_with_warmup", "linear", "cosine", "polynomial"))
    lr_warmup_steps: int = opt("0", "Linear warm-up steps", _pos_int(0))
    max_grad_norm: float = opt("2.0", "Gradient clipping threshold (0 = off)", _number(float, 0.0, None, False))
    grad_clip_method: str = opt("value", "Clip each gradient element (value) or the total norm (norm)",
                                _choice("value", "norm"))
    mixed_precision: str = opt("bf16", "Compute and adapter precision: bf16 or no (fp32)", _choice(*MIXED_PRECISIONS))
    base_model_precision: str = opt("no_change", "Frozen base weights: " + precision.base_help(),
                                    _choice(*BASE_PRECISIONS))
    quantize_via: str = opt("accelerator", "Where to quantise the base: cpu (less VRAM at start) or accelerator",
                            _choice("cpu", "accelerator"))
    gradient_checkpointing: bool = opt("true", "Recompute activations in the backward to save memory")
    skip_nonfinite_steps: int = opt("0", "Skip up to this many steps with a non-finite loss or gradient before "
                                    "stopping with exit 5", _pos_int(0))
    use_ema: bool = opt("false", "Keep an EMA of the adapter weights")
    profile: bool = opt("false", "Write a torch profiler trace of steps 3-5 to OUTPUT_DIR/profile/")
    ema_decay: float = opt("0.999", "EMA decay per optimizer step", _number(float, 0.0, 1.0, True))
    seed: int = opt("42", "Random seed (data order, noise, timesteps, adapter init)", _pos_int(0))
    flow_schedule_shift: float = opt("3.0", "Timestep shift s*shift/(1+(shift-1)*s); 1 = none",
                                     _number(float, 0.0, None, True))
    flow_schedule_auto_shift: bool = opt("false", "Resolution-dependent shift instead of FLOW_SCHEDULE_SHIFT")
    flow_use_uniform_schedule: bool = opt("false", "Sample sigmas uniformly instead of logit-normal")


@dataclass(frozen=True)
class MemorySettings:
    enable_group_offload: bool = opt("false", "Offload transformer blocks to CPU (or disk) between uses")
    group_offload_type: str = opt("block_level", "Offload granularity", _choice("block_level", "leaf_level"))
    group_offload_blocks_per_group: int = opt("1", "Blocks per offload group (block_level)", _pos_int())
    group_offload_use_stream: bool | None = opt("auto", "Prefetch the next group on a CUDA stream; auto: on with CUDA "
                                                "when the grouping allows it (block_level, 1 block per group, in RAM)",
                                                _auto_bool)
    group_offload_to_disk_path: str = opt("", "Spill offloaded weights to this folder instead of RAM")
    enable_model_cpu_offload: bool = opt("false", "Move whole models to CPU when idle (simpler, slower)")
    offload_during_startup: bool = opt("false", "Keep the VAE and text encoder on the GPU only while caching")


@dataclass(frozen=True)
class ValidationSettings:
    validation_prompt: str = opt("", "Main validation prompt (default: INSTANCE_PROMPT)")
    user_prompt_library: dict = opt("", "JSON {nickname: prompt} (inline or a file path) of extra validation prompts",
                                    _json_or_path(dict, "an object of nickname: prompt"))
    validation_negative_prompt: str = opt("ugly, cropped, blurry, low-quality, mediocre average",
                                          "Negative prompt for validation images")
    validation_step_interval: int = opt("200", "Render validation images every N steps (0 = only at the end)",
                                        _pos_int(0))
    validation_resolution: tuple = opt("1024x1024", "One or more WxH, comma-separated", _resolutions)
    validation_guidance: float = opt("3.5", "Classifier-free guidance scale", _number(float, 0.0, None, False))
    validation_num_inference_steps: int = opt("20", "Sampler steps per validation image", _pos_int())
    validation_seed: int = opt("42", "Seed for validation noise (the same every round)", _pos_int(0))
    eval_steps_interval: int = opt("0", "Score the stable eval loss (fixed latents, sigmas and noise) every N steps "
                                   "(0 = off)", _pos_int(0))
    num_eval_images: int = opt("4", "Training images in the stable eval set", _pos_int())


@dataclass(frozen=True)
class CheckpointSettings:
    checkpoint_step_interval: int = opt("500", "Write a resumable checkpoint every N steps (0 = only on stop)",
                                        _pos_int(0))
    checkpoints_total_limit: int = opt("5", "Keep at most this many checkpoints (0 = keep all)", _pos_int(0))
    resume_from_checkpoint: str = opt("latest", "latest, none, or a checkpoint folder")


@dataclass(frozen=True)
class OutputSettings:
    output_dir: str = opt("./output", "Where the adapter, samples, checkpoints and caches go")
    push_to_hub: bool = opt("true", "Push the adapter, samples and model card to HUB_MODEL_ID")
    hub_model_id: str = opt("", "Output model repo on the Hub (user/name)")
    hub_private: bool = opt("true", "Create the output repo as private")
    push_checkpoints_to_hub: bool = opt("false", "Also upload each checkpoint to the output repo (in the background)")
    hub_retries: int = opt("5", "Attempts for each Hub call before giving up (backoff 1, 2, 4, 8 s...)", _pos_int())
    download_stall_timeout: float = opt("60", "Seconds without a byte before a download is retried (then retried "
                                        "with Xet off, then exit 3)", _number(float, 0.0, None, True))
    report_to: str = opt("none", "Tracker: wandb, tensorboard or none", _choice("wandb", "tensorboard", "none"))
    tracker_project_name: str = opt("auraflow-lokr", "Tracker project name")
    tracker_run_name: str = opt("", "Tracker run name (default: derived from HUB_MODEL_ID or OUTPUT_DIR)")
    # secret: a Discord or Slack webhook URL carries its key, and anyone holding it can post to the channel
    webhook_url: str = opt("", "POST progress events here (Discord webhooks get Discord's format)", secret=True)
    export_comfyui: bool = opt("true", "Also write (and push) <name>_comfyui.safetensors: the adapter with the key "
                               "names ComfyUI loads for AuraFlow")


@dataclass(frozen=True)
class ScaleSettings:
    num_processes: int = opt("auto", "Data-parallel processes (auto = one per visible GPU)", _num_processes)
    # Several machines, through torchrun's c10d rendezvous. cli fills an unset one from the launcher's variables
    # (PET_NNODES/NNODES/NUM_NODES, PET_NODE_RANK/NODE_RANK, PET_MASTER_ADDR/MASTER_ADDR, PET_MASTER_PORT/MASTER_PORT).
    num_machines: int = opt("1", "Machines that train together, each running the job with the same settings and its "
                            "own MACHINE_RANK (OUTPUT_DIR on a filesystem they all share)", _pos_int())
    machine_rank: int | None = opt("", "This machine's rank, 0 to NUM_MACHINES-1; 0 is the main machine, which hosts "
                                   "the rendezvous (required with NUM_MACHINES > 1)", _machine_rank)
    main_process_ip: str = opt("", "Address of the main machine (MACHINE_RANK=0) that every machine can reach "
                               "(required with NUM_MACHINES > 1)")
    main_process_port: int = opt("29500", "TCP port of the rendezvous on the main machine",
                                 _number(int, 1, 65535, False))
    rendezvous_timeout: float = opt("1800", "Seconds the machines wait for each other to join (long enough for "
                                    "every machine to pull the image), then exit 2 saying how many joined",
                                    _number(float, 0.0, None, True))


@dataclass(frozen=True)
class CloudSettings:
    pod_action_on_success: str = opt("none", "After a successful push: none, stop or terminate the pod",
                                     _choice("none", "stop", "terminate"))
    pod_action_on_failure: str = opt("none", "After a failure: none or stop the pod", _choice("none", "stop"))


@dataclass(frozen=True)
class AccessSettings:
    hf_token: str = opt("", "Hugging Face token (read for gated models, write for pushing)", secret=True)
    hf_home: str = opt("", "Hugging Face cache folder (put it on the persistent volume)")
    hf_endpoint: str = opt("", "Hub endpoint (mirror); empty = huggingface.co")
    wandb_api_key: str = opt("", "Weights & Biases API key (REPORT_TO=wandb)", secret=True)
    wandb_mode: str = opt("", "Weights & Biases mode: online, offline or disabled",
                          _choice("", "online", "offline", "disabled"))


GROUPS: dict[str, type] = {
    "model": ModelSettings, "data": DataSettings, "adapter": AdapterSettings, "training": TrainingSettings,
    "memory": MemorySettings, "validation": ValidationSettings, "checkpoints": CheckpointSettings,
    "output": OutputSettings, "scale": ScaleSettings, "cloud": CloudSettings, "access": AccessSettings,
}


@dataclass(frozen=True)
class Settings:
    model: ModelSettings
    data: DataSettings
    adapter: AdapterSettings
    training: TrainingSettings
    memory: MemorySettings
    validation: ValidationSettings
    checkpoints: CheckpointSettings
    output: OutputSettings
    scale: ScaleSettings
    cloud: CloudSettings
    access: AccessSettings

    @property
    def model_id(self) -> str:
        return self.model.model_id or FLAVOURS[self.model.model_flavour]

    def value(self, spec: Spec) -> Any:
        return getattr(getattr(self, spec.group), spec.name)

    def public_dict(self) -> dict:
        """Resolved settings for training_config.json and trackers: secrets removed, not masked."""
        out = {spec.name: _public(self.value(spec)) for spec in SPECS if not spec.secret}
        out["model_id"] = self.model_id
        return json.loads(log.redact(json.dumps(out), self.secrets()))

    def secrets(self) -> list[str]:
        """The values of the settings declared secret=True, for `log.redact`."""
        return [value for spec in SPECS if spec.secret and (value := self.value(spec))]


@dataclass(frozen=True)
class Spec:
    """One setting as the outside world sees it."""

    name: str
    group: str
    default: str
    help: str
    parse: Callable[[str], Any]
    secret: bool
    is_text: bool  # free text: empty means "not set" rather than invalid

    @property
    def env(self) -> str:
        return self.name.upper()

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def _specs() -> list[Spec]:
    out = []
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            parse = f.metadata["parse"] or {"bool": _bool, "str": _text}[f.type]
            out.append(Spec(f.name, group, f.metadata["default"], f.metadata["help"], parse,
                            f.metadata["secret"], f.metadata["parse"] is None and f.type == "str"))
    return out


SPECS: list[Spec] = _specs()
SPEC_BY_NAME: dict[str, Spec] = {s.name: s for s in SPECS}


def _public(value: Any) -> Any:
    """A parsed value as public_dict writes it (JSON: tuples of tuples become lists of lists)."""
    return json.loads(json.dumps(list(map(list, value)) if isinstance(value, tuple) else value))


def public_default(name: str) -> Any:
    """Setting `name`'s default as public_dict writes it."""
    spec = SPEC_BY_NAME[name]
    return _public(spec.parse(spec.default))


CONFIG_FILE_ENV = "CONFIG_FILE"

# SimpleTuner's config.json spells its keys as its command-line options ("--learning_rate"); the prefix is dropped.
_SIMPLETUNER_PREFIX = "--"


def _show(spec: Spec, raw: str) -> str:
    return log.MASK if spec.secret else repr(raw)


# ---------------------------------------------------------------- loading

def read_config_file(path: str) -> tuple[dict[str, str], list[str], list[str]]:
    """A SimpleTuner-style config.json → (raw values by setting name, ignored keys, problems). Keys that name no
    setting here are returned as ignored, for the caller to name in a warning, never silently dropped."""
    file = Path(path).expanduser()
    if not file.is_file():
        return {}, [], [f"{CONFIG_FILE_ENV}={path!r}: no such file; expected the path of a JSON config file"]
    try:
        data = loads_lenient(file.read_text(encoding="utf-8"))
    except (Invalid, OSError, UnicodeDecodeError) as e:
        return {}, [], [f"{CONFIG_FILE_ENV}={path!r}: {e}"]
    if not isinstance(data, dict):
        return {}, [], [f"{CONFIG_FILE_ENV}={path!r}: expected a JSON object of option: value"]
    raw, ignored = {}, []
    for key, value in data.items():
        name = key.removeprefix(_SIMPLETUNER_PREFIX).replace("-", "_").lower()
        if name not in SPEC_BY_NAME:
            ignored.append(key)
            continue
        if isinstance(value, bool):
            raw[name] = "true" if value else "false"
        elif value is None:
            continue
        elif isinstance(value, (dict, list)):
            raw[name] = json.dumps(value)
        else:
            raw[name] = str(value)
    return raw, sorted(ignored), []


def build_settings(layers: list[dict[str, str | None]]) -> Settings:
    """Parse raw values, later layers winning, defaults beneath all; raise every problem at once."""
    merged: dict[str, str] = {}
    for layer in layers:
        # An empty free-text value means "not set" (an empty template field), so a lower layer still counts.
        merged.update({k: v for k, v in layer.items()
                       if v is not None and not (v.strip() == "" and SPEC_BY_NAME[k].is_text)})
    problems: list[str] = []
    failed: list[str] = []
    values: dict[str, Any] = {}
    for spec in SPECS:
        raw = merged.get(spec.name, spec.default)
        try:
            if raw.strip() == "" and not spec.is_text and spec.default.strip() != "":
                raise Invalid(f"empty; expected {getattr(spec.parse, 'allowed', 'a value')}")
            values[spec.name] = spec.parse(raw)
        except Invalid as e:
            problems.append(f"{spec.env}={_show(spec, raw)}: {e}")
            failed.append(spec.env)
            values[spec.name] = spec.parse(spec.default)  # stand-in so the cross-checks still run
    groups = {g: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)}) for g, cls in GROUPS.items()}
    settings = Settings(**groups)
    # Report contradictions together with the parse errors, except those that involve a bad value.
    problems += [c.text for c in cross_check(settings) if not set(c.concerns) & set(failed)]
    if problems:
        secrets = [merged[spec.name] for spec in SPECS if spec.secret and merged.get(spec.name)]
        raise ConfigError([log.redact(p, secrets) for p in problems])
    return settings


@dataclass(frozen=True)
class Problem:
    """A cross-check's complaint and the variables whose values raised it: when one of them failed to parse, its
    stand-in default raised it, and the complaint is left out."""

    text: str
    concerns: tuple[str, ...]


def cross_check(s: Settings) -> list[Problem]:
    """Contradictions and missing companions between settings (no file system beyond small reads)."""
    found: list[Problem] = []

    def problem(text: str, *concerns: str) -> None:
        found.append(Problem(text, concerns))

    training, memory, output, data = s.training, s.memory, s.output, s.data
    base = BASE_PRECISIONS[training.base_model_precision]
    if training.max_train_steps == 0 and training.num_train_epochs == 0:
        problem("MAX_TRAIN_STEPS=0 and NUM_TRAIN_EPOCHS=0: set one of them above 0", "MAX_TRAIN_STEPS",
                "NUM_TRAIN_EPOCHS")
    if memory.enable_group_offload and memory.enable_model_cpu_offload:
        problem("ENABLE_GROUP_OFFLOAD=true with ENABLE_MODEL_CPU_OFFLOAD=true: choose one offload method",
                "ENABLE_GROUP_OFFLOAD", "ENABLE_MODEL_CPU_OFFLOAD")
    movable = precision.quantised_alternatives(lambda p: p.movable)
    if memory.enable_group_offload:
        if not base.movable:
            problem(f"ENABLE_GROUP_OFFLOAD=true with BASE_MODEL_PRECISION={base.name}: {base.what} cannot be "
                    f"offloaded in groups; use {movable}", "ENABLE_GROUP_OFFLOAD", "BASE_MODEL_PRECISION")
        if memory.group_offload_use_stream is True and memory.group_offload_type == "block_level" \
                and memory.group_offload_blocks_per_group > 1:
            problem(f"GROUP_OFFLOAD_USE_STREAM=true prefetches one block at a time: set GROUP_OFFLOAD_BLOCKS_PER_GROUP=1 "
                    f"(not {memory.group_offload_blocks_per_group}) or turn the stream off",
                    "GROUP_OFFLOAD_USE_STREAM", "GROUP_OFFLOAD_BLOCKS_PER_GROUP", "GROUP_OFFLOAD_TYPE", "ENABLE_GROUP_OFFLOAD")
    if memory.enable_model_cpu_offload and not base.movable:
        problem(f"ENABLE_MODEL_CPU_OFFLOAD=true with BASE_MODEL_PRECISION={base.name}: {base.what} cannot move "
                f"between devices; use {movable}", "ENABLE_MODEL_CPU_OFFLOAD", "BASE_MODEL_PRECISION")
    if not memory.enable_group_offload:
        for name, value in (("GROUP_OFFLOAD_USE_STREAM", memory.group_offload_use_stream is True),
                            ("GROUP_OFFLOAD_TO_DISK_PATH", memory.group_offload_to_disk_path)):
            if value:
                problem(f"{name} is set but ENABLE_GROUP_OFFLOAD=false: set ENABLE_GROUP_OFFLOAD=true, or unset {name}",
                        name, "ENABLE_GROUP_OFFLOAD")
    if output.push_to_hub and not output.hub_model_id:
        problem("PUSH_TO_HUB=true needs HUB_MODEL_ID (user/name); set PUSH_TO_HUB=false to keep the output local",
                "PUSH_TO_HUB", "HUB_MODEL_ID")
    if output.push_to_hub and not s.access.hf_token:
        problem("PUSH_TO_HUB=true needs HF_TOKEN (a write token)", "PUSH_TO_HUB", "HF_TOKEN")
    if output.hub_model_id and not re.fullmatch(r"[\w.-]+/[\w.-]+", output.hub_model_id):
        problem(f"HUB_MODEL_ID={output.hub_model_id!r}: expected user/name", "HUB_MODEL_ID")
    if output.push_checkpoints_to_hub and not output.push_to_hub:
        problem("PUSH_CHECKPOINTS_TO_HUB=true needs PUSH_TO_HUB=true", "PUSH_CHECKPOINTS_TO_HUB", "PUSH_TO_HUB")
    if not data.dataset_id and not data.data_backend_config:
        problem("DATASET_ID is required (a Hub dataset repo id or a local folder), or DATA_BACKEND_CONFIG",
                "DATASET_ID", "DATA_BACKEND_CONFIG")
    if data.dataset_id and data.data_backend_config:
        problem("DATASET_ID and DATA_BACKEND_CONFIG are both set: use one", "DATASET_ID", "DATA_BACKEND_CONFIG")
    if data.data_backend_config:
        for text in datasets(s)[2]:
            problem(text, "DATA_BACKEND_CONFIG")
    elif data.caption_strategy == "instanceprompt" and not data.instance_prompt:
        problem("CAPTION_STRATEGY=instanceprompt needs INSTANCE_PROMPT", "CAPTION_STRATEGY", "INSTANCE_PROMPT")
    if output.webhook_url and not re.match(r"https?://", output.webhook_url):
        problem("WEBHOOK_URL: expected an http:// or https:// URL", "WEBHOOK_URL")
    if s.cloud.pod_action_on_success == "terminate" and not output.push_to_hub:
        problem("POD_ACTION_ON_SUCCESS=terminate needs PUSH_TO_HUB=true: terminating deletes the volume, and with "
                "it the only copy of the output; use stop", "POD_ACTION_ON_SUCCESS", "PUSH_TO_HUB")
    if training.optimizer == "adamw_bf16" and training.mixed_precision != "bf16":
        problem("OPTIMIZER=adamw_bf16 needs MIXED_PRECISION=bf16; use adamw with MIXED_PRECISION=no", "OPTIMIZER",
                "MIXED_PRECISION")
    resume = s.checkpoints.resume_from_checkpoint
    if resume not in ("latest", "none") and not re.fullmatch(r"checkpoint-\d+", resume) and not Path(resume).is_dir():
        problem(f"RESUME_FROM_CHECKPOINT={resume!r}: expected latest, none, checkpoint-N or an existing folder",
                "RESUME_FROM_CHECKPOINT")
    for text in lycoris_problems(s.adapter.lycoris_config):
        problem(text, "LYCORIS_CONFIG")
    scale = s.scale
    if scale.num_machines > 1 and scale.machine_rank is None:
        problem(f"NUM_MACHINES={scale.num_machines} needs MACHINE_RANK on each machine: 0 on the main one, 1 to "
                f"{scale.num_machines - 1} on the others", "NUM_MACHINES", "MACHINE_RANK")
    if scale.machine_rank is not None and scale.machine_rank >= scale.num_machines:
        problem(f"MACHINE_RANK={scale.machine_rank} is out of range for NUM_MACHINES={scale.num_machines}: expected 0 "
                f"to {scale.num_machines - 1}", "MACHINE_RANK", "NUM_MACHINES")
    if scale.num_machines > 1 and not scale.main_process_ip:
        problem(f"NUM_MACHINES={scale.num_machines} needs MAIN_PROCESS_IP: the address of the main machine "
                "(MACHINE_RANK=0) that every machine can reach", "NUM_MACHINES", "MAIN_PROCESS_IP")
    for nick in s.validation.user_prompt_library:
        if not re.fullmatch(r"[\w.<>-]+", nick) or not isinstance(s.validation.user_prompt_library[nick], str):
            problem(f"USER_PROMPT_LIBRARY: entry {nick!r} needs a filename-safe nickname and a string prompt",
                    "USER_PROMPT_LIBRARY")
    return found


@dataclass(frozen=True)
class DatasetSpec:
    """One image source with its own captions, geometry and weight in the mix."""

    id: str
    source: str  # a local folder or a Hub dataset repo id
    caption_strategy: str
    instance_prompt: str
    resolution: int
    resolution_type: str
    crop: bool
    crop_style: str
    crop_aspect: str
    repeats: int
    minimum_image_size: int
    cache_dir_vae: str  # "" = OUTPUT_DIR/cache/vae
    regularisation: bool = False  # parent-teacher: the target is the base model's own prediction
    mask_dir: str = ""  # a folder of masks, one per image by relative name (a conditioning dataset's)
    revision: str = "main"  # of a Hub dataset repo
    split: str = "train"  # the parquet layout's split
    image_column: str = ""  # parquet; "" = the image-typed column
    caption_column: tuple[str, ...] = ()  # parquet; () = the first of text, caption, prompt


# DATA_BACKEND_CONFIG keys: honoured (mapped onto DatasetSpec), or known to SimpleTuner but without effect here.
_BACKEND_KEYS = ("caption_strategy", "instance_prompt", "resolution", "resolution_type", "crop", "crop_style",
                 "crop_aspect", "repeats", "minimum_image_size")
# SimpleTuner's `"type": "huggingface"` keys (in the entry or its "huggingface" block) → the setting each overrides
_BACKEND_HUB_KEYS = {"split": "dataset_split", "revision": "dataset_revision", "image_column": "image_column",
                     "caption_column": "caption_column"}
_BACKEND_TYPES = ("local", "huggingface")
_BACKEND_IGNORED = {
    "maximum_image_size": "images are always resized straight to their bucket",
    "target_downsample_size": "images are always resized straight to their bucket",
    "metadata_backend": "images are discovered by listing the folder",
    "skip_file_discovery": "images are discovered by listing the folder",
    "write_batch_size": "embeddings are written one file each",
    "default": "there is one text-embedding cache",
    "vae_cache_clear_each_epoch": "latents are cached once, keyed by content",
}


def _columns(raw: Any) -> tuple[str, ...] | None:
    """A caption column as SimpleTuner takes it: one name, or a list of names (each a caption of the row)."""
    if isinstance(raw, str):
        return (raw.strip(),) if raw.strip() else ()
    if isinstance(raw, list) and raw and all(isinstance(c, str) and c.strip() for c in raw):
        return tuple(c.strip() for c in raw)
    return None


def datasets(s: Settings) -> tuple[list[DatasetSpec], str, list[str], list[str]]:
    """(datasets, text-embedding cache dir or "", problems, warnings) from DATASET_ID or DATA_BACKEND_CONFIG.

    Entries take their missing keys from the top-level data settings, as SimpleTuner's do."""
    data = s.data
    base = {k: getattr(data, k) for k in _BACKEND_KEYS}
    hub = {"revision": data.dataset_revision, "split": data.dataset_split, "image_column": data.image_column,
           "caption_column": _columns(data.caption_column)}
    if not data.data_backend_config:
        return [DatasetSpec("dataset", data.dataset_id, cache_dir_vae="", **base, **hub)], "", [], []
    specs, problems, ignored, text_dir = [], [], set(), ""
    masks = _mask_datasets(data.data_backend_config, problems)
    for n, entry in enumerate(data.data_backend_config):
        where = f"DATA_BACKEND_CONFIG[{n}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected an object")
            continue
        where = f"DATA_BACKEND_CONFIG[{entry.get('id', n)}]"
        if _truthy(entry.get("disabled", False)) or entry.get("dataset_type") == "conditioning":
            continue
        if entry.get("dataset_type") == "text_embeds":
            text_dir = str(entry.get("cache_dir", ""))
            ignored |= {k for k in entry if k in _BACKEND_IGNORED}
            continue
        kind = entry.get("type", "local")
        if kind not in _BACKEND_TYPES:
            problems.append(f"{where}.type={kind!r}: expected local (a folder: images, zips or parquet shards) or "
                            "huggingface (a Hub dataset repo)")
        block = entry.get("huggingface", {})
        if not isinstance(block, dict):
            problems.append(f"{where}.huggingface: expected an object")
            block = {}
        if kind == "huggingface":
            source = str(entry.get("dataset_name", block.get("dataset_name", ""))).strip()
            if not source:
                problems.append(f"{where}.dataset_name is required for type huggingface (a Hub dataset repo id)")
        else:
            source = str(entry.get("instance_data_dir", ""))
            if not source or not Path(source).expanduser().is_dir():
                problems.append(f"{where}.instance_data_dir={source!r}: no such folder")
        mask_dir = ""
        if "conditioning_data" in entry:
            ref = entry["conditioning_data"]
            ref = ref[0] if isinstance(ref, list) and len(ref) == 1 else ref
            if not isinstance(ref, str) or ref not in masks:
                problems.append(f"{where}.conditioning_data={entry['conditioning_data']!r}: expected the id of an "
                                f"enabled dataset_type conditioning entry with conditioning_type mask "
                                f"({', '.join(sorted(masks)) or 'there is none'})")
            else:
                mask_dir = masks[ref]
        values = dict(base)
        if kind == "huggingface":
            values["caption_strategy"] = "huggingface"  # SimpleTuner's only strategy for these entries
        for key in _BACKEND_KEYS:
            if key in entry:
                raw = entry[key]
                raw = ("true" if raw else "false") if isinstance(raw, bool) else str(raw)
                try:
                    values[key] = SPEC_BY_NAME[key].parse(raw)
                except Invalid as e:
                    problems.append(f"{where}.{key}={raw!r}: {e}")
        if values["caption_strategy"] == "instanceprompt" and not values["instance_prompt"]:
            problems.append(f"{where}: caption_strategy instanceprompt needs instance_prompt")
        columns = dict(hub)
        for key in _BACKEND_HUB_KEYS:
            for scope, found in ((f"{where}.huggingface.{key}", block), (f"{where}.{key}", entry)):  # entry wins
                if key not in found:
                    continue
                raw = found[key]
                if key == "caption_column":
                    parsed = _columns(raw)
                    if parsed is None:
                        problems.append(f"{scope}={raw!r}: expected a column name or a list of column names")
                    else:
                        columns[key] = parsed
                elif not isinstance(raw, str) or not raw.strip():
                    problems.append(f"{scope}={raw!r}: expected a non-empty string")
                else:
                    columns[key] = raw.strip()
        known = set(_BACKEND_KEYS) | set(_BACKEND_HUB_KEYS) | {
            "id", "type", "instance_data_dir", "dataset_name", "huggingface", "disabled", "cache_dir_vae",
            "dataset_type", "conditioning_data", *_REGULARISATION_KEYS}
        ignored |= {k for k in entry if k not in known}
        ignored |= {f"huggingface.{k}" for k in block if k not in set(_BACKEND_HUB_KEYS) | {"dataset_name"}}
        specs.append(DatasetSpec(str(entry.get("id", f"dataset-{n}")), source,
                                 cache_dir_vae=str(entry.get("cache_dir_vae", "")), **values, **columns,
                                 regularisation=any(_truthy(entry.get(k, False)) for k in _REGULARISATION_KEYS),
                                 mask_dir=mask_dir))
    if not specs and not problems:
        problems.append("DATA_BACKEND_CONFIG: no enabled image dataset")
    if specs and all(spec.regularisation for spec in specs):
        warnings_extra = ["DATA_BACKEND_CONFIG: every dataset is regularisation data, so the adapter is trained to "
                          "match the base model: its loss is 0 from the first step and its effect stays zero"]
    else:
        warnings_extra = []
    warnings = [f"DATA_BACKEND_CONFIG: {k} ignored ({_BACKEND_IGNORED.get(k, 'not a setting of this job')})"
                for k in sorted(ignored)] + warnings_extra
    return specs, text_dir, problems, warnings


# SimpleTuner spells it both ways
_REGULARISATION_KEYS = ("is_regularisation_data", "is_regularization_data")


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def _mask_datasets(entries: list, problems: list[str]) -> dict[str, str]:
    """The enabled conditioning entries of DATA_BACKEND_CONFIG: id → mask folder (masks are the only kind)."""
    masks = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("dataset_type") != "conditioning" or \
                _truthy(entry.get("disabled", False)):
            continue
        where = f"DATA_BACKEND_CONFIG[{entry.get('id', n)}]"
        if entry.get("conditioning_type") != "mask":
            problems.append(f"{where}.conditioning_type={entry.get('conditioning_type')!r}: only mask conditioning "
                            "(masked loss) is supported")
            continue
        masks[str(entry.get("id", f"dataset-{n}"))] = _local_folder(entry, where, problems,
                                                                    "masks must be a local folder")
    return masks


def _local_folder(entry: dict, where: str, problems: list[str], other_types: str) -> str:
    """An entry's `instance_data_dir`, which must be an existing local folder."""
    if entry.get("type", "local") != "local":
        problems.append(f"{where}.type={entry['type']!r}: {other_types}")
    folder = str(entry.get("instance_data_dir", ""))
    if not folder or not Path(folder).expanduser().is_dir():
        problems.append(f"{where}.instance_data_dir={folder!r}: no such folder")
    return folder


def tokenizer_max_length(s: Settings) -> int:
    """TOKENIZER_MAX_LENGTH as used: the setting, or MODEL_FLAVOUR's default when it is 0."""
    return s.data.tokenizer_max_length or TOKENIZER_MAX_LENGTH_DEFAULTS[s.model.model_flavour]


def lycoris_problems(cfg: dict) -> list[str]:
    p = []
    algo = cfg.get("algo")
    if algo not in LYCORIS_ALGOS:
        p.append(f"LYCORIS_CONFIG: algo={algo!r}; expected one of: {', '.join(LYCORIS_ALGOS)}")
    for key in ("multiplier", "linear_alpha"):
        if key in cfg and not isinstance(cfg[key], (int, float)):
            p.append(f"LYCORIS_CONFIG: {key}={cfg[key]!r}; expected a number")
    for key in ("linear_dim", "factor", "conv_dim"):
        if key in cfg and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] == 0):
            p.append(f"LYCORIS_CONFIG: {key}={cfg[key]!r}; expected a non-zero integer (-1 = full)")
    preset = cfg.get("apply_preset", {})
    if not isinstance(preset, dict):
        p.append("LYCORIS_CONFIG: apply_preset must be an object")
    elif "target_module" in preset and not isinstance(preset["target_module"], list):
        p.append("LYCORIS_CONFIG: apply_preset.target_module must be a list of module class names")
    return p


def grid_problems(resolutions: dict[str, list[tuple[int, int]]], *, patch_size: int, pos_embed_max_size: int,
                  vae_scale_factor: int, exact: tuple[str, ...] = ()) -> list[str]:
    """Sizes the AuraFlow patch grid cannot take, from the model's own transformer/VAE configs.

    A latent must split into whole patches, and the patch grid must fit inside the square
    positional-embedding table of pos_embed_max_size entries. Variables in `exact` are used as given
    (validation sizes go straight to the pipeline), so they must be multiples of the patch step too;
    training sizes are rounded into buckets."""
    step = vae_scale_factor * patch_size
    side = int(math.isqrt(pos_embed_max_size))
    max_side = side * step
    p = []
    for var, sizes in resolutions.items():
        for w, h in sizes:
            if w < step or h < step or max(w, h) > max_side:
                p.append(f"{var}={w}x{h}: this model takes sides from {step} to {max_side} pixels "
                         f"(patch grid {step} px, positional embedding {side} patches a side)")
            elif var in exact and (w % step or h % step):
                p.append(f"{var}={w}x{h}: sides must be multiples of {step} pixels for this model")
    return p
