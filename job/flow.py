"""Rectified-flow maths for AuraFlow, as pure functions.

Convention (the one diffusers' AuraFlowPipeline and FlowMatchEulerDiscreteScheduler use):
    x_s = (1 - s) * x0 + s * noise,   s in [0, 1] (s = 1 is pure noise)
    the transformer predicts v = dx/ds = noise - x0 and receives timestep = s
    (the pipeline passes t / 1000 with t = 1000 * s; the model scales by 1000 itself).
"""
from __future__ import annotations

import math

import torch


def sample_sigmas(n: int, generator: torch.Generator, *, uniform: bool = False) -> torch.Tensor:
    """Training sigmas: logit-normal (SD3's default, favouring the middle) or uniform on (0, 1)."""
    if uniform:
        return torch.rand(n, generator=generator)
    return torch.sigmoid(torch.randn(n, generator=generator))


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Bias sigmas towards noise (shift > 1) or detail (shift < 1); shift = 1 is the identity."""
    return s * shift / (1 + (shift - 1) * s)


def auto_shift(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096,
               base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent shift exp(mu), mu linear in the patch count (as Flux/SD3.5 and SimpleTuner do)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (image_seq_len - base_seq_len)
    return math.exp(mu)


def _expand(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def noised(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s = _expand(s, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def model_timestep(s: torch.Tensor) -> torch.Tensor:
    """What the AuraFlow transformer receives for sigma s (see the module docstring)."""
    return s

