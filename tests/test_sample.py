"""Validation rounds, the grid, the loss plot, the stable eval loss and EMA, through the real CLI."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ALL_LINEAR, TINY, run_cli
from job import builtin, plots, sample

LIBRARY = {"circle": "a red circle on a white background", "square": "a blue square"}


def settings(tiny_model, root):
    return dict(**{**TINY, "validation_resolution": "64x64,32x48", "validation_num_inference_steps": 3},
                model_id=tiny_model, dataset_id=builtin.single_image_dataset_dir(root), output_dir=root / "out",
                max_train_steps=6, lycoris_config=ALL_LINEAR, learning_rate=3e-3, validation_step_interval=3,
                user_prompt_library=json.dumps(LIBRARY),
                validation_prompt="a red circle", eval_steps_interval=2, num_eval_images=1, use_ema="true",
                ema_decay=0.5, checkpoint_step_interval=6)


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    r = run_cli("train", **settings(tiny_model, root))
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "out"


NAMES = sorted(f"{n}-{s}" for n in ("validation", "circle", "square") for s in ("64x64", "32x48"))


@pytest.mark.slow
def test_rounds_at_step_zero_each_interval_and_the_end(run):
    samples = run / "samples"
    assert sorted(p.name for p in samples.iterdir() if p.is_dir()) == ["step-000000", "step-000003",
                                                                        "step-000006"]
    for d in ("step-000000", "step-000003", "step-000006"):
        assert sorted(p.stem for p in (samples / d).glob("*.png")) == NAMES
    finals = sorted(p.stem for p in samples.glob("*.png") if p.name != "grid.png")
    assert finals == NAMES
    for name in NAMES:  # the final set is the last round
        assert (samples / f"{name}.png").read_bytes() == (samples / "step-000006" / f"{name}.png").read_bytes()
    with Image.open(samples / "step-000003" / "square-32x48.png") as im:
        assert im.size == (32, 48)


@pytest.mark.slow
def test_grid_is_prompts_by_rounds(run):
    samples = run / "samples"
    prompts = {f"{n}-{s}": p for n, p in (("validation", "a red circle"), *LIBRARY.items()) for s in ("64x64", "32x48")}
    cells, labels, columns = sample.grid_layout(samples, prompts)
    assert columns == ["step 0 (base model)", "step 3", "step 6"]
    assert labels == [f"{name}: {prompts[name]}" for name in NAMES]
    assert cells == [[samples / d / f"{name}.png" for d in ("step-000000", "step-000003", "step-000006")]
                     for name in NAMES]
    with Image.open(samples / "grid.png") as g:
        assert g.size == plots.grid_size(len(NAMES), 3)


@pytest.mark.slow
def test_the_adapter_shows_in_later_rounds(run):
    s = run / "samples"
    # step 0 is the base model; every round uses VALIDATION_SEED, so a difference is the adapter's doing
    assert (s / "step-000000" / "circle-64x64.png").read_bytes() != (s / "step-000006" / "circle-64x64.png").read_bytes()


@pytest.mark.slow
def test_same_seed_renders_the_same_image_twice(run, tiny_model, tmp_path):
    """Another process, the same settings: its base-model round (step 0) is byte for byte the module run's."""
    r = run_cli("train", **{**settings(tiny_model, tmp_path), "max_train_steps": 1, "checkpoint_step_interval": 0})
    assert r.returncode == 0, r.stderr[-3000:]
    for name in NAMES:
        first, again = (out / "samples" / "step-000000" / f"{name}.png" for out in (run, tmp_path / "out"))
        assert first.read_bytes() == again.read_bytes(), name


@pytest.mark.slow
def test_eval_loss_at_its_interval_and_loss_plot(run):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]
    assert all(set(r) >= {"step", "loss", "lr", "elapsed_s"} for r in rows)
    with Image.open(run / "loss.png") as im:
        assert im.size == (900, 450)


@pytest.mark.slow
def test_ema_is_what_gets_published(run):
    """USE_EMA: the saved adapter is the EMA shadow from the last checkpoint, not its live weights."""
    state = torch.load(run / "checkpoints" / "checkpoint-6" / "training_state.pt", weights_only=True)
    live = load_file(str(run / "checkpoints" / "checkpoint-6" / "adapter.safetensors"))
    published = load_file(str(run / "pytorch_lora_weights.safetensors"))
    shadow = state["ema"]["shadow"]
    assert set(shadow) <= set(published) and len(shadow) >= 30
    assert any(not torch.equal(published[k], live[k]) for k in shadow)
    for k, v in shadow.items():
        torch.testing.assert_close(published[k].float(), v, rtol=0, atol=0)
