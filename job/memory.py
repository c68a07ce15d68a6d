"""Predicted peak accelerator memory of a training step, and peak host RAM of the job, from parameter counts and
settings (arithmetic), and the RAM this machine or container allows.

`check` prints it, so a user learns before renting a GPU whether the settings fit; bench/gpu.py prints it beside
the measured peak (torch.cuda.max_memory_allocated, which leaves out the ~0.5-1 GiB CUDA context).

The terms, for one step of batch B at resolution R with a frozen base and a LoKr adapter:
- base weights resident: everything without offloading; with group offloading the non-block layers (autograd
  keeps theirs) plus the groups that can be loaded at once (counted in tests/test_offload.py: the configured
  group plus one, as a block's backward overlaps the next block's recompute; one more with stream prefetch).
  At leaf level the same as one block per group: autograd holds a block's weights until its backward is done;
- adapter: weights, gradients and optimizer state;
- activations: with checkpointing each block's inputs are kept and one block's internals live at a time;
  without it every block's internals live until the backward. Attention is flash/memory-efficient on CUDA
  (no sequence² term).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from job.precision import BASE_PRECISIONS, MIXED_PRECISIONS

GiB = 2**30
# Tensors of hidden width alive inside one MMDiT block during its forward+backward, per token: q, k, v, attention
# out, two norms and modulations, the gated MLP (3 × 8/3 width), their gradients. An upper estimate.
BLOCK_WORKING_WIDTHS = 32
REGISTER_TOKENS = 8  # AuraFlow prepends these to the text tokens


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of the transformer (from a weightless instance of its config)."""

    outside: int  # not in any block: embeddings, final norm and projection (never quantised)
    block_linear: tuple[int, ...]  # per block: Linear weights (what quanto quantises)
    block_other: tuple[int, ...]  # per block: biases, norms
    hidden: int
    patch_size: int
    vae_scale_factor: int
    # Σ (each block tensor's size rounded up to a power of two) / Σ sizes: what torch's pinned-memory cache makes of
    # the blocks (the same for 1-, 2- and 4-byte elements)
    pinned_ratio: float = 1.0

    @property
    def total(self) -> int:
        return self.outside + sum(self.block_linear) + sum(self.block_other)


@dataclass(frozen=True)
class Estimate:
    weights: float
    adapter: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.activations

    def describe(self) -> str:
        return (f"≈{self.total / GiB:.1f} GiB peak accelerator memory (base weights {self.weights / GiB:.1f}, "
                f"adapter and optimizer {self.adapter / GiB:.2f}, activations {self.activations / GiB:.1f}; "
                "plus the CUDA context)")


OPTIMIZER_STATES = {"adamw": 2, "optimi-adamw": 2, "adamw_bf16": 2, "optimi-lion": 1}  # × the parameter's bytes
OPTIMIZER_BYTES = {"bnb-adamw8bit": 2, "bnb-adamw8bit-paged": 2, "bnb-lion8bit": 1, "bnb-lion8bit-paged": 1}


def _dense(mixed_precision: str) -> int:
    return MIXED_PRECISIONS[mixed_precision].bytes


def _block_bytes(size: ModelSize, precision: str, mixed_precision: str) -> list[float]:
    dense = _dense(mixed_precision)
    linear = BASE_PRECISIONS[precision].linear_bytes
    linear = dense if linear is None else linear
    return [lin * linear + other * dense for lin, other in zip(size.block_linear, size.block_other)]


def weight_bytes(size: ModelSize, precision: str, mixed_precision: str) -> float:
    """The base weights at their training precision (also what disk offloading writes)."""
    return size.outside * _dense(mixed_precision) + sum(_block_bytes(size, precision, mixed_precision))


