"""NUM_MACHINES: several machines through torchrun's c10d rendezvous, tested as two "machines" on this one: two
launches of the real CLI with NUM_MACHINES=2, MACHINE_RANK=0/1, the loopback address, gloo, one process each.

They train the adapter that one process trains with their joint batch, into one set of outputs; a machine that never
joins ends in the clear error within RENDEZVOUS_TIMEOUT; SIGTERM to one machine checkpoints and both exit 143; killing
one machine ends the other within seconds; an OUTPUT_DIR that is not shared is refused. Plus the settings: the
launcher's variables and their precedence, and what `check` refuses.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ALL_LINEAR, ROOT, TINY, adapter, clean_env, losses, max_diff, run_cli, wait_for_steps
from job import builtin, cli, launch

SEED = 5
# as tests/test_distributed.py: accumulation and caption dropout on, so each rank's rows get their own draws
COMMON = dict(**TINY, max_train_steps=4, gradient_accumulation_steps=2, learning_rate=1e-3,
              lycoris_config=ALL_LINEAR, caption_dropout_probability=0.3, checkpoint_step_interval=2, seed=SEED)
TOLERANCE = 1e-6
WAIT_S = 600  # for a whole run of two machines on a busy 2-core machine


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return builtin.toy_dataset_dir(tmp_path_factory.mktemp("nodes-data"), count=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(log: Path, out: Path, model_dir: Path, data: Path, machine: int, port: int, **over) -> subprocess.Popen:
    """One machine of two: the real CLI, `train`, its output in `log`."""
    settings = {**COMMON, "model_id": model_dir, "dataset_id": data, "output_dir": out, "num_machines": 2,
                "machine_rank": machine, "main_process_ip": "127.0.0.1", "main_process_port": port,
                "train_batch_size": 1, **over}
    return subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), "train"], cwd=ROOT, env=clean_env(**settings),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def both(tmp: Path, model_dir: Path, data: Path, outs: tuple[Path, Path] | None = None, **over):
    port = free_port()
    outs = outs or (tmp / "out", tmp / "out")
    logs = tmp / "machine0.log", tmp / "machine1.log"
    procs = [start(logs[m], outs[m], model_dir, data, m, port, **over) for m in (0, 1)]
    return procs, logs


def finish(procs: list[subprocess.Popen], timeout: float = WAIT_S) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()


def tree(pid: int) -> list[int]:
    """`pid` and every process under it (from /proc), deepest first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out[::-1]




@pytest.fixture(scope="module")
def two(tiny_model, dataset, tmp_path_factory):
    """Two machines, one process each, batch 1 each, one shared OUTPUT_DIR."""
    tmp = tmp_path_factory.mktemp("two-machines")
    procs, logs = both(tmp, tiny_model, dataset)
    codes = finish(procs)
    return tmp / "out", codes, [log.read_text() for log in logs]


