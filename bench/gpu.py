"""GPU benchmark (`bash bench/gpu.sh` on any CUDA machine; no download): the real-size AuraFlow transformer with
random weights, 1024 px, batch 1, gradient checkpointing, the seed's LoKr, one optimizer step at a time.

Variants: bf16 and int8-quanto base weights, each without offload, with block-level group offload, and with
group offload + stream prefetch. For each it reports:
- steps/s (median of the timed steps, optimizer step included);
- FLOPs per step counted from the model's shapes (bench/flops.py): model FLOPs (what the step needs, no
  recompute) and hardware FLOPs (plus the checkpoint recompute, flash attention's QK^T recompute and LyCORIS's
  rebuild-mode matmuls when that mode is on); MFU and HFU against the card's dense bf16 peak (by its exact name;
  an unknown card gets none). For the bf16 base the first step also runs under torch's FlopCounterMode and the
  ratio counted/analytic is reported (int8 is not cross-checked: FlopCounterMode does not see quanto's matmul op;
  on CUDA it also misses LyCORIS's fused LoKr kernels, a few % of the step);
- peak GPU memory allocated and reserved during the steps (torch.cuda.max_memory_*; reserved is what the process
  holds, fragmentation included) beside the job's estimate, the same two while building (quantisation), and the
  process's peak host RSS during the variant beside the job's host estimate (an upper reading: the process also
  holds what earlier variants left in its heap; bench/host_ram.py measures host RAM in fresh processes);
- how far each offload variant's LoKr gradients (the same step twice: the first, and one after diffusers' tracing
  forward, with a stream the first that prefetches) are from the same precision without offload (same weights,
  same batches), beside the no-offload variant's own run-to-run noise (the same step twice on the same model).
Writes bench/gpu_results.json (or --out) and prints a table. The whole script stays within --budget-s (default
420 s): a variant that would end after it (judged by the longest so far) is listed as skipped. Targets: int8 + group offload under 12 GB,
offload + stream at >= 70% of the no-offload steps/s, bf16 without offload >= 45% MFU on an H100.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

from bench import flops as flopcount
from job import memory, model, offload
from job.config import SEED_LYCORIS_CONFIG, build_settings
from job.loss import Batch, train_loss
from job.train import make_optimizer

# AuraFlow v0.3's transformer: diffusers' defaults with the 96x96 positional grid (1024 px needs 64x64 patches)
CONFIG = {"sample_size": 64, "patch_size": 2, "in_channels": 4, "num_mmdit_layers": 4, "num_single_dit_layers": 32,
          "attention_head_dim": 256, "num_attention_heads": 12, "joint_attention_dim": 2048,
          "caption_projection_dim": 3072, "out_channels": 4, "pos_embed_max_size": 9216}
OUT = Path(__file__).resolve().parent / "gpu_results.json"
CUDA = torch.device("cuda")
RESOLUTION = 1024
TEXT_TOKENS = 256
# --cpu-smoke: the same code path on a tiny transformer on the CPU, to check this script without a GPU
SMOKE_CONFIG = {**CONFIG, "num_mmdit_layers": 1, "num_single_dit_layers": 2, "attention_head_dim": 8,
                "num_attention_heads": 4, "joint_attention_dim": 2048, "caption_projection_dim": 32}
GiB = 2**30


def sync() -> None:
    if CUDA.type == "cuda":
        torch.cuda.synchronize()


def card() -> tuple[str, float | None]:
    """(the card's name, its dense bf16 peak TFLOP/s or None)."""
    if CUDA.type != "cuda":
        return "cpu (smoke)", None
    props = torch.cuda.get_device_properties(CUDA)
    return props.name, flopcount.peak_tflops(props.name, props.multi_processor_count)


def reset_host_peak() -> bool:
    """Linux resets the process's peak RSS (VmHWM) on writing 5 to clear_refs: a peak per variant."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def host_peak_gib() -> float | None:
    try:
        line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024 / GiB
    except (OSError, StopIteration, ValueError):
        return None


def build(precision: str, mode: str):
    """(transformer, adapter, GroupOffload or None), as the job builds them; random weights made on the GPU."""
    from accelerate import init_empty_weights
    from diffusers import AuraFlowTransformer2DModel

    with init_empty_weights():
        tr = AuraFlowTransformer2DModel(**CONFIG).to(torch.bfloat16)  # allocated in bf16, as the job loads it
    # with offload the job loads on the CPU and quantises block by block on the GPU: no whole model in GPU memory
    # here either, so the build peak is the job's
    tr.to_empty(device=CUDA if mode == "none" else torch.device("cpu"))
    with torch.no_grad():
        for name, p in tr.named_parameters():  # random, small: the numbers that matter here are times and bytes
            g = torch.Generator(CUDA.type).manual_seed(zlib.crc32(name.encode()))  # the same weights in every variant
            p.copy_(torch.empty(p.shape, dtype=p.dtype, device=CUDA).normal_(0, 0.02, generator=g))
    tr.requires_grad_(False)
    if precision != "no_change":  # as the job does (QUANTIZE_VIA=accelerator): block by block on the GPU
        model.quantize_blocks(tr, precision, CUDA, keep=mode == "none", expose=mode != "none")
    if mode != "none":
        tr.to("cpu")
    tr.enable_gradient_checkpointing()
    tr.train()
    torch.manual_seed(0)
    net = model.create_adapter(tr, SEED_LYCORIS_CONFIG, torch.bfloat16, CUDA)
    off = (offload.apply(tr, net, CUDA, offload.Policy("block_level", 1, mode == "stream", ""), "bench")
           if mode != "none" else None)
    return tr, net, off


def batch():
    g = torch.Generator().manual_seed(123)
    return Batch(torch.randn(1, 4, RESOLUTION // 8, RESOLUTION // 8, generator=g),
                 torch.randn(1, TEXT_TOKENS, CONFIG["joint_attention_dim"], generator=g))


def loss_of(tr, settings, seed: int):
    return train_loss(tr, batch(), torch.Generator().manual_seed(seed), settings.training, 2, CUDA,
                      torch.bfloat16).mean()


def predicted(precision: str, mode: str, adapter_params: int) -> tuple[float, float]:
    """The job's estimates (GiB): peak GPU memory of a step, peak host RAM of the process."""
    from accelerate import init_empty_weights
    from diffusers import AuraFlowTransformer2DModel

    with init_empty_weights():
        shell = AuraFlowTransformer2DModel(**CONFIG)
    size = model.model_size(shell, model.Grid(2, CONFIG["pos_embed_max_size"], 8, 4))
    stream = mode == "stream" and CUDA.type == "cuda"
    est = memory.estimate(size, adapter_params, precision=precision, mixed_precision="bf16", optimizer="optimi-lion",
                          resolution=RESOLUTION, batch=1, text_tokens=TEXT_TOKENS, checkpointing=True,
                          group_offload=mode != "none", stream=stream)
    host = memory.host_estimate(size, precision=precision, mixed_precision="bf16", device=CUDA.type,
                                group_offload=mode != "none", stream=stream, to_disk=False)
    return est.total / GiB, host.total / GiB


def sig(x: float) -> float:
    return float(f"{x:.4g}")  # 4 significant digits: TFLOP at 1024 px, or the smoke's tiny counts


def gib(x: float) -> float:
    return round(x / GiB, 2)


def measure(precision: str, mode: str, steps: int, warmup: int, peak: float | None
            ) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """One variant: (row, gradients of the first step, gradients of the same step run again)."""
    from torch.utils.flop_counter import FlopCounterMode

    cuda = CUDA.type == "cuda"
    settings = build_settings([{"dataset_id": "x", "push_to_hub": "false", "optimizer": "optimi-lion",
                                "base_model_precision": precision, "mixed_precision": "bf16"}])
    host = reset_host_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr, net, off = build(precision, mode)
    sync()
    setup_s = time.perf_counter() - t0
    build_mem = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else None
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings.training)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loss_of(tr, settings, 0).backward()
    first = [p.grad.detach().float().cpu() for p in params]
    opt.zero_grad(set_to_none=True)
    # the same step again on the same model: after diffusers' tracing forward (with a stream, the first that
    # prefetches), and without offload the GPU's own run-to-run noise; no rebuild needed for it
    loss_of(tr, settings, 0).backward()
    again = [p.grad.detach().float().cpu() for p in params]
    counted = None
    if precision == "no_change":  # FlopCounterMode sees every op of the bf16 base (not quanto's int8 matmul)
        opt.zero_grad(set_to_none=True)
        # a step of its own: under the counter (a dispatch mode) SDPA may take another kernel, other numerics.
        # On the CPU the math backend, whose matmuls it sees (it has no formula for the CPU flash kernel).
        with FlopCounterMode(display=False) as counter, attention_for_counting():
            loss_of(tr, settings, 0).backward()
        counted = float(counter.get_total_flops())
    opt.step()
    opt.zero_grad(set_to_none=True)
    times = []
    for i in range(warmup + steps):
        sync()
        t = time.perf_counter()
        loss_of(tr, settings, i + 1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    sec = statistics.median(times) if times else float("nan")
    latent = RESOLUTION // 8
    f = flopcount.step_flops(tr, net, batch=1, height=latent, width=latent, text_tokens=TEXT_TOKENS,
                             checkpointing=True, attention_recompute=cuda)
    adapter_params = sum(p.numel() for p in params)
    gpu_est, host_est = predicted(precision, mode, adapter_params)
    row = {"variant": f"{precision}/{mode}", "setup_s": round(setup_s, 1), "s_per_step": round(sec, 3),
           "steps_per_s": round(1 / sec, 3),
           "alloc_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
           "reserved_gib": gib(torch.cuda.max_memory_reserved()) if cuda else None,
           "predicted_gib": round(gpu_est, 2),
           "build_alloc_gib": gib(build_mem[0]) if build_mem else None,
           "build_reserved_gib": gib(build_mem[1]) if build_mem else None,
           "host_peak_gib": round(host_peak_gib(), 2) if host and host_peak_gib() else None,
           "host_predicted_gib": round(host_est, 2),
           "model_tflop": sig(f.model / 1e12), "hw_tflop": sig(f.hardware / 1e12),
           "model_tflops": round(f.model / sec / 1e12, 1), "mfu": round(f.model / sec / 1e12 / peak, 3) if peak else None,
           "hfu": round(f.hardware / sec / 1e12 / peak, 3) if peak else None,
           "counted_vs_hw": round(counted / f.hardware, 4) if counted else None}
    if off:
        off.close()
    del tr, net, opt, off
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row, first, again


def attention_for_counting():
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return nullcontext() if CUDA.type == "cuda" else sdpa_kernel(SDPBackend.MATH)


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--precisions", default="no_change,int8-quanto")
    ap.add_argument("--modes", default="none,group,stream")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no variant starts after this many seconds")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny transformer on the CPU: checks this script only")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    start = time.perf_counter()
    if args.cpu_smoke:
        global CUDA, RESOLUTION
        CUDA, RESOLUTION = torch.device("cpu"), 64
        CONFIG.update(SMOKE_CONFIG)
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (this machine has none); the CPU benchmarks are `make bench`",
              file=sys.stderr)
        return 2
    device, peak = card()
    rows = []
    longest = 0.0  # the longest variant so far: one that would end past the budget is not started
    for precision in args.precisions.split(","):
        ref = None
        for mode in args.modes.split(","):
            began = time.perf_counter()
            if began - start + longest > args.budget_s:
                rows.append({"variant": f"{precision}/{mode}", "skipped": f"time budget ({args.budget_s:g} s)"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            error = None
            try:
                row, first, again = measure(precision, mode, args.steps, args.warmup, peak)
            except Exception as e:  # one variant's failure (out of memory, a kernel) must not lose the others
                error = f"{type(e).__name__}: {e}"[:300]
            longest = max(longest, time.perf_counter() - began)
            if error:
                rows.append({"variant": f"{precision}/{mode}", "error": error})
                print(json.dumps(rows[-1]), flush=True)
                gc.collect()  # after the except block: the traceback no longer holds the variant's model
                if CUDA.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if mode == "none":
                ref = (first, again)
                row["grad_rel_diff"] = round(max_rel_diff(again, first), 6)  # the noise: same step, same model
            elif ref is not None:
                row["grad_rel_diff"] = round(max(max_rel_diff(first, ref[0]), max_rel_diff(again, ref[1])), 6)
                base = next(r for r in rows if r["variant"] == f"{precision}/none")
                row["throughput_vs_none"] = round(row["steps_per_s"] / base["steps_per_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    alloc_conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    peak_text = f"dense bf16 peak {peak:g} TFLOP/s" if peak else "peak unknown: no MFU/HFU"
    header = (f"device: {device} ({peak_text}), torch {torch.__version__}, "
              f"{RESOLUTION} px, batch 1, gradient checkpointing, LoKr (seed), optimi-lion, "
              f"PYTORCH_CUDA_ALLOC_CONF={alloc_conf or '(unset)'}, {time.perf_counter() - start:.0f} s in all")
    print(header)
    print(table(rows))
    args.out.write_text(json.dumps({"device": device, "peak_bf16_tflops": peak, "torch": torch.__version__,
                                    "alloc_conf": alloc_conf, "header": header, "rows": rows}, indent=2) + "\n")
    return 0


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    width = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    lines = ["  ".join(f"{k:>{width[k]}}" for k in keys)]
    lines += ["  ".join(f"{str(r.get(k, '')):>{width[k]}}" for k in keys) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
