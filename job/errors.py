"""The job's failure kinds, each carrying the exit code that README.md's exit-code table promises for it.

Lowest floor: every module may raise these; only `cli` turns them into exit codes.
"""
from __future__ import annotations

import errno
import sys


class JobError(Exception):
    exit_code = 1


class ConfigError(JobError):
    """One or more invalid settings; the message lists every problem at once."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} invalid setting(s):\n{lines}")


class HubAccessError(JobError):
    exit_code = 3


class DataError(JobError):
    exit_code = 4


class DivergedError(JobError):
    exit_code = 5


class PushError(JobError):
    exit_code = 6


class Fault(JobError):
    """Found mid-run on this process's machine (its disk, its GPU) or not foreseen at all. The other processes are
    not in step with this one: nothing waits for them, and the process group is left for the process's exit."""


class DiskFull(Fault):
    """No space left where the job writes. `path`: what was being written, when known; `needed`: its bytes."""

    exit_code = 7

    def __init__(self, message: str, path=None, needed: int | None = None):
        super().__init__(message)
        self.path, self.needed = path, needed


class OutOfMemory(Fault):
    exit_code = 8


class DeviceFailed(Fault):
    """The CUDA device was lost or a kernel failed (a device-side assert): the process's CUDA context is unusable."""

    exit_code = 9


class Unexpected(Fault):
    exit_code = 1


_NO_SPACE = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122", "storagefull")
# torch's words for a failed kernel or a lost device ("CUDA error: device-side assert triggered", "... an illegal
# memory access was encountered", "... unspecified launch failure", "CUDA driver error: ..."); an out-of-memory is not
# one ("CUDA out of memory"), nor is a peer's death in a collective
_DEVICE = ("cuda error", "cuda driver error", "device-side assert", "cudnn_status_execution_failed")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def disk_full(e: BaseException) -> bool:
    """Whether `e`, or what caused it, is a write that found no space: ENOSPC or EDQUOT, also as libraries that
    write through their own code report it (safetensors: "No space left on device (os error 28)"). torch.save says
    only "unexpected pos": its writers compare free space with what they needed (see checkpoint.save)."""
    return any(isinstance(x, DiskFull) or (isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT))
               or any(m in str(x).lower() for m in _NO_SPACE) for x in _chain(e))


def out_of_memory(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return any(isinstance(x, OutOfMemory) or (torch is not None and isinstance(x, torch.OutOfMemoryError))
               for x in _chain(e))


def device_failed(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    accelerator = getattr(torch, "AcceleratorError", ()) if torch is not None else ()
    return any(isinstance(x, DeviceFailed) or (accelerator and isinstance(x, accelerator))
               or (isinstance(x, RuntimeError) and any(m in str(x).lower() for m in _DEVICE)) for x in _chain(e))


def exit_code(e: BaseException) -> int:
    """The exit code `e` stands for: a JobError's own; a full disk, an out-of-memory GPU or a failed CUDA device
    found as the libraries raise them; 1 for anything else."""
    if isinstance(e, JobError):
        return e.exit_code
    for kind, found in ((OutOfMemory, out_of_memory), (DeviceFailed, device_failed), (DiskFull, disk_full)):
        if found(e):
            return kind.exit_code
    return 1


class RankZeroFailed(JobError):
    """On the other ranks, when work only rank 0 does failed: they leave with its exit code (rank 0 reports it)."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(f"rank 0 failed: {message}")
        self.exit_code = exit_code


class PeerFailed(JobError):
    """On every other machine, when one machine's own work (its downloads) failed: they leave with its exit code."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


class PeerFault(PeerFailed, Fault):
    """On rank 0, when another rank's failure broke the run: that rank has gone, so nothing waits for it."""


class RankZeroFault(RankZeroFailed, Fault):
    """Likewise, when rank 0's failure was a Fault: it leaves without waiting for the others, and so do they."""


class Interrupted(JobError):
    """Stopped by a signal after a resumable checkpoint was written."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
