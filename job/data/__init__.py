"""Datasets, one file per concern: `source` (the seam every dataset layout implements, and discovery over it),
the layouts (`folder`: image files; `parquet`: the `datasets` library's parquet shards; `archive`: zip archives,
extracted once), `layout` (which layout a file listing holds, a parquet dataset's split), `images` (decoding,
buckets, crop), `masks` (masked loss), `plan` (the deterministic batch order and the fetcher), `prepare` (settings →
sources → cached latents, masks and embeddings).

Touches neither the Hub (the pipeline hands in local copies) nor training; the model only to encode.
"""
from job.data.archive import Archives
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
from job.data.layout import Footprint, footprint, pull_patterns, split_problem
from job.data.masks import Masks
from job.data.parquet import ParquetShards
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

__all__ = ["IMAGE_SUFFIXES", "UNREADABLE", "Archives", "BatchPlan", "Cached", "Folder", "Footprint", "Framing", "Item",
           "Masks", "ParquetShards", "Sample", "Source", "batch_fetcher", "bucket_for", "cache_latents", "cache_text",
           "caption_table", "discover", "discover_all", "encode_captions", "encode_images", "encode_masks", "fit",
           "footprint", "make_plan", "open_image", "open_source", "oriented_size", "pull_patterns", "split_problem",
           "to_rgb", "to_tensor"]
