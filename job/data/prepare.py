"""Datasets from settings to cached tensors: each source opened and discovered with its own framing, then the
latents and text embeddings that the caches lack encoded (each encoder loaded once, used, freed), shared out
among the processes.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from job import model
from job.cache import TensorCache, component_identity
from job.config import TOKENIZER_MAX_LENGTH_DEFAULTS, DatasetSpec
from job.data import layout
from job.data.archive import Archives
from job.data.folder import Folder
from job.data.images import UNREADABLE, Framing, fit, to_tensor
from job.data.masks import Masks, match, reduce
from job.data.parquet import ParquetShards
from job.data.plan import BatchPlan, batch_fetcher
from job.data.source import Sample, Source, discover
from job.distributed import SINGLE, Context
from job.errors import DataError
from job.loss import Batch

log = logging.getLogger("job")


def open_source(folder: Path, spec: DatasetSpec, archive_cache: Path | None = None) -> Source:
    """The source for a dataset's local copy, by what it holds: parquet shards (the spec's split), zip archives
    (extracted into `archive_cache`), or image files. For a folder, `huggingface` captions are the metadata file's."""
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    found = layout.kind(names)
    if found == layout.PARQUET:
        problem = layout.split_problem(names, spec.split, str(folder))
        if problem:
            raise DataError(problem)
        return ParquetShards(folder, layout.shards(names, spec.split), spec.caption_strategy, spec.instance_prompt,
                             spec.image_column, spec.caption_column)
    strategy = "metadata" if spec.caption_strategy == "huggingface" else spec.caption_strategy
    if found == layout.ZIP:
        return Archives(folder, strategy, archive_cache or folder.parent / f"{folder.name}.extracted",
                        spec.instance_prompt)
    return Folder(folder, strategy, spec.instance_prompt)


def discover_all(specs: list[DatasetSpec], folders: list[Path], grid: model.Grid, out: Path
                 ) -> tuple[list[Sample], list[Path]]:
    """Every dataset's samples, each with its own framing, regularisation flag and masks, and each sample's latent
    cache folder."""
    samples, cache_dirs = [], []
    for spec, folder in zip(specs, folders):
        framing = Framing(spec.resolution, spec.resolution_type, spec.crop, spec.crop_style, spec.crop_aspect,
                          grid.pixel_step, int(grid.pos_embed_max_size ** 0.5) * grid.pixel_step)
        source = open_source(folder, spec, out / "cache" / "archives")
        found = discover(source, framing, repeats=spec.repeats, minimum_image_size=spec.minimum_image_size)
        if spec.mask_dir:
            masks = Masks(Path(spec.mask_dir))
            names = match(masks, [(smp.name, source.size(smp.name)) for smp in found], source.where)
            found = [replace(smp, mask=(masks, name)) for smp, name in zip(found, names)]
        if spec.regularisation:
            found = [replace(smp, regularisation=True) for smp in found]
            log.info("dataset %s: regularisation data (trained towards the base model's own predictions)",
                     source.where)
        samples += found
        cache_dirs += [Path(spec.cache_dir_vae) if spec.cache_dir_vae else out / "cache" / "vae"] * len(found)
    return samples, cache_dirs


@dataclass
class Cached:
    """Where each sample's latents and each caption's embedding are: what the loop and the eval curve read."""

    samples: list[Sample]  # those whose images decoded
    latents_of: dict[int, tuple[TensorCache, str]]  # sample index → (its latent cache, key)
    text_cache: TensorCache
    text_keys: dict[str, str]  # caption → key
    masks_of: dict[int, tuple[TensorCache, str]] = field(default_factory=dict)  # sample index → its reduced mask

    def embeds(self, caption: str) -> torch.Tensor:
        return self.text_cache.get(self.text_keys[caption])

    def fetcher(self, plan: BatchPlan, dropout: float, rows: slice) -> Callable[[int, torch.Generator], Batch]:
        return batch_fetcher(plan, self.latents_of, self.text_cache, self.text_keys, dropout, rows, self.masks_of)

    def eval_batches(self, n: int) -> list[Batch]:
        """The first `n` samples with their first captions, one per batch (buckets may differ)."""
        return [Batch(self.latents_of[i][0].get(self.latents_of[i][1]).unsqueeze(0),
                      self.embeds(self.samples[i].captions[0]).unsqueeze(0))
                for i in range(min(n, len(self.samples)))]


def encode_images(model_dir: Path, samples: list[Sample], cache_dirs: list[Path], batch_size: int,
                  device: torch.device, ctx: Context = SINGLE
                  ) -> tuple[list[Sample], dict[int, tuple[TensorCache, str]]]:
    """(the samples whose images decoded, their index → (cache, key)). The VAE lives only inside this call:
    loaded once, used for what the caches lack, freed on return. Each rank encodes its share."""
    vae = model.load_vae(model_dir, device)
    identity = component_identity(model_dir, "vae")
    latents_of = {}
    for folder in dict.fromkeys(cache_dirs):
        idx = [i for i, d in enumerate(cache_dirs) if d == folder]
        cache = TensorCache(folder, identity)
        keys = cache_latents([samples[i] for i in idx], cache, functools.partial(model.encode_latents, vae),
                             batch_size, mine=ctx.share)
        latents_of.update({idx[j]: (cache, key) for j, key in keys.items()})
        cache.refill = functools.partial(_refill_latents, model_dir, device, cache,
                                         {key: samples[idx[j]] for j, key in keys.items()})
    del vae
    model.release(device)
    if ctx.world > 1:
        ctx.barrier()  # every share is encoded; what is still missing could not be decoded by its rank
        latents_of = {i: (cache, key) for i, (cache, key) in latents_of.items() if cache.has(key)}
    kept = sorted(latents_of)
    if not kept:
        raise DataError("no image could be decoded in any dataset")
    return [samples[i] for i in kept], {n: latents_of[i] for n, i in enumerate(kept)}


