"""GPU benchmark (`bash bench/gpu.sh` on any CUDA machine; no download): the real-size AuraFlow transformer with
random weights, 1024 px, batch 1, gradient checkpointing, the seed's LoKr, one optimizer step at a time.

Variants: bf16 and int8-quanto base weights, each without offload, with block-level group offload, and with
group offload + stream prefetch. For each it reports steps/s, peak memory (torch.cuda.max_memory_allocated) with
the job's estimate beside it, FLOPs per step (counted by torch's FlopCounterMode over a whole step: forward,
checkpoint recompute and backward, attention included), achieved TFLOP/s and model-FLOPs utilisation against the
card's dense bf16 peak, and how far each offload variant's LoKr gradients (first two steps) are from the same
precision without offload (same weights, same batches), beside the run-to-run noise of the no-offload steps.
Writes bench/gpu_results.json and prints a table; targets: int8 + group offload under 12 GB, offload + stream at
≥ 70% of the no-offload steps/s, bf16 without offload ≥ 45% MFU on an H100.
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

from job import memory, model, offload
from job.config import SEED_LYCORIS_CONFIG, build_settings
from job.train import flow_loss, make_optimizer

# AuraFlow v0.3's transformer: diffusers' defaults with the 96x96 positional grid (1024 px needs 64x64 patches)
CONFIG = {"sample_size": 64, "patch_size": 2, "in_channels": 4, "num_mmdit_layers": 4, "num_single_dit_layers": 32,
          "attention_head_dim": 256, "num_attention_heads": 12, "joint_attention_dim": 2048,
          "caption_projection_dim": 3072, "out_channels": 4, "pos_embed_max_size": 9216}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "A6000": 155.0}
OUT = Path(__file__).resolve().parent / "gpu_results.json"
CUDA = torch.device("cuda")
RESOLUTION = 1024
# --cpu-smoke: the same code path on a tiny transformer on the CPU, to check this script without a GPU
SMOKE_CONFIG = {**CONFIG, "num_mmdit_layers": 1, "num_single_dit_layers": 2, "attention_head_dim": 8,
                "num_attention_heads": 4, "joint_attention_dim": 2048, "caption_projection_dim": 32}


def sync() -> None:
    if CUDA.type == "cuda":
        torch.cuda.synchronize()


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build(precision: str, mode: str):
    """(transformer, adapter, GroupOffload or None), as the job builds them; random weights made on the GPU."""
    from accelerate import init_empty_weights
    from diffusers import AuraFlowTransformer2DModel

    with init_empty_weights():
        tr = AuraFlowTransformer2DModel(**CONFIG)
    tr.to_empty(device=CUDA)
    g = torch.Generator(CUDA.type).manual_seed(0)
    with torch.no_grad():
        for p in tr.parameters():  # random, small: the numbers that matter here are times and bytes
            p.normal_(0, 0.02, generator=g)
    tr.to(torch.bfloat16).requires_grad_(False)
    if precision != "no_change":
        model.quantize_quanto(tr, precision)  # QUANTIZE_VIA=accelerator
    if mode != "none":
        if precision != "no_change":
            offload.expose_quantized_payload(tr)
        tr.to("cpu")
    tr.enable_gradient_checkpointing()
    tr.train()
    torch.manual_seed(0)
    net = model.create_adapter(tr, SEED_LYCORIS_CONFIG, torch.bfloat16, CUDA)
    off = (offload.apply(tr, net, CUDA, offload.Plan("block_level", 1, mode == "stream", ""), "bench")
           if mode != "none" else None)
    return tr, net, off


def batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(1, 4, RESOLUTION // 8, RESOLUTION // 8, generator=g), torch.randn(1, 256, 2048, generator=g)


def loss_of(tr, settings, seed: int):
    x0, emb = batch()
    return flow_loss(tr, x0, emb, torch.Generator().manual_seed(seed), settings.training, 2, CUDA, torch.bfloat16)


def predicted(precision: str, mode: str, adapter_params: int) -> float:
    from accelerate import init_empty_weights
    from diffusers import AuraFlowTransformer2DModel

    with init_empty_weights():
        shell = AuraFlowTransformer2DModel(**CONFIG)
    size = model.model_size(shell, model.Geometry(2, CONFIG["pos_embed_max_size"], 8, 4))
    est = memory.estimate(size, adapter_params, precision=precision, mixed_precision="bf16", optimizer="optimi-lion",
                          resolution=RESOLUTION, batch=1, text_tokens=256, checkpointing=True,
                          group_offload=mode != "none", stream=mode == "stream")
    return est.total / memory.GiB


def measure(precision: str, mode: str, steps: int, warmup: int) -> tuple[dict, list[torch.Tensor]]:
    from torch.utils.flop_counter import FlopCounterMode

    settings = build_settings([{"dataset_id": "x", "push_to_hub": "false", "optimizer": "optimi-lion",
                                "base_model_precision": precision, "mixed_precision": "bf16"}])
    t0 = time.perf_counter()
    tr, net, off = build(precision, mode)
    setup_s = time.perf_counter() - t0
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings.training)
    sync()
    if CUDA.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counter = FlopCounterMode(display=False)
    with counter:  # the first step, counted; its gradients are the ones compared across variants
        loss_of(tr, settings, 0).backward()
    grads = [p.grad.detach().float().cpu() for p in params]
    opt.zero_grad(set_to_none=True)
    flops = float(counter.get_total_flops())
    times = []
    for i in range(max(1, warmup + steps)):
        sync()
        t = time.perf_counter()
        loss_of(tr, settings, i).backward()
        if i == 0:  # a step after diffusers' tracing forward: with a stream, the first that prefetches
            grads += [p.grad.detach().float().cpu() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup and steps:
            times.append(time.perf_counter() - t)
    sec = statistics.median(times) if times else float("nan")
    cuda = CUDA.type == "cuda"
    peak = peak_tflops(torch.cuda.get_device_name()) if cuda else None
    adapter_params = sum(p.numel() for p in params)
    row = {"variant": f"{precision}/{mode}", "setup_s": round(setup_s, 1), "s_per_step": round(sec, 3),
           "steps_per_s": round(1 / sec, 3), "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "predicted_gib": round(predicted(precision, mode, adapter_params), 2),
           "tflop_per_step": round(flops / 1e12, 1), "achieved_tflops": round(flops / sec / 1e12, 1),
           "mfu": round(flops / sec / 1e12 / peak, 3) if peak else None}
    if off:
        off.close()
    del tr, net, opt, off
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row, grads


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precisions", default="no_change,int8-quanto")
    ap.add_argument("--modes", default="none,group,stream")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny transformer on the CPU: checks this script only")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.cpu_smoke:
        global CUDA, RESOLUTION
        CUDA, RESOLUTION = torch.device("cpu"), 64
        CONFIG.update(SMOKE_CONFIG)
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (this machine has none); the CPU benchmarks are `make bench`",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if CUDA.type == "cuda" else "cpu (smoke)"
    rows = []
    for precision in args.precisions.split(","):
        ref = None
        for mode in args.modes.split(","):
            row, grads = measure(precision, mode, args.steps, args.warmup)
            if mode == "none":
                ref = grads
                _, again = measure(precision, mode, 0, 0)  # the same steps once more: the GPU's own noise
                row["grad_rel_diff"] = round(max_rel_diff(again, ref), 6)
            elif ref is not None:
                row["grad_rel_diff"] = round(max_rel_diff(grads, ref), 6)
                base = next(r for r in rows if r["variant"] == f"{precision}/none")
                row["throughput_vs_none"] = round(row["steps_per_s"] / base["steps_per_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"device: {device}, torch {torch.__version__}, {RESOLUTION} px, batch 1, gradient checkpointing, "
          "LoKr (seed), optimi-lion")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("  ".join(f"{k:>17}" for k in keys))
    for r in rows:
        print("  ".join(f"{str(r.get(k, '')):>17}" for k in keys))
    args.out.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
