"""The training loop, its optimizer and schedule, EMA and checkpoints (the loss itself is `job/loss.py`).

Reads neither the environment nor the Hub. Every random draw of a micro-batch (caption dropout,
sigmas, noise) comes from a generator seeded by (SEED, micro-batch index), so a resumed run
replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from job import checkpoint, distributed
from job.config import TrainingSettings
from job.errors import ConfigError, DivergedError, Interrupted
from job.log import MetricsSink, NullSink, Progress, StatusFile
from job.loss import Batch, train_loss

log = logging.getLogger("job")


# ---------------------------------------------------------------- set-up

def make_optimizer(params: list[torch.nn.Parameter], t: TrainingSettings) -> torch.optim.Optimizer:
    name, lr = t.optimizer, t.learning_rate
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    if name in ("adamw_bf16", "optimi-adamw", "optimi-lion"):
        import optimi  # Kahan summation keeps bf16 adapter weights from losing small updates

        kahan = True if name == "adamw_bf16" else None  # None: optimi turns it on for low-precision params
        if name == "optimi-lion":
            return optimi.Lion(params, lr=lr, weight_decay=0.0, kahan_sum=kahan)
        return optimi.AdamW(params, lr=lr, weight_decay=1e-2, kahan_sum=kahan)
    import bitsandbytes as bnb  # only the bnb-* optimizers pay for this import

    cls = {"bnb-adamw8bit": bnb.optim.AdamW8bit, "bnb-lion8bit": bnb.optim.Lion8bit,
           "bnb-adamw8bit-paged": bnb.optim.PagedAdamW8bit, "bnb-lion8bit-paged": bnb.optim.PagedLion8bit}[name]
    return cls(params, lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, t: TrainingSettings, total_steps: int):
    from diffusers.optimization import get_scheduler

    name = t.lr_scheduler
    if name == "constant" and t.lr_warmup_steps:  # diffusers' "constant" ignores warm-up; the seed expects it
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=total_steps)


class EMA:
    """Exponential moving average of the adapter weights, kept in fp32, by parameter name."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.params, self.decay = dict(named_params), decay
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA weights in place of the live ones (for saving and validation), then back."""
        live = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(live[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {n: t.clone() for n, t in state["shadow"].items()}


class _NoProfiler(contextlib.nullcontext):
    def __enter__(self):
        return self

    def step(self) -> None:
        pass


def profiler(enabled: bool, folder: Path):
    """PROFILE=true: a torch profiler trace of steps 3-5 (after two of warm-up), for chrome://tracing or TensorBoard."""
    if not enabled:
        return _NoProfiler()
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    log.info("profiling steps 3-5 into %s", folder)
    return profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(str(folder)), record_shapes=True)


def micro_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


# ---------------------------------------------------------------- the loop

Hook = Callable[["Trainer"], "dict | None"]  # after each step: eval loss, validation (see pipeline)


