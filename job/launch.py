"""NUM_PROCESSES or NUM_MACHINES above 1: the job starts itself again under torchrun, one process per GPU, and waits.

One machine: torchrun --standalone. Several: torchrun's c10d rendezvous at MAIN_PROCESS_IP:MAIN_PROCESS_PORT, hosted
by the main machine (MACHINE_RANK=0); every machine waits up to RENDEZVOUS_TIMEOUT for the others. torchrun numbers
the machines in its own order, so global rank 0 (the main process) may sit on any of them. While it waits, each
machine also signs its MACHINE_RANK into the rendezvous' store (a roll call), so that a rendezvous that times out
can say which machines came.

The settings are already valid when this runs (a bad one exits 2 before anything starts). The parent forwards
SIGTERM and SIGINT to each rank exactly once per signal, so the first asks every rank for a checkpoint and the
second exits at once, as with one process; torchrun runs in a session of its own, so a terminal's Ctrl-C does
not reach it twice. The job exits with the code of the rank that failed first, or 0.

Each rank leaves two small files in JOB_RANKS_DIR: `pid-<rank>` when it starts (where the signals go) and
`exit-<rank>` when it ends (its exit code and the time). torchrun itself only says that some rank failed.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from job.errors import ConfigError

log = logging.getLogger("job")

RANKS_DIR_ENV = "JOB_RANKS_DIR"
SHUTDOWN_S = 180  # what torchrun gives the others to stop (and checkpoint) after one rank failed or it was told to
RDZV_ID = "auraflow-lokr-job"  # the rendezvous' name: the same on every machine
ROLL_CALL_KEY = "auraflow-lokr-job/machine/"  # + MACHINE_RANK, in the rendezvous' store
RENDEZVOUS_FAILED = "rendezvous-failed"  # in JOB_RANKS_DIR: what the torchrun process says when the machines never met


@dataclass(frozen=True)
class Cluster:
    """NUM_MACHINES > 1: this machine's part in the rendezvous (the settings, resolved by cli)."""

    machines: int
    machine_rank: int
    host: str  # MAIN_PROCESS_IP
    port: int  # MAIN_PROCESS_PORT
    timeout: float  # RENDEZVOUS_TIMEOUT, seconds

    @property
    def is_main(self) -> bool:
        return self.machine_rank == 0

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def cluster_problems(cluster: Cluster, resolve: bool = True) -> list[str]:
    """What this machine can tell before the others come: the main machine can listen on the rendezvous port; the
    others can resolve the main machine's address (`resolve`: `check`; a run waits for a name that does not resolve
    yet, as a Kubernetes service's before its pod is up)."""
    if cluster.is_main:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", cluster.port))
            except OSError as e:
                return [f"MAIN_PROCESS_PORT={cluster.port}: this machine (MACHINE_RANK=0) hosts the rendezvous on that "
                        f"port but cannot listen on it ({e.strerror}); choose a free port, the same on every machine"]
        return []
    if not resolve:
        return []
    try:
        socket.getaddrinfo(cluster.host, cluster.port)
    except OSError as e:
        return [f"MAIN_PROCESS_IP={cluster.host!r}: this machine cannot resolve it ({e}); give the main machine's "
                "address as the other machines reach it"]
    return []


