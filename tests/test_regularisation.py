"""Parent-teacher regularisation and masked loss: the loss maths against independent computations, and the
seed's dataset shapes through the real CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AuraFlowTransformer2DModel
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY, run_cli
from job import builtin, data, flow, model
from job.loss import Batch, batch_loss
from job.pipeline import DEMO_LYCORIS

QUICK = dict(**TINY, validation_step_interval=0, eval_steps_interval=0, train_batch_size=2, resume_from_checkpoint="none")
CPU = torch.device("cpu")


def tiny_transformer(tiny_model) -> torch.nn.Module:
    return AuraFlowTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").requires_grad_(False)


def inputs(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 8, 32, generator=g), torch.rand(n, generator=g),
            torch.randn(n, 4, 16, 16, generator=g))


# ---------------------------------------------------------------- the loss, in process

def test_a_regularisation_row_is_trained_towards_the_base_models_prediction(tiny_model):
    student = tiny_transformer(tiny_model)
    network = model.create_adapter(student, DEMO_LYCORIS, torch.float32)
    with torch.no_grad():
        for p in network.parameters():  # a non-zero delta, so student and base differ
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    x0, embeds, sigmas, noise = inputs()
    batch = Batch(x0, embeds, regularisation=torch.tensor([False, True]))
    rows = batch_loss(student, batch, sigmas, noise, CPU, torch.float32, network)

    base = tiny_transformer(tiny_model)  # loaded afresh: never touched by LyCORIS
    call = dict(hidden_states=flow.noised(x0, noise, sigmas), encoder_hidden_states=embeds,
                timestep=flow.model_timestep(sigmas), return_dict=False)
    with torch.no_grad():
        base_pred, student_pred = base(**call)[0], student(**call)[0]
    assert (student_pred - base_pred).abs().max() > 1e-3  # the adapter has an effect
    want = torch.stack([((student_pred[0] - flow.velocity_target(x0, noise)[0]) ** 2).mean(),
                        ((student_pred[1] - base_pred[1]) ** 2).mean()])
    torch.testing.assert_close(rows.detach(), want, rtol=1e-5, atol=1e-7)
    assert network.multiplier == 1.0  # switched back on after the teacher's forward
    rows[1].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())


def local_transformer(hidden_states, encoder_hidden_states, timestep, return_dict):
    """Each latent cell predicted from that cell alone, so what lies under a mask cannot leak through the input."""
    return (hidden_states * 0.5 + timestep.view(-1, 1, 1, 1),)


def test_a_masked_loss_ignores_what_lies_under_the_mask():
    x0, embeds, sigmas, noise = inputs()
    mask = torch.ones(2, 1, 16, 16)
    mask[:, :, :, 8:] = 0  # the right half left out
    rows = batch_loss(local_transformer, Batch(x0, embeds, mask=mask), sigmas, noise, CPU, torch.float32)
    changed = x0.clone()
    changed[..., 8:] = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(9)) * 5
    same = batch_loss(local_transformer, Batch(changed, embeds, mask=mask), sigmas, noise, CPU, torch.float32)
    torch.testing.assert_close(same, rows, rtol=0, atol=0)
    changed[..., :8] += 1.0  # a change where the mask is white does count
    assert not torch.allclose(batch_loss(local_transformer, Batch(changed, embeds, mask=mask), sigmas, noise, CPU,
                                         torch.float32), rows)
    # the left half alone, computed by hand: the mean over the cells the mask keeps
    pred = local_transformer(flow.noised(x0, noise, sigmas), embeds, sigmas, False)[0]
    err = (pred - flow.velocity_target(x0, noise)) ** 2
    torch.testing.assert_close(rows, err[..., :8].mean(dim=(1, 2, 3)), rtol=1e-6, atol=0)
    # an all-white mask is the plain loss
    plain = batch_loss(local_transformer, Batch(x0, embeds), sigmas, noise, CPU, torch.float32)
    ones = batch_loss(local_transformer, Batch(x0, embeds, mask=torch.ones(2, 1, 16, 16)), sigmas, noise, CPU,
                      torch.float32)
    torch.testing.assert_close(ones, plain, rtol=1e-6, atol=0)


def test_a_mask_is_cropped_like_its_image_and_averaged_onto_the_latent_grid(tmp_path):
    rng = np.random.default_rng(0)
    pixels = (rng.random((60, 90)) > 0.5).astype(np.uint8) * 255  # landscape: the crop has room to move
    Image.fromarray(pixels, "L").save(tmp_path / "m.png")
    image = Image.fromarray(np.stack([pixels] * 3, -1), "RGB")
    framing = data.Framing(32, "pixel", True, "random", "square", 4, 64)
    bucket = data.bucket_for(90, 60, framing)
    masks = data.Masks(tmp_path)
    fitted_image = np.asarray(data.fit(image, bucket, framing, "seed-key"))[..., 0] / 255.0
    from job.data.masks import reduce

    reduced = reduce(masks.open("m.png"), bucket, framing, "seed-key", vae_factor=2)
    assert reduced.shape == (1, bucket[1] // 2, bucket[0] // 2)
    want = torch.nn.functional.avg_pool2d(torch.tensor(fitted_image, dtype=torch.float32)[None, None], 2)[0]
    torch.testing.assert_close(reduced, want, rtol=0, atol=1e-6)  # the same crop as the image's
    assert 0 <= reduced.min() and reduced.max() <= 1


# ---------------------------------------------------------------- through the CLI

def half_masks(images: Path, folder: Path) -> Path:
    """A mask per image, its size, the right half black."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.glob("*.png")):
        w, h = Image.open(path).size
        arr = np.full((h, w), 255, np.uint8)
        arr[:, w // 2:] = 0
        Image.fromarray(arr, "L").save(folder / path.name)
    return folder


def backend(*entries: dict) -> str:
    return json.dumps(list(entries))


@pytest.mark.slow
def test_the_seeds_regularisation_and_mask_datasets_train(tiny_model, tmp_path):
    subject = builtin.toy_dataset_dir(tmp_path / "subject", count=8)
    photos = builtin.toy_dataset_dir(tmp_path / "photos", count=8)
    masks = half_masks(subject, tmp_path / "masks")
    config = backend(
        {"id": "pseudo-camera-10k-auraflow", "type": "local", "crop": True, "crop_aspect": "square",
         "crop_style": "center", "resolution": 64, "minimum_image_size": 32, "maximum_image_size": 64,
         "resolution_type": "pixel", "instance_data_dir": str(photos), "caption_strategy": "textfile",
         "metadata_backend": "discovery", "repeats": 0, "is_regularisation_data": True},
        {"id": "dreambooth-subject", "type": "local", "crop": False, "resolution": 64, "resolution_type": "pixel",
         "instance_data_dir": str(subject), "caption_strategy": "instanceprompt", "instance_prompt": "sks shapes",
         "repeats": 0, "conditioning_data": "subject-masks"},
        {"id": "subject-masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": str(masks)},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(tmp_path / "text-cache")},
    )
    out = tmp_path / "out"
    r = run_cli("train", **QUICK, model_id=tiny_model, data_backend_config=config, output_dir=out, max_train_steps=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is_regularisation_data ignored" not in r.stderr
    assert "regularisation data (trained towards the base model's own predictions)" in r.stderr
    assert "masks: 8 on the latent grid" in r.stderr
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(0 <= row["regularisation_loss"] <= row["loss"] for row in rows)
    assert any(row["regularisation_loss"] > 0 for row in rows)  # the adapter moves, so the teacher's rows cost
    card = (out / "README.md").read_text()
    assert f"`{photos}`: regularisation data" in card and f"`{subject}`: regularisation" not in card


@pytest.mark.slow
def test_regularisation_data_alone_leaves_the_adapter_without_effect(tiny_model, tmp_path):
    photos = builtin.toy_dataset_dir(tmp_path / "photos", count=4)
    config = backend({"id": "reg", "instance_data_dir": str(photos), "caption_strategy": "textfile",
                      "is_regularization_data": "true"})  # SimpleTuner's other spelling, as a string
    out = tmp_path / "out"
    r = run_cli("train", **QUICK, model_id=tiny_model, data_backend_config=config, output_dir=out, max_train_steps=3,
                learning_rate="1e-2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "every dataset is regularisation data" in r.stderr
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in rows] == [0.0] * 3 and [row["regularisation_loss"] for row in rows] == [0.0] * 3
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    modules = {k.rsplit(".", 1)[0] for k in weights if k.endswith(".lokr_w1")}
    assert modules
    for m in modules:
        assert torch.count_nonzero(torch.kron(weights[f"{m}.lokr_w1"], weights[f"{m}.lokr_w2"])) == 0, m


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["missing", "unreadable"])
def test_an_image_without_a_readable_mask_exits_4_naming_it(tiny_model, tmp_path, fault):
    subject = builtin.toy_dataset_dir(tmp_path / "subject", count=4)
    masks = half_masks(subject, tmp_path / "masks")
    victim = sorted(masks.glob("*.png"))[1]
    if fault == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:40])
    config = backend({"id": "s", "instance_data_dir": str(subject), "caption_strategy": "textfile",
                      "conditioning_data": ["m"]},
                     {"id": "m", "dataset_type": "conditioning", "conditioning_type": "mask",
                      "instance_data_dir": str(masks)})
    r = run_cli("train", **QUICK, model_id=tiny_model, data_backend_config=config, output_dir=tmp_path / "out",
                max_train_steps=2)
    assert r.returncode == 4, r.stderr[-3000:]
    assert victim.name in r.stderr and ("without a mask" if fault == "missing" else "cannot be decoded") in r.stderr
    assert "caching latents" not in r.stderr and "Traceback" not in r.stderr


def test_conditioning_settings_are_checked_with_the_other_settings(tmp_path):
    from job.config import build_settings
    from job.errors import ConfigError

    (tmp_path / "a").mkdir()
    config = backend({"id": "s", "instance_data_dir": str(tmp_path / "a"), "conditioning_data": "nope"},
                     {"id": "c", "dataset_type": "conditioning", "conditioning_type": "canny",
                      "instance_data_dir": str(tmp_path / "a")})
    with pytest.raises(ConfigError) as e:
        build_settings([{"data_backend_config": config, "push_to_hub": "false"}])
    assert "DATA_BACKEND_CONFIG[c].conditioning_type='canny': only mask conditioning" in str(e.value)
    assert "DATA_BACKEND_CONFIG[s].conditioning_data='nope'" in str(e.value)
