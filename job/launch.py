"""NUM_PROCESSES above 1: the job starts itself again under torchrun, one process per GPU, and waits for it.

The settings are already valid when this runs (a bad one exits 2 before anything starts). The parent forwards
SIGTERM and SIGINT to each rank exactly once per signal, so the first asks every rank for a checkpoint and the
second exits at once, as with one process; torchrun runs in a session of its own, so a terminal's Ctrl-C does
not reach it twice. The job exits with the code of the rank that failed first, or 0.

Each rank leaves two small files in JOB_RANKS_DIR: `pid-<rank>` when it starts (where the signals go) and
`exit-<rank>` when it ends (its exit code and the time). torchrun itself only says that some rank failed.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from job.errors import ConfigError

log = logging.getLogger("job")

RANKS_DIR_ENV = "JOB_RANKS_DIR"
SHUTDOWN_S = 180  # what torchrun gives the others to stop (and checkpoint) after one rank failed or it was told to


def process_count(setting: int, gpus: int) -> int:
    """NUM_PROCESSES resolved: auto (0) is one per visible GPU, or 1 without a GPU. On a GPU machine each
    process needs a GPU of its own; without one, several processes share the CPU over gloo (as the tests do)."""
    n = setting or max(1, gpus)
    if gpus and n > gpus:
        raise ConfigError([f"NUM_PROCESSES={n}: this machine has {gpus} visible GPU(s), one process each; "
                           f"use at most {gpus}, or auto"])
    return n


def relaunch(argv: list[str], processes: int, env: dict[str, str]) -> int:
    """Run `python -m job <argv>` as `processes` ranks under torchrun; returns the job's exit code. `env` holds
    everything the ranks need, secrets included (never the command line, which other users can read)."""
    folder = Path(tempfile.mkdtemp(prefix="job-ranks-"))
    env = {**env, RANKS_DIR_ENV: str(folder)}
    # torchrun's default is 1 thread per process (with a warning); CPU ranks share the machine's cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    cmd = [sys.executable, "-m", "job.launch", "--standalone", "--nnodes=1", f"--nproc-per-node={processes}",
           f"--shutdown-timeout={SHUTDOWN_S}", "--module", "job", *argv]
    log.info("NUM_PROCESSES=%d: starting %d processes under torchrun", processes, processes)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    signalled: list[int] = []

    def forward(signum, frame) -> None:
        signalled.append(signum)
        pids = _rank_pids(folder)
        log.warning("signal %d: passed on to %s", signum, f"{len(pids)} rank(s)" if pids else "torchrun")
        for pid in pids or [proc.pid]:  # before any rank has started, torchrun stops them itself
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
        return exit_code(rc, folder, processes, signalled[-1] if signalled else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)


def exit_code(torchrun_rc: int, folder: Path, processes: int, signalled: int | None = None) -> int:
    """0 when every rank succeeded; otherwise the code of the rank that failed first (the others' failures
    follow from it); when no rank could say, 128 + the signal passed on (a second one ends the ranks at once),
    or torchrun's own code (a rank killed outright)."""
    if torchrun_rc == 0:
        return 0
    failed, silent = [], []
    for rank in range(processes):
        try:
            code, at = (folder / f"exit-{rank}").read_text().split()
        except (OSError, ValueError):
            silent.append(rank)
            continue
        if int(code):
            failed.append((float(at), int(code)))
    if silent and not signalled:
        log.error("rank(s) %s ended without reporting an exit code (killed, e.g. out of memory)",
                  ", ".join(map(str, silent)))
    if failed:
        return min(failed)[1]
    if signalled:
        return 128 + signalled
    return 128 - torchrun_rc if torchrun_rc < 0 else torchrun_rc


def _rank_pids(folder: Path) -> list[int]:
    pids = []
    for f in folder.glob("pid-*"):
        try:
            pids.append(int(f.read_text()))
        except (OSError, ValueError):
            continue
    return pids


def record_start(folder: str, rank: int) -> None:
    """In a rank: where the parent sends signals."""
    _write(Path(folder) / f"pid-{rank}", str(os.getpid()))


def record_exit(folder: str, rank: int, code: int) -> None:
    """In a rank, as it leaves."""
    _write(Path(folder) / f"exit-{rank}", f"{code} {time.time():.6f}")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _torchrun() -> None:
    """torchrun, stopped (SIGTERM: its ranks checkpoint) if the parent dies without passing a signal on, so no
    rank outlives the job; and quiet about failures the ranks have already explained in the log."""
    import ctypes

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (AttributeError, OSError):
        pass
    try:
        main()
    except ChildFailedError:
        sys.exit(1)


if __name__ == "__main__":
    _torchrun()
