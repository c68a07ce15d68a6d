"""The data-source seam: what the job needs from a place that holds captioned images, and discovery over it.

A source lists its items (a name and the captions) and, for one item, gives its size from the header alone,
its decoded image, and a content key (part of the latent cache key, so a renamed or re-uploaded file that is
byte-identical is not encoded again). `folder.Folder` is the first source; another layout (Hub parquet
shards, a zip) is one more class with these methods, chosen in `prepare.open_source`.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from job.data.images import UNREADABLE, Framing, bucket_for
from job.data.masks import Masks
from job.errors import DataError

log = logging.getLogger("job")


@dataclass(frozen=True)
class Item:
    name: str  # unique within its source, stable across runs (a folder's: the relative path)
    captions: tuple[str, ...]  # several: one is chosen per epoch; none: the item is skipped


class Source(Protocol):
    where: str  # names the source in messages

    def items(self) -> list[Item]: ...

    def size(self, name: str) -> tuple[int, int]:
        """(width, height) after EXIF rotation, from the header alone."""

    def open(self, name: str) -> Image.Image:
        """Decoded, upright, 8-bit RGB; raises one of images.UNREADABLE when the pixels cannot be read."""

    def content_key(self, name: str) -> str: ...


@dataclass(frozen=True)
class Sample:
    """One usable image of one source: its captions, training size and the framing that made it."""

    source: Source
    name: str
    captions: tuple[str, ...]
    bucket: tuple[int, int]  # (width, height) in pixels
    framing: Framing
    repeats: int = 0  # extra appearances per epoch
    regularisation: bool = False  # trained towards the base model's own prediction (loss.batch_loss)
    mask: tuple[Masks, str] | None = None  # (its dataset's masks, this image's mask name): masked loss


def discover(source: Source, framing: Framing, *, repeats: int = 0, minimum_image_size: int = 0) -> list[Sample]:
    """Every usable item of `source`; what was skipped is counted by reason and logged."""
    items = source.items()
    samples, skipped = [], Counter()
    for item in items:
        if not item.captions:
            skipped["no caption"] += 1
            continue
        try:
            w, h = source.size(item.name)
        except UNREADABLE:
            skipped["unreadable"] += 1
            continue
        size = min(w, h) if framing.resolution_type == "pixel" else math.sqrt(w * h)
        if size < minimum_image_size:
            skipped[f"smaller than minimum_image_size {minimum_image_size}"] += 1
            continue
        samples.append(Sample(source, item.name, item.captions, bucket_for(w, h, framing), framing, repeats))
    buckets = Counter(s.bucket for s in samples)
    log.info("dataset %s: %d images usable%s; buckets %s", source.where, len(samples),
             "".join(f", {n} skipped ({why})" for why, n in skipped.items()),
             ", ".join(f"{w}x{h}:{n}" for (w, h), n in sorted(buckets.items())))
    if not samples:
        raise DataError(f"no usable images in {source.where} ({len(items)} image files found"
                        + "".join(f"; {n} {why}" for why, n in skipped.items()) + ")")
    return samples
