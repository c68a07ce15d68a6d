"""Peak host RAM at the real AuraFlow size, on the CPU (`python -m bench.host_ram`; minutes, ~15 GB of RAM; not in
`make test`): measured resident memory beside the job's estimate (job/memory.py `host_estimate`).

Each variant runs in a fresh process, so its peaks are its own: the 6.8B transformer with random weights, dense bf16
in host RAM as from_pretrained leaves it; then the job's own steps (model.quantize_blocks to int8, the seed's LoKr,
offload.apply with group offload in RAM or to a disk folder) and one training step at 64 px with 16 text tokens
(activations are small next to the weights; what is measured is where the weights live). Peak RSS is read from
/proc/self/status (VmHWM) and reset between phases (/proc/self/clear_refs): loading, quantising and offloading
(bf16 blocks give way to int8), what is resident once that is done ("settled"), and the training step.

Variants: int8 + group offload in RAM, int8 + group offload to disk. A CPU has no stream, so the pinned copy
(torch rounds each pinned tensor up to a power of two: ModelSize.pinned_ratio) is predicted but not measured here.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30
# to disk: no training step on the CPU, where torch's bf16 int8 kernel segfaults on weights read back from disk (the
# job refuses that combination without CUDA); loading, quantising and spilling the weights are measured
VARIANTS = {"int8/group-ram": {"to_disk": False}, "int8/group-disk": {"to_disk": True}}


def vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)
        return True
    except OSError:
        return False


def one(variant: str, disk_root: str, smoke: bool = False) -> dict:
    """In a fresh process: build, quantise, offload, step; the peaks of each phase and the estimate."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AuraFlowTransformer2DModel

    from bench.gpu import CONFIG, SMOKE_CONFIG
    from job import memory, model, offload
    from job.config import SEED_LYCORIS_CONFIG, build_settings
    from job.loss import Batch, train_loss

    to_disk = VARIANTS[variant]["to_disk"]
    config = SMOKE_CONFIG if smoke else CONFIG
    cpu = torch.device("cpu")
    process = vm("VmRSS")
    t0 = time.monotonic()
    with init_empty_weights():
        tr = AuraFlowTransformer2DModel(**config)
    tr.to(torch.bfloat16).to_empty(device=cpu)  # made in bf16: an fp32 model first would peak at twice the size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tr.parameters():
            p.normal_(0, 0.02, generator=g)
    tr.requires_grad_(False)
    size = model.model_size(tr, model.Grid(2, config["pos_embed_max_size"], 8, 4))
    load_peak, load_s = vm("VmHWM"), time.monotonic() - t0

    phased = reset_peak()
    t0 = time.monotonic()
    model.quantize_blocks(tr, "int8-quanto", cpu, keep=False, expose=True)  # the job's path with group offload
    tr.enable_gradient_checkpointing()
    tr.train()
    net = model.create_adapter(tr, SEED_LYCORIS_CONFIG, torch.bfloat16, cpu)
    off = offload.apply(tr, net, cpu, offload.Policy("block_level", 1, False, disk_root if to_disk else ""), "bench")
    quantise_peak, settled = vm("VmHWM"), vm("VmRSS")  # what stays once the bf16 weights are gone
    phased = phased and reset_peak()
    loss = None
    if not to_disk:
        settings = build_settings([{"dataset_id": "x", "push_to_hub": "false", "mixed_precision": "bf16"}])
        gen = torch.Generator().manual_seed(1)
        batch = Batch(torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 16, 2048, generator=gen))
        loss = train_loss(tr, batch, torch.Generator().manual_seed(2), settings.training, 2, cpu, torch.bfloat16).mean()
        loss.backward()
        loss = loss.item()
    train_peak, train_s = vm("VmHWM"), time.monotonic() - t0
    off.close()

    est = memory.host_estimate(size, precision="int8-quanto", mixed_precision="bf16", device="cpu",
                               group_offload=True, stream=False, to_disk=to_disk)
    measured = {"load": load_peak / GiB, "quantise": quantise_peak / GiB, "settled": settled / GiB,
                "train": train_peak / GiB if phased else None,
                "peak": max(load_peak, quantise_peak, train_peak) / GiB}
    estimated = {"load": (est.process + est.load) / GiB, "quantise": (est.process + est.load) / GiB,
                 "settled": (est.process + est.train) / GiB, "train": (est.process + est.train) / GiB,
                 "peak": est.total / GiB}
    return {"variant": variant, "process_gib": process / GiB, "measured_gib": measured, "estimate_gib": estimated,
            "load_s": load_s, "train_s": train_s, "loss": loss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "host_ram.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--disk", default="", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="a tiny transformer: checks the script in seconds")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.disk, args.smoke)))
        return 0
    rows = []
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory(prefix="host-ram-") as disk:
            r = subprocess.run([sys.executable, "-m", "bench.host_ram", "--one", variant, "--disk", disk,
                                *(["--smoke"] if args.smoke else [])],
                               capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return r.returncode
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{'variant':<16} {'phase':<6} {'measured GiB':>12} {'estimate GiB':>12} {'ratio':>6}")
    for row in rows:
        for phase in ("load", "quantise", "settled", "train", "peak"):
            got, want = row["measured_gib"][phase], row["estimate_gib"][phase]
            if got is not None:
                print(f"{row['variant']:<16} {phase:<6} {got:>12.2f} {want:>12.2f} {want / got:>6.2f}")
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
