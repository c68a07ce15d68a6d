"""GPU benchmark (`bash bench/gpu.sh` on any CUDA machine; no download): the real-size AuraFlow transformer with
random weights, 1024 px, batch 1, gradient checkpointing, the seed's LoKr, one optimizer step at a time.

For each variant it reports steps/s, peak memory, FLOPs per step (counted by torch's FlopCounterMode over a whole
step: forward, checkpoint recompute and backward, attention included), achieved TFLOP/s and model-FLOPs
utilisation against the card's dense bf16 peak. Group-offload variants join once offloading is supported for
training (it is refused by the job today). Writes bench/gpu_results.json and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from job import model
from job.config import SEED_LYCORIS_CONFIG, build_settings
from job.train import flow_loss, make_optimizer

# AuraFlow v0.3's transformer: diffusers' defaults with the 96x96 positional grid (1024 px needs 64x64 patches)
CONFIG = {"sample_size": 64, "patch_size": 2, "in_channels": 4, "num_mmdit_layers": 4, "num_single_dit_layers": 32,
          "attention_head_dim": 256, "num_attention_heads": 12, "joint_attention_dim": 2048,
          "caption_projection_dim": 3072, "out_channels": 4, "pos_embed_max_size": 9216}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "A6000": 155.0}
OUT = Path(__file__).resolve().parent / "gpu_results.json"


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build(precision: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    from accelerate import init_empty_weights
    from diffusers import AuraFlowTransformer2DModel

    with init_empty_weights():
        tr = AuraFlowTransformer2DModel(**CONFIG)
    tr.to_empty(device="cuda")
    g = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for p in tr.parameters():  # random, small: the numbers that matter here are times and bytes
            p.normal_(0, 0.02, generator=g)
    tr.to(torch.bfloat16).requires_grad_(False)
    if precision != "no_change":
        model.quantize_quanto(tr, precision)
    tr.enable_gradient_checkpointing()
    tr.train()
    torch.manual_seed(0)
    net = model.create_adapter(tr, SEED_LYCORIS_CONFIG, torch.bfloat16)
    return tr, net


def step_flops(tr, x0, emb, opt_params, settings) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = flow_loss(tr, x0, emb, torch.Generator().manual_seed(0), settings.training, 2, torch.device("cuda"),
                         torch.bfloat16)
        loss.backward()
    for p in opt_params:
        p.grad = None
    return float(counter.get_total_flops())


def measure(precision: str, steps: int, warmup: int) -> dict:
    settings = build_settings([{"dataset_id": "x", "push_to_hub": "false", "optimizer": "optimi-lion",
                                "base_model_precision": precision}])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr, net = build(precision)
    setup_s = time.perf_counter() - t0
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings.training)
    x0 = torch.randn(1, 4, 128, 128)  # 1024 px through the 8x VAE
    emb = torch.randn(1, 256, 2048)
    flops = step_flops(tr, x0, emb, params, settings)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = flow_loss(tr, x0, emb, torch.Generator().manual_seed(i), settings.training, 2, torch.device("cuda"),
                         torch.bfloat16)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    peak = peak_tflops(torch.cuda.get_device_name())
    result = {"variant": precision, "setup_s": round(setup_s, 1), "s_per_step": round(sec, 3),
              "steps_per_s": round(1 / sec, 3), "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "tflop_per_step": round(flops / 1e12, 1), "achieved_tflops": round(flops / sec / 1e12, 1),
              "mfu": round(flops / sec / 1e12 / peak, 3) if peak else None}
    del tr, net, opt
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default="no_change,int8-quanto")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (this machine has none); the CPU benchmarks are `make bench`",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    rows = [measure(v, args.steps, args.warmup) for v in args.variants.split(",")]
    print(f"device: {device}, torch {torch.__version__}, 1024 px, batch 1, gradient checkpointing, LoKr (seed)")
    keys = list(rows[0])
    print("  ".join(f"{k:>15}" for k in keys))
    for r in rows:
        print("  ".join(f"{str(r[k]):>15}" for k in keys))
    OUT.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