def encode_masks(samples: list[Sample], latents_of: dict[int, tuple[TensorCache, str]], vae_factor: int,
                 ctx: Context = SINGLE) -> dict[int, tuple[TensorCache, str]]:
    """Each masked sample's mask on the latent grid, cached beside its latents (keyed by the mask's bytes and the
    latent key, which holds the image, bucket and crop). Cheap: no model; each rank its share."""
    masks_of = {}
    for i, smp in enumerate(samples):
        if smp.mask is None:
            continue
        masks, name = smp.mask
        cache, latent_key = latents_of[i]
        key = cache.key("mask", masks.content_key(name), latent_key)
        if ctx.share(i) and not cache.has(key):
            cache.put(key, reduce(masks.open(name), smp.bucket, smp.framing, latent_key, vae_factor).half())
        masks_of[i] = (cache, key)
    if masks_of:
        log.info("masks: %d on the latent grid", len(masks_of))
        ctx.barrier()
    return masks_of


def encode_captions(model_dir: Path, captions: list[str], folder: Path, device: torch.device,
                    ctx: Context = SINGLE, *, max_length: int = TOKENIZER_MAX_LENGTH_DEFAULTS["v0.3"]
                    ) -> tuple[TensorCache, dict[str, str]]:
    """Likewise the text encoder: training captions, the empty prompt (caption dropout) and the validation
    prompts, so sampling never needs the encoder again. Each is `max_length` tokens (TOKENIZER_MAX_LENGTH), part of
    the cache's identity; how many were cut to it is logged."""
    text_pipe = model.load_text_encoder(model_dir, device)
    cache = TensorCache(folder, f"{component_identity(model_dir, 'text_encoder')}-{max_length}")
    if ctx.is_main:
        distinct = list(dict.fromkeys(captions))
        counts = model.token_counts(text_pipe.tokenizer, distinct)
        cut = sum(1 for n in counts if n > max_length)
        longest = max(counts, default=0)
        if cut:
            log.warning("text: %d of %d distinct captions and prompts are longer than TOKENIZER_MAX_LENGTH=%d tokens "
                        "and were truncated (the longest has %d)", cut, len(distinct), max_length, longest)
        else:
            log.info("text: all %d distinct captions and prompts fit TOKENIZER_MAX_LENGTH=%d tokens (the longest has "
                     "%d)", len(distinct), max_length, longest)
    keys = cache_text(captions, cache, functools.partial(_encode_text, text_pipe, device, max_length), mine=ctx.share)
    del text_pipe
    model.release(device)
    ctx.barrier()  # every rank's share is written
    cache.refill = functools.partial(_refill_text, model_dir, device, max_length, cache,
                                     {key: c for c, key in keys.items()})
    return cache, keys


# An entry found unreadable mid-run (TensorCache.get): encoded again as at start-up, on the same device (so to the
# same values and dtype), with its encoder loaded for it and freed after.

def _refill_latents(model_dir: Path, device: torch.device, cache: TensorCache, samples: dict[str, Sample],
                    key: str) -> None:
    if key not in samples:  # a mask beside the latents: encode_masks makes it again at the next start
        return
    vae = model.load_vae(model_dir, device)
    cache_latents([samples[key]], cache, functools.partial(model.encode_latents, vae), 1)
    del vae
    model.release(device)


def _refill_text(model_dir: Path, device: torch.device, max_length: int, cache: TensorCache,
                 captions: dict[str, str], key: str) -> None:
    text_pipe = model.load_text_encoder(model_dir, device)
    cache_text([captions[key]], cache, functools.partial(_encode_text, text_pipe, device, max_length))
    del text_pipe
    model.release(device)


def _encode_text(text_pipe, device: torch.device, max_length: int, captions: list[str]) -> torch.Tensor:
    return model.encode_prompts(text_pipe, captions, device, max_length).cpu()


def cache_latents(samples: list[Sample], cache, encode: Callable[[torch.Tensor], torch.Tensor],
                  batch_size: int, mine: Callable[[int], bool] = lambda i: True) -> dict[int, str]:
    """Latent cache key per usable sample index; encodes only what the cache lacks, a bucket's images batched.
    Images whose pixels cannot be decoded get no key. With several processes, each looks after the samples that
    are `mine`; the others' appear in the cache once they are done."""
    keys = {i: cache.key(s.source.content_key(s.name), s.bucket, s.framing) for i, s in enumerate(samples)}
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
                    img = samples[i].source.open(samples[i].name)
                except UNREADABLE:
                    bad.append(i)  # a header that reads but pixels that don't (truncated file): skip it
                    continue
                chunk.append(i)
                pixels.append(to_tensor(fit(img, samples[i].bucket, samples[i].framing, keys[i])))
            done += len(idx[k:k + batch_size])
            if not chunk:
                continue
            latents = encode(torch.stack(pixels))
            if not torch.isfinite(latents).all():
                raise DataError(f"the VAE produced non-finite latents for {samples[chunk[0]].source.where}")
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
