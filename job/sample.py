"""Validation rounds with diffusers' own AuraFlowPipeline around the live adapted transformer, the
prompts × rounds grid, and the loss plot. Never touches optimizer state.

Prompt embeddings come from the text cache, so the text encoder is not needed after caching.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from job.config import Settings, tokenizer_max_length

log = logging.getLogger("job")
SAMPLES = "samples"


@dataclass(frozen=True)
class Job:
    """One image per round: a prompt at a size."""

    name: str  # file stem, unique per round
    prompt: str
    size: tuple[int, int]


def validation_jobs(s: Settings, fallback: str) -> list[Job]:
    """VALIDATION_PROMPT (else INSTANCE_PROMPT, else the first training caption) plus the prompt library,
    at every VALIDATION_RESOLUTION."""
    v = s.validation
    prompts = {}
    main = v.validation_prompt or s.data.instance_prompt or fallback
    if main:
        prompts["validation"] = main
    prompts.update(v.user_prompt_library)
    sizes = v.validation_resolution
    return [Job(nick if len(sizes) == 1 else f"{nick}-{w}x{h}", prompt, (w, h))
            for nick, prompt in prompts.items() for (w, h) in sizes]


def prompts_to_cache(s: Settings, fallback: str) -> list[str]:
    return [j.prompt for j in validation_jobs(s, fallback)] + [s.validation.validation_negative_prompt]


class Validator:
    """Renders the validation set at a step; same seed every round, so rounds are comparable."""

    def __init__(self, s: Settings, out: Path, transformer, vae, scheduler, embed_of, device: torch.device,
                 fallback: str, park_vae: bool = False, park_transformer: bool = False):
        """park_vae: the VAE waits on the CPU between decodes (OFFLOAD_DURING_STARTUP, ENABLE_MODEL_CPU_OFFLOAD);
        park_transformer: the transformer also leaves the GPU while the VAE decodes (ENABLE_MODEL_CPU_OFFLOAD)."""
        from diffusers import AuraFlowPipeline

        self.s, self.v, self.out, self.device = s, s.validation, out / SAMPLES, device
        self.jobs = validation_jobs(s, fallback)
        self.embed_of = embed_of  # prompt → cached text embedding (seq, dim)
        self.pipe = AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                     scheduler=scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer, self.vae = transformer, vae
        self.park_vae, self.park_transformer = park_vae or park_transformer, park_transformer
        if self.park_vae:
            vae.to("cpu")
        self.rendered = -1  # the step of the last round rendered by this process

    def _embeds(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed_of(prompt).unsqueeze(0).to(self.device)
        return e, (e != 0).any(-1).long()  # the pipeline zeroes padded positions; the mask is recovered from that

    @torch.no_grad()
    def render(self, step: int, final: bool = False) -> list[Path]:
        if not self.jobs:
            return []
        folder = self.out / f"step-{step:06d}"
        if final and folder.is_dir() and self.rendered == step:  # the last interval round is the final one
            return self._promote(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        was_training = self.transformer.training
        self.transformer.eval()
        neg, neg_mask = self._embeds(self.v.validation_negative_prompt)
        try:
            latents = []  # every prompt denoised first, then all decoded: the models swap places once per round
            for job in self.jobs:
                emb, mask = self._embeds(job.prompt)
                latents.append(self.pipe(
                    prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                    negative_prompt_attention_mask=neg_mask, width=job.size[0], height=job.size[1],
                    num_inference_steps=self.v.validation_num_inference_steps,
                    guidance_scale=self.v.validation_guidance, output_type="latent",
                    max_sequence_length=tokenizer_max_length(self.s),  # the cached embeddings' length already
                    generator=torch.Generator("cpu").manual_seed(self.v.validation_seed)).images)
            for job, image in zip(self.jobs, self.decode(latents)):
                image.save(tmp / f"{job.name}.png")
        finally:
            self.transformer.train(was_training)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        self.rendered = step
        write_grid(self.out)
        log.info("validation: %d image(s) for step %d in %s", len(self.jobs), step, folder)
        return self._promote(folder) if final else sorted(folder.glob("*.png"))

    def decode(self, latents: list[torch.Tensor]) -> list[Image.Image]:
        """What AuraFlowPipeline does after denoising, with the VAE brought in (and the transformer out) when
        parked, so only one of them needs the GPU at a time."""
        if self.park_transformer:
            self.transformer.to("cpu")
        if self.park_vae:
            self.vae.to(self.device)
        try:
            images = []
            for lat in latents:
                pixels = self.vae.decode(lat.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor,
                                         return_dict=False)[0]
                images += self.pipe.image_processor.postprocess(pixels, output_type="pil")
            return images
        finally:
            if self.park_vae:
                self.vae.to("cpu")
            if self.park_transformer:
                self.transformer.to(self.device)

    def finals(self) -> list[tuple[Path, str]]:
        """The final images with their prompts, for the model card."""
        return [(self.out / f"{j.name}.png", j.prompt) for j in self.jobs if (self.out / f"{j.name}.png").is_file()]

    def _promote(self, folder: Path) -> list[Path]:
        """The final round also goes to samples/<nickname>.png (the model card's images)."""
        finals = []
        for f in sorted(folder.glob("*.png")):
            shutil.copyfile(f, self.out / f.name)
            finals.append(self.out / f.name)
        return finals


def rounds(samples_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in samples_dir.glob("step-*")
             if p.is_dir() and (m := re.fullmatch(r"step-(\d+)", p.name))]
    return sorted(found)


def write_grid(samples_dir: Path, cell: int = 256) -> Path | None:
    """prompts (rows) × rounds (columns), each column headed by its step."""
    cols = rounds(samples_dir)
    names = sorted({f.stem for _, d in cols for f in d.glob("*.png")})
    if not cols or not names:
        return None
    head, label = 20, 160
    grid = Image.new("RGB", (label + cell * len(cols), head + cell * len(names)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (step, _) in enumerate(cols):
        draw.text((label + c * cell + 4, 4), f"step {step}", fill="black")
    for r, name in enumerate(names):
        draw.text((4, head + r * cell + cell // 2), name[:24], fill="black")
        for c, (_, folder) in enumerate(cols):
            f = folder / f"{name}.png"
            if f.is_file():
                with Image.open(f) as im:
                    k = min(cell / im.width, cell / im.height)  # small samples are enlarged, pixel for pixel
                    im = im.convert("RGB").resize((max(1, round(im.width * k)), max(1, round(im.height * k))),
                                                  Image.NEAREST if k > 1 else Image.LANCZOS)
                    grid.paste(im, (label + c * cell, head + r * cell))
    path = samples_dir / "grid.png"
    tmp = path.with_name(".grid.tmp.png")
    grid.save(tmp)
    os.replace(tmp, path)
    return path


def plot_losses(series: dict[str, list[tuple[int, float]]], path: Path, size: tuple[int, int] = (800, 400)) -> None:
    """A plain line plot of the loss curves (PIL only: no plotting library for one picture)."""
    w, h = size
    pad = 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    points = [p for s in series.values() for p in s]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)

        def xy(step, value):
            return (pad + (step - x0) / (x1 - x0) * (w - 2 * pad), h - pad - (value - y0) / (y1 - y0) * (h - 2 * pad))

        colours = ["#1f77b4", "#d62728", "#2ca02c"]
        for i, (name, s) in enumerate(series.items()):
            if len(s) > 1:
                draw.line([xy(*p) for p in s], fill=colours[i % 3], width=2)
            draw.text((w - pad - 120, 10 + 14 * i), name, fill=colours[i % 3])
        draw.text((5, pad - 15), f"{y1:.4g}", fill="black")
        draw.text((5, h - pad - 5), f"{y0:.4g}", fill="black")
        draw.text((pad, h - pad + 10), f"step {x0}", fill="black")
        draw.text((w - pad - 60, h - pad + 10), f"step {x1}", fill="black")
    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    tmp = path.with_name(f".{path.stem}.tmp.png")
    img.save(tmp)
    os.replace(tmp, path)
