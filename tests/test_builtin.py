import os
from pathlib import Path

import pytest
import torch
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, AutoencoderKL
from PIL import Image
from transformers import AutoTokenizer, UMT5EncoderModel

from job import builtin


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return builtin.tiny_model_dir(tmp_path_factory.mktemp("models"))


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


def test_second_call_reuses_folder(tmp_path, monkeypatch):
    first = builtin.tiny_model_dir(tmp_path)
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


def test_recipe_change_builds_new_folder(model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(builtin._SCHEDULER_CONFIG, "shift", 3.0)
    assert builtin.tiny_model_dir(tmp_path).name != model_dir.name


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
