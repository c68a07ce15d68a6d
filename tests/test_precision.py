"""The precisions, pinned to what config, model and memory did with each name before one table held them: the
choices and help, the refusals word for word, bytes per weight, the quantised weight type, the compute dtype."""
from __future__ import annotations

import pytest
import torch

from job import model
from job.config import SPEC_BY_NAME, build_settings
from job.errors import ConfigError
from job.memory import ModelSize, weight_bytes

BASES = ("no_change", "int8-quanto", "int4-quanto", "nf4-bnb")
# bytes per block-Linear parameter, scales included; None: the dense MIXED_PRECISION dtype
LINEAR_BYTES = {"no_change": None, "int8-quanto": 1 + 4 / 1024, "int4-quanto": 0.5 + 4 / 128, "nf4-bnb": 0.5 + 4 / 64}
DENSE_BYTES = {"bf16": 2, "no": 4}
MINIMAL = {"dataset_id": "x", "push_to_hub": "false"}


def problems(**kw) -> list[str]:
    try:
        build_settings([MINIMAL, kw])
    except ConfigError as e:
        return e.problems
    return []


def settings(**kw):
    return build_settings([MINIMAL, kw])


def test_the_choices_and_help_name_every_precision():
    base, mixed = SPEC_BY_NAME["base_model_precision"], SPEC_BY_NAME["mixed_precision"]
    assert base.help == "Frozen base weights: no_change, int8-quanto, int4-quanto, nf4-bnb (CUDA)"
    assert base.parse.allowed == "one of: " + ", ".join(BASES)
    assert [base.parse(name) for name in BASES] == list(BASES)
    assert mixed.parse.allowed == "one of: bf16, no"
    assert problems(base_model_precision="fp8") == ["BASE_MODEL_PRECISION='fp8': expected one of: " + ", ".join(BASES)]


@pytest.mark.parametrize("mixed", DENSE_BYTES)
@pytest.mark.parametrize("base", BASES)
def test_weight_bytes_per_precision(base, mixed):
    size = ModelSize(outside=10, block_linear=(1024, 2048), block_other=(6, 8), hidden=4, patch_size=2,
                     vae_scale_factor=8)
    dense = DENSE_BYTES[mixed]
    linear = LINEAR_BYTES[base] if LINEAR_BYTES[base] is not None else dense
    want = 10 * dense + (1024 + 2048) * linear + (6 + 8) * dense
    assert weight_bytes(size, base, mixed) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("mixed,dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_the_compute_dtype(mixed, dtype):
    assert model.train_dtype(settings(mixed_precision=mixed)) == dtype


@pytest.mark.parametrize("base", BASES)
def test_only_bitsandbytes_weights_are_refused_with_either_offload(base):
    group = problems(base_model_precision=base, enable_group_offload="true")
    whole = problems(base_model_precision=base, enable_model_cpu_offload="true")
    if base != "nf4-bnb":
        assert group == whole == []
        return
    assert group == ["ENABLE_GROUP_OFFLOAD=true with BASE_MODEL_PRECISION=nf4-bnb: bitsandbytes weights cannot be "
                     "offloaded in groups; use int8-quanto or int4-quanto"]
    assert whole == ["ENABLE_MODEL_CPU_OFFLOAD=true with BASE_MODEL_PRECISION=nf4-bnb: bitsandbytes weights cannot "
                     "move between devices; use int8-quanto or int4-quanto"]


@pytest.mark.parametrize("base", BASES)
def test_the_refusals_on_a_machine_without_cuda(base):
    plain = model.device_problems(settings(base_model_precision=base), torch.device("cpu"))
    assert plain == (["BASE_MODEL_PRECISION=nf4-bnb needs a CUDA GPU; use int8-quanto or int4-quanto here"]
                     if base == "nf4-bnb" else [])
    disk = dict(base_model_precision=base, mixed_precision="bf16", group_offload_to_disk_path="/tmp/offload")
    if base != "nf4-bnb":  # nf4-bnb with group offload is refused by the settings already
        crash = model.device_problems(settings(enable_group_offload="true", **disk), torch.device("cpu"))
        assert crash == ([f"GROUP_OFFLOAD_TO_DISK_PATH with BASE_MODEL_PRECISION={base} and MIXED_PRECISION=bf16 "
                          "crashes torch's CPU kernels: on a machine without CUDA use MIXED_PRECISION=no, or offload "
                          "to RAM"] if base.endswith("-quanto") else [])
        assert model.device_problems(settings(enable_group_offload="true", **disk), torch.device("cuda")) == []
    assert model.device_problems(settings(base_model_precision=base), torch.device("cuda")) == []


@pytest.mark.parametrize("base,qtype", [("int8-quanto", "qint8"), ("int4-quanto", "qint4")])
def test_quanto_precisions_quantise_to_their_weight_type(base, qtype):
    import optimum.quanto

    layers = torch.nn.Sequential(torch.nn.Linear(128, 128))
    model.quantize_quanto(layers, base)
    assert layers[0].weight_qtype is getattr(optimum.quanto, qtype)
    assert not any(p.requires_grad for p in layers.parameters())


def test_a_new_row_reaches_the_advice_and_the_memory_estimate(monkeypatch):
    """Adding a precision is one row: the refusals' advice and the bytes per weight follow from it."""
    from job import precision

    row = precision.BasePrecision("fp8-quanto", "quanto", "qfloat8", 1 + 4 / 1024)
    monkeypatch.setitem(precision.BASE_PRECISIONS, row.name, row)
    assert model.device_problems(settings(base_model_precision="nf4-bnb"), torch.device("cpu")) == [
        "BASE_MODEL_PRECISION=nf4-bnb needs a CUDA GPU; use int8-quanto, int4-quanto or fp8-quanto here"]
    size = ModelSize(outside=0, block_linear=(1024,), block_other=(0,), hidden=4, patch_size=2, vae_scale_factor=8)
    assert weight_bytes(size, "fp8-quanto", "bf16") == 1024 + 4
