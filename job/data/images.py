"""Pixels: decoding any image file to upright RGB, aspect buckets, resize and crop, the training tensor.

Knows nothing of where an image comes from (a source hands in a file) or of the model beyond `Framing.step`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
EXIF_ORIENTATION = 0x0112
# what decoding a hostile or broken image raises
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Framing:
    """How a dataset's images become training tensors (its fields are part of the latent cache key)."""

    resolution: int
    resolution_type: str  # pixel | pixel_area
    crop: bool
    crop_style: str  # center | random | corner
    crop_aspect: str  # square | preserve
    step: int  # sides are multiples of this (VAE factor x patch size)
    max_side: int  # the patch grid's positional-embedding limit, in pixels


def to_rgb(img: Image.Image) -> Image.Image:
    """Any pillow mode → 8-bit RGB; transparency over white, 16-bit scaled rather than clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit modes are 16-bit whatever their content; plain "I" carries no depth, so judge by the values
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):  # palette or tRNS colour key
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(file: Path | BinaryIO) -> Image.Image:
    """Decoded, upright, 8-bit RGB."""
    with Image.open(file) as img:
        img.load()  # decode now: a truncated file fails here, not in the middle of caching
        return to_rgb(ImageOps.exif_transpose(img))


def oriented_size(file: Path | BinaryIO) -> tuple[int, int]:
    """Width and height after EXIF rotation, from the header alone."""
    with Image.open(file) as img:
        w, h = img.size
        # pillow already reports a TIFF's size in display orientation; other formats in storage orientation
        if img.format != "TIFF" and img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
            w, h = h, w
        return w, h


def bucket_for(width: int, height: int, f: Framing) -> tuple[int, int]:
    """The (w, h) training size for an image: multiples of f.step within the model's grid."""
    aspect = width / height
    if f.crop and f.crop_aspect == "square":
        aspect = 1.0
    if f.resolution_type == "pixel":
        short = f.resolution
        w, h = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    else:
        area = f.resolution ** 2
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
    scale = min(1.0, f.max_side / max(w, h))  # extreme aspects shrink to fit the positional embedding
    w, h = w * scale, h * scale
    return (max(f.step, int(round(w / f.step)) * f.step), max(f.step, int(round(h / f.step)) * f.step))


def fit(img: Image.Image, bucket: tuple[int, int], f: Framing, seed_key: str) -> Image.Image:
    """Resize so the image covers the bucket, then crop the excess (centre, corner or a seeded random spot)."""
    bw, bh = bucket
    w, h = img.size
    if not f.crop:  # the bucket already has the image's aspect (to within one step)
        return img.resize((bw, bh), Image.LANCZOS)
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    img = img.resize((rw, rh), Image.LANCZOS)
    if f.crop_style == "corner":
        left, top = 0, 0
    elif f.crop_style == "random":
        rng = random.Random(seed_key)  # fixed per image, so cached latents are reproducible
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def to_tensor(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0
