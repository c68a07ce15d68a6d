"""The GPU benchmark's arithmetic (bench/flops.py) and the GPU kit (bench/gpu_kit.sh), checked on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from diffusers import AuraFlowTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import flops, kit
from conftest import ROOT, clean_env
from job import model
from job.config import SEED_LYCORIS_CONFIG
from job.pipeline import DEMO_LYCORIS

# AuraFlow's architecture at a CPU size: two MMDiT and two single-DiT blocks, 4 heads of 32, 16x16 latent patches
SMALL = {"sample_size": 16, "patch_size": 2, "in_channels": 4, "num_mmdit_layers": 2, "num_single_dit_layers": 2,
         "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 96, "caption_projection_dim": 128,
         "out_channels": 4, "pos_embed_max_size": 256}
SEED_SMALL = {**SEED_LYCORIS_CONFIG, "factor": 4}  # the seed's preset (Attention only) at a factor this size allows


@pytest.mark.parametrize("lycoris, bypass, checkpointing", [
    (SEED_SMALL, True, True),  # the seed's LoKr in bypass mode (the quantised base, and bf16 once issue 16 lands)
    # rebuild mode: W + dW materialised, one more full matmul per adapted Linear
    pytest.param(SEED_SMALL, False, True, marks=pytest.mark.slow),
    # every Linear adapted, the patch embedding and timestep MLP too; no recompute
    pytest.param(DEMO_LYCORIS, True, False, marks=pytest.mark.slow),
])
def test_analytic_flops_equal_what_flopcountermode_counts_on_a_bf16_model(lycoris, bypass, checkpointing):
    """A whole training step (forward, checkpoint recompute, backward) of a bf16 AuraFlow with LoKr: the count from
    the shapes equals torch's FlopCounterMode (math attention on the CPU, whose bmm it sees) to within 0.5%."""
    torch.manual_seed(0)
    tr = AuraFlowTransformer2DModel(**SMALL).to(torch.bfloat16).requires_grad_(False)
    if checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    net = model.create_adapter(tr, lycoris, torch.bfloat16)
    for lora in net.loras:
        lora.bypass_mode = bypass
    x = torch.randn(2, 4, 32, 32, dtype=torch.bfloat16)
    text = torch.randn(2, 24, 96, dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = tr(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500.0, 20.0]).to(torch.bfloat16),
                 return_dict=False)[0]
        out.float().square().mean().backward()
    f = flops.step_flops(tr, net, batch=2, height=32, width=32, text_tokens=24, checkpointing=checkpointing,
                         attention_recompute=False)
    counted = counter.get_total_flops()
    assert f.hardware == pytest.approx(counted, rel=5e-3)
    if not checkpointing:
        assert f.recompute == 0.0
    elif bypass:  # every block's forward once more, nothing outside the blocks
        assert f.recompute == pytest.approx(f.forward - f.outside)
    else:  # rebuild mode recomputes its delta matmul too
        assert f.recompute > f.forward - f.outside
    assert f.model < f.hardware if checkpointing or not bypass else f.model == f.hardware


def test_flop_conventions_at_the_real_size():
    """AuraFlow v0.3 at 1024 px, seed LoKr: hand-computable terms of the count (the model's shapes, no weights)."""
    from accelerate import init_empty_weights

    from bench.gpu import CONFIG

    with init_empty_weights():
        tr = AuraFlowTransformer2DModel(**CONFIG)
        net = model._lycoris_network(tr, SEED_LYCORIS_CONFIG)
    for lora in net.loras:
        lora.bypass_mode = True  # as the job trains (the quantised base always; bf16 once issue 16 lands)
    f = flops.step_flops(tr, net, batch=1, height=128, width=128, text_tokens=256, checkpointing=True,
                         attention_recompute=True)
    n, d = 64 * 64 + 256 + 8, 3072  # image tokens, text tokens, register tokens; hidden width
    attention_fwd = 36 * 2 * (2 * n * n * d)  # QK^T and AV in each of the 36 blocks
    assert f.parts["attention"] == pytest.approx(3 * attention_fwd)  # forward + backward (4 matmuls)
    assert f.extra == pytest.approx(attention_fwd / 2)  # flash attention's QK^T again in the backward
    # the frozen base: no weight gradients, input gradients for every Linear after the first adapted one
    assert 1.0 < f.backward / f.forward < 1.5
    assert 44e12 < f.forward < 47e12 and f.recompute == pytest.approx(f.forward - f.outside)
    assert 0.02 < f.parts["adapter"] / f.model < 0.06
    # the README's figures
    assert (round(f.model / 1e12, 1), round(f.hardware / 1e12, 1)) == (100.6, 150.3)
    for lora in net.loras:
        lora.bypass_mode = False
    rebuild = flops.step_flops(tr, net, batch=1, height=128, width=128, text_tokens=256, checkpointing=True,
                               attention_recompute=True)
    assert rebuild.model == f.model and round(rebuild.hardware / 1e12, 1) == 191.4


