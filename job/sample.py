"""Validation rounds with diffusers' own AuraFlowPipeline around the live adapted transformer, and the
prompts × rounds grid of them (drawn by job.plots). Never touches optimizer state.

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
from PIL import Image

from job import plots
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
        write_grid(self.out, {j.name: j.prompt for j in self.jobs}, self.v.validation_seed)
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


def grid_layout(samples_dir: Path, prompts: dict[str, str] | None = None
                ) -> tuple[list[list[Path | None]], list[str], list[str]]:
    """(cells, row labels, column labels) for the grid: one row per image name (labelled with its prompt when
    known), one column per round (labelled with its step). A round without that image leaves a hole."""
    cols = rounds(samples_dir)
    names = sorted({f.stem for _, d in cols for f in d.glob("*.png")})
    prompts = prompts or {}
    cells = [[d / f"{name}.png" if (d / f"{name}.png").is_file() else None for _, d in cols] for name in names]
    labels = [f"{name}: {prompts[name]}" if name in prompts else name for name in names]
    return cells, labels, [f"step {step}" + (" (base model)" if step == 0 else "") for step, _ in cols]


def write_grid(samples_dir: Path, prompts: dict[str, str] | None = None, seed: int | None = None) -> Path | None:
    """samples/grid.png: prompts (rows) × rounds (columns)."""
    cells, labels, columns = grid_layout(samples_dir, prompts)
    if not cells or not columns:
        return None
    title = "validation samples" + (f", seed {seed} every round" if seed is not None else "")
    return plots.image_grid(cells, labels, columns, samples_dir / "grid.png", title=title)