@pytest.fixture(scope="module")
def one(tiny_model, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process") / "out"
    r = run_cli("train", timeout=WAIT_S, **{**COMMON, "model_id": tiny_model, "dataset_id": dataset, "output_dir": out,
                                            "num_processes": 1, "train_batch_size": 2})
    return out, r


# ------------------------------------------------------------------ the same adapter, one set of outputs


@pytest.mark.slow
def test_two_machines_train_the_adapter_of_one_process_with_their_joint_batch(two, one):
    out2, codes, logs = two
    out1, r1 = one
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert r1.returncode == 0, r1.stderr[-3000:]
    diff = max_diff(adapter(out2), adapter(out1))
    print(f"2 machines × 1 process × batch 1 vs 1 process × batch 2: max abs difference {diff:.3g}")
    assert diff <= TOLERANCE
    assert losses(out2) == pytest.approx(losses(out1), abs=TOLERANCE)
    # ... and the tolerance is far below what the last two steps moved the adapter
    halfway = load_file(str(out1 / "checkpoints" / "checkpoint-2" / "adapter.safetensors"))
    assert max_diff(adapter(out2), halfway) > 100 * TOLERANCE


@pytest.mark.slow
def test_two_machines_write_one_set_of_outputs(two):
    out, codes, logs = two
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    meta = json.loads((out / "checkpoints" / "checkpoint-4" / "meta.json").read_text())
    assert meta["num_processes"] == 2 and meta["global_batch"] == 2
    assert json.loads((out / "status.json").read_text())["phase"] == "done"
    assert not list(out.rglob(".*")), list(out.rglob(".*"))  # no marker left, no second writer's temporary file
    # one voice: the machine holding rank 0 says the plan, once, for both machines
    plans = [log.count("plan:") for log in logs]
    assert sorted(plans) == [0, 1], plans
    assert "× 2 processes on 2 machines = effective batch 4" in "".join(logs)
    assert all("waiting up to 1800s for the others" in log for log in logs)


@pytest.mark.slow
def test_an_output_dir_that_is_not_shared_is_refused_before_any_download(tiny_model, dataset, tmp_path):
    procs, logs = both(tmp_path, tiny_model, dataset, outs=(tmp_path / "a", tmp_path / "b"))
    codes = finish(procs)
    texts = [log.read_text() for log in logs]
    assert codes == [2, 2], "\n\n".join(t[-3000:] for t in texts)
    for text in texts:
        assert "is not shared by every machine: machine(s) " in text, text[-3000:]
        assert "plan:" not in text  # refused before the preflight
    assert not [p for p in tmp_path.glob("*/.shared-*")]


# ------------------------------------------------------------------ the rendezvous


@pytest.mark.slow
def test_a_machine_that_never_joins_ends_in_a_clear_error_within_the_timeout(tiny_model, dataset, tmp_path):
    """The main machine alone, and a second machine alone whose main machine never comes: each gives up after
    RENDEZVOUS_TIMEOUT and says how many machines joined."""
    timeout = 8
    t0 = time.monotonic()
    main = start(tmp_path / "main.log", tmp_path / "a", tiny_model, dataset, 0, free_port(), rendezvous_timeout=timeout)
    other = start(tmp_path / "other.log", tmp_path / "b", tiny_model, dataset, 1, free_port(),
                  rendezvous_timeout=timeout)
    codes = finish([main, other], timeout=timeout + 240)
    elapsed = time.monotonic() - t0
    main_log, other_log = (tmp_path / "main.log").read_text(), (tmp_path / "other.log").read_text()
    assert codes == [2, 2], main_log[-3000:] + "\n\n" + other_log[-3000:]
    assert f"1 of 2 machines joined within RENDEZVOUS_TIMEOUT={timeout}s (MACHINE_RANK 0; missing: 1)" in main_log
    assert "the main machine (MACHINE_RANK=0) never answered" in other_log and "0 of 2 machines joined" in other_log
    print(f"gave up after {elapsed:.1f}s (RENDEZVOUS_TIMEOUT={timeout}s, plus the start and stop of two jobs)")
    assert timeout <= elapsed < timeout + 240
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # no rank started


# ------------------------------------------------------------------ failures


@pytest.mark.slow
def test_sigterm_to_one_machine_checkpoints_and_both_exit_143(tiny_model, dataset, tmp_path):
    out = tmp_path / "out"
    procs, logs = both(tmp_path, tiny_model, dataset, max_train_steps=10_000, checkpoint_step_interval=0)
    try:
        wait_for_steps(out, procs, logs, timeout=WAIT_S)
        procs[1].send_signal(signal.SIGTERM)  # to the second machine's job only, as its container's stop would
        codes = finish(procs, timeout=120)
    finally:
        finish(procs, timeout=1)
    texts = [log.read_text() for log in logs]
    assert codes == [143, 143], "\n\n".join(t[-3000:] for t in texts)
    assert sum(t.count("stopping after the current step") for t in texts) == 1, texts  # one rank was signalled
    (ckpt,) = (out / "checkpoints").iterdir()  # written once, at the step both ranks stopped after
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()][-1] == step
    assert json.loads((out / "status.json").read_text())["phase"] == "interrupted"


@pytest.mark.slow
def test_killing_one_machine_ends_the_other_within_seconds(tiny_model, dataset, tmp_path):
    out = tmp_path / "out"
    procs, logs = both(tmp_path, tiny_model, dataset, max_train_steps=10_000, checkpoint_step_interval=0)
    try:
        wait_for_steps(out, procs, logs, 2, timeout=WAIT_S)
        for pid in tree(procs[1].pid):  # the whole second machine: its job, torchrun and rank, without a word
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        finish(procs, timeout=1)
    print(f"machine 1 killed: machine 0 exited {rc} after {elapsed:.1f}s")
    assert rc not in (0, None), logs[0].read_text()[-3000:]
    # at the next collective, not at its 10-minute timeout (distributed.STEP_TIMEOUT): measured 20 s on a busy 2-core
    # machine, most of it the failing rank's traceback and the processes' exits; the bound leaves room for more load
    assert elapsed < 120, logs[0].read_text()[-3000:]


# ------------------------------------------------------------------ the settings


