"""Masked loss (SimpleTuner's mask conditioning datasets): one greyscale mask per image, found by the image's
relative name; white is trained, black is left out of the loss.

A mask follows its image through the same resize and crop, then is averaged down to the latent grid, so a latent
cell half covered by white counts half. The reduced masks are cached beside the latents.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from job.data.images import IMAGE_SUFFIXES, UNREADABLE, Framing, fit
from job.errors import DataError


@dataclass(frozen=True)
class Masks:
    root: Path

    def find(self, image_name: str) -> str | None:
        """The mask for an image: the same relative path, else the same relative stem with any image suffix."""
        if (self.root / image_name).is_file():
            return image_name
        stem = PurePosixPath(image_name).with_suffix("")
        return next((str(stem.with_suffix(sfx)) for sfx in sorted(IMAGE_SUFFIXES)
                     if (self.root / stem.with_suffix(sfx)).is_file()), None)

    def open(self, name: str) -> Image.Image:
        """8-bit greyscale, upright (EXIF rotation applied, as to the image); transparency counts as black."""
        with Image.open(self.root / name) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA", "P"):
                rgba = img.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L")
            return img.convert("L")

    def content_key(self, name: str) -> str:
        return hashlib.sha256((self.root / name).read_bytes()).hexdigest()


def match(masks: Masks, images: list[tuple[str, tuple[int, int]]], where: str) -> list[str]:
    """Each image's mask name, for (image name, its upright size) pairs; exit 4 naming the images whose mask is
    missing, cannot be decoded, or has another size (it would be cropped differently)."""
    found, missing, unreadable, other_size = [], [], [], []
    for name, size in images:
        mask = masks.find(name)
        found.append(mask or "")
        if mask is None:
            missing.append(name)
            continue
        try:
            if masks.open(mask).size != size:
                other_size.append(mask)
        except UNREADABLE:
            unreadable.append(mask)
    problems = ([f"{len(missing)} image(s) without a mask in {masks.root} (e.g. {', '.join(missing[:3])})"]
                if missing else []) + \
               ([f"{len(unreadable)} mask(s) that cannot be decoded (e.g. {', '.join(unreadable[:3])})"]
                if unreadable else []) + \
               ([f"{len(other_size)} mask(s) not the size of their image (e.g. {', '.join(other_size[:3])})"]
                if other_size else [])
    if problems:
        raise DataError(f"dataset {where}: every image needs a readable mask: " + "; ".join(problems))
    return found


def reduce(mask: Image.Image, bucket: tuple[int, int], framing: Framing, seed_key: str, vae_factor: int
           ) -> torch.Tensor:
    """(1, h, w) weights in [0, 1] on the latent grid: the mask fitted like its image (same crop seed), averaged
    over each latent cell."""
    fitted = fit(mask, bucket, framing, seed_key)
    pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)[None, None]
    return F.avg_pool2d(pixels, vae_factor)[0]