def local_address(cluster: Cluster, deadline: float) -> str:
    """This machine's address on its route to the main machine: what the others reach it by (torchrun's node
    address) and where gloo listens. A name that does not resolve yet (a Kubernetes service whose pod is starting) is
    asked again until `deadline`."""
    while True:
        try:
            family, _, _, _, addr = socket.getaddrinfo(cluster.host, cluster.port, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(addr)  # UDP: no packet is sent, the kernel only picks the route
                return s.getsockname()[0]
        except OSError as e:
            if time.monotonic() > deadline:
                raise ConfigError([f"MAIN_PROCESS_IP={cluster.host!r}: no route from this machine within "
                                   f"RENDEZVOUS_TIMEOUT ({e})"]) from None
            time.sleep(2)


def interface_of(address: str) -> str | None:
    """The network interface that holds IPv4 `address` (for GLOO_SOCKET_IFNAME), or None."""
    import fcntl
    import struct

    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:  # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        if socket.inet_ntoa(packed[20:24]) == address:
            return name
    return None


def process_count(setting: int, gpus: int) -> int:
    """NUM_PROCESSES resolved: auto (0) is one per visible GPU, or 1 without a GPU. On a GPU machine each
    process needs a GPU of its own; without one, several processes share the CPU over gloo (as the tests do)."""
    n = setting or max(1, gpus)
    if gpus and n > gpus:
        raise ConfigError([f"NUM_PROCESSES={n}: this machine has {gpus} visible GPU(s), one process each; "
                           f"use at most {gpus}, or auto"])
    return n


def relaunch(argv: list[str], processes: int, env: dict[str, str], cluster: Cluster | None = None) -> int:
    """Run `python -m job <argv>` as `processes` ranks under torchrun (on each of the cluster's machines); returns the
    job's exit code. `env` holds everything the ranks need, secrets included (never the command line, which other
    users can read)."""
    env = dict(env)
    if cluster:
        deadline = time.monotonic() + cluster.timeout
        address = local_address(cluster, deadline)
        log.info("NUM_MACHINES=%d: machine %d of the rendezvous at %s (%s), %d process%s here; waiting up to %gs for "
                 "the others", cluster.machines, cluster.machine_rank, cluster.endpoint,
                 "hosted here" if cluster.is_main else "hosted by the main machine", processes,
                 "es" if processes > 1 else "", cluster.timeout)
        if not cluster.is_main and not wait_for_main(cluster, deadline):
            log.error("%s", never_answered(cluster))
            return ConfigError.exit_code
        rendezvous = _rendezvous_args(cluster, env, address, deadline - time.monotonic())
    else:
        rendezvous = ["--standalone", "--nnodes=1"]
        log.info("NUM_PROCESSES=%d: starting %d processes under torchrun", processes, processes)
    folder = Path(tempfile.mkdtemp(prefix="job-ranks-"))
    env[RANKS_DIR_ENV] = str(folder)
    # torchrun's default is 1 thread per process (with a warning); CPU ranks share the machine's cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    own = [f"--job-ranks-dir={folder}"]
    if cluster:
        own.append(f"--job-roll-call={cluster.machine_rank},{cluster.machines},{cluster.host},{cluster.port},"
                   f"{cluster.timeout:g}")  # the setting, for messages; the wait left is in --rdzv-conf
    cmd = [sys.executable, "-m", "job.launch", *own, *rendezvous, f"--nproc-per-node={processes}", "--max-restarts=0",
           f"--shutdown-timeout={SHUTDOWN_S}", "--module", "job", *argv]
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
        failed = folder / RENDEZVOUS_FAILED
        if rc and failed.is_file():  # no rank started: the machines never all met
            log.error("%s", failed.read_text().strip())
            return ConfigError.exit_code
        return exit_code(rc, folder, processes, signalled[-1] if signalled else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)


def _rendezvous_args(cluster: Cluster, env: dict[str, str], address: str, seconds: float) -> list[str]:
    """torchrun's options for the c10d rendezvous, waiting up to `seconds`; gloo (and NCCL's bootstrap) told which
    interface reaches the other machines, unless the environment says already."""
    interface = interface_of(address)
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if interface and not env.get(var):
            env[var] = interface
    if not interface and not env.get("GLOO_SOCKET_IFNAME"):
        log.warning("no network interface holds %s (this machine's address towards MAIN_PROCESS_IP); set "
                    "GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the one that reaches the other machines", address)
    wait = max(1, math.ceil(seconds))
    # join_timeout: the wait for every machine; read_timeout: for each call to the rendezvous' store; is_host: the
    # main machine hosts the store, whatever its address looks like
    return [f"--nnodes={cluster.machines}", "--rdzv-backend=c10d", f"--rdzv-endpoint={cluster.endpoint}",
            f"--rdzv-id={RDZV_ID}", f"--local-addr={address}",
            f"--rdzv-conf=join_timeout={wait},read_timeout={wait},is_host={str(cluster.is_main).lower()}"]


def _answers(host: str, port: int) -> bool:
    """Whether something listens at host:port (a plain connection, closed at once: the store takes no offence)."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def wait_for_main(cluster: Cluster, deadline: float) -> bool:
    """Another machine than the main one: wait, quietly, until the main machine's rendezvous answers (it may still be
    pulling the image), so that torchrun's store client, which logs each failed try, starts only then. False when
    it never answered before `deadline`."""
    while not _answers(cluster.host, cluster.port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(1)
    return True


def never_answered(cluster: Cluster) -> str:
    return (f"the rendezvous at {cluster.endpoint}: the main machine (MACHINE_RANK=0) never answered within "
            f"RENDEZVOUS_TIMEOUT={cluster.timeout:g}s, so 0 of {cluster.machines} machines joined; start it, and check "
            "that this machine reaches MAIN_PROCESS_IP on MAIN_PROCESS_PORT")


def exit_code(torchrun_rc: int, folder: Path, processes: int, signalled: int | None = None) -> int:
    """0 when every rank succeeded; otherwise the code of this machine's rank that failed first (the others' failures
    follow from it); when no rank could say, 128 + the signal passed on (a second one ends the ranks at once),
    or torchrun's own code (a rank killed outright). The ranks are this machine's: the ones that left a file."""
    if torchrun_rc == 0:
        return 0
    failed, silent, done = [], [], []
    ranks = sorted({int(f.name.split("-", 1)[1]) for f in [*folder.glob("pid-*"), *folder.glob("exit-*")]
                    if f.name.split("-", 1)[1].isdigit()}) or range(processes)
    for rank in ranks:
        try:
            code, at = (folder / f"exit-{rank}").read_text().split()
        except (OSError, ValueError):
            silent.append(rank)
            continue
        if int(code):
            failed.append((float(at), int(code)))
        else:
            done.append(rank)
    if len(done) == processes:  # every rank here finished: torchrun only lost the rendezvous' host at the end
        return 0
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


class RollCall(threading.Thread):
    """In the torchrun process of each machine, while the rendezvous waits: sign this MACHINE_RANK into the
    rendezvous' store and watch which machines have signed, so that a timeout can say who came. It only counts: the
    rendezvous itself is torchrun's."""

    def __init__(self, machine_rank: int, machines: int, host: str, port: int, timeout: float):
        super().__init__(name="roll-call", daemon=True)
        self.cluster = Cluster(machines, machine_rank, host, port, timeout)
        self.seen: set[int] = set()
        self.reached = False  # whether the rendezvous' store answered at all
        self.done = threading.Event()

    def run(self) -> None:
        from torch.distributed import TCPStore

        c = self.cluster
        try:
            while not _answers(c.host, c.port):  # the store comes up with the main machine's rendezvous
                if self.done.wait(1.0):
                    return
            store = TCPStore(c.host, c.port, is_master=False, timeout=timedelta(seconds=10))
            self.reached = True
            store.set(f"{ROLL_CALL_KEY}{c.machine_rank}", socket.gethostname())
            while len(self.seen) < c.machines and not self.done.wait(1.0):
                self.seen = {m for m in range(c.machines) if store.check([f"{ROLL_CALL_KEY}{m}"])}
        except Exception:  # the store went away (the run ended): the rendezvous reports what went wrong
            return

    def report(self) -> str:
        c = self.cluster
        if not self.reached:
            return never_answered(c)
        seen = sorted(self.seen)
        missing = [m for m in range(c.machines) if m not in self.seen]
        return (f"the rendezvous at {c.endpoint}: {len(seen)} of {c.machines} machines joined within "
                f"RENDEZVOUS_TIMEOUT={c.timeout:g}s (MACHINE_RANK {', '.join(map(str, seen)) or 'none'}; missing: "
                f"{', '.join(map(str, missing))}). Start every machine with NUM_MACHINES={c.machines}, its own "
                "MACHINE_RANK and the same MAIN_PROCESS_IP/MAIN_PROCESS_PORT, and let the machines reach each other on "
                "every TCP port (README: Several machines)")


