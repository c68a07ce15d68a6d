"""REPORT_TO through the real CLI: the tracker gets the metrics, never a secret."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ALL_LINEAR, TINY, run_cli
from job import builtin

pytestmark = pytest.mark.slow  # every test here runs the real CLI end to end

TOKEN = "hf_" + "Q" * 34
WANDB_KEY = "f" * 40


def all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return builtin.single_image_dataset_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tensorboard_run(tiny_model, data, tmp_path_factory):
    """Six steps with REPORT_TO=tensorboard and PROFILE=true (a trace of steps 3-5): (run, OUTPUT_DIR)."""
    out = tmp_path_factory.mktemp("tb") / "out"
    r = run_cli("train", **TINY, model_id=tiny_model, dataset_id=data, output_dir=out, max_train_steps=6,
                lycoris_config=ALL_LINEAR, report_to="tensorboard", tracker_run_name="tb", hf_token=TOKEN,
                wandb_api_key=WANDB_KEY, validation_step_interval=3, profile="true")
    assert r.returncode == 0, r.stderr[-2000:]
    return r, out


def test_tensorboard_gets_every_step_and_no_secret(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r, out = tensorboard_run
    acc = EventAccumulator(str(out / "logs" / "tensorboard" / "tb"))
    acc.Reload()
    losses = acc.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]
    jsonl = [float(ln.split('"loss": ')[1].split(",")[0]) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [round(e.value, 5) for e in losses] == [round(v, 5) for v in jsonl]
    assert [e.step for e in acc.Scalars("it_per_s")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Images("samples/validation")] == [0, 3, 6]  # the sample images, every round
    everything = all_bytes(out) + r.stdout.encode() + r.stderr.encode()
    assert TOKEN.encode() not in everything and WANDB_KEY.encode() not in everything


def test_wandb_offline_run_has_the_scalars_and_no_secret(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    r = run_cli("train", **TINY, model_id=tiny_model, dataset_id=data, output_dir=out, max_train_steps=4,
                lycoris_config=ALL_LINEAR, report_to="wandb", wandb_mode="offline", hf_token=TOKEN,
                wandb_api_key=WANDB_KEY, validation_step_interval=2, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (record,) = (out / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb 0.31 keeps offline runs in a protobuf record log and ships no reader; its strings are stored raw.
    # No setting name contains "loss" or "grad_norm": these come from the logged history.
    raw = record.read_bytes()
    assert b"loss" in raw and b"grad_norm" in raw and b"samples/validation" in raw  # scalars and the images
    assert b"learning_rate" in raw and b"optimizer" in raw  # the run config
    everything = all_bytes(out) + r.stdout.encode() + r.stderr.encode()
    assert TOKEN.encode() not in everything and WANDB_KEY.encode() not in everything


def test_profile_writes_a_trace_of_a_few_steps(tensorboard_run):
    _, out = tensorboard_run
    (trace,) = (out / "profile").glob("*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)
    assert sum(e.get("name", "").startswith("ProfilerStep#") for e in events) == 3  # the three active steps