@dataclass(kw_only=True)
class Trainer:
    transformer: torch.nn.Module
    network: torch.nn.Module  # the LyCORIS wrapper; its parameters are the only trainable ones
    fetch: Callable[[int, torch.Generator], Batch]  # micro-batch index → its batch
    t: TrainingSettings
    total_steps: int
    patch_size: int
    device: torch.device
    dtype: torch.dtype
    checkpoint_dir: Path
    checkpoint_interval: int = 0
    checkpoints_total_limit: int = 0
    resume_from: checkpoint.Loaded | None = None
    hooks: list[Hook] = field(default_factory=list)
    metrics: MetricsSink | NullSink = field(default_factory=NullSink)  # opened at the resume step
    should_stop: Callable[[], int | None] = lambda: None  # the signal number once a stop is requested
    on_checkpoint: Callable[[Path], None] = lambda path: None
    status: StatusFile = field(default_factory=lambda: StatusFile(None))
    dist: distributed.Context = distributed.SINGLE  # with several processes: this one's rank and the collectives
    # test-only (JOB_TEST_FAULT, see faults.Injection): called as fault("step", n) before step n and
    # fault("checkpoint", n, folder) inside the write of checkpoint n; raises the fault a test asks for
    fault: Callable[..., None] | None = None
    step: int = field(init=False, default=0)
    skipped: int = field(init=False, default=0)  # non-finite steps skipped so far
    # where the loop is, for a failure's message: "step" (forward, backward, update), "hooks" (eval loss,
    # validation), "checkpoint"; and the latents' shape of the last micro-batch fetched (batch, channels, h, w)
    stage: str = field(init=False, default="")
    batch_shape: tuple[int, ...] | None = field(init=False, default=None)

    def __post_init__(self):
        named = [(n, p) for n, p in self.network.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.optimizer = make_optimizer(self.params, self.t)
        self.scheduler = make_scheduler(self.optimizer, self.t, self.total_steps)
        self.ema = EMA(named, self.t.ema_decay) if self.t.use_ema else None
        if self.resume_from:
            self._resume(self.resume_from)

    def run(self) -> None:
        t, accum = self.t, self.t.gradient_accumulation_steps
        progress, t0 = Progress(self.total_steps, self.step, status=self.status), time.monotonic()
        with profiler(t.profile and self.dist.is_main, self.checkpoint_dir.parent / "profile") as prof:
            while self.step < self.total_steps:
                self.train_step(t, accum, progress, t0)
                prof.step()
        self.stage = ""

    def train_step(self, t: TrainingSettings, accum: int, progress: Progress, t0: float) -> None:
        """One optimizer step: accumulate micro-batches, clip, update, log, checkpoint, honour a stop request."""
        self.stage = "step"
        if self.fault:
            self.fault("step", self.step + 1)
        loss, extra = self.accumulate(t, accum)
        grad_norm = self.clip()
        finite = self.apply(loss, grad_norm)
        self.step += 1
        lr = self.scheduler.get_last_lr()[0]
        self.stage = "hooks"
        extra |= {k: v for hook in self.hooks for k, v in (hook(self) or {}).items()}
        self.metrics.write(step=self.step, loss=loss if finite else None, lr=lr,
                           grad_norm=grad_norm if finite else None, elapsed_s=round(time.monotonic() - t0, 3),
                           it_per_s=round(progress.rate(self.step), 4), time=round(time.time(), 3), **extra,
                           **({} if finite else {"skipped": True}))
        progress.update(self.step, loss, lr)
        if self.checkpoint_interval and self.step % self.checkpoint_interval == 0:
            self.save_checkpoint()
        signum = self.dist.agree_stop(self.should_stop())  # every rank stops after the same step
        if signum:
            t_stop = time.monotonic()
            path = self.save_checkpoint()
            raise Interrupted(signum, f"stopped by signal {signum} at step {self.step}; checkpoint {path} written in "
                                      f"{time.monotonic() - t_stop:.1f}s; the same command resumes")

    def accumulate(self, t: TrainingSettings, accum: int) -> tuple[float, dict]:
        """Forward and backward over the step's micro-batches; (the loss, the regularisation rows' share of it when
        the run has such rows), averaged over micro-batches and ranks, the gradients likewise."""
        losses, reg_losses = [], []
        for micro in range(accum):
            index = self.step * accum + micro
            g = micro_generator(t.seed, index)
            batch = self.fetch(index, g)
            self.batch_shape = tuple(batch.latents.shape)
            rows = train_loss(self.transformer, batch, g, t, self.patch_size, self.device, self.dtype,
                              share=(self.dist.rank, self.dist.world), network=self.network)
            loss = rows.mean()
            (loss / accum).backward()
            losses.append(loss.item())
            if batch.regularisation is not None:
                reg_losses.append(rows.detach()[batch.regularisation.to(rows.device)].sum().item() / len(rows))
        # once per step, after accumulation: every rank then clips, steps and decides about non-finite values
        # alike, and the adapters stay identical
        loss, reg_loss = self.dist.average_gradients(self.params, [sum(losses) / accum, sum(reg_losses) / accum])
        return loss, ({"regularisation_loss": reg_loss} if reg_losses else {})

    def apply(self, loss: float, grad_norm: float) -> bool:
        """The optimizer step; a non-finite loss or gradient is skipped (SKIP_NONFINITE_STEPS allows that many)
        or stops the run with the last good checkpoint kept."""
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if not finite:
            if self.skipped >= self.t.skip_nonfinite_steps:
                raise DivergedError(f"training diverged at step {self.step + 1} (loss {loss}, grad norm {grad_norm})"
                                    f"; the last good checkpoint is kept in {self.checkpoint_dir}")
            self.skipped += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d of SKIP_NONFINITE_STEPS=%d)",
                        self.step + 1, self.skipped, self.t.skip_nonfinite_steps)
        else:
            self.optimizer.step()
            if self.ema:
                self.ema.update()
        self.scheduler.step()  # the schedule follows the step count either way, so resumes stay exact
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def clip(self) -> float:
        t = self.t
        if t.max_grad_norm and t.grad_clip_method == "norm":
            return float(torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm))
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_value_(self.params, t.max_grad_norm)
        return norm

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Written by rank 0 (the ranks' adapters and optimizers are identical) with every rank's RNG state; the
        others wait for it."""
        self.stage = "checkpoint"
        rng = self.dist.gather(checkpoint.rng_state())
        return self.dist.main_only(lambda: self._write_checkpoint(rng))

    def _write_checkpoint(self, rng: list[dict]) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng}
        if self.ema:
            state["ema"] = self.ema.state_dict()
        # the data position: micro-batches of the global batch (the data order follows from its size and SEED)
        meta = {"micro_batches_done": self.step * self.t.gradient_accumulation_steps,
                "total_steps": self.total_steps, "skipped": self.skipped, "num_processes": self.dist.world,
                "global_batch": self.global_batch}
        fault = (lambda tmp: self.fault("checkpoint", self.step, tmp)) if self.fault else None
        path = checkpoint.save(self.checkpoint_dir, self.step, self.network.state_dict(), state, meta, fault=fault)
        self.status.update(last_checkpoint=path.name, force=True)
        self.on_checkpoint(path)  # first: an upload still reading an older checkpoint finishes before rotation
        removed = checkpoint.rotate(self.checkpoint_dir, self.checkpoints_total_limit)
        log.info("checkpoint %s written%s", path.name, f" ({len(removed)} old removed)" if removed else "")
        return path

    def _resume(self, loaded: checkpoint.Loaded) -> None:
        """Continue from a checkpoint already read (checkpoint.choose)."""
        path, adapter, state, meta = loaded.path, loaded.adapter, loaded.state, loaded.meta
        try:
            self.network.load_state_dict(adapter)
        except RuntimeError as e:  # an adapter of another shape: the settings changed, the file is fine
            raise ConfigError([f"RESUME_FROM_CHECKPOINT: {path} holds an adapter made with another LYCORIS_CONFIG "
                               f"({str(e).splitlines()[0][:200]}); use the original settings, a new OUTPUT_DIR, or "
                               "RESUME_FROM_CHECKPOINT=none"]) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        checkpoint.restore_rng(state["rng"][self.dist.rank % len(state["rng"])])  # one per rank
        self.step, self.skipped = meta["step"], meta["skipped"]
        log.info("resumed from %s (step %d of %d)", path, self.step, self.total_steps)
        written_by, then = meta["num_processes"], meta["global_batch"]
        if written_by != self.dist.world and self.dist.is_main:
            why = (f"the global batch (TRAIN_BATCH_SIZE × NUM_PROCESSES = {then}) is unchanged, and so is the data "
                   "order" if then == self.global_batch else "data order differs from an uninterrupted run (global "
                   f"batch {then} then, {self.global_batch} now)")
            log.warning("resumed with NUM_PROCESSES=%d, checkpoint was written with %d: %s", self.dist.world,
                        written_by, why)

    @property
    def global_batch(self) -> int:
        return self.t.train_batch_size * self.dist.world

    def final_weights(self):
        """Context: the weights to publish (EMA when on)."""
        return self.ema.swapped_in() if self.ema else contextlib.nullcontext()
