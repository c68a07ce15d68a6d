"""The flow-matching loss: what a batch carries, and the one place its loss is computed.

Training and the eval curve both call `batch_loss`; they differ only in how sigmas and noise are drawn. What a
loss needs beyond latents and captions (a mask over the latent grid; a flag that makes the base model's own
prediction the target of a row) is a field of `Batch`, filled by the data side and used here, and nowhere else.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from job import flow
from job.config import TrainingSettings


@dataclass
class Batch:
    latents: torch.Tensor  # (n, c, h, w) clean VAE latents, x0
    embeds: torch.Tensor  # (n, tokens, dim) text embeddings
    mask: torch.Tensor | None = None  # (n, 1, h, w) loss weights on the latent grid in [0, 1]; None: all ones
    regularisation: torch.Tensor | None = None  # (n,) bool: rows whose target is the base model's prediction


@contextlib.contextmanager
def adapter_off(network):
    """The LyCORIS network's effect switched off (multiplier 0: the base model alone), then restored."""
    multiplier = network.multiplier
    network.set_multiplier(0.0)
    try:
        yield
    finally:
        network.set_multiplier(multiplier)


def batch_loss(transformer, batch: Batch, sigmas: torch.Tensor, noise: torch.Tensor, device: torch.device,
               dtype: torch.dtype, network=None) -> torch.Tensor:
    """Per row: the mean squared error of the predicted velocity at `sigmas` with `noise`, in fp32, weighted by the
    mask. The target is the flow velocity, or for regularisation rows the prediction of the base model (the
    LyCORIS `network` switched off, no gradients) for the same input: parent-teacher training."""
    x0 = batch.latents
    inputs = {"hidden_states": flow.noised(x0, noise, sigmas).to(device, dtype),
              "encoder_hidden_states": batch.embeds.to(device, dtype),
              "timestep": flow.model_timestep(sigmas).to(device, dtype)}
    target = flow.velocity_target(x0, noise).to(device).float()
    teach = batch.regularisation
    if teach is not None and teach.any():
        rows = teach.to(device)
        with torch.no_grad(), adapter_off(network):
            target[rows] = transformer(**{k: v[rows] for k, v in inputs.items()}, return_dict=False)[0].float()
    pred = transformer(**inputs, return_dict=False)[0]
    err = (pred.float() - target) ** 2
    if batch.mask is None:
        return err.mean(dim=(1, 2, 3))
    weight = batch.mask.to(device).float().expand_as(err)
    return (err * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp_min(1e-8)


def train_loss(transformer, batch: Batch, g: torch.Generator, t: TrainingSettings, patch_size: int,
               device: torch.device, dtype: torch.dtype, share: tuple[int, int] = (0, 1), network=None
               ) -> torch.Tensor:
    """Per-row losses (batch_loss) at freshly drawn sigmas and noise. `share`: (rank, processes). The batch is this
    rank's rows of the global micro-batch; the sigmas and noise are drawn for the whole of it and sliced, so every
    row gets what it would get in one process."""
    rank, processes = share
    x0 = batch.latents
    n, rows = x0.shape[0], slice(rank * x0.shape[0], (rank + 1) * x0.shape[0])
    sigmas = flow.sample_sigmas(n * processes, g, uniform=t.flow_use_uniform_schedule)[rows]
    seq_len = (x0.shape[-2] // patch_size) * (x0.shape[-1] // patch_size)
    sigmas = flow.shift_sigmas(sigmas, flow.auto_shift(seq_len) if t.flow_schedule_auto_shift
                               else t.flow_schedule_shift)
    noise = torch.randn((n * processes, *x0.shape[1:]), generator=g)[rows]
    return batch_loss(transformer, batch, sigmas, noise, device, dtype, network)


EVAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def eval_loss(transformer, batches: list[Batch], device: torch.device, dtype: torch.dtype, seed: int = 0) -> float:
    """The same latents at the same sigmas with the same noise every time: a curve comparable across steps
    (the training loss jumps with each step's random sigma)."""
    total, n = 0.0, 0
    for b, batch in enumerate(batches):
        g = torch.Generator().manual_seed(seed + b)
        for sigma in EVAL_SIGMAS:
            sigmas = torch.full((batch.latents.shape[0],), sigma)
            noise = torch.randn(batch.latents.shape, generator=g)
            total += batch_loss(transformer, batch, sigmas, noise, device, dtype).mean().item()
            n += 1
    return total / n
