"""The deterministic batch plan and the fetcher that turns a plan position into a Batch from the caches.

The plan is a pure function of (seed, epoch), so a resumed run needs only the step number.
"""
from __future__ import annotations

import random
from collections.abc import Callable

import torch

from job.data.source import Sample
from job.errors import DataError
from job.loss import Batch


class BatchPlan:
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


def make_plan(samples: list[Sample], batch_size: int, seed: int, processes: int = 1) -> BatchPlan:
    """With several processes a micro-batch is the global one (batch_size rows for each process, one bucket);
    each process takes its own rows of it (see batch_fetcher)."""
    plan = BatchPlan(samples, batch_size * processes, seed)
    if plan.batches_per_epoch == 0:
        size = f"TRAIN_BATCH_SIZE={batch_size}" + (f" × NUM_PROCESSES={processes}" if processes > 1 else "")
        raise DataError(f"{len(samples)} usable image(s) give no full batch of {size} in any bucket; add images, "
                        "raise REPEATS, or lower TRAIN_BATCH_SIZE")
    return plan


def batch_fetcher(plan: BatchPlan, latents_of: dict[int, tuple], text_cache, text_keys: dict[str, str],
                  dropout: float, rows: slice = slice(None), masks_of: dict[int, tuple] | None = None
                  ) -> Callable[[int, torch.Generator], Batch]:
    """micro-batch index → its Batch, from the caches; dropout swaps in the empty prompt.

    latents_of (and masks_of) map a sample index to its (cache, key): datasets may keep their own cache folders.
    `rows`: this process's rows of each (global) micro-batch. A batch carries a mask when any sample of the run
    has one (ones for the others), and regularisation flags when any sample is regularisation data."""
    masks_of = masks_of or {}
    regularised = any(smp.regularisation for smp in plan.samples)

    def fetch(index: int, g: torch.Generator) -> Batch:
        batch = plan.micro_batch(index)
        drop = torch.rand(len(batch), generator=g) < dropout  # drawn even at 0, so the noise stream never depends on it
        batch, drop = batch[rows], drop[rows]  # the whole batch's draws: each row's are those of one process
        latents = torch.stack([latents_of[i][0].get(latents_of[i][1]) for i, _ in batch])
        captions = ["" if d else plan.samples[i].captions[c] for (i, c), d in zip(batch, drop.tolist())]
        embeds = torch.stack([text_cache.get(text_keys[c]) for c in captions])
        mask = None
        if masks_of:
            ones = torch.ones(1, *latents.shape[-2:])
            mask = torch.stack([masks_of[i][0].get(masks_of[i][1]).float() if i in masks_of else ones
                                for i, _ in batch])
        flags = torch.tensor([plan.samples[i].regularisation for i, _ in batch]) if regularised else None
        return Batch(latents, embeds, mask=mask, regularisation=flags)

    return fetch
