"""Several processes, one job: the process group, rank-0 gating, barriers and the collectives the loop needs.

torchrun starts one process per GPU and sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; `cli` reads
them into `Ranks` (torch's own env:// rendezvous reads them too). With one process every method here is a
plain call, so the single-GPU path pays nothing. With several machines, each machine's local rank 0 does that
machine's share of the work that needs its own disk (`per_machine`), and `unshared` tells which folders every
machine sees.

Two groups. The default one (NCCL on CUDA, gloo on CPU) carries the per-step collectives, with a short
timeout: a peer that hangs fails the step within minutes. A gloo group with a long timeout carries the waits
for work only rank 0 does (downloads, checkpoints, validation rounds), which can take hours. A peer that dies
is noticed at once either way: torchrun watches its processes and stops the others.
"""
from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from job.errors import Fault, JobError, PeerFailed, RankZeroFailed, RankZeroFault, exit_code

log = logging.getLogger("job")
T = TypeVar("T")

STEP_TIMEOUT = timedelta(minutes=10)  # between two ranks' arrival at the same training collective
WAIT_TIMEOUT = timedelta(hours=24)  # rank 0 alone: a model download, a validation round, a checkpoint
SHARED_WAIT_S = 5.0  # how long a machine looks for the file rank 0 wrote into a shared folder (network file systems)


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job, as torchrun's environment says."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # which of this node's GPUs is ours
    master_addr: str = ""
    node: int = 0  # torchrun's GROUP_RANK: this machine's place in the rendezvous (not always its MACHINE_RANK)
    nodes: int = 1  # torchrun's GROUP_WORLD_SIZE: the machines in the job
    machine: int = 0  # MACHINE_RANK, the name messages give this machine


