"""Unit tests of job.config: parsing, layering, the seed document's own examples, secrets, the patch grid.

Pure Python, no torch: the whole file runs in well under a second.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from job import config
from job.config import SPEC_BY_NAME, SPECS, build_settings, grid_problems, read_config_file
from job.errors import ConfigError

# The least a run needs beyond the defaults (no dataset, no push target by default).
MINIMAL = {"dataset_id": "some/dataset", "push_to_hub": "false"}

TOKEN = "hf_" + "QwErTyUiOpAsDfGhJkLzXcVbNmQwErTyUi"  # token-shaped: hf_ + 34 letters
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"

# ------------------------------------------------------------------ the seed document's examples, verbatim

SEED_CONFIG_JSON = """\
{
    "validation_torch_compile": "false",
    "validation_step_interval": 200,
    "validation_seed": 42,
    "validation_resolution": "1024x1024",
    "validation_prompt": "A photo-realistic image of a cat",
    "validation_num_inference_steps": "20",
    "validation_guidance": 2.0,
    "validation_guidance_rescale": "0.0",
    "vae_cache_ondemand": true,
    "vae_batch_size": 1,
    "train_batch_size": 1,
    "tracker_run_name": "eval_loss_test1",
    "seed": 42,
    "resume_from_checkpoint": "latest",
    "resolution": 1024,
    "resolution_type": "pixel_area",
    "report_to": "tensorboard",
    "output_dir": "output/models-auraflow",
    "optimizer": "optimi-lion",
    "num_train_epochs": 0,
    "num_eval_images": 1,
    "model_type": "lora",
    "model_family": "auraflow",
    "mixed_precision": "bf16",
    "minimum_image_size": 0,
    "max_train_steps": 10000,
    "max_grad_norm": 0.01,
    "lycoris_config": "config/lycoris_config.json",
    "lr_warmup_steps": 100,
    "lr_scheduler": "constant",
    "lora_type": "lycoris",
    "learning_rate": "4e-5",
    "gradient_checkpointing": "true",
    "grad_clip_method": "value",
    "eval_steps_interval": 100,
    "disable_benchmark": false,
    "data_backend_config": "config/auraflow/multidatabackend.json",
    "checkpoints_total_limit": 5,
    "checkpoint_step_interval": 500,
    "caption_dropout_probability": 0.0,
    "base_model_precision": "int8-quanto",
    "aspect_bucket_rounding": 2
}
"""

# Trailing commas included, exactly as the seed shows it.
SEED_LYCORIS_JSON = """\
{
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 16,
    "apply_preset": {
        "target_module": [
            "Attention",
        ],
        "module_algo_map": {
            "Attention": {
                "factor": 8
            },
        }
    }
}
"""

SEED_MULTIDATABACKEND_JSON = """\
[
  {
    "id": "pseudo-camera-10k-auraflow",
    "type": "local",
    "crop": true,
    "crop_aspect": "square",
    "crop_style": "center",
    "resolution": 1024,
    "minimum_image_size": 1024,
    "maximum_image_size": 1024,
    "target_downsample_size": 1024,
    "resolution_type": "pixel_area",
    "cache_dir_vae": "cache/vae/auraflow/pseudo-camera-10k",
    "instance_data_dir": "datasets/pseudo-camera-10k",
    "disabled": false,
    "skip_file_discovery": "",
    "caption_strategy": "filename",
    "metadata_backend": "discovery",
    "repeats": 0,
    "is_regularisation_data": true
  },
  {
    "id": "dreambooth-subject",
    "type": "local",
    "crop": false,
    "resolution": 1024,
    "minimum_image_size": 1024,
    "maximum_image_size": 1024,
    "target_downsample_size": 1024,
    "resolution_type": "pixel_area",
    "cache_dir_vae": "cache/vae/auraflow/dreambooth-subject",
    "instance_data_dir": "datasets/dreambooth-subject",
    "caption_strategy": "instanceprompt",
    "instance_prompt": "the name of your subject goes here",
    "metadata_backend": "discovery",
    "repeats": 1000
  },
  {
    "id": "text-embeds",
    "type": "local",
    "dataset_type": "text_embeds",
    "default": true,
    "cache_dir": "cache/text/auraflow",
    "disabled": false,
    "write_batch_size": 128
  }
]
"""

SEED_USER_PROMPT_LIBRARY_JSON = """\
{
    "anime_<token>": "a breathtaking anime-style portrait of <token>, capturing her essence with vibrant colors and expressive features",
    "chef_<token>": "a high-quality, detailed photograph of <token> as a sous-chef, immersed in the art of culinary creation",
    "woman": "a beautifully crafted portrait of a woman, highlighting her natural beauty and unique features",
    "family": "a heartwarming and cohesive family portrait, showcasing the bonds and connections between loved ones"
}
"""

SEED_IGNORED_KEYS = {
    "validation_torch_compile", "validation_guidance_rescale", "vae_cache_ondemand", "disable_benchmark",
    "aspect_bucket_rounding",
}


def _problems(layers: list[dict]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_settings(layers)
    return info.value.problems


def _one_naming(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem naming {needles} in {problems}"
    return hits[0]


def _bool_specs() -> list[config.Spec]:
    bools = {f.name for cls in config.GROUPS.values() for f in dataclasses.fields(cls) if f.type in ("bool", bool)}
    return [s for s in SPECS if s.name in bools]


def _seed_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "lycoris_config.json").write_text(SEED_LYCORIS_JSON, encoding="utf-8")
    backend = SEED_MULTIDATABACKEND_JSON
    for rel in ("datasets/pseudo-camera-10k", "datasets/dreambooth-subject", "cache/vae/auraflow/pseudo-camera-10k",
                "cache/vae/auraflow/dreambooth-subject", "cache/text/auraflow"):
        (tmp_path / rel).mkdir(parents=True, exist_ok=True)
        backend = backend.replace(f'"{rel}"', json.dumps(str(tmp_path / rel)))
    (tmp_path / "multidatabackend.json").write_text(backend, encoding="utf-8")
    text = (SEED_CONFIG_JSON
            .replace('"config/lycoris_config.json"', json.dumps(str(tmp_path / "lycoris_config.json")))
            .replace('"config/auraflow/multidatabackend.json"', json.dumps(str(tmp_path / "multidatabackend.json"))))
    full = tmp_path / "config.json"
    full.write_text(text, encoding="utf-8")
    # The same file without the multi-dataset key, which this version of the job refuses.
    data = json.loads(text)
    del data["data_backend_config"]
    no_backend = tmp_path / "config-no-backend.json"
    no_backend.write_text(json.dumps(data, indent=4), encoding="utf-8")
    return {"full": full, "no_backend": no_backend}


# ------------------------------------------------------------------ declarations


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.env)
def test_every_setting_parses_its_own_raw_default(spec):
    spec.parse(spec.default)


def test_defaults_with_the_minimal_companions_build():
    s = build_settings([MINIMAL])
    assert s.training.learning_rate == pytest.approx(4e-5)
    assert s.training.optimizer == "optimi-lion"
    assert s.adapter.lycoris_config == config.SEED_LYCORIS_CONFIG
    assert s.model_id == config.FLAVOURS["v0.3"] == "terminusresearch/auraflow-v0.3"
    assert s.output.hub_private is True


def test_env_names_are_unique_and_the_upper_cased_name():
    envs = [s.env for s in SPECS]
    assert len(envs) == len(set(envs))
    assert len({s.name for s in SPECS}) == len(SPECS)
    for s in SPECS:
        assert s.env == s.name.upper()
        # the naming rule (README): the variable is the option upper-cased with - -> _
        assert s.option.startswith("--") and s.option[2:].upper().replace("-", "_") == s.env
    assert config.CONFIG_FILE_ENV == "CONFIG_FILE" and "CONFIG_FILE" not in envs


def test_secrets_are_flagged():
    assert {s.env for s in SPECS if s.secret} == {"HF_TOKEN", "WANDB_API_KEY", "WEBHOOK_URL"}


# ------------------------------------------------------------------ booleans


@pytest.mark.parametrize("raw,expected", [
    ("true", True), ("TRUE", True), ("True", True), ("1", True), ("yes", True), ("YES", True), ("Yes", True),
    ("false", False), ("FALSE", False), ("False", False), ("0", False), ("no", False), ("NO", False), ("No", False),
    (" true ", True), ("nO", False),
])
def test_booleans_accept_the_contract_spellings_in_any_case(raw, expected):
    for spec in _bool_specs():
        assert spec.parse(raw) is expected, spec.env


def test_there_are_boolean_settings():
    envs = {s.env for s in _bool_specs()}
    assert {"PUSH_TO_HUB", "HUB_PRIVATE", "USE_EMA", "GRADIENT_CHECKPOINTING", "ENABLE_GROUP_OFFLOAD", "CROP"} <= envs


@pytest.mark.parametrize("spec", _bool_specs(), ids=lambda s: s.env)
def test_boolean_maybe_is_an_error_naming_the_variable(spec):
    problems = _problems([MINIMAL, {spec.name: "maybe"}])
    line = _one_naming(problems, spec.env, "maybe")
    assert "true" in line and "false" in line  # says what is allowed


def test_boolean_through_build_settings():
    s = build_settings([MINIMAL, {"use_ema": "YES", "gradient_checkpointing": "0", "hub_private": "No"}])
    assert s.training.use_ema is True
    assert s.training.gradient_checkpointing is False
    assert s.output.hub_private is False


# ------------------------------------------------------------------ all problems at once


def test_several_problems_are_collected_in_one_error():
    with pytest.raises(ConfigError) as info:
        build_settings([MINIMAL, {"learning_rate": "abc", "max_train_steps": "-5", "optimizer": "sgd"}])
    problems = info.value.problems
    assert len(problems) >= 3
    _one_naming(problems, "LEARNING_RATE", "abc")
    _one_naming(problems, "MAX_TRAIN_STEPS", "-5")
    line = _one_naming(problems, "OPTIMIZER", "sgd")
    assert "optimi-lion" in line  # what is allowed
    message = str(info.value)
    for needle in ("LEARNING_RATE", "abc", "MAX_TRAIN_STEPS", "-5", "OPTIMIZER", "sgd"):
        assert needle in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("name,raw", [
    ("learning_rate", "0"), ("learning_rate", "nan"), ("learning_rate", "inf"), ("learning_rate", "-1e-4"),
    ("train_batch_size", "0"), ("train_batch_size", "1.5"), ("caption_dropout_probability", "1.5"),
    ("resolution", "abc"), ("validation_resolution", "1024by1024"), ("validation_resolution", "0x512"),
    ("num_processes", "0"), ("model_flavour", "v9"), ("report_to", "mlflow"), ("grad_clip_method", "l2"),
    ("mixed_precision", "fp16"), ("user_prompt_library", "[1, 2]"), ("lycoris_config", "[]"),
])
def test_invalid_values_name_variable_and_value(name, raw):
    env = SPEC_BY_NAME[name].env
    _one_naming(_problems([MINIMAL, {name: raw}]), env, repr(raw))


def test_contradictions_are_errors():
    problems = _problems([MINIMAL, {"enable_group_offload": "true", "enable_model_cpu_offload": "true"}])
    _one_naming(problems, "ENABLE_GROUP_OFFLOAD", "ENABLE_MODEL_CPU_OFFLOAD")
    problems = _problems([{"dataset_id": "x", "push_to_hub": "true", "hf_token": TOKEN}])
    _one_naming(problems, "PUSH_TO_HUB", "HUB_MODEL_ID")
    problems = _problems([{"dataset_id": "x", "push_to_hub": "true", "hub_model_id": "me/lokr"}])
    _one_naming(problems, "PUSH_TO_HUB", "HF_TOKEN")
    _one_naming(_problems([{"push_to_hub": "false"}]), "DATASET_ID")


@pytest.mark.parametrize("extra,names", [
    ({"enable_group_offload": "true", "base_model_precision": "nf4-bnb"}, ("ENABLE_GROUP_OFFLOAD", "nf4-bnb")),
    ({"enable_model_cpu_offload": "true", "base_model_precision": "nf4-bnb"}, ("ENABLE_MODEL_CPU_OFFLOAD", "nf4-bnb")),
    ({"enable_group_offload": "true", "group_offload_use_stream": "true", "group_offload_blocks_per_group": "2"},
     ("GROUP_OFFLOAD_USE_STREAM", "GROUP_OFFLOAD_BLOCKS_PER_GROUP")),
    ({"group_offload_use_stream": "true"}, ("GROUP_OFFLOAD_USE_STREAM", "ENABLE_GROUP_OFFLOAD")),
    ({"group_offload_to_disk_path": "/fast-ssd/offload"}, ("GROUP_OFFLOAD_TO_DISK_PATH", "ENABLE_GROUP_OFFLOAD")),
])
def test_offload_contradictions_are_errors(extra, names):
    _one_naming(_problems([MINIMAL, extra]), *names)


def test_the_seeds_offload_settings_are_accepted():
    s = build_settings([MINIMAL, {"enable_group_offload": "true", "group_offload_type": "block_level",
                                  "group_offload_blocks_per_group": "1", "group_offload_use_stream": "true",
                                  "group_offload_to_disk_path": "/fast-ssd/offload",
                                  "base_model_precision": "int8-quanto"}])
    assert s.memory.enable_group_offload and s.memory.group_offload_use_stream


def test_a_bad_value_hides_only_the_contradictions_that_read_it():
    """Each cross-check names the settings it reads. A value that merely spells another setting's name (the old
    regex over the message took LEARNING_RATE here for a bad value's) keeps its own problem; a stand-in that a
    check reads without naming it in its message (GROUP_OFFLOAD_TYPE) raises nothing."""
    assert _problems([MINIMAL, {"learning_rate": "abc", "hub_model_id": "LEARNING_RATE"}]) == [
        "LEARNING_RATE='abc': expected a number > 0", "HUB_MODEL_ID='LEARNING_RATE': expected user/name"]
    assert _problems([MINIMAL, {"enable_group_offload": "true", "group_offload_use_stream": "true",
                                "group_offload_blocks_per_group": "2", "group_offload_type": "blocks"}]) == [
        "GROUP_OFFLOAD_TYPE='blocks': expected one of: block_level, leaf_level"]


def test_every_cross_check_names_declared_settings_starting_with_the_one_it_is_about():
    base = build_settings([MINIMAL])

    def changed(**groups):
        return dataclasses.replace(base, **{g: dataclasses.replace(getattr(base, g), **kw) for g, kw in groups.items()})

    found = config.cross_check(changed(
        training={"max_train_steps": 0, "num_train_epochs": 0, "optimizer": "adamw_bf16", "mixed_precision": "no",
                  "base_model_precision": "nf4-bnb"},
        memory={"enable_group_offload": True, "enable_model_cpu_offload": True, "group_offload_use_stream": True,
                "group_offload_blocks_per_group": 2},
        output={"push_to_hub": True, "hub_model_id": "", "webhook_url": "ftp://x"},
        data={"dataset_id": "", "caption_strategy": "instanceprompt"},
        checkpoints={"resume_from_checkpoint": "/no/such/folder"},
        adapter={"lycoris_config": {"algo": "nope"}},
        validation={"user_prompt_library": {"a b": "x"}},
    )) + config.cross_check(changed(
        memory={"group_offload_use_stream": True, "group_offload_to_disk_path": "/x"},
        output={"push_to_hub": False, "hub_model_id": "no slash", "push_checkpoints_to_hub": True},
        cloud={"pod_action_on_success": "terminate"},
        data={"data_backend_config": [{"type": "s3"}]},
    ))
    assert len(found) == 22, [p.text for p in found]  # each check at least once
    declared = {s.env for s in SPECS}
    for problem in found:
        assert set(problem.concerns) <= declared, problem
        assert re.match(r"[A-Z][A-Z0-9_]+", problem.text)[0] == problem.concerns[0], problem


def test_bad_value_does_not_also_raise_its_contradictions():
    # PUSH_TO_HUB=maybe falls back to a stand-in; its cross-checks must not add noise about HUB_MODEL_ID.
    problems = _problems([{"dataset_id": "x", "push_to_hub": "maybe"}])
    assert len(problems) == 1, problems
    _one_naming(problems, "PUSH_TO_HUB", "maybe")


# ------------------------------------------------------------------ layers


def test_later_layers_win():
    s = build_settings([MINIMAL, {"learning_rate": "1e-3", "seed": "7"}, {"learning_rate": "2e-4"}])
    assert s.training.learning_rate == pytest.approx(2e-4)
    assert s.training.seed == 7


def test_cli_env_layer_beats_the_config_file_layer(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"learning_rate": "abc", "optimizer": "adamw", "max_train_steps": 50,
                                "dataset_id": "from/file"}))
    file_layer, ignored, problems = read_config_file(str(path))
    assert problems == [] and ignored == []
    s = build_settings([file_layer, {"learning_rate": "1e-4", "push_to_hub": "false"}])
    assert s.training.learning_rate == pytest.approx(1e-4)  # the file's bad value was overridden
    assert s.training.optimizer == "adamw"  # the file still counts where nothing overrides it
    assert s.training.max_train_steps == 50
    assert s.data.dataset_id == "from/file"


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_free_text_does_not_override_a_lower_layer(empty):
    s = build_settings([{"dataset_id": "from/file", "push_to_hub": "false", "instance_prompt": "sks dog",
                         "tracker_project_name": "mine"},
                        {"dataset_id": empty, "instance_prompt": empty, "tracker_project_name": empty}])
    assert s.data.dataset_id == "from/file"
    assert s.data.instance_prompt == "sks dog"
    assert s.output.tracker_project_name == "mine"


def test_empty_free_text_falls_back_to_the_default():
    s = build_settings([MINIMAL, {"tracker_project_name": "", "model_revision": ""}])
    assert s.output.tracker_project_name == SPEC_BY_NAME["tracker_project_name"].default
    assert s.model.model_revision == "main"


def test_none_means_not_given():
    s = build_settings([MINIMAL, {"learning_rate": "1e-3"}, {"learning_rate": None}])
    assert s.training.learning_rate == pytest.approx(1e-3)


def test_empty_typed_value_is_an_error_not_a_silent_default():
    line = _one_naming(_problems([MINIMAL, {"learning_rate": "1e-3"}, {"learning_rate": ""}]), "LEARNING_RATE")
    assert "empty" in line


# ------------------------------------------------------------------ the seed's config.json




def test_seed_config_json_is_accepted_as_it_stands(tmp_path):
    """README: the seed's example is accepted as it stands, paths aside (its data_backend_config and
    report_to=tensorboard included). The seed has no push settings; this version cannot push yet."""
    paths = _seed_files(tmp_path)
    raw, _, problems = read_config_file(str(paths["full"]))
    assert problems == []
    s = build_settings([raw, {"push_to_hub": "false"}])
    assert s.output.report_to == "tensorboard" and len(config.datasets(s)[0]) == 2


def test_seed_config_json_values_land(tmp_path):
    paths = _seed_files(tmp_path)
    raw, ignored, problems = read_config_file(str(paths["no_backend"]))
    assert problems == []
    assert set(ignored) == SEED_IGNORED_KEYS  # named, not silently dropped
    assert raw["report_to"] == "tensorboard"
    s = build_settings([raw, {"dataset_id": str(tmp_path), "push_to_hub": "false"}])
    assert s.training.learning_rate == pytest.approx(4e-5)
    assert s.training.optimizer == "optimi-lion"
    assert s.training.max_grad_norm == pytest.approx(0.01)
    assert s.training.base_model_precision == "int8-quanto"
    assert s.training.max_train_steps == 10000
    assert s.training.lr_warmup_steps == 100
    assert s.training.gradient_checkpointing is True
    assert s.training.mixed_precision == "bf16"
    assert s.validation.validation_num_inference_steps == 20  # from the string "20"
    assert s.validation.validation_guidance == pytest.approx(2.0)
    assert s.validation.validation_resolution == ((1024, 1024),)
    assert s.validation.validation_prompt == "A photo-realistic image of a cat"
    assert s.data.resolution == 1024 and s.data.resolution_type == "pixel_area"
    assert s.data.vae_batch_size == 1
    assert s.output.output_dir == "output/models-auraflow"
    assert s.output.tracker_run_name == "eval_loss_test1"
    assert s.checkpoints.checkpoints_total_limit == 5
    assert s.checkpoints.checkpoint_step_interval == 500
    assert s.validation.eval_steps_interval == 100 and s.validation.num_eval_images == 1
    assert s.adapter.lycoris_config == config.SEED_LYCORIS_CONFIG


def test_seed_config_json_with_its_data_backend_config_is_honoured(tmp_path):
    paths = _seed_files(tmp_path)
    raw, ignored, problems = read_config_file(str(paths["full"]))
    assert problems == []
    assert set(ignored) == SEED_IGNORED_KEYS
    s = build_settings([raw, {"push_to_hub": "false", "report_to": "none"}])
    specs, text_dir, problems, warnings = config.datasets(s)
    assert problems == []
    assert text_dir == str(tmp_path / "cache/text/auraflow")
    camera, subject = specs
    assert (camera.id, camera.caption_strategy, camera.crop, camera.crop_aspect, camera.crop_style) == (
        "pseudo-camera-10k-auraflow", "filename", True, "square", "center")
    assert (camera.resolution, camera.resolution_type, camera.minimum_image_size, camera.repeats) == (
        1024, "pixel_area", 1024, 0)
    assert camera.source == str(tmp_path / "datasets/pseudo-camera-10k")
    assert camera.cache_dir_vae == str(tmp_path / "cache/vae/auraflow/pseudo-camera-10k")
    assert (subject.caption_strategy, subject.instance_prompt, subject.repeats, subject.crop) == (
        "instanceprompt", "the name of your subject goes here", 1000, False)
    assert (camera.regularisation, subject.regularisation) == (True, False)  # parent-teacher, as SimpleTuner means it
    # every seed key without an effect here is named in a warning, none silently dropped
    named = " ".join(warnings)
    for key in ("maximum_image_size", "target_downsample_size", "metadata_backend", "skip_file_discovery",
                "write_batch_size", "default"):
        assert key in named, key
    assert "is_regularisation_data" not in named


def test_data_backend_config_problems_name_the_entry(tmp_path):
    entries = [{"id": "a", "instance_data_dir": str(tmp_path / "missing"), "crop": "maybe", "type": "aws"},
               {"id": "b", "instance_data_dir": str(tmp_path), "caption_strategy": "instanceprompt"}]
    problems = _problems([{"data_backend_config": json.dumps(entries), "push_to_hub": "false"}])
    _one_naming(problems, "DATA_BACKEND_CONFIG[a].instance_data_dir")
    _one_naming(problems, "DATA_BACKEND_CONFIG[a].crop", "maybe")
    _one_naming(problems, "DATA_BACKEND_CONFIG[a].type", "aws")
    _one_naming(problems, "DATA_BACKEND_CONFIG[b]", "instance_prompt")


def test_seed_style_dashed_keys_are_read(tmp_path):
    (tmp_path / "upl.json").write_text(SEED_USER_PROMPT_LIBRARY_JSON, encoding="utf-8")
    path = tmp_path / "config.json"
    upl = json.dumps(str(tmp_path / "upl.json"))
    # a trailing comma, as in the seed's snippet
    path.write_text(f'{{\n  "--user_prompt_library": {upl},\n  "--learning-rate": 1e-4,\n}}\n')
    raw, ignored, problems = read_config_file(str(path))
    assert problems == [] and ignored == []
    s = build_settings([raw, MINIMAL])
    assert s.training.learning_rate == pytest.approx(1e-4)
    assert set(s.validation.user_prompt_library) == {"anime_<token>", "chef_<token>", "woman", "family"}


def test_config_file_problems_name_config_file(tmp_path):
    raw, ignored, problems = read_config_file(str(tmp_path / "missing.json"))
    assert raw == {} and ignored == [] and len(problems) == 1 and "CONFIG_FILE" in problems[0]
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rate": ')
    raw, _, problems = read_config_file(str(bad))
    assert len(problems) == 1 and "CONFIG_FILE" in problems[0]
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert "CONFIG_FILE" in read_config_file(str(listed))[2][0]


def test_config_file_values_go_through_the_same_parser(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"learning_rate": "abc", "use_ema": True, "max_train_steps": -3}))
    raw, _, problems = read_config_file(str(path))
    assert problems == [] and raw["use_ema"] == "true"
    got = _problems([raw, MINIMAL])
    _one_naming(got, "LEARNING_RATE", "abc")
    _one_naming(got, "MAX_TRAIN_STEPS", "-3")


# ------------------------------------------------------------------ LYCORIS_CONFIG


def test_seed_lycoris_config_from_a_file(tmp_path):
    path = tmp_path / "lycoris_config.json"
    path.write_text(SEED_LYCORIS_JSON, encoding="utf-8")
    s = build_settings([MINIMAL, {"lycoris_config": str(path)}])
    assert s.adapter.lycoris_config == config.SEED_LYCORIS_CONFIG


def test_seed_lycoris_config_inline():
    s = build_settings([MINIMAL, {"lycoris_config": SEED_LYCORIS_JSON}])
    assert s.adapter.lycoris_config == config.SEED_LYCORIS_CONFIG
    assert s.adapter.lycoris_config["apply_preset"]["module_algo_map"]["Attention"]["factor"] == 8


def test_seed_lycoris_config_is_the_default():
    assert json.loads(SPEC_BY_NAME["lycoris_config"].default) == config.SEED_LYCORIS_CONFIG


@pytest.mark.parametrize("raw", ['{"algo": "lokr", "factor": }', "{bad", '{"algo": "lokr"'])
def test_malformed_lycoris_json_names_lycoris_config(raw):
    line = _one_naming(_problems([MINIMAL, {"lycoris_config": raw}]), "LYCORIS_CONFIG")
    assert "JSON" in line


def test_malformed_lycoris_file_names_lycoris_config(tmp_path):
    path = tmp_path / "lycoris.json"
    path.write_text('{"algo": "lokr", "factor": 16')
    line = _one_naming(_problems([MINIMAL, {"lycoris_config": str(path)}]), "LYCORIS_CONFIG")
    assert "JSON" in line
    _one_naming(_problems([MINIMAL, {"lycoris_config": str(tmp_path / "nope.json")}]), "LYCORIS_CONFIG",
                "no such file")


def test_lycoris_semantic_problems():
    _one_naming(_problems([MINIMAL, {"lycoris_config": '{"algo": "bogus"}'}]), "LYCORIS_CONFIG", "algo")
    _one_naming(_problems([MINIMAL, {"lycoris_config": '{"algo": "lokr", "factor": 0}'}]), "LYCORIS_CONFIG",
                "factor")


# ------------------------------------------------------------------ secrets


def test_secret_values_never_appear_in_config_errors():
    with pytest.raises(ConfigError) as info:
        build_settings([MINIMAL, {"hf_token": TOKEN, "wandb_api_key": WANDB_KEY, "learning_rate": "abc",
                                  "optimizer": "sgd", "report_to": "wandb", "push_to_hub": "true"}])
    message = str(info.value) + "\n".join(info.value.problems) + repr(info.value.args)
    assert "LEARNING_RATE" in message and "HUB_MODEL_ID" in message
    assert TOKEN not in message and WANDB_KEY not in message


def test_secret_pasted_into_another_setting_is_not_echoed():
    with pytest.raises(ConfigError) as info:
        build_settings([MINIMAL, {"hf_token": TOKEN, "learning_rate": TOKEN}])
    assert TOKEN not in str(info.value)


def test_a_newly_declared_secret_is_masked_everywhere_without_another_edit(monkeypatch):
    """Every place that masks secrets reads secret=True from SPECS: flag one more setting and its value is masked in
    problem lines, missing from public_dict, among secrets() (the model card's mask) and registered for the log."""
    from job import cli, log

    flagged = [dataclasses.replace(s, secret=True) if s.name == "tracker_run_name" else s for s in SPECS]
    monkeypatch.setattr(config, "SPECS", flagged)
    monkeypatch.setattr(config, "SPEC_BY_NAME", {s.name: s for s in flagged})
    monkeypatch.setattr(log, "_secrets", set())
    secret = "name-of-a-secret-run"
    assert _problems([MINIMAL, {"tracker_run_name": secret, "hub_model_id": secret}]) == [
        f"HUB_MODEL_ID='{log.MASK}': expected user/name"]
    s = build_settings([MINIMAL, {"tracker_run_name": secret, "validation_prompt": f"a {secret} photo"}])
    assert s.secrets() == [secret]
    public = s.public_dict()
    assert "tracker_run_name" not in public and public["validation_prompt"] == f"a {log.MASK} photo"
    cli.register_secrets({"tracker_run_name": secret})
    assert log.redact(f"run {secret} started") == f"run {log.MASK} started"


def test_public_dict_has_no_secrets():
    s = build_settings([MINIMAL, {"hf_token": TOKEN, "wandb_api_key": WANDB_KEY}])
    assert s.access.hf_token == TOKEN and set(s.secrets()) == {TOKEN, WANDB_KEY}
    public = s.public_dict()
    assert "hf_token" not in public and "wandb_api_key" not in public
    dumped = json.dumps(public)  # must be JSON-serialisable for training_config.json
    assert TOKEN not in dumped and WANDB_KEY not in dumped
    assert TOKEN not in repr(s) and WANDB_KEY not in repr(s)
    assert public["learning_rate"] == pytest.approx(4e-5)
    assert public["model_id"] == s.model_id


# ------------------------------------------------------------------ the AuraFlow patch grid

AURAFLOW = {"patch_size": 2, "pos_embed_max_size": 9216, "vae_scale_factor": 8}  # sides 16..1536


@pytest.mark.parametrize("size", [(16, 16), (1024, 1024), (1280, 768), (768, 1280), (1536, 1536), (1536, 16)])
def test_grid_accepts_sizes_inside_the_table(size):
    assert grid_problems({"VALIDATION_RESOLUTION": [size]}, **AURAFLOW) == []


@pytest.mark.parametrize("size", [(1552, 1552), (2048, 1024), (1024, 2048), (1537, 1024)])
def test_grid_refuses_sizes_larger_than_the_positional_table(size):
    problems = grid_problems({"RESOLUTION": [size]}, **AURAFLOW)
    assert len(problems) == 1
    assert "RESOLUTION" in problems[0] and f"{size[0]}x{size[1]}" in problems[0] and "1536" in problems[0]


@pytest.mark.parametrize("size", [(8, 8), (15, 1024), (1024, 8)])
def test_grid_refuses_sizes_smaller_than_a_patch(size):
    problems = grid_problems({"VALIDATION_RESOLUTION": [size]}, **AURAFLOW)
    assert len(problems) == 1
    assert "VALIDATION_RESOLUTION" in problems[0] and "16" in problems[0]


def test_grid_reports_every_bad_size_by_variable():
    problems = grid_problems({"RESOLUTION": [(2048, 2048)], "VALIDATION_RESOLUTION": [(1024, 1024), (8, 8),
                                                                                       (4096, 512)]}, **AURAFLOW)
    assert len(problems) == 3
    assert sum("VALIDATION_RESOLUTION" in p for p in problems) == 2


def test_grid_uses_the_models_own_numbers():
    tiny = {"patch_size": 2, "pos_embed_max_size": 256, "vae_scale_factor": 2}  # the built-in model: 4..64
    assert grid_problems({"RESOLUTION": [(64, 64), (4, 4)]}, **tiny) == []
    assert len(grid_problems({"RESOLUTION": [(128, 128), (2, 2)]}, **tiny)) == 2


def test_lenient_json_leaves_string_contents_alone():
    from job.config import loads_lenient

    assert loads_lenient('{"a": "x,}", "b": [1, 2,],}') == {"a": "x,}", "b": [1, 2]}
    assert loads_lenient('{"s": "q\\",}",}') == {"s": 'q",}'}


def test_validation_sizes_must_be_whole_patches():
    from job.config import grid_problems

    kw = dict(patch_size=2, pos_embed_max_size=9216, vae_scale_factor=8)
    assert grid_problems({"VALIDATION_RESOLUTION": [(1000, 1000)]}, **kw, exact=("VALIDATION_RESOLUTION",))
    assert not grid_problems({"VALIDATION_RESOLUTION": [(1024, 1024), (1280, 768)]}, **kw,
                             exact=("VALIDATION_RESOLUTION",))
    assert not grid_problems({"RESOLUTION": [(1000, 1000)]}, **kw)  # training sizes are rounded into buckets


@pytest.mark.parametrize("extra,cuda,cpu", [
    ({"enable_group_offload": "true"}, True, False),  # the default (auto): the stream wherever CUDA allows it
    ({"enable_group_offload": "true", "group_offload_use_stream": "auto"}, True, False),
    ({"enable_group_offload": "true", "group_offload_use_stream": "false"}, False, False),
    ({"enable_group_offload": "true", "group_offload_use_stream": "true"}, True, True),  # offload.apply warns on CPU
    ({"enable_group_offload": "true", "group_offload_blocks_per_group": "2"}, False, False),
    ({"enable_group_offload": "true", "group_offload_type": "leaf_level"}, False, False),
    ({"enable_group_offload": "true", "group_offload_to_disk_path": "/fast-ssd/offload"}, False, False),
    ({}, False, False),
])
def test_the_offload_stream_is_the_default_on_cuda_where_the_grouping_allows_it(extra, cuda, cpu):
    import torch

    from job.model import use_stream

    s = build_settings([MINIMAL, extra])  # auto with 2 blocks per group, or without offload, is no contradiction
    assert (use_stream(s, torch.device("cuda")), use_stream(s, torch.device("cpu"))) == (cuda, cpu)