@pytest.mark.parametrize("name, sms, peak", [
    ("NVIDIA H100 80GB HBM3", 132, 989.0), ("NVIDIA H100 PCIe", 114, 756.0), ("NVIDIA H100 NVL", 132, 835.0),
    ("NVIDIA H100", 114, 756.0), ("NVIDIA H100", 132, 989.0), ("NVIDIA H100", 100, None),
    ("NVIDIA H200", 132, 989.0), ("NVIDIA H200 NVL", 132, 835.0), ("NVIDIA GH200 480GB", 132, 989.0),
    ("NVIDIA A100-SXM4-80GB", 108, 312.0), ("NVIDIA A100 80GB PCIe", 108, 312.0), ("NVIDIA L40S", 142, 362.0),
    ("NVIDIA L40", 142, None), ("NVIDIA GeForce RTX 4090", 128, 165.0), ("NVIDIA RTX A6000", 84, 155.0),
    ("NVIDIA RTX 6000 Ada Generation", 142, None), ("NVIDIA B200", 148, 2250.0), ("Tesla T4", 40, None),
])
def test_the_cards_peak_is_read_from_its_exact_name(name, sms, peak):
    assert flops.peak_tflops(name, sms) == peak


# ------------------------------------------------------------------------------------------------- the GPU kit

WHL, HOST_WHL = ROOT / ".whl", ROOT / ".whl-host"


def test_the_kit_carries_the_pinned_versions_and_nothing_of_torch():
    """Pure (no download): the wheel list the kit prepares, resolved from the venv, holds each pinned dependency at
    its pin, except what it leaves out on purpose, and none of torch's own stack (the GPU machine's CUDA build)."""
    want = kit.wheels()
    for name, version in kit.pinned().items():
        assert want.get(name) == (None if name in kit.LEFT_OUT else version), name
    assert not [n for n in want if n.startswith(("nvidia-", "triton")) or n in ("torch", "sympy", "networkx")]
    assert {"transformers", "huggingface-hub", "tokenizers", "typer", "safetensors", "hf-xet"} <= set(want)


@pytest.mark.skipif(not WHL.is_dir(), reason="no .whl/: `bash bench/gpu_kit.sh prepare` downloads it (needs PyPI)")
def test_the_prepared_wheels_are_the_pins_and_install_on_the_gpu_machines_python():
    """.whl/ is exactly the list above, small enough to travel, and pip (no index, no install: --dry-run) takes
    every wheel for CPython 3.12 on manylinux x86_64, the GPU machine's, and refuses them for 3.13 (a real check)."""
    assert kit.check(WHL) == []
    assert sum(w.stat().st_size for w in WHL.glob("*.whl")) < 60 * 2**20

    def dry_run(version: str) -> subprocess.CompletedProcess:
        platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in range(5, 36)]
        return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               "--dry-run", "--no-index", "--no-deps", "--only-binary=:all:", "--implementation=cp",
                               f"--python-version={version}", *platforms, "--platform=manylinux2014_x86_64",
                               "--target", "/nonexistent", *map(str, WHL.glob("*.whl"))],
                              capture_output=True, text=True, timeout=120)

    ok = dry_run("3.12")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "is not a supported wheel" in dry_run("3.13").stderr


