"""Latent-caching throughput on the tiny built-in AuraFlow: a bucket's images batched through the VAE vs one at a time.

Times the whole of `job.data.cache_latents` (decode, fit, VAE encode, safetensors write) for 48 toy images at
64 px (the demo's geometry: RESOLUTION=64, pixel, cropped square, so all fall in one bucket), each run on a fresh
TensorCache in a temporary folder; the median of 3 runs per batch size.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from job import builtin, data, model
from job.cache import TensorCache

IMAGES = 48
SIZE = 64
BATCHED = 8
RUNS = 3


def _builtin_root() -> Path:
    """Where `demo` keeps the tiny model and toy data, so repeated benches skip rebuilding them."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "auraflow-lokr-job"


def _samples(model_dir: Path) -> list[data.Sample]:
    grid = model.read_grid(model_dir)
    g = data.Framing(SIZE, "pixel", True, "center", "square", grid.pixel_step,
                      int(grid.pos_embed_max_size ** 0.5) * grid.pixel_step)
    samples = data.discover(builtin.toy_dataset_dir(_builtin_root(), count=IMAGES, size=SIZE), "textfile", "", g)
    assert len(samples) == IMAGES and {s.bucket for s in samples} == {(SIZE, SIZE)}
    return samples


def _images_per_second(samples, encode, batch_size: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        cache = TensorCache(Path(tmp), "bench")
        t0 = time.perf_counter()
        data.cache_latents(samples, cache, encode, batch_size)
        elapsed = time.perf_counter() - t0
        assert cache.writes == len(samples)
    return len(samples) / elapsed


def run() -> dict:
    device = model.pick_device()
    model_dir = builtin.tiny_model_dir(_builtin_root())
    samples = _samples(model_dir)
    vae = model.load_vae(model_dir, device)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return model.encode_latents(vae, pixels)

    _images_per_second(samples, encode, BATCHED)  # warm-up: first-call allocations, file cache
    rates: dict[int, list[float]] = {BATCHED: [], 1: []}
    for _ in range(RUNS):  # interleaved, so a slow spell on a shared machine hits both alike
        for batch_size in rates:
            rates[batch_size].append(_images_per_second(samples, encode, batch_size))
    batched, single = statistics.median(rates[BATCHED]), statistics.median(rates[1])
    print(f"caching: {IMAGES} images {SIZE}px on {device.type} ({torch.get_num_threads()} threads); img/s "
          f"batch {BATCHED}: {[round(r, 1) for r in rates[BATCHED]]}, batch 1: {[round(r, 1) for r in rates[1]]}",
          file=sys.stderr)
    return {"caching_img_per_s_batched": round(batched, 2), "caching_img_per_s_single": round(single, 2),
            "caching_batched_speedup": round(batched / single, 3)}
