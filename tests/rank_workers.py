"""Functions that tests run as spawned ranks: this module imports only what they need, so a spawned process starts
in a second or two (spawn re-imports the module a function comes from)."""
from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch


def first_collective(rank: int, port: int, late_s: float, out: str) -> None:
    """One rank of two: arrives `late_s` late (slow loading and quantising) at the first training collective."""
    from job import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    distributed.STEP_TIMEOUT = timedelta(seconds=1)  # the per-step timeout, shortened
    with distributed.started(distributed.Ranks(rank=rank, world=2), torch.device("cpu")) as ctx:
        if rank == 1:
            time.sleep(late_s)
        p = torch.full((3,), float(rank + 1))
        ctx.broadcast_params([p])
        Path(out, f"rank{rank}").write_text(json.dumps(p.tolist()))
