"""Built-in, offline stand-ins for the real AuraFlow model and a training dataset.

The ``demo`` command and the tests need an AuraFlow pipeline folder and some captioned images without
network access or gigabytes of weights. Everything here is generated deterministically from code:
an AuraFlow-architecture pipeline with the sizes of diffusers' own AuraFlow pipeline tests, and PNGs
of coloured shapes drawn with Pillow. The transformer and text encoder keep random weights (the
transformer's position table is the smooth sine-cosine one); the VAE is fitted for a few seconds to
the shapes, so decoded samples are pictures, not noise.

Every builder writes into a hidden temporary sibling folder and renames it into place, so a folder
under its final name is always complete; a later call finds it and returns it without rebuilding.
Final names carry a fingerprint of the recipe, so changing a recipe builds into a new folder instead
of silently reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

# Bump when the build code changes in a way the config dicts below do not capture.
_RECIPE_VERSION = 2

# 64 px -> 32x32 latents (VAE factor 2) -> 16x16 patches (patch 2) = pos_embed_max_size 256, the
# most position embeddings the tiny transformer has. It is also the pipeline's default size
# (sample_size 32 * VAE factor 2). Sides must be multiples of 4 (VAE factor * patch size).
TINY_RESOLUTION = 64

# diffusers' AuraFlow pipeline fast-test transformer (tests/pipelines/aura_flow).
_TRANSFORMER_CONFIG = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 4,
    "num_mmdit_layers": 1,
    "num_single_dit_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "caption_projection_dim": 32,
    "joint_attention_dim": 32,
    "out_channels": 4,
    "pos_embed_max_size": 256,
}

# The diffusers fast test's VAE layout (two blocks: factor 2, 4 latent channels) at half its width, so
# fitting it takes seconds; 4 channels per norm group as in the real VAE (one per group would
# normalise a flat colour away). The SDXL VAE's scaling factor, which the real AuraFlow VAE uses.
_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "sample_size": TINY_RESOLUTION,
    "scaling_factor": 0.13025,
}

# How the VAE is fitted: Adam on L1 reconstruction (flat colours come out truer than with MSE) of
# random crops from a pool of shape images like the toy dataset's, with a little noise on the
# latents so the decoder also renders latents a denoiser only gets close to. Three latent channels
# are pulled towards the image's colours at latent resolution: the encoder then learns in seconds
# what it otherwise takes minutes to find, and distinct colours stay far apart in latent space.
_VAE_FIT = {"pool": 256, "steps": 200, "batch": 16, "crop": 16, "lr": 3e-3, "latent_noise": 0.1,
            "colour_prior": 1.0, "seed": 0}

# d_model must equal the transformer's joint_attention_dim. T5's special-token ids (pad 0, eos 1)
# match the tokenizer built below. No dropout, so text embeddings do not depend on train/eval mode.
_TEXT_ENCODER_CONFIG = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

# fal/AuraFlow's scheduler/scheduler_config.json.
_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.73}

# The pipeline always tokenizes to 256 tokens; use it as the default truncation length too.
_MAX_SEQUENCE_LENGTH = 256

# T5's special tokens at T5's ids.
_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]

_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
_SHAPES = ["circle", "square", "triangle", "diamond"]

# Words the tokenizer knows besides the caption vocabulary, so ordinary prompts mostly avoid <unk>.
_COMMON_WORDS = """
a an the this that these those some any all each every no not and or but if then than so as of in on
at by for with without from to into onto over under above below between behind near next beside
around through across up down out off inside outside front back top bottom left right middle center
is are was were be been being am has have had do does did can could will would should may might must
i you he she it we they me him her us them my your his its our their who what which where when why how
one two three four five six seven eight nine ten many few more most less little much very too also
only just again still here there now today day night morning evening sun moon star sky cloud rain snow
wind water sea ocean river lake beach sand mountain hill field forest tree trees flower flowers grass
leaf leaves rock stone road street city town village house home building room window door wall floor
roof garden park bridge car bus train boat ship plane bicycle person people man woman men women boy
girl child children baby friend family face eye eyes hair hand hands head body arm leg foot feet dog
dogs cat cats bird birds fish horse cow sheep animal animals food bread apple fruit cake coffee tea cup
table chair bed book books paper picture photo photograph image painting drawing art style portrait
landscape scene view close closeup detailed simple plain bright dark light shadow color colour colors
colored coloured big small large tiny huge tall short long wide narrow round flat sharp soft hard smooth
rough old new young beautiful pretty ugly good bad happy sad hot cold warm cool wet dry clean dirty
empty full open closed high low fast slow heavy quiet loud gray grey brown pink gold golden silver
dark light pale vivid shape shapes line lines dot dots pattern texture rectangle oval star heart cross
cube sphere ball box object objects sitting standing walking running flying looking holding wearing
playing eating drinking reading smiling shining made make like look see go come get take give put
photo realistic cartoon illustration digital render rendered sketch watercolor oil canvas anime minimal
minimalist abstract vintage modern background foreground edge corner side surface solid filled outline
"""


def tiny_model_dir(root: str | os.PathLike) -> Path:
    """Return ``root/<name>``, a complete tiny AuraFlowPipeline folder, building it if needed.

    The folder has the layout of ``fal/AuraFlow`` (model_index.json, transformer/, vae/,
    text_encoder/, tokenizer/, scheduler/; safetensors weights), so anything that loads the real
    repository with ``from_pretrained`` loads this one the same way.
    """
    return _build_once(Path(root) / f"tiny-auraflow-{_fingerprint(_model_recipe())}", _build_model)


def toy_dataset_dir(root: str | os.PathLike, count: int = 24, size: int = 64) -> Path:
    """Return ``root/<name>`` holding ``count`` captioned PNGs of coloured shapes, building if needed.

    Images are ``NNNN.png`` with the caption in ``NNNN.txt``, e.g. "a red circle on a blue
    background". Most are ``size`` x ``size``; every eighth is portrait or landscape with one side
    ``size * 3 // 2``, so cropping and bucketing code sees non-square inputs.
    """
    if count < 1 or size < 8:
        raise ValueError(f"need count >= 1 and size >= 8, got count={count}, size={size}")
    recipe = {
        "version": _RECIPE_VERSION,
        "count": count,
        "size": size,
        "shapes": _SHAPES,
        "colours": _COLOURS,
    }
    return _build_once(
        Path(root) / f"toy-shapes-{count}x{size}-{_fingerprint(recipe)}",
        lambda out: _write_toy_dataset(out, count, size),
    )


# The demo's four pictures: shape, colour, background. Every word differs between captions, so even the
# tiny random text encoder tells them apart; one fixed picture per caption, so the few hundred steps a
# CPU affords go to learning them rather than a distribution.
DEMO_PICTURES = [("circle", "red", "white"), ("square", "blue", "yellow"), ("triangle", "green", "black"),
                 ("diamond", "orange", "purple")]


def demo_captions() -> dict[str, str]:
    """{shape: caption} of the demo's pictures, e.g. "circle": "a red circle on a white background"."""
    return {shape: _caption(fg, shape, bg) for shape, fg, bg in DEMO_PICTURES}


