"""Faults in the middle of a run, turned into what a person reading a pod's log at 3 a.m. needs: one line naming what
failed, where, and what to do, under the exit code of its kind (`errors`), with the traceback in OUTPUT_DIR/logs/.

`pipeline.failed` calls `explain` once for any exception after preflight. The kinds:
- a full disk (DiskFull, 7): which folder (OUTPUT_DIR, HF_HOME, GROUP_OFFLOAD_TO_DISK_PATH, a dataset's cache
  folder), what is free there, what the write needed when the writer knew, the last good checkpoint;
- GPU out of memory (OutOfMemory, 8): the step, the bucket and batch, the estimate `check` prints beside the GPU's
  memory, and the settings that lower it, in the order of the README's GPU table;
- a failed CUDA device or kernel (DeviceFailed, 9): the CUDA context is unusable, so nothing more is read from the
  GPU; for a device-side assert, whether the bucket exceeds AuraFlow's positional-embedding grid;
- anything else (Unexpected, 1).
The job's own failure kinds (a bad setting, the Hub, the data, divergence, a signal) pass through as they are.

Also the test-only fault injection (`Injection`, from JOB_TEST_FAULT, which only `cli` reads).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from job import checkpoint, hub, model, outputs
from job.config import Settings, datasets
from job.errors import (
    ConfigError,
    DeviceFailed,
    DiskFull,
    Interrupted,
    JobError,
    OutOfMemory,
    PeerFault,
    Unexpected,
    device_failed,
    disk_full,
    out_of_memory,
)
from job.log import StatusFile, redact

if TYPE_CHECKING:
    from job.train import Trainer

log = logging.getLogger("job")
GiB = 2**30

PHASES = {"starting": "while starting", "download": "while downloading the model",
          "caching": "while caching latents and text embeddings or loading the model",
          "training": "while preparing the training loop", "sampling": "while writing the results",
          "push": "while pushing to the Hub", "done": "after the run was done"}


@dataclass(frozen=True)
class Injection:
    """Test-only: JOB_TEST_FAULT=KIND@STEP makes a run meet a fault as the real one arises, so the tests can follow
    it through the real CLI on a CPU. `oom@N`: torch.OutOfMemoryError before step N; `device@N`: the error torch
    raises after a device-side assert, before step N; `enospc@N`: ENOSPC from the write of checkpoint N, its adapter
    file already in the temporary folder (where the test cannot mount a small tmpfs for a real full disk); `stop@N`:
    the process stops itself (SIGSTOP) before step N, so that a test can fill the volume, as another process would,
    after the preflight's disk check passed, and continue it (SIGCONT). `KIND@STEP/RANK`: in that rank only."""

    kind: str
    step: int
    rank: int | None = None
    own_rank: int = 0  # the rank of the process that parsed it

    KINDS = ("oom", "device", "enospc", "stop")

    @classmethod
    def parse(cls, spec: str, own_rank: int = 0) -> Injection | None:
        if not spec:
            return None
        found = re.fullmatch(r"([a-z]+)@(\d+)(?:/(\d+))?", spec)
        if not found or found[1] not in cls.KINDS:
            raise ConfigError([f"JOB_TEST_FAULT={spec!r}: expected KIND@STEP or KIND@STEP/RANK with KIND one of "
                               f"{', '.join(cls.KINDS)}"])
        return cls(found[1], int(found[2]), None if found[3] is None else int(found[3]), own_rank)

    def __call__(self, point: str, step: int, path: Path | None = None) -> None:
        if step != self.step or self.rank not in (None, self.own_rank):
            return
        note = "(injected by JOB_TEST_FAULT)"
        if point == "step" and self.kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        if point == "step" and self.kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB {note}")
        if point == "step" and self.kind == "device":
            raise getattr(torch, "AcceleratorError", RuntimeError)(f"CUDA error: device-side assert triggered {note}")
        if point == "checkpoint" and self.kind == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device {note}", str(path))


PEER_RECORD = "rank-{rank}.failed.json"  # in OUTPUT_DIR/logs: a failed rank's line and exit code, for the others


