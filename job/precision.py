"""The precisions a run can choose, one row each: what `config` offers and refuses, how `model` quantises and
places the base, what `memory` counts per weight.

BASE_MODEL_PRECISION is the frozen base's weight format, MIXED_PRECISION the dtype everything dense computes and
trains in (the adapter, and the base's layers that stay unquantised). A new base precision from a library already
here (quanto, bitsandbytes) is one row; a new library also needs its branch in `model.load_transformer`.

No torch: `config` reads this table and must stay importable in well under a second.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BasePrecision:
    name: str  # the BASE_MODEL_PRECISION value
    library: str  # "" (dense at MIXED_PRECISION), "quanto" (after loading, block by block) or "bnb" (while loading)
    weight_type: str  # the library's name for it: optimum.quanto's qint8/qint4, bitsandbytes' 4-bit quant type
    linear_bytes: float | None  # per block-Linear parameter, scales included; None: MIXED_PRECISION's bytes
    needs_cuda: bool = False
    # the weights can move between devices once loaded (group offload, model CPU offload); bitsandbytes' cannot
    movable: bool = True
    # torch's CPU kernels survive these weights read back from disk with bf16 compute (measured: the int8 kernel,
    # _weight_int8pack_mm, segfaults); only ever asked on a machine without CUDA
    cpu_bf16_from_disk: bool = True
    what: str = ""  # the weights' name in a refusal


BASE_PRECISIONS: dict[str, BasePrecision] = {p.name: p for p in (
    BasePrecision("no_change", "", "", None),
    BasePrecision("int8-quanto", "quanto", "qint8", 1 + 4 / 1024, cpu_bf16_from_disk=False),
    BasePrecision("int4-quanto", "quanto", "qint4", 0.5 + 4 / 128, cpu_bf16_from_disk=False),
    BasePrecision("nf4-bnb", "bnb", "nf4", 0.5 + 4 / 64, needs_cuda=True, movable=False,
                  what="bitsandbytes weights"),
)}


@dataclass(frozen=True)
class MixedPrecision:
    name: str  # the MIXED_PRECISION value
    dtype: str  # torch's name for it
    bytes: int


MIXED_PRECISIONS: dict[str, MixedPrecision] = {p.name: p for p in (
    MixedPrecision("bf16", "bfloat16", 2),
    MixedPrecision("no", "float32", 4),
)}


def base_help() -> str:
    return ", ".join(p.name + (" (CUDA)" if p.needs_cuda else "") for p in BASE_PRECISIONS.values())


def quantised_alternatives(fits: Callable[[BasePrecision], bool]) -> str:
    """The quantised precisions that `fits`, for a refusal's advice: "int8-quanto or int4-quanto"."""
    names = [p.name for p in BASE_PRECISIONS.values() if p.library and fits(p)]
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))
