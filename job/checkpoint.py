"""Resumable checkpoints: written whole under a temporary name, then renamed; rotated; found again.

A folder named `checkpoint-<step>` exists only once everything inside it is on disk, so a crash
mid-write leaves a hidden temporary folder (cleaned up next time), never a checkpoint that lies.
`choose` resolves RESUME_FROM_CHECKPOINT and reads the checkpoint once, setting damaged ones aside.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from job.errors import ConfigError, DiskFull, disk_full

log = logging.getLogger("job")

_NAME = re.compile(r"checkpoint-(\d+)")
ADAPTER = "adapter.safetensors"
STATE = "training_state.pt"
META = "meta.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, adapter: dict[str, torch.Tensor], state: dict[str, Any], meta: dict,
         fault: Callable[[Path], None] | None = None) -> Path:
    """`fault`: test-only (JOB_TEST_FAULT), called with the temporary folder once the adapter is in it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(tmp / ADAPTER))
        if fault:
            fault(tmp)
        torch.save(state, tmp / STATE)
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=1))
        for f in (ADAPTER, STATE, META):
            _fsync(tmp / f)
    except BaseException as e:
        # a writer that failed half-way holds its open file through the traceback's frames, and an unlinked file
        # keeps its blocks while open: let it go, so that the space it took is free again (for status.json, the log)
        seen = e
        while seen is not None:
            seen.__traceback__, seen = None, seen.__cause__ or seen.__context__
        gc.collect()
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written folder left behind, whatever went wrong
        before = latest(root)  # what a checkpoint takes on this disk; without one, about its tensors' bytes
        needed = sum(f.stat().st_size for f in before.iterdir()) if before else _nbytes(adapter) + _nbytes(state)
        # torch.save reports a full disk only as "unexpected pos": what is free, with the folder gone, tells
        if isinstance(e, Exception) and (disk_full(e) or _free(root) < needed):
            raise DiskFull(f"no space left for {final.name}", path=final, needed=needed) from e
        raise
    if final.exists():  # the same step again (e.g. a stop right after a periodic save): replace it
        _remove(final)
    os.replace(tmp, final)
    _fsync(root)
    return final


def _nbytes(obj) -> int:
    """The bytes of the tensors in `obj` (nested dicts, lists and tuples): about what saving it takes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _free(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def _remove(path: Path) -> None:
    """Rename out of sight first, then delete: a kill mid-delete never leaves a checkpoint missing files."""
    hidden = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def step_of(path: Path) -> int:
    m = _NAME.fullmatch(path.name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint-<step> folder")
    return int(m.group(1))


def complete(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first; also clears temporary folders left by a crash."""
    if not root.is_dir():
        return []
    for stale in root.glob(".checkpoint-*"):  # half-written or half-deleted by a crash
        shutil.rmtree(stale, ignore_errors=True)
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / META).is_file()]
    return sorted(found, key=step_of)


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


@dataclass
class Loaded:
    """A checkpoint read from disk: what Trainer resumes from."""

    path: Path
    adapter: dict[str, torch.Tensor]
    state: dict[str, Any]  # optimizer, scheduler, EMA, each rank's RNG
    meta: dict

    @property
    def step(self) -> int:
        return self.meta["step"]


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    adapter = load_file(str(path / ADAPTER))
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    meta = json.loads((path / META).read_text())
    return adapter, state, meta


def rotate(root: Path, limit: int) -> list[Path]:
    """Keep the newest `limit` checkpoints (0 = all); returns what was removed."""
    found = complete(root)
    doomed = found[:-limit] if limit and len(found) > limit else []
    for p in doomed:
        _remove(p)
    return doomed


def choose(setting: str, folder: Path, remote: Callable[[], Path | None] | None = None) -> Loaded | None:
    """RESUME_FROM_CHECKPOINT, resolved and read: "none"; "latest" (the newest in `folder`, else what `remote`
    fetches: a fresh pod after preemption finds its checkpoints on the Hub); or a checkpoint name or path."""
    complete(folder)  # clears what an interrupted save, rotation or download left, whatever the setting
    if setting == "none":
        return None
    if setting == "latest":
        path = latest(folder) or (remote() if remote else None)
    else:
        path = folder / setting if (folder / setting).is_dir() else Path(setting)
        if not path.is_dir():
            raise ConfigError([f"RESUME_FROM_CHECKPOINT={setting!r}: no such checkpoint"])
    return _readable(path)


def _readable(path: Path | None) -> Loaded | None:
    """`path` read, or when its files cannot be read (a disk fault, a crash), set aside and the one before it
    tried. One that reads but does not fit the model is an error, not damage (Trainer's resume says so)."""
    while path is not None:
        try:
            return Loaded(path, *load(path))
        except Exception as e:  # torch/safetensors raise many kinds for a damaged file
            aside = path.with_name(path.name + ".unreadable")
            path.replace(aside)
            log.warning("checkpoint %s cannot be read (%s); set aside as %s", path.name, type(e).__name__, aside.name)
            path = latest(path.parent)
    return None