@dataclass
class Scene:
    """What the run knows when something fails: filled in by the pipeline as the run goes."""

    settings: Settings
    grid: model.Grid
    device: torch.device
    status: StatusFile  # its phase, step and last checkpoint (every rank keeps the state; rank 0 writes the file)
    rank: int = 0
    debug: bool = False  # DEBUG=true: the traceback on the terminal too
    injection: Injection | None = None
    model_dir: Path | None = None  # once pulled
    trainer: Trainer | None = None  # once built
    world: int = 1  # processes in the run

    @property
    def out(self) -> Path:
        return Path(self.settings.output.output_dir)


def explain(e: BaseException, scene: Scene) -> JobError:
    """`e` as the failure kind the job exits with, its message one line. A fault's traceback goes to
    OUTPUT_DIR/logs/ (redacted), and to the terminal with DEBUG=true; the line says where the file is."""
    if isinstance(e, JobError) and not isinstance(e, DiskFull):
        return e  # the job's own kinds already say what happened and what to do
    if out_of_memory(e):
        kind, line = OutOfMemory, _out_of_memory(e, scene)
    elif device_failed(e):
        kind, line = DeviceFailed, _device_failed(e, scene)
    elif disk_full(e):
        kind, line = DiskFull, _disk_full(e, scene)
    else:
        kind, line = Unexpected, (f"unexpected error {_where(scene)}: {type(e).__name__}: {_first_line(e)}; "
                                  f"{_resume(scene)}")
    trace = redact("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    if scene.debug:
        log.error("%s", trace.rstrip())
    saved = _save_traceback(scene, line, trace)
    line += f" (traceback: {saved})" if saved else " (no room for the traceback file; DEBUG=true prints it)"
    return kind(line)


def forget_earlier_failures(scene: Scene) -> None:
    """At the start: a failure record left by an earlier run is not this run's. Each rank removes its own (no other
    rank writes it), rank 0 also those of ranks this run does not have."""
    for path in (scene.out / "logs").glob(PEER_RECORD.format(rank="*")):
        found = re.fullmatch(r"rank-(\d+)\.failed\.json", path.name)  # PEER_RECORD's
        if found and (int(found[1]) == scene.rank or (scene.rank == 0 and int(found[1]) >= scene.world)):
            path.unlink(missing_ok=True)


def record_failure(error: JobError, scene: Scene) -> None:
    """On a rank other than 0, its own failure's line and exit code in OUTPUT_DIR/logs/ (shared by every machine),
    before it exits. The other ranks only see their collective break when this rank's process goes (or torchrun
    stops them): rank 0 reports what this one says, and every rank leaves with its exit code.
    An interruption is not recorded: a signal reaches every rank, and rank 0 reports its own."""
    if isinstance(error, Interrupted):
        return
    record = {"rank": scene.rank, "exit_code": error.exit_code, "line": redact(str(error)), "at": time.time()}
    path = scene.out / "logs" / PEER_RECORD.format(rank=scene.rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        outputs.write_json(path, record)
    except OSError:  # a full disk: the others then report their broken collective
        pass


def peer_failure(error: JobError, scene: Scene, wait_s: float = 2.0) -> JobError:
    """`error`, or the failure another rank recorded first when `error` is only its consequence (an unexpected
    error: the collective broke; or an interruption: torchrun stops the other ranks after one failed)."""
    if scene.world == 1 or not isinstance(error, Unexpected | Interrupted):
        return error
    deadline = time.monotonic() + (wait_s if isinstance(error, Unexpected) else 0)  # a shared volume may lag
    while True:
        found = []
        for path in (scene.out / "logs").glob(PEER_RECORD.format(rank="*")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # half written by a rank killed meanwhile
                continue
        if found or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not found:
        return error
    first = min(found, key=lambda r: r["at"])
    return PeerFault(int(first["exit_code"]), f"rank {first['rank']} failed: {first['line']}; {_resume(scene)}")


# ---------------------------------------------------------------- the kinds

def _out_of_memory(e: BaseException, scene: Scene) -> str:
    s, where = scene.settings, _where(scene)
    parts = []
    est = _estimate(scene)
    gpu = _gpu_memory(scene.device)
    if est is not None:
        parts.append(f"the estimate for these settings is {memory_size(est)}"
                     + (f", the GPU has {memory_size(gpu[0])} and this run's peak was {memory_size(gpu[1])}" if gpu
                        else f" (this run is on the {scene.device.type}, not a GPU)"))
    parts.append("lower it with " + ", then ".join(remedies(s, scene)))
    parts.append(_resume(scene))
    return f"out of GPU memory {where}{_bucket(scene)}: " + "; ".join(parts)


def memory_size(n: float) -> str:
    """GiB as `check` prints them; MiB below one GiB (a small model's estimate would read 0.0 GiB)."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def remedies(s: Settings, scene: Scene | None = None) -> list[str]:
    """The settings that lower GPU memory and are not yet in effect, in the order of the README's GPU table (24 GB
    row, then the 12-16 GB row), then the resolution; for a round outside the step, what that round uses."""
    training, memory = s.training, s.memory
    stage = scene.trainer.stage if scene and scene.trainer else ""
    phase = scene.status.state.get("phase") if scene else "training"
    found = []
    if phase == "caching" and s.data.vae_batch_size > 1:
        found.append("VAE_BATCH_SIZE=1")
    if stage == "hooks" or phase == "sampling":
        found.append("a smaller VALIDATION_RESOLUTION or ENABLE_MODEL_CPU_OFFLOAD=true")
    if training.base_model_precision == "no_change":
        found.append("BASE_MODEL_PRECISION=int8-quanto")
    if not model.checkpointing(s):
        found.append("GRADIENT_CHECKPOINTING=true")
    if training.train_batch_size > 1:
        found.append(f"TRAIN_BATCH_SIZE=1 (GRADIENT_ACCUMULATION_STEPS={training.train_batch_size * training.gradient_accumulation_steps} "
                     "keeps the effective batch)")
    if not memory.enable_group_offload:
        found.append("ENABLE_GROUP_OFFLOAD=true")
    found.append("a smaller RESOLUTION")
    return found


def _device_failed(e: BaseException, scene: Scene) -> str:
    what = _first_line(e)
    line = (f"the GPU failed {_where(scene)}{_bucket(scene)}: {what}; its CUDA context is unusable after this, so "
            "nothing more was read from the GPU (no checkpoint of the weights it held)")
    if "device-side assert" in what.lower():
        line += f"; {_assert_hint(scene)}"
    else:
        line += "; if it happens again at another step, the GPU itself is failing: run on another machine"
    return f"{line}; {_resume(scene)}"


def _assert_hint(scene: Scene) -> str:
    """AuraFlow's positional embedding is a fixed grid: a latent larger than it indexes past its end, which on CUDA
    is a device-side assert."""
    grid, trainer = scene.grid, scene.trainer
    side = int(grid.pos_embed_max_size ** 0.5)
    limit = side * grid.pixel_step
    if trainer is not None and trainer.stage == "step" and trainer.batch_shape:
        h, w = trainer.batch_shape[-2:]
        if h // grid.patch_size > side or w // grid.patch_size > side:
            return (f"the bucket {w * grid.vae_scale_factor}×{h * grid.vae_scale_factor} px exceeds AuraFlow's "
                    f"positional-embedding grid (at most {limit} px a side for this model): lower RESOLUTION")
        return (f"the bucket is within AuraFlow's positional-embedding grid (at most {limit} px a side), so this is "
                "another index out of range: CUDA_LAUNCH_BLOCKING=1 DEBUG=true shows which operation")
    return (f"images larger than AuraFlow's positional-embedding grid ({limit} px a side for this model) cause "
            "this: check VALIDATION_RESOLUTION and RESOLUTION; CUDA_LAUNCH_BLOCKING=1 DEBUG=true shows the operation")


def _disk_full(e: BaseException, scene: Scene) -> str:
    path, needed = _written(e)
    name, folder = _folder(scene, path)
    free, where = _free(folder), _where(scene)
    what = f", writing {path.name}" if path is not None and path.name not in where else ""
    line = (f"disk full {where}{what}: {name} ({folder}) has {_size(free)} free"
            + (f", the write needed about {_size(needed)}" if needed else ""))
    return f"{line}; free space there (or give {name} a larger volume) and start the same command again: {_resume(scene)}"


# ---------------------------------------------------------------- the facts

def _written(e: BaseException) -> tuple[Path | None, int | None]:
    """(what was being written, the bytes it needed), as far as the exception knows."""
    seen = e
    while seen is not None:
        if isinstance(seen, DiskFull):
            return (Path(seen.path) if seen.path else None), seen.needed
        if isinstance(seen, OSError) and seen.filename:
            return Path(seen.filename), None
        seen = seen.__cause__ or seen.__context__
    return None, None


def folders(s: Settings) -> list[tuple[str, Path]]:
    """Where the job writes, by the setting that names each folder."""
    found = [("OUTPUT_DIR", Path(s.output.output_dir)), ("HF_HOME", hub.cache_folder())]
    if s.memory.enable_group_offload and s.memory.group_offload_to_disk_path:
        found.append(("GROUP_OFFLOAD_TO_DISK_PATH", Path(s.memory.group_offload_to_disk_path)))
    specs, text_dir, _, _ = datasets(s)
    found += [(f"cache_dir_vae of dataset {spec.id}", Path(spec.cache_dir_vae)) for spec in specs if spec.cache_dir_vae]
    if text_dir:
        found.append(("the text_embeds cache_dir", Path(text_dir)))
    return found


def _folder(scene: Scene, path: Path | None) -> tuple[str, Path]:
    """The setting's folder that holds `path` (the innermost); without a path, the fullest of them."""
    candidates = [(name, folder.resolve()) for name, folder in folders(scene.settings)]
    if path is not None:
        target = path.resolve()
        holding = [(name, f) for name, f in candidates if target == f or f in target.parents]
        if holding:
            return max(holding, key=lambda c: len(c[1].parts))
        return str(target.parent), target.parent
    existing = [(name, f) for name, f in candidates if _existing(f) is not None]
    return min(existing, key=lambda c: _free(c[1])) if existing else candidates[0]


def _existing(folder: Path) -> Path | None:
    for p in (folder, *folder.parents):
        if p.exists():
            return p
    return None


def _free(folder: Path) -> int:
    try:
        return shutil.disk_usage(_existing(folder) or folder).free
    except OSError:
        return 0


def _estimate(scene: Scene) -> float | None:
    """The peak GPU memory `check` predicts for these settings (bytes), at the largest dataset resolution."""
    if scene.model_dir is None:
        return None
    s = scene.settings
    try:
        _, params, size = model.adapter_check(scene.model_dir, s.adapter.lycoris_config)
        resolution = max(spec.resolution for spec in datasets(s)[0])
        return model.memory_estimate(s, size, params, resolution, scene.device).total
    except Exception as e:  # the message goes out without it rather than not at all
        log.debug("no memory estimate for the failure message: %s", e)
        return None


def _gpu_memory(device: torch.device) -> tuple[int, int] | None:
    """(the GPU's memory, the peak this process allocated): an out-of-memory leaves the CUDA context usable."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.mem_get_info(device)[1], torch.cuda.max_memory_allocated(device)
    except RuntimeError:
        return None


def _where(scene: Scene) -> str:
    trainer, phase = scene.trainer, scene.status.state.get("phase")
    if phase == "training" and trainer is not None:
        return {"step": f"at step {trainer.step + 1}",
                "hooks": f"in the eval or validation round after step {trainer.step}",
                "checkpoint": f"writing checkpoint-{trainer.step}"}.get(trainer.stage, f"after step {trainer.step}")
    return PHASES.get(phase, f"while {phase}")


def _bucket(scene: Scene) -> str:
    trainer = scene.trainer
    if trainer is None or trainer.stage != "step" or not trainer.batch_shape:
        return ""
    b, _, h, w = trainer.batch_shape
    f = scene.grid.vae_scale_factor
    return f" (bucket {w * f}×{h * f} px, batch {b})"


def _resume(scene: Scene) -> str:
    """The last good checkpoint (rank 0 alone looks: listing clears what an interrupted save left)."""
    if scene.rank != 0:
        return "process 0 reports the last checkpoint"
    last = checkpoint.latest(scene.out / "checkpoints")
    if scene.settings.checkpoints.resume_from_checkpoint != "latest":
        return f"the last checkpoint is {last}" if last else "no checkpoint was written"
    if last is None:
        return "no checkpoint was written yet, so the same command starts from the beginning"
    return f"the last good checkpoint is {last.name} (in {last.parent}), and the same command resumes from it"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return redact(text.splitlines()[0][:400]) if text else type(e).__name__


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _save_traceback(scene: Scene, line: str, trace: str) -> Path | None:
    """OUTPUT_DIR/logs/failure-<UTC time>[-rank<N>].log: the line, then the traceback (secrets masked)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = scene.out / "logs" / f"failure-{stamp}{f'-rank{scene.rank}' if scene.rank else ''}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(redact(line) + "\n\n" + trace, encoding="utf-8")
    except OSError:
        path.unlink(missing_ok=True)
        return None
    return path