@pytest.mark.slow
def test_the_kit_cpu_mode_trains_from_the_wheels_on_a_torch_only_python(tmp_path):
    """`bash bench/gpu_kit.sh cpu`, trimmed to one job variant and two benchmark variants: the same steps as on the
    GPU machine. With .whl-host/ (prepare) the job runs on a python that has torch and numpy only, plus the wheels
    installed into a private target: the kit's set is complete. Without it, the venv's own packages."""
    env = clean_env(PY=sys.executable, OUT=str(tmp_path / "out"), KIT_VARIANTS="int8", KIT_STEPS="2",
                    KIT_BENCH_ARGS="--precisions int8-quanto --modes none,group", TMPDIR=str(tmp_path))
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_kit.sh"), "cpu"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    result = json.loads((tmp_path / "out" / "kit.json").read_text())
    assert [(x["run"], x["rc"], x["phase"], x["steps"]) for x in result["runs"]] == [("int8", 0, "done", 2)]
    assert ", finite," in result["runs"][0]["adapter"]  # "N tensors, finite, max|x| ...", read back
    rows = result["bench"]["rows"]  # bench/gpu.py --cpu-smoke: its code path kept working without a GPU
    assert [r["variant"] for r in rows] == ["int8-quanto/none", "int8-quanto/group"]
    assert rows[1]["grad_rel_diff"] == 0.0  # offload on the CPU: the very same gradients
    assert rows[0]["model_tflop"] < rows[0]["hw_tflop"]  # the checkpoint recompute
    assert (tmp_path / "out" / "kit.txt").read_text().startswith("# GPU kit")
    if HOST_WHL.is_dir():
        assert "wheels: pip" in result["env"] and f"from {tmp_path}" in result["env"]
        assert "left out of the kit): bitsandbytes wandb" in result["env"]  # nothing leaks in from the venv
    print(f"gpu_kit.sh cpu (trimmed): {time.monotonic() - t0:.0f} s")


def test_the_wheel_check_names_what_is_missing_extra_or_doubled(tmp_path):
    want = kit.wheels()
    for name, version in want.items():
        (tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").touch()
    assert kit.check(tmp_path) == []
    (tmp_path / "typer-0.1.0-py3-none-any.whl").touch()  # two versions of one: pip would stop the whole install
    (tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl").touch()
    (tmp_path / f"diffusers-{want['diffusers']}-py3-none-any.whl").unlink()
    assert sorted(kit.check(tmp_path)) == sorted([
        f"typer: {want['typer']} wanted, 0.1.0, {want['typer']}", f"diffusers: {want['diffusers']} wanted, no wheel",
        "bitsandbytes: not wanted (0.50.2)"])


@pytest.mark.skipif(not HOST_WHL.is_dir(), reason="no .whl-host/: `bash bench/gpu_kit.sh prepare` downloads it")
def test_without_pip_the_kit_unpacks_the_wheels_to_the_same_files(tmp_path):
    """The GPU machine has pip; where one has not, `bench.kit install` unpacks the wheels itself: the same files
    as pip's install, importable (a pure and a compiled wheel, on a python without pip)."""
    picked = tmp_path / "wheels"
    picked.mkdir()
    for w in [*HOST_WHL.glob("einops-*.whl"), *HOST_WHL.glob("safetensors-*.whl")]:
        (picked / w.name).symlink_to(w)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    bare = tmp_path / "venv" / "bin" / "python"
    how = {}
    for python, target in ((sys.executable, "by-pip"), (str(bare), "by-hand")):
        r = subprocess.run([python, "-m", "bench.kit", "install", str(picked), str(tmp_path / target)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        how[target] = r.stdout.strip()
    assert how == {"by-pip": "pip", "by-hand": "unpacked"}

    def files(target: str) -> set[str]:  # pip adds its own bookkeeping to the dist-info
        return {str(p.relative_to(tmp_path / target)) for p in (tmp_path / target).rglob("*") if p.is_file()
                and p.name not in ("INSTALLER", "REQUESTED", "direct_url.json") and "__pycache__" not in p.parts}

    assert files("by-pip") == files("by-hand")
    r = subprocess.run([str(bare), "-c", "import einops, safetensors; print(einops.__file__, safetensors.__file__)"],
                       env={"PYTHONPATH": str(tmp_path / "by-hand")}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.count(str(tmp_path / "by-hand")) == 2, r.stderr