def _torchrun(argv: list[str]) -> None:
    """torchrun, stopped (SIGTERM: its ranks checkpoint) if the parent dies without passing a signal on, so no
    rank outlives the job; quiet about failures the ranks have already explained in the log; and with several
    machines, a rendezvous that never completes explained in JOB_RANKS_DIR for the parent to report."""
    import ctypes

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import main

    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("--job-")}
    args = [a for a in argv if not a.startswith("--job-")]
    roll_call = None
    if "--job-roll-call" in own:
        roll_call = RollCall(*_roll_call_args(own["--job-roll-call"]))
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (AttributeError, OSError):
        pass
    if roll_call:
        roll_call.start()
    try:
        main(args)
    except ChildFailedError:
        sys.exit(1)
    except RendezvousError:  # the timeout, or a main machine that went away before everyone came
        if roll_call is None:
            raise
        if _rank_pids(Path(own["--job-ranks-dir"])):  # after the ranks started: the machine hosting the rendezvous
            sys.exit(1)  # ended its torchrun first; the parent takes the ranks' own exit codes
        roll_call.done.set()
        roll_call.join(timeout=5)
        _write(Path(own["--job-ranks-dir"]) / RENDEZVOUS_FAILED, roll_call.report())
        sys.stderr.flush()
        os._exit(ConfigError.exit_code)  # not sys.exit: the roll call may still sit in a store call, in C++
    finally:
        if roll_call:
            roll_call.done.set()


def _roll_call_args(text: str) -> tuple[int, int, str, int, float]:
    rank, machines, rest = text.split(",", 2)
    host, port, timeout = rest.rsplit(",", 2)  # an IPv6 host has colons, never commas
    return int(rank), int(machines), host, int(port), float(timeout)


if __name__ == "__main__":
    _torchrun(sys.argv[1:])
