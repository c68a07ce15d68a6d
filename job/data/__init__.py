"""Datasets, one file per concern: `source` (the seam every dataset layout implements, and discovery over it),
`folder` (the first layout: a folder of image files), `images` (decoding, buckets, crop), `masks` (masked loss),
`plan` (the deterministic batch order and the fetcher), `prepare` (settings → sources → cached tensors).

Touches neither the Hub (the pipeline hands in local copies) nor training; the model only to encode.
"""
from job.data.folder import Folder, caption_table
from job.data.images import (
    IMAGE_SUFFIXES,
    UNREADABLE,
    Framing,
    bucket_for,
    fit,
    open_image,
    oriented_size,
    to_rgb,
    to_tensor,
)
from job.data.masks import Masks
from job.data.plan import BatchPlan, batch_fetcher, make_plan
from job.data.prepare import (
    Cached,
    cache_latents,
    cache_text,
    discover_all,
    encode_captions,
    encode_images,
    encode_masks,
    open_source,
)
from job.data.source import Item, Sample, Source, discover

__all__ = ["IMAGE_SUFFIXES", "UNREADABLE", "BatchPlan", "Cached", "Folder", "Framing", "Item", "Masks", "Sample",
           "Source", "batch_fetcher", "bucket_for", "cache_latents", "cache_text", "caption_table", "discover",
           "discover_all", "encode_captions", "encode_images", "encode_masks", "fit", "make_plan", "open_image",
           "open_source", "oriented_size", "to_rgb", "to_tensor"]