class Context:
    """This process's part in the job. Rank 0 is the one that talks to the Hub and writes the outputs."""

    def __init__(self, ranks: Ranks, device: torch.device, waits=None):
        self.rank, self.world, self.device = ranks.rank, ranks.world, device
        self.local_rank, self.node, self.nodes, self.machine = ranks.local_rank, ranks.node, ranks.nodes, ranks.machine
        self._waits = waits  # the long-timeout gloo group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ rank 0 alone

    def main_only(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs `fn`; the others wait, then get its result, or leave with its exit code when it failed."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:
                code = exit_code(e)  # a full disk or a failed GPU: the others leave with the code rank 0 leaves with
                fault = isinstance(e, Fault) or not isinstance(e, JobError)  # rank 0 will not wait for them
                dist.broadcast_object_list([("failed", code, str(e).splitlines()[0] if str(e) else type(e).__name__,
                                             fault)], src=0, group=self._waits)
                raise
        dist.broadcast_object_list(box, src=0, group=self._waits)
        if box[0][0] == "failed":
            _, code, message, fault = box[0]
            raise (RankZeroFault if fault else RankZeroFailed)(code, message)
        return box[0][1]

    def hook(self, due: Callable[[int], bool], work: Callable[[Any], T]) -> Callable[[Any], T | None]:
        """A Trainer hook whose `work` only rank 0 does: on the steps it is `due`, the others wait for it, so the
        next step's collectives never wait on a validation round."""
        return lambda trainer: self.main_only(lambda: work(trainer)) if due(trainer.step) else None

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self._waits)

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._waits)
        return out

    # ------------------------------------------------------------ several machines

    def per_machine(self, fn: Callable[[], T]) -> T:
        """Each machine's local rank 0 runs `fn` (the machine's own downloads), at the same time as the others; every
        rank gets its machine's result. When it failed on any machine, every rank leaves with that exit code."""
        if self.nodes == 1:
            return self.main_only(fn)
        import torch.distributed as dist

        outcome, error = None, None
        if self.local_rank == 0:
            try:
                outcome = ("ok", fn())
            except Exception as e:
                error = e
                outcome = ("failed", e.exit_code if isinstance(e, JobError) else 1,
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, (self.node, self.machine, outcome), group=self._waits)
        if error is not None:
            raise error
        for _, machine, result in everyone:
            if result is not None and result[0] == "failed":
                raise PeerFailed(result[1], f"machine {machine} failed: {result[2]}")
        return next(result[1] for node, _, result in everyone if node == self.node and result is not None)

    def unshared(self, folders: Sequence[Path]) -> list[list[int]]:
        """For each folder: the machines (their MACHINE_RANK) on which it does not hold the file that rank 0 has just
        written into it; [] where every machine sees the same folder. Rank 0 creates the folders."""
        if self.nodes == 1:
            return [[] for _ in folders]
        import torch.distributed as dist

        box = [uuid.uuid4().hex]
        dist.broadcast_object_list(box, src=0, group=self._waits)
        token = box[0]
        markers = [Path(folder) / f".shared-{token}" for folder in folders]
        if self.is_main:
            for marker in markers:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(token)
        self.barrier()
        seen = [_holds(marker, token) for marker in markers] if self.local_rank == 0 else [True] * len(markers)
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, (self.machine, seen), group=self._waits)
        if self.is_main:
            for marker in markers:
                marker.unlink(missing_ok=True)
        return [sorted({machine for machine, held in everyone if not held[i]}) for i in range(len(markers))]

    # ------------------------------------------------------------ sharing work and data

    def share(self, index: int) -> bool:
        """Whether item `index` of a list that every rank holds is this rank's to work on."""
        return index % self.world == self.rank

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of each global batch (`batch_size` rows per rank)."""
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)

    # ------------------------------------------------------------ the training collectives

    def broadcast_params(self, params: Sequence[torch.Tensor]) -> None:
        """Rank 0's values into every rank's `params` (identical seeds give identical adapters; this makes sure)."""
        if self.world == 1 or not params:
            return
        import torch.distributed as dist

        # The first training collective: ranks get here after loading and quantising at their own speed, which can
        # take longer than STEP_TIMEOUT apart. Meet on the long-timeout group first.
        self.barrier()
        flat = _flat([p.detach() for p in params])
        dist.broadcast(flat, src=0)
        _unflat(flat, params)

    def average_gradients(self, params: Sequence[torch.nn.Parameter], losses: list[float]) -> list[float]:
        """The mean over ranks of the adapter gradients and of the losses, in one all-reduce (the frozen base has no
        gradients, so it never travels). Each rank's loss is the mean over its equal share of the global batch,
        so this is the gradient one process would get from the whole global batch. Returns the mean losses."""
        if self.world == 1:
            return losses
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([_flat(grads), torch.tensor(losses, dtype=torch.float32, device=self._collective_device)])
        dist.all_reduce(flat)
        flat /= self.world
        for p, g in zip(params, grads):
            p.grad = g
        _unflat(flat[:-len(losses)], grads)
        return flat[-len(losses):].tolist()

    def agree_stop(self, signum: int | None) -> int | None:
        """A stop request seen by any rank stops them all at the same step (the signal reaches them at different
        moments)."""
        if self.world == 1:
            return signum
        import torch.distributed as dist

        flag = torch.tensor([signum or 0], device=self._collective_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    @property
    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _holds(marker: Path, token: str) -> bool:
    """Whether `marker` is here with `token` in it; a network file system may show a new file a moment late."""
    deadline = time.monotonic() + SHARED_WAIT_S
    while True:
        try:
            if marker.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)


SINGLE = Context(Ranks(), torch.device("cpu"))  # one process: every collective above is a plain return


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One fp32 buffer (exact for bf16 and fp32 values): one collective instead of one per tensor."""
    return torch.cat([t.reshape(-1).float() for t in tensors])


@torch.no_grad()
def _unflat(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@contextlib.contextmanager
def started(ranks: Ranks, device: torch.device) -> Iterator[Context]:
    """The process group for this run (none with one process), on this rank's own GPU; `device` is the kind
    of device the job uses."""
    if ranks.world == 1:
        yield Context(ranks, device)
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(ranks.local_rank)  # so that a bare "cuda" anywhere means this rank's GPU
        device = torch.device("cuda", ranks.local_rank)
    cuda = device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=STEP_TIMEOUT, device_id=device if cuda else None)
    waits = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    log.info("data parallel: %d processes (%s)%s, master %s", ranks.world, backend,
             f" on {ranks.nodes} machines" if ranks.nodes > 1 else "", ranks.master_addr or "local")
    try:
        yield Context(ranks, device, waits)
    except JobError as e:  # an orderly end: the ranks are in step, so the group closes cleanly
        if not isinstance(e, Fault):
            dist.destroy_process_group()
        raise
    else:
        dist.destroy_process_group()
    # a Fault or any other exception leaves the group as it is: a peer still in a collective (or a CUDA context a
    # failed kernel poisoned) can make destroying it hang
