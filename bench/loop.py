"""Loop overhead: seconds per step of the job's Trainer (micro-batches fetched from the on-disk caches, metrics,
progress, status) over a bare reference step on the same tiny model, batch and optimizer (forward, loss, backward,
step, nothing else). Median of several runs; the target is a ratio of at most 1.10.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AuraFlowTransformer2DModel

from bench.caching import _builtin_root
from job import builtin, flow, model
from job.cache import TensorCache
from job.config import build_settings
from job.log import MetricsSink
from job.loss import Batch
from job.pipeline import DEMO_LYCORIS
from job.train import Trainer, make_optimizer

STEPS, RUNS, BATCH = 40, 5, 4


def _setup(tmp: Path):
    s = build_settings([{"dataset_id": "x", "push_to_hub": "false", "mixed_precision": "no", "optimizer": "adamw",
                         "learning_rate": "1e-3", "flow_schedule_shift": "1.0", "max_train_steps": str(STEPS)}])
    tr = AuraFlowTransformer2DModel.from_pretrained(builtin.tiny_model_dir(_builtin_root()), subfolder="transformer")
    tr.requires_grad_(False)
    torch.manual_seed(0)
    net = model.create_adapter(tr, json.loads(json.dumps(DEMO_LYCORIS)), torch.float32)
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, 32, 32, generator=g) for _ in range(16)]
    embeds = [torch.randn(256, 32, generator=g) for _ in range(16)]
    cache = TensorCache(tmp / "cache", "bench")
    for i, (lat, emb) in enumerate(zip(latents, embeds)):
        cache.put(f"l{i:062d}", lat)
        cache.put(f"e{i:062d}", emb)
    return s, tr, net, latents, embeds, cache


def _bare(s, tr, net, latents, embeds) -> float:
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(params, s.training)
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for step in range(STEPS):
        idx = [(step * BATCH + k) % len(latents) for k in range(BATCH)]
        x0, emb = torch.stack([latents[i] for i in idx]), torch.stack([embeds[i] for i in idx])
        sig = torch.sigmoid(torch.randn(BATCH, generator=g))
        noise = torch.randn(x0.shape, generator=g)
        pred = tr(flow.noised(x0, noise, sig), emb, sig, return_dict=False)[0]
        F.mse_loss(pred, noise - x0).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / STEPS


def _job(s, tr, net, cache, tmp: Path) -> float:
    def fetch(index, g):
        idx = [(index * BATCH + k) % 16 for k in range(BATCH)]
        torch.rand(BATCH, generator=g)  # the caption-dropout draw the real fetcher makes
        return Batch(torch.stack([cache.get(f"l{i:062d}") for i in idx]),
                     torch.stack([cache.get(f"e{i:062d}") for i in idx]))

    t = Trainer(transformer=tr, network=net, fetch=fetch, t=s.training, total_steps=STEPS, patch_size=2,
                device=torch.device("cpu"), dtype=torch.float32, checkpoint_dir=tmp / "ckpt",
                metrics=MetricsSink(tmp / f"metrics-{time.monotonic_ns()}.jsonl"))
    t0 = time.perf_counter()
    t.run()
    t.metrics.close()
    return (time.perf_counter() - t0) / STEPS


def run() -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        s, tr, net, latents, embeds, cache = _setup(tmp)
        _bare(s, tr, net, latents, embeds)  # warm-up: allocator, kernels
        bare, job = [], []
        for _ in range(RUNS):  # interleaved, so drift in machine load hits both alike
            bare.append(_bare(s, tr, net, latents, embeds))
            job.append(_job(s, tr, net, cache, tmp))
    b, j = statistics.median(bare), statistics.median(job)
    return {"loop_s_per_step_bare": round(b, 5), "loop_s_per_step_job": round(j, 5),
            "loop_overhead_ratio": round(j / b, 3)}
