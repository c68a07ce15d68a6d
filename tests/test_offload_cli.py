"""Group offloading and the other memory settings through the real CLI on the tiny model: the same adapter with
and without them, and `check`'s memory estimate (a module of its own, so that pytest-xdist runs it beside
test_offload.py's in-process tests rather than after them)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_cli
from job import builtin
from job.pipeline import DEMO_LYCORIS

pytestmark = pytest.mark.slow  # every test here runs the real CLI end to end


def _run(tiny_model, data, out, **extra):
    settings = {**TINY, "model_id": tiny_model, "dataset_id": data, "output_dir": out, "max_train_steps": 4,
                "train_batch_size": 2, "learning_rate": 1e-2, "lycoris_config": json.dumps(DEMO_LYCORIS),
                "gradient_checkpointing": "true", "base_model_precision": "int8-quanto",
                "validation_step_interval": 0, "checkpoint_step_interval": 0, **extra}
    r = run_cli("train", **settings)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr, load_file(str(out / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def baseline(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("offload-cli")
    data = builtin.toy_dataset_dir(root, count=4)
    return data, _run(tiny_model, data, root / "base")[1], (root / "base" / "samples" / "validation.png").read_bytes()


def test_train_with_group_offload_to_disk_gives_the_same_adapter(tiny_model, baseline, tmp_path):
    data, want, _ = baseline
    spill = tmp_path / "spill"
    log, got = _run(tiny_model, data, tmp_path / "out", enable_group_offload="true", group_offload_to_disk_path=spill,
                    group_offload_type="block_level", group_offload_use_stream="true", gradient_checkpointing="false")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the ComfyUI copy, renamed from the quantised, offloaded transformer's module list: the same tensors
    comfy = load_file(str(tmp_path / "out" / "out_comfyui.safetensors"))
    flat = {k: f"lycoris_{k.removeprefix('transformer.').rpartition('.')[0].replace('.', '_')}."
               f"{k.rpartition('.')[2]}" for k in comfy}
    assert sorted(flat.values()) == sorted(want) and all(torch.equal(comfy[k], want[flat[k]]) for k in comfy)
    assert "group offload:" in log and "GRADIENT_CHECKPOINTING" in log  # turned on, and said so
    assert "streams need a CUDA GPU" in log
    assert spill.is_dir() and list(spill.iterdir()) == []  # the run's offload folder is gone


def test_model_cpu_offload_and_offload_during_startup_change_no_number(tiny_model, baseline, tmp_path):
    data, want, png = baseline
    for name in ("enable_model_cpu_offload", "offload_during_startup"):
        out = tmp_path / name
        _, got = _run(tiny_model, data, out, **{name: "true"})
        assert all(torch.equal(got[k], want[k]) for k in want), name
        assert (out / "samples" / "validation.png").read_bytes() == png, name


def test_check_prints_a_memory_estimate(tiny_model, baseline):
    r = run_cli("check", model_id=tiny_model, dataset_id=baseline[0], push_to_hub="false", resolution=64,
                validation_resolution="64x64",
                enable_group_offload="true", base_model_precision="int8-quanto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "peak accelerator memory" in r.stderr and "group offload block_level" in r.stderr
    assert "peak host RAM" in r.stderr
