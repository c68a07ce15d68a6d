"""Datasets: discovery, captions, image decoding, aspect buckets, and the deterministic batch plan.

Touches neither the Hub nor the model: encoding is a callable handed in by the pipeline.
The batch plan is a pure function of (seed, epoch), so a resumed run needs only the step number.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from job.errors import DataError

log = logging.getLogger("job")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Geometry:
    """How images become training tensors."""

    resolution: int
    resolution_type: str  # pixel | pixel_area
    crop: bool
    crop_style: str  # center | random | corner
    crop_aspect: str  # square | preserve
    step: int  # sides are multiples of this (VAE factor x patch size)
    max_side: int  # the patch grid's positional-embedding limit, in pixels


@dataclass(frozen=True)
class Sample:
    path: Path
    captions: tuple[str, ...]
    bucket: tuple[int, int]  # (width, height) in pixels
    geometry: Geometry
    repeats: int = 0  # extra appearances per epoch


# ---------------------------------------------------------------- captions

def _caption_table(folder: Path) -> dict[str, str]:
    """Hub imagefolder convention: metadata.jsonl or metadata.csv with file_name and a text column."""
    rows: list[dict] = []
    if (folder / "metadata.jsonl").is_file():
        rows = [json.loads(ln) for ln in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif (folder / "metadata.csv").is_file():
        with (folder / "metadata.csv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise DataError(f"CAPTION_STRATEGY=metadata: no metadata.jsonl or metadata.csv in {folder}")
    table = {}
    for row in rows:
        text = next((row[k] for k in ("text", "caption", "prompt") if row.get(k)), None)
        if "file_name" in row and text:
            table[str(Path(row["file_name"]))] = str(text)
    return table


def captions_for(path: Path, folder: Path, strategy: str, instance_prompt: str,
                 table: dict[str, str] | None) -> tuple[str, ...]:
    if strategy == "instanceprompt":
        return (instance_prompt,)
    if strategy == "filename":
        return (path.stem.replace("_", " ").strip(),)
    if strategy == "metadata":
        text = (table or {}).get(str(path.relative_to(folder)))
        return (text,) if text else ()
    txt = path.with_suffix(".txt")
    if not txt.is_file():
        return ()
    lines = [ln.strip() for ln in txt.read_text(encoding="utf-8", errors="replace").splitlines()]
    return tuple(ln for ln in lines if ln)  # several lines: one is chosen per epoch


# ---------------------------------------------------------------- images

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


def open_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # decode now: a truncated file fails here, not in the middle of caching
        return to_rgb(ImageOps.exif_transpose(img))


def oriented_size(path: Path) -> tuple[int, int]:
    """Width and height after EXIF rotation, from the header alone."""
    with Image.open(path) as img:
        w, h = img.size
        # pillow already reports a TIFF's size in display orientation; other formats in storage orientation
        if img.format != "TIFF" and img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
            w, h = h, w
        return w, h


def bucket_for(width: int, height: int, g: Geometry) -> tuple[int, int]:
    """The (w, h) training size for an image: multiples of g.step within the model's grid."""
    aspect = width / height
    if g.crop and g.crop_aspect == "square":
        aspect = 1.0
    if g.resolution_type == "pixel":
        short = g.resolution
        w, h = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    else:
        area = g.resolution ** 2
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
    scale = min(1.0, g.max_side / max(w, h))  # extreme aspects shrink to fit the positional embedding
    w, h = w * scale, h * scale
    return (max(g.step, int(round(w / g.step)) * g.step), max(g.step, int(round(h / g.step)) * g.step))