def estimate(size: ModelSize, adapter_params: int, *, precision: str, mixed_precision: str, optimizer: str,
             resolution: int, batch: int, text_tokens: int, checkpointing: bool, group_offload: bool = False,
             offload_type: str = "block_level", blocks_per_group: int = 1, stream: bool = False) -> Estimate:
    dense = _dense(mixed_precision)
    if not group_offload:
        weights = weight_bytes(size, precision, mixed_precision)
    else:
        blocks = _block_bytes(size, precision, mixed_precision)
        # leaf level in training: a recomputed block's layers go back one by one, but autograd holds their weights
        # until the block's backward is done, so it peaks like block level with one block per group
        per = 1 if offload_type == "leaf_level" else blocks_per_group
        group = max(sum(blocks[i:i + per]) for i in range(0, len(blocks), per))
        weights = size.outside * dense + (3 if stream else 2) * group

    states = OPTIMIZER_BYTES.get(optimizer, OPTIMIZER_STATES.get(optimizer, 2) * dense)
    kahan = dense if dense == 2 and optimizer in ("adamw_bf16", "optimi-adamw", "optimi-lion") else 0
    adapter = adapter_params * (2 * dense + states + kahan)

    latent = resolution // size.vae_scale_factor // size.patch_size
    tokens = batch * (latent * latent + text_tokens + REGISTER_TOKENS)
    width_bytes = tokens * size.hidden * dense
    n = len(size.block_linear)
    if checkpointing:
        activations = n * width_bytes + BLOCK_WORKING_WIDTHS * width_bytes
    else:
        activations = n * BLOCK_WORKING_WIDTHS * width_bytes
    return Estimate(float(weights), float(adapter), float(activations))


# ---------------------------------------------------------------- host RAM

# The process before any model: Python, torch, diffusers, transformers and their libraries. bench/host_ram.py measured
# 0.4 GiB with its imports; the job imports more, so 1 GiB is a margin. CUDA's libraries and context add about 1 GiB
# on a GPU machine (not yet measured here).
PROCESS_BYTES = {"cpu": 1.0 * GiB, "cuda": 2.0 * GiB}


@dataclass(frozen=True)
class HostEstimate:
    load: float  # the transformer as from_pretrained leaves it: every weight, dense, in host RAM
    train: float  # what stays in host RAM while training: offloaded weights (pinned with a stream)
    process: float

    @property
    def total(self) -> float:
        return self.process + max(self.load, self.train)

    def describe(self) -> str:
        return (f"≈{self.total / GiB:.1f} GiB peak host RAM (loading the transformer {self.load / GiB:.1f}, "
                f"while training {self.train / GiB:.1f}, the process {self.process / GiB:.1f})")


def host_estimate(size: ModelSize, *, precision: str, mixed_precision: str, device: str, group_offload: bool,
                  stream: bool, to_disk: bool) -> HostEstimate:
    """Peak resident host memory of one process. Loading puts the whole transformer in host RAM at its dense
    training dtype (quantisation comes after, block by block); the VAE and text encoder have been freed by then.
    While training the base weights are on the accelerator, except with group offloading: then host RAM holds
    them (quantised), pinned and rounded up with a stream (offload.py pins in place, so there is no second copy),
    or only placeholders when they were spilled to disk. On a CPU-only machine every weight stays in host RAM."""
    dense = float(size.total * _dense(mixed_precision))
    weights = weight_bytes(size, precision, mixed_precision)
    if group_offload and to_disk:
        train = 0.0  # a group at a time, read back from its file
    elif group_offload:
        train = weights * (size.pinned_ratio if stream and device == "cuda" else 1.0)
    else:
        train = weights if device != "cuda" else 0.0
    return HostEstimate(load=dense, train=float(train), process=PROCESS_BYTES.get(device, PROCESS_BYTES["cpu"]))


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v2, v1


def machine_ram_bytes() -> int | None:
    """Physical RAM, or the container's memory limit when that is lower (a pod's RAM is its cgroup limit)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    for path in CGROUP_LIMITS:
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            ram = min(ram, int(limit))
    return ram
