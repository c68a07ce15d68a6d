"""Training core through the real CLI on the tiny model: it learns, the adapter loads like the seed says,
resume is exact, bad adapter configs and divergence get their exit codes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel
from lycoris import create_lycoris_from_weights
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ALL_LINEAR, TINY, losses, run_cli
from job import builtin, model
from job.pipeline import DEMO_LYCORIS

CAPTION = "a red circle"


@pytest.fixture(scope="module")
def learned(tiny_model, tmp_path_factory) -> Path:
    """One image, one caption, LoKr over every Linear, 200 AdamW steps."""
    root = tmp_path_factory.mktemp("learn")
    data = builtin.single_image_dataset_dir(root, caption=CAPTION)
    out = root / "out"
    r = run_cli("train", **TINY, model_id=tiny_model, dataset_id=data, output_dir=out, max_train_steps=200,
                learning_rate=3e-3, lycoris_config=ALL_LINEAR, checkpoint_step_interval=100, seed=7)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_loss_falls_well_below_its_start(learned):
    r = losses(learned)
    assert len(r) == 200
    first, last = sum(r[:20]) / 20, sum(r[-20:]) / 20
    assert last < 0.5 * first, (first, last)  # measured here: ~1.0 → ~0.25


def _sample(pipe, seed=0) -> torch.Tensor:
    return pipe(CAPTION, height=64, width=64, num_inference_steps=20, guidance_scale=1.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.slow
def test_sampled_latents_move_towards_the_training_image(learned, tiny_model):
    (target_file,) = (learned / "cache" / "vae").rglob("*.safetensors")  # the one image's cached latent
    target = load_file(str(target_file))["t"].unsqueeze(0)
    pipe = AuraFlowPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    base = _sample(pipe)
    wrapper, _ = create_lycoris_from_weights(1.0, str(learned / "pytorch_lora_weights.safetensors"), pipe.transformer)
    wrapper.merge_to()
    tuned = _sample(pipe)
    base_mse, tuned_mse = F.mse_loss(base, target).item(), F.mse_loss(tuned, target).item()
    assert tuned_mse < 0.5 * base_mse, (base_mse, tuned_mse)


@pytest.mark.slow
def test_without_ema_the_published_adapter_is_the_last_live_weights(learned):
    published = load_file(str(learned / "pytorch_lora_weights.safetensors"))
    live = load_file(str(learned / "checkpoints" / "checkpoint-200" / "adapter.safetensors"))
    assert published.keys() == live.keys() and all(torch.equal(published[k], live[k]) for k in live)


@pytest.mark.slow
def test_saved_adapter_loads_onto_a_fresh_transformer_like_the_seed(learned, tiny_model):
    path = learned / "pytorch_lora_weights.safetensors"
    cfg = json.loads((learned / "lycoris_config.json").read_text())
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["lycoris_config"]) == cfg == DEMO_LYCORIS

    g = torch.Generator().manual_seed(3)
    x, emb, t = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 12, 32, generator=g), torch.tensor([0.4])

    # the job's way: network applied in training mode, weights from the final file
    trained = AuraFlowTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    net = model.create_adapter(trained, cfg, torch.float32)
    net.load_state_dict(load_file(str(path)))
    # the seed's way: create_lycoris_from_weights onto a freshly loaded transformer, merged
    fresh = AuraFlowTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    before = fresh(x, emb, t, return_dict=False)[0]
    wrapper, _ = create_lycoris_from_weights(1.0, str(path), fresh)
    wrapper.merge_to()
    with torch.no_grad():
        want = trained(x, emb, t, return_dict=False)[0]
        got = fresh(x, emb, t, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - before).abs().max() > 1e-3  # the adapter really changes the output


def test_no_base_weight_gets_a_gradient(tiny_model):
    tr = AuraFlowTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").requires_grad_(False)
    net = model.create_adapter(tr, DEMO_LYCORIS, torch.float32)
    adapter = {id(p) for p in net.parameters()}
    out = tr(torch.randn(1, 4, 16, 16), torch.randn(1, 8, 32), torch.tensor([0.5]), return_dict=False)[0]
    out.square().mean().backward()
    assert all(p.grad is None for p in tr.parameters() if id(p) not in adapter)
    assert all(p.grad is not None for p in net.parameters())


def test_lycoris_preset_does_not_leak_between_networks(tiny_model):
    from lycoris import LycorisNetwork

    before = list(LycorisNetwork.TARGET_REPLACE_MODULE)
    tr = AuraFlowTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    model.create_adapter(tr, DEMO_LYCORIS, torch.float32)
    assert LycorisNetwork.TARGET_REPLACE_MODULE == before


@pytest.mark.slow
def test_resume_is_exact(tiny_model, tmp_path):
    """8 steps straight vs 4 steps, a new process from checkpoint-4, 4 more: identical adapter tensors."""
    data = builtin.toy_dataset_dir(tmp_path / "data", count=8)
    common = dict(**TINY, model_id=tiny_model, dataset_id=data, max_train_steps=8, train_batch_size=2,
                  gradient_accumulation_steps=2, caption_dropout_probability=0.3, lr_scheduler="cosine",
                  lr_warmup_steps=2, learning_rate=1e-2, lycoris_config=ALL_LINEAR, checkpoint_step_interval=4,
                  use_ema="true", ema_decay=0.9)
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_cli("train", **common, output_dir=a)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copytree(a / "checkpoints" / "checkpoint-4", b / "checkpoints" / "checkpoint-4")
    r = run_cli("train", **common, output_dir=b)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    wa, wb = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert losses(a)[4:] == losses(b)  # the same losses, step for step, after the resume
    # with USE_EMA the published adapter is the EMA, not the live weights of the last checkpoint
    ca = load_file(str(a / "checkpoints" / "checkpoint-8" / "adapter.safetensors"))
    assert any(not torch.equal(ca[k], wa[k]) for k in wa)


@pytest.mark.slow
def test_lycoris_config_that_targets_nothing_is_refused_early(tiny_model, tmp_path):
    bad = json.dumps({"algo": "lokr", "factor": 4, "apply_preset": {"target_module": ["NoSuchBlock"]}})
    r = run_cli("train", **TINY, model_id=tiny_model, dataset_id=tmp_path, lycoris_config=bad, output_dir=tmp_path / "o")
    assert r.returncode == 2
    assert "LYCORIS_CONFIG" in r.stderr and "Attention" in r.stderr and "AuraFlowTransformer2DModel" in r.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.slow
def test_divergence_exits_5_and_keeps_the_last_checkpoint(tiny_model, tmp_path):
    data = builtin.single_image_dataset_dir(tmp_path / "data")
    out = tmp_path / "out"
    r = run_cli("train", **TINY, model_id=tiny_model, dataset_id=data, output_dir=out, max_train_steps=20,
                learning_rate=1e30, max_grad_norm=0, lycoris_config=ALL_LINEAR, checkpoint_step_interval=1)
    assert r.returncode == 5, r.stderr[-2000:]
    assert "diverged" in r.stderr
    kept = sorted((out / "checkpoints").iterdir())
    assert kept, "the last good checkpoint must be kept"
    assert all(torch.isfinite(t).all() for t in load_file(str(kept[-1] / "adapter.safetensors")).values())
    assert not (out / "pytorch_lora_weights.safetensors").exists()