def demo_dataset_dir(root: str | os.PathLike, size: int = TINY_RESOLUTION) -> Path:
    """Return ``root/<name>`` holding the demo's pictures (``size`` x ``size``, centred shapes) and captions."""
    recipe = {"version": _RECIPE_VERSION, "pictures": DEMO_PICTURES, "colours": _COLOURS, "size": size}

    def write(out: Path) -> None:
        for i, (shape, fg, bg) in enumerate(DEMO_PICTURES):
            image = _draw_shape(shape, _COLOURS[fg], _COLOURS[bg], (size, size), (size / 2, size / 2), size * 0.32)
            image.save(out / f"{i:04d}.png")
            (out / f"{i:04d}.txt").write_text(_caption(fg, shape, bg), encoding="utf-8")

    return _build_once(Path(root) / f"demo-pictures-{size}-{_fingerprint(recipe)}", write)


def single_image_dataset_dir(root: str | os.PathLike, caption: str = "a red circle", size: int = 64) -> Path:
    """Return ``root/<name>`` holding one ``size`` x ``size`` red circle on white and its caption.

    Meant for tests that check an adapter actually learns: one fixed image is easy to overfit.
    """
    if not caption.strip() or size < 8:
        raise ValueError(f"need a non-empty caption and size >= 8, got {caption!r}, size={size}")
    recipe = {"version": _RECIPE_VERSION, "caption": caption, "size": size}

    def write(out: Path) -> None:
        half = size / 2
        image = _draw_shape(
            "circle", _COLOURS["red"], _COLOURS["white"], (size, size), (half, half), size * 0.35
        )
        image.save(out / "0000.png")
        (out / "0000.txt").write_text(caption, encoding="utf-8")

    return _build_once(Path(root) / f"single-image-{size}-{_fingerprint(recipe)}", write)


