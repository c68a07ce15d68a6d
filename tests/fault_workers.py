"""Ranks that tests/test_faults.py spawns: only this module and torch are imported in them (a fast start)."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch


def rank_zero_failures(rank: int, port: int, out: str) -> None:
    """Rank 0's work fails twice: a full disk (a fault), then divergence (an orderly end). What each rank sees."""
    from job import distributed
    from job.errors import DivergedError, Fault

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    def diverged():
        raise DivergedError("training diverged at step 3")

    seen = []
    with distributed.started(distributed.Ranks(rank=rank, world=2), torch.device("cpu")) as ctx:
        for work in (disk_full, diverged):
            try:
                ctx.main_only(work)
            except Exception as e:
                seen.append([type(e).__name__, getattr(e, "exit_code", None), isinstance(e, Fault)])
    Path(out, f"rank{rank}").write_text(json.dumps(seen))