def test_launcher_variables_fill_in_for_unset_cluster_settings():
    # Kubernetes' PyTorchJob (PET_*, first), then torchrun's and RunPod's names
    assert cli.launcher_layer({"PET_NNODES": "3", "NNODES": "2", "NUM_NODES": "4", "PET_NODE_RANK": "2",
                               "NODE_RANK": "1", "PET_MASTER_ADDR": "m0", "MASTER_ADDR": "x",
                               "PET_MASTER_PORT": "1234", "MASTER_PORT": "99"}) == {
        "num_machines": "3", "machine_rank": "2", "main_process_ip": "m0", "main_process_port": "1234"}
    assert cli.launcher_layer({"NUM_NODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29400",
                               "PET_NNODES": " "}) == {
        "num_machines": "4", "machine_rank": "3", "main_process_ip": "10.0.0.2", "main_process_port": "29400"}
    assert cli.launcher_layer({"PET_NNODES": "2:2"}) == {"num_machines": "2"}  # torchrun's MIN:MAX, a fixed size
    assert cli.launcher_layer({"PET_NNODES": "1:4"}) == {"num_machines": "1:4"}  # elastic: refused by the parser
    assert cli.launcher_layer({"WORLD_SIZE": "16", "RANK": "1"}) == {}  # a platform's process counts are not machines


def test_check_refuses_incomplete_cluster_settings_at_once(tmp_path):
    r = run_cli("check", timeout=120, dataset_id=tmp_path, push_to_hub="false", num_machines=2)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "NUM_MACHINES=2 needs MACHINE_RANK on each machine: 0 on the main one, 1 to 1 on the others" in r.stderr
    assert "NUM_MACHINES=2 needs MAIN_PROCESS_IP" in r.stderr
    # from the launcher's variables; the job's own name wins over them
    env = dict(dataset_id=tmp_path, push_to_hub="false", pet_nnodes="2", node_rank="2", master_addr="10.1.1.1")
    r = run_cli("check", timeout=120, **env)
    assert r.returncode == 2 and "MACHINE_RANK=2 is out of range for NUM_MACHINES=2: expected 0 to 1" in r.stderr
    assert "MAIN_PROCESS_IP" not in r.stderr
    r = run_cli("check", timeout=120, **env, num_machines=3, rendezvous_timeout=0)
    assert r.returncode == 2 and "MACHINE_RANK=" not in r.stderr and "RENDEZVOUS_TIMEOUT='0'" in r.stderr
    r = run_cli("check", timeout=120, dataset_id=tmp_path, push_to_hub="false", num_machines=2, machine_rank=1,
                main_process_ip="no-such-host.invalid")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "MAIN_PROCESS_IP='no-such-host.invalid': this machine cannot resolve it" in r.stderr


@pytest.mark.slow
def test_check_plans_for_the_cluster_and_tries_the_rendezvous_port(tiny_model, dataset, tmp_path):
    settings = {**COMMON, "model_id": tiny_model, "dataset_id": dataset, "output_dir": tmp_path / "o",
                "num_machines": 2, "main_process_ip": "127.0.0.1", "train_batch_size": 2}
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("check", timeout=120, **settings, machine_rank=0, main_process_port=port)
        assert r.returncode == 2, r.stderr[-3000:]
        assert f"MAIN_PROCESS_PORT={port}: this machine (MACHINE_RANK=0) hosts the rendezvous" in r.stderr
        r = run_cli("check", timeout=120, **settings, machine_rank=1, main_process_port=port)  # not its port
    assert r.returncode == 0, r.stderr[-3000:]
    assert "× 2 processes on 2 machines = effective batch 8" in r.stderr and "torchrun" not in r.stderr


def test_the_exit_code_reads_this_machines_ranks(tmp_path):
    """On the second machine the ranks are 2 and 3, say: their files, whatever their numbers."""
    (tmp_path / "pid-2").write_text("1")
    (tmp_path / "pid-3").write_text("2")
    (tmp_path / "exit-2").write_text("143 20.5")
    (tmp_path / "exit-3").write_text("4 20.0")
    assert launch.exit_code(1, tmp_path, 2) == 4
    (tmp_path / "exit-3").unlink()  # killed: no word from it
    assert launch.exit_code(1, tmp_path, 2) == 143
    # both finished: torchrun failed only afterwards (the machine hosting the rendezvous had ended its own)
    (tmp_path / "exit-2").write_text("0 20.5")
    (tmp_path / "exit-3").write_text("0 20.0")
    assert launch.exit_code(1, tmp_path, 2) == 0


@pytest.mark.slow
def test_a_fault_on_one_machine_is_what_both_report_and_exit_with(tiny_model, dataset, tmp_path):
    """Two processes on each machine; the second machine's second rank runs out of memory. The first machine's
    ranks only see their collectives break, or torchrun stop them; they leave with its exit code, and status.json
    says what it said."""
    out = tmp_path / "out"
    procs, logs = both(tmp_path, tiny_model, dataset, num_processes=2, max_train_steps=6, checkpoint_step_interval=2,
                       job_test_fault="oom@4/3")
    codes = finish(procs)
    assert codes == [8, 8], [log.read_text()[-3000:] for log in logs]
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "failed" and status["last_error"].startswith("rank 3 failed: out of GPU memory at step 4")
    assert [p.name for p in (out / "logs").glob("rank-*.failed.json")] == ["rank-3.failed.json"]  # the cause alone
