import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, AutoencoderKL
from PIL import Image
from transformers import AutoTokenizer, UMT5EncoderModel

from job import builtin


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model  # the session's build: the VAE fit is worth doing once


@pytest.fixture(scope="module")
def pipe(model_dir) -> AuraFlowPipeline:
    pipe = AuraFlowPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_has_the_real_repo_layout(model_dir):
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (model_dir / sub).is_dir(), sub
    assert (model_dir / "model_index.json").is_file()
    assert not list(model_dir.rglob("*.bin")), "weights must be safetensors"
    # Components load on their own, the way training code loads them from fal/AuraFlow.
    transformer = AuraFlowTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    text_encoder = UMT5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    assert transformer.config.joint_attention_dim == text_encoder.config.d_model
    assert vae.config.scaling_factor == pytest.approx(0.13025)
    assert text_encoder.config.vocab_size == len(tokenizer)


def test_pipeline_generates_latents(pipe):
    latents = pipe(
        prompt="a red circle",
        height=builtin.TINY_RESOLUTION,
        width=builtin.TINY_RESOLUTION,
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    side = builtin.TINY_RESOLUTION // pipe.vae_scale_factor
    assert latents.shape == (1, 4, side, side)
    assert torch.isfinite(latents).all()


def test_encode_prompt_zeroes_padding(pipe):
    embeds, _, _, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
    assert embeds.shape == (1, 256, 32)
    # Three words plus the </s> the tokenizer appends, as T5 does.
    n_tokens = len(pipe.tokenizer("a red circle").input_ids)
    assert n_tokens == 4
    assert pipe.tokenizer.unk_token_id not in pipe.tokenizer("a red circle").input_ids
    assert (embeds[0, :n_tokens].abs().sum(-1) > 0).all()
    assert (embeds[0, n_tokens:] == 0).all()


def test_builds_are_byte_identical(model_dir, tmp_path):
    other = builtin.tiny_model_dir(tmp_path)
    assert other.name == model_dir.name
    assert _tree(other) == _tree(model_dir)


def test_second_call_reuses_folder(model_dir, tmp_path, monkeypatch):
    shutil.copytree(model_dir, tmp_path / model_dir.name)
    first = tmp_path / model_dir.name
    mtimes = {p: p.stat().st_mtime_ns for p in [first, *first.rglob("*")]}

    def fail(out):
        raise AssertionError("rebuilt an existing folder")

    monkeypatch.setattr(builtin, "_build_model", fail)
    assert builtin.tiny_model_dir(tmp_path) == first
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def crash(out):
        (out / "model_index.json").write_text("{}")
        raise RuntimeError("crash mid-build")

    monkeypatch.setattr(builtin, "_build_model", crash)
    with pytest.raises(RuntimeError):
        builtin.tiny_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("table, key, value", [("_SCHEDULER_CONFIG", "shift", 3.0), ("_VAE_FIT", "steps", 199)])
def test_recipe_change_builds_new_folder(model_dir, tmp_path, monkeypatch, table, key, value):
    monkeypatch.setitem(getattr(builtin, table), key, value)
    built = []
    monkeypatch.setattr(builtin, "_build_model", built.append)  # the name is the point, not a second fit
    other = builtin.tiny_model_dir(tmp_path)
    assert other.name != model_dir.name and len(built) == 1 and built[0].parent == tmp_path


def test_toy_dataset(tmp_path):
    count = 10
    root = builtin.toy_dataset_dir(tmp_path / "a", count=count, size=32)
    images = sorted(root.glob("*.png"))
    assert len(images) == count
    sizes = set()
    for image in images:
        with Image.open(image) as im:
            assert im.mode == "RGB"
            sizes.add(im.size)
        assert image.with_suffix(".txt").read_text(encoding="utf-8").strip()
    assert (32, 32) in sizes and any(w != h for w, h in sizes), "expected square and non-square images"
    # Deterministic bytes, and idempotent.
    assert _tree(builtin.toy_dataset_dir(tmp_path / "b", count=count, size=32)) == _tree(root)
    assert builtin.toy_dataset_dir(tmp_path / "a", count=count, size=32) == root
    assert os.listdir(tmp_path / "a") == [root.name]


def test_single_image_dataset(tmp_path):
    root = builtin.single_image_dataset_dir(tmp_path, caption="a red circle", size=48)
    (image,) = root.glob("*.png")
    with Image.open(image) as im:
        assert im.size == (48, 48)
        assert im.getpixel((0, 0)) == (255, 255, 255)
        assert im.getpixel((24, 24)) == (220, 30, 30)
    assert image.with_suffix(".txt").read_text(encoding="utf-8") == "a red circle"


def _as_batch(paths) -> torch.Tensor:
    """RGB PNGs as the pipeline's VAE input: (n, 3, h, w) in [-1, 1]."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def vae(model_dir) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()


@torch.no_grad()
def test_vae_reconstructs_the_toy_images(vae, tmp_path):
    images = [p for p in sorted(builtin.toy_dataset_dir(tmp_path).glob("*.png")) if Image.open(p).size == (64, 64)]
    x = _as_batch(images)
    assert len(x) == 21  # every image but the three non-square ones

    def error(model):
        return F.mse_loss(model.decode(model.encode(x).latent_dist.mean).sample.clamp(-1, 1), x).item()

    torch.manual_seed(0)
    unfitted = error(AutoencoderKL(**builtin._VAE_CONFIG).eval())  # what the build starts from
    fitted = error(vae)
    assert fitted < 0.04 and fitted < unfitted / 10, (fitted, unfitted)  # measured: 0.026 vs 0.64
    scaled = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert ((scaled.std((0, 2, 3)) - 1).abs() < 0.2).all() and (scaled.mean((0, 2, 3)).abs() < 0.3).all()


@torch.no_grad()
def test_vae_latents_have_the_noise_scale_and_keep_colours_apart(vae):
    # flat images of each palette colour: the decoder gives the colour back, and scaled latents sit about a unit
    # apart, the scale of the flow-matching noise, as the real VAE's scaling factor makes them
    colours = torch.tensor(list(builtin._COLOURS.values())).float() / 127.5 - 1
    flat = colours.view(-1, 3, 1, 1).expand(-1, 3, 64, 64)
    latents = vae.encode(flat).latent_dist.mean
    back = vae.decode(latents).sample.clamp(-1, 1).mean((2, 3))
    assert (back - colours).abs().max().item() * 127.5 < 24  # measured: at most 17 of 255 per channel
    scaled = (latents * vae.config.scaling_factor).mean((2, 3))
    gaps = torch.cdist(scaled, scaled) + torch.eye(len(colours)) * 99
    assert gaps.min().item() > 0.5  # measured: 1.07 for the closest pair
    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    decoded = vae.decode(noise / vae.config.scaling_factor).sample
    assert decoded.std().item() > 0.3  # pure noise decodes to coloured noise, not a flat field (step 0 of a run)


def test_the_transformer_knows_where_it_is(model_dir):
    # the position table is smooth: neighbouring patches get near-identical codes, distant ones different codes,
    # so a shape can be placed from the caption alone (the rest of the transformer is random)
    transformer = AuraFlowTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    table = transformer.pos_embed.pos_embed[0].detach()
    side = int(len(table) ** 0.5)
    grid = table.view(side, side, -1)
    neighbours = (grid[:, 1:] - grid[:, :-1]).norm(dim=-1).mean()
    far = (grid[:, side // 2:] - grid[:, : side - side // 2]).norm(dim=-1).mean()
    assert neighbours < 0.5 * far, (neighbours, far)  # measured: 0.39 (a random table: 1.0)
    assert table.std() > 0.3  # as strong as the patch content, not the 0.1 of a random initialisation