def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
    # The rename is the only way a folder gets its final name, so an existing one is complete.
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # A concurrent builder renamed its identical folder into place first; keep that one.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fingerprint(recipe: object) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def _vocabulary() -> list[str]:
    caption_words = ["a", "an", "on", "background", *_SHAPES, *_COLOURS]
    words = set(_COMMON_WORDS.split()) | set(caption_words) | set(",.!?;:'\"-()")
    # Sorted so the ids do not depend on set iteration order.
    return _SPECIAL_TOKENS + sorted(words)


def _model_recipe() -> dict:
    return {
        "version": _RECIPE_VERSION,
        "transformer": _TRANSFORMER_CONFIG,
        "vae": _VAE_CONFIG,
        "vae_fit": _VAE_FIT,
        "text_encoder": _TEXT_ENCODER_CONFIG,
        "scheduler": _SCHEDULER_CONFIG,
        "vocabulary": _vocabulary(),
        "max_sequence_length": _MAX_SEQUENCE_LENGTH,
    }


def _build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(_vocabulary())}
    # A fixed word-level vocabulary rather than a trained BPE: ids are fully determined by the word
    # list, and unknown words still encode (as <unk>), which is all a random text encoder needs.
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5 appends </s> to every sequence; the pipeline's attention mask then covers it.
    eos_id = vocab["</s>"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=_MAX_SEQUENCE_LENGTH,
    )


def _build_model(out: Path) -> None:
    import torch
    from diffusers import (
        AuraFlowPipeline,
        AuraFlowTransformer2DModel,
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _build_tokenizer()
    # fork_rng keeps the caller's global RNG state untouched; seeding before each component makes
    # every component's weights independent of the others' construction order and size.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = AuraFlowTransformer2DModel(**_TRANSFORMER_CONFIG)
        _smooth_positions(transformer)
        torch.manual_seed(0)
        vae = AutoencoderKL(**_VAE_CONFIG)
        _fit_vae(vae)
        torch.manual_seed(0)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **_TEXT_ENCODER_CONFIG))
    pipeline = AuraFlowPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
    )
    pipeline.save_pretrained(out, safe_serialization=True)


def _smooth_positions(transformer) -> None:
    """Replace the transformer's random position table (N(0, 0.1^2) per entry) with the 2-D sine-cosine table,
    which gives nearby patches similar codes.

    The random one is lost in the noise of the first sampling steps, where the model must place a shape from
    the caption alone, and no adapter reaches it (a parameter, not a Linear layer): with it, the demo learned
    the pictures' colours but no shapes, even in 1500 steps. The rest of the transformer stays random.
    """
    import torch
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    table = transformer.pos_embed.pos_embed  # (1, side * side, dim), read as a side x side grid
    side = int(table.shape[1] ** 0.5)
    with torch.no_grad():
        table.copy_(get_2d_sincos_pos_embed(table.shape[-1], side, output_type="pt").to(table.dtype)[None])