def fit(img: Image.Image, bucket: tuple[int, int], g: Geometry, seed_key: str) -> Image.Image:
    """Resize so the image covers the bucket, then crop the excess (centre, corner or a seeded random spot)."""
    bw, bh = bucket
    w, h = img.size
    if not g.crop:  # the bucket already has the image's aspect (to within one step)
        return img.resize((bw, bh), Image.LANCZOS)
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    img = img.resize((rw, rh), Image.LANCZOS)
    if g.crop_style == "corner":
        left, top = 0, 0
    elif g.crop_style == "random":
        rng = random.Random(seed_key)  # fixed per image, so cached latents are reproducible
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def to_tensor(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


# ---------------------------------------------------------------- discovery

def discover(folder: Path, strategy: str, instance_prompt: str, g: Geometry, *, repeats: int = 0,
             minimum_image_size: int = 0) -> list[Sample]:
    """Every usable image under `folder`; what was skipped is counted by reason and logged."""
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist")
    table = _caption_table(folder) if strategy == "metadata" else None
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    samples, skipped = [], Counter()
    for path in paths:
        captions = captions_for(path, folder, strategy, instance_prompt, table)
        if not captions:
            skipped["no caption"] += 1
            continue
        try:
            w, h = oriented_size(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            skipped["unreadable"] += 1
            continue
        size = min(w, h) if g.resolution_type == "pixel" else math.sqrt(w * h)
        if size < minimum_image_size:
            skipped[f"smaller than minimum_image_size {minimum_image_size}"] += 1
            continue
        samples.append(Sample(path, captions, bucket_for(w, h, g), g, repeats))
    buckets = Counter(s.bucket for s in samples)
    log.info("dataset %s: %d images usable%s; buckets %s", folder, len(samples),
             "".join(f", {n} skipped ({why})" for why, n in skipped.items()),
             ", ".join(f"{w}x{h}:{n}" for (w, h), n in sorted(buckets.items())))
    if not samples:
        raise DataError(f"no usable images in {folder} ({len(paths)} image files found"
                        + "".join(f"; {n} {why}" for why, n in skipped.items()) + ")")
    return samples


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the batch plan

class Plan:
    """Which samples (and which of their captions) make each micro-batch, for any epoch, from the seed alone."""

    def __init__(self, samples: list[Sample], batch_size: int, seed: int):
        self.samples, self.batch_size, self.seed = tuple(samples), batch_size, seed
        self._epoch, self._batches = -1, []
        self.batches_per_epoch = len(self.epoch_batches(0))

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Micro-batches of (sample index, caption index); a batch never mixes buckets."""
        if epoch == self._epoch:
            return self._batches
        rng = random.Random(f"{self.seed}:{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(self.samples):
            by_bucket.setdefault(s.bucket, []).extend([i] * (1 + s.repeats))
        batches = []
        for bucket in sorted(by_bucket):
            idx = by_bucket[bucket]
            rng.shuffle(idx)
            for k in range(0, len(idx) - self.batch_size + 1, self.batch_size):  # incomplete tails are dropped
                batches.append([(i, rng.randrange(len(self.samples[i].captions))) for i in idx[k:k + self.batch_size]])
        rng.shuffle(batches)
        self._epoch, self._batches = epoch, batches
        return batches

    def micro_batch(self, index: int) -> list[tuple[int, int]]:
        """The index-th micro-batch of the whole run (epochs follow each other)."""
        epoch, pos = divmod(index, self.batches_per_epoch)
        return self.epoch_batches(epoch)[pos]


def make_plan(samples: list[Sample], batch_size: int, seed: int, processes: int = 1) -> Plan:
    """With several processes a micro-batch is the global one (batch_size rows for each process, one bucket);
    each process takes its own rows of it (see batch_fetcher)."""
    plan = Plan(samples, batch_size * processes, seed)
    if plan.batches_per_epoch == 0:
        size = f"TRAIN_BATCH_SIZE={batch_size}" + (f" × NUM_PROCESSES={processes}" if processes > 1 else "")
        raise DataError(f"{len(samples)} usable image(s) give no full batch of {size} in any bucket; add images, "
                        "raise REPEATS, or lower TRAIN_BATCH_SIZE")
    return plan


# ---------------------------------------------------------------- caching (encoders handed in)

def cache_latents(samples: list[Sample], cache, encode: Callable[[torch.Tensor], torch.Tensor],
                  batch_size: int, mine: Callable[[int], bool] = lambda i: True) -> dict[int, str]:
    """Latent cache key per usable sample index; encodes only what the cache lacks, a bucket's images batched.
    Images whose pixels cannot be decoded get no key. With several processes, each looks after the samples that
    are `mine`; the others' appear in the cache once they are done."""
    keys = {i: cache.key(file_digest(s.path), s.bucket, s.geometry) for i, s in enumerate(samples)}
    share = [i for i in keys if mine(i)]
    todo = [i for i in share if not cache.has(keys[i])]
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in todo:
        by_bucket.setdefault(samples[i].bucket, []).append(i)
    t0, done, bad = time.monotonic(), 0, []
    for idx in by_bucket.values():
        for k in range(0, len(idx), batch_size):
            chunk, pixels = [], []
            for i in idx[k:k + batch_size]:
                try:
                    img = open_image(samples[i].path)
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                    bad.append(i)  # a header that reads but pixels that don't (truncated file): skip it
                    continue
                chunk.append(i)
                pixels.append(to_tensor(fit(img, samples[i].bucket, samples[i].geometry, keys[i])))
            done += len(idx[k:k + batch_size])
            if not chunk:
                continue
            latents = encode(torch.stack(pixels))
            if not torch.isfinite(latents).all():
                raise DataError(f"the VAE produced non-finite latents for {samples[chunk[0]].path.parent}")
            for i, lat in zip(chunk, latents):
                cache.put(keys[i], lat)
            rate = done / max(time.monotonic() - t0, 1e-9)
            log.info("caching latents %d/%d (%.1f img/s, eta %.0fs)", done, len(todo), rate, (len(todo) - done) / rate)
    for i in bad:
        del keys[i]
    log.info("latents: %d cached before, %d encoded now%s%s", len(share) - len(todo), len(todo) - len(bad),
             f", {len(bad)} undecodable image(s) skipped" if bad else "",
             f" (this process's share of {len(keys)})" if len(share) < len(keys) else "")
    return keys


def cache_text(captions: list[str], cache, encode: Callable[[list[str]], torch.Tensor], batch_size: int = 8,
               mine: Callable[[int], bool] = lambda i: True) -> dict[str, str]:
    """Text-embedding cache key per caption; encodes only what the cache lacks (of the distinct captions, those
    that are `mine`, as in cache_latents)."""
    keys = {c: cache.key(c) for c in dict.fromkeys(captions)}
    share = [c for n, c in enumerate(keys) if mine(n)]
    todo = [c for c in share if not cache.has(keys[c])]
    for k in range(0, len(todo), batch_size):
        chunk = todo[k:k + batch_size]
        for c, emb in zip(chunk, encode(chunk)):
            cache.put(keys[c], emb)
    log.info("text embeddings: %d cached before, %d encoded now%s", len(share) - len(todo), len(todo),
             f" (this process's share of {len(keys)})" if len(share) < len(keys) else "")
    return keys


def batch_fetcher(plan: Plan, latents_of: dict[int, tuple], text_cache, text_keys: dict[str, str],
                  dropout: float, rows: slice = slice(None)
                  ) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """micro-batch index → (latents, text embeddings), both from the caches; dropout swaps in the empty prompt.

    latents_of maps a sample index to its (latent cache, key): datasets may keep their own cache folders.
    `rows`: this process's rows of each (global) micro-batch."""

    def fetch(index: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch = plan.micro_batch(index)
        drop = torch.rand(len(batch), generator=g) < dropout  # drawn even at 0, so the noise stream never depends on it
        batch, drop = batch[rows], drop[rows]  # the whole batch's draws: each row's are those of one process
        latents = torch.stack([latents_of[i][0].get(latents_of[i][1]) for i, _ in batch])
        captions = ["" if d else plan.samples[i].captions[c] for (i, c), d in zip(batch, drop.tolist())]
        embeds = torch.stack([text_cache.get(text_keys[c]) for c in captions])
        return latents, embeds

    return fetch