def _fit_vae(vae) -> None:
    """Fit `vae` in place to toy shapes, then rescale its latents so `latent * scaling_factor` is about
    N(0, 1) per channel, as the real VAE's are (the flow-matching noise has that scale).

    One thread: CPU kernels may sum in another order with another thread count, and the build must
    give the same bytes on every machine that runs the same code.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    f = _VAE_FIT
    rng = random.Random(f["seed"])
    names = list(_COLOURS)
    images = []
    for _ in range(f["pool"]):
        fg, bg = rng.sample(names, 2)
        radius = TINY_RESOLUTION * rng.uniform(0.25, 0.4)
        centre = (rng.uniform(radius, TINY_RESOLUTION - radius), rng.uniform(radius, TINY_RESOLUTION - radius))
        image = _draw_shape(rng.choice(_SHAPES), _COLOURS[fg], _COLOURS[bg], (TINY_RESOLUTION,) * 2, centre, radius)
        images.append(torch.from_numpy(np.array(image)))
    pool = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # the pipeline's [-1, 1]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(f["seed"])
        opt = torch.optim.Adam(vae.parameters(), lr=f["lr"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=f["lr"], total_steps=f["steps"], pct_start=0.15)
        vae.train()
        crop = f["crop"]
        factor = 2 ** (len(_VAE_CONFIG["block_out_channels"]) - 1)
        for _ in range(f["steps"]):
            pick = torch.randint(0, len(pool), (f["batch"],), generator=gen)
            x0, y0 = torch.randint(0, TINY_RESOLUTION - crop + 1, (2,), generator=gen).tolist()
            x = pool[pick, :, y0:y0 + crop, x0:x0 + crop]
            mean = vae.encode(x).latent_dist.mean
            rec = vae.decode(mean + f["latent_noise"] * torch.randn(mean.shape, generator=gen)).sample
            colours = F.avg_pool2d(x, factor)  # each latent pixel's share of the image
            loss = F.l1_loss(rec, x) + f["colour_prior"] * F.mse_loss(mean[:, :3], colours)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        vae.eval().requires_grad_(False)
        with torch.no_grad():
            latents = torch.cat([vae.encode(pool[i:i + 32]).latent_dist.mean for i in range(0, len(pool), 32)])
            mu = latents.mean((0, 2, 3))
            a = 1 / (latents.std((0, 2, 3)) * vae.config.scaling_factor)
            _standardise_latents(vae, mu, a)
    finally:
        torch.set_num_threads(threads)
    vae.requires_grad_(True)


def _standardise_latents(vae, mu, a) -> None:
    """Latent z becomes a * (z - mu) per channel, and the decoder undoes it: the same autoencoder."""
    import torch

    c = mu.numel()
    q, p = vae.quant_conv, vae.post_quant_conv  # 1x1 convs: the encoder's (mean, logvar) and the decoder's input
    q.weight[:c] *= a.view(c, 1, 1, 1)
    q.bias[:c] = a * (q.bias[:c] - mu)
    q.bias[c:] += 2 * torch.log(a)  # the posterior's variance scales with a^2
    p.bias += p.weight[:, :, 0, 0] @ mu
    p.weight /= a.view(1, c, 1, 1)


def _write_toy_dataset(out: Path, count: int, size: int) -> None:
    # Every (shape, colour, different background colour) combination in a fixed shuffled order, so
    # the first images already vary all three and each image is the same whatever `count` is.
    combos = [(s, fg, bg) for s in _SHAPES for fg in _COLOURS for bg in _COLOURS if fg != bg]
    random.Random(0).shuffle(combos)
    long_side = size * 3 // 2
    for i in range(count):
        shape, fg, bg = combos[i % len(combos)]
        width, height = size, size
        if i % 8 == 7:
            width, height = (long_side, size) if (i // 8) % 2 == 0 else (size, long_side)
        rng = random.Random(i)
        radius = min(width, height) * rng.uniform(0.25, 0.4)
        # Jitter the centre but keep the whole shape inside the image.
        centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
        image = _draw_shape(shape, _COLOURS[fg], _COLOURS[bg], (width, height), centre, radius)
        image.save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(_caption(fg, shape, bg), encoding="utf-8")


def _caption(fg: str, shape: str, bg: str) -> str:
    return f"{'an' if fg[0] in 'aeiou' else 'a'} {fg} {shape} on a {bg} background"


def _draw_shape(shape: str, fg: tuple, bg: tuple, size: tuple, centre: tuple, radius: float):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(image)
    cx, cy = centre
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fg)
    elif shape == "square":
        draw.rectangle(box, fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fg)
    elif shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fg)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image
