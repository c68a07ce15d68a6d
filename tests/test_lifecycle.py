"""Stop and restart safely: SIGTERM checkpoints and resumes to the same adapter; a finished run is never
trained twice; status.json is always whole."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ALL_LINEAR, ROOT, TINY, adapter, clean_env, run_cli
from job import builtin, outputs
from job.config import build_settings
from job.errors import ConfigError
from job.log import StatusFile

STEPS = 24


def settings(tiny_model, data, out):
    return dict(**TINY, model_id=tiny_model, dataset_id=data, output_dir=out, max_train_steps=STEPS,
                train_batch_size=2, caption_dropout_probability=0.2, lycoris_config=ALL_LINEAR, learning_rate=3e-3,
                checkpoint_step_interval=0, validation_step_interval=0)



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return builtin.toy_dataset_dir(tmp_path_factory.mktemp("toy"), count=8)


@pytest.fixture(scope="module")
def reference(tiny_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    r = run_cli("train", **settings(tiny_model, data, out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def steps_logged(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [2, 13])
def test_sigterm_writes_a_checkpoint_and_the_rerun_equals_an_uninterrupted_run(tiny_model, data, reference,
                                                                              tmp_path, stop_after):
    out = tmp_path / "out"
    # 500 steps: long enough to be stopped mid-way; the schedule is constant, so only the step count differs
    env = clean_env(**{**settings(tiny_model, data, out), "max_train_steps": 500})
    proc = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), "train"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while steps_logged(out) < stop_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    (ckpt,) = (out / "checkpoints").iterdir()
    stopped_at = int(ckpt.name.split("-")[1])
    assert stop_after <= stopped_at < 500
    assert json.loads((out / "status.json").read_text())["phase"] == "interrupted"
    # the same command (with the run's real length) resumes and finishes
    r = run_cli("train", **settings(tiny_model, data, out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert stopped_at <= STEPS, "stopped too late to compare"
    assert f"(step {stopped_at} of {STEPS})" in r.stderr
    want, got = adapter(reference), adapter(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
def test_a_finished_run_is_not_trained_twice(reference, tiny_model, data):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    r = run_cli("train", **settings(tiny_model, data, reference))
    assert r.returncode == 0 and "nothing to do" in r.stderr
    assert "plan:" not in r.stderr and "caching" not in r.stderr, r  # ended before the preflight read the model
    r = run_cli("train", **{**settings(tiny_model, data, reference), "learning_rate": 1e-2})
    assert r.returncode == 2 and "learning_rate" in r.stderr and "new OUTPUT_DIR" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()} == before


def test_a_run_finished_by_an_older_version_is_still_recognised(tmp_path):
    """The record of a version that lacked a setting, or had one since removed: at the new setting's default the
    run is the same run; set otherwise, it is another."""
    public = build_settings([{"dataset_id": "some/dataset", "push_to_hub": "false"}]).public_dict()
    older = {k: v for k, v in outputs.result_settings(public).items() if k != "export_comfyui"}
    older["a_setting_since_removed"] = 3
    (tmp_path / outputs.COMPLETION).write_text(json.dumps({"settings": older, "pushed": None}))
    assert outputs.finished_run(tmp_path, public)["settings"] == older
    with pytest.raises(ConfigError, match=r"other settings \(export_comfyui\)"):
        outputs.finished_run(tmp_path, {**public, "export_comfyui": not public["export_comfyui"]})
    with pytest.raises(ConfigError, match=r"other settings \(learning_rate\)"):
        outputs.finished_run(tmp_path, {**public, "learning_rate": 1.0})


def torn_reads(path, write, writes: int = 600) -> tuple[int, int]:
    """(torn, whole): reads of `path` by a thread that reads it without pause while `write(i)` rewrites it."""
    torn, whole, done = [0], [0], threading.Event()

    def reader():
        while not done.is_set():
            try:
                json.loads(path.read_text(encoding="utf-8"))
                whole[0] += 1
            except (json.JSONDecodeError, FileNotFoundError):
                torn[0] += 1

    write(0)
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, writes):
            write(i)
    finally:
        done.set()
        thread.join()
    return torn[0], whole[0]


def test_status_json_is_whole_at_every_moment(tmp_path):
    """The status writer replaces the file atomically: a reader never sees half of it. The same reader catches a
    writer that rewrites in place at once (the harness can fail)."""
    status = StatusFile(tmp_path / "status.json")

    def atomic(i):  # the job's writer, forced past its interval, with a large field so a write takes time
        status.update(force=True, phase="training" if i else "starting", step=i, last_error="x" * (20_000 + i))

    def in_place(i):
        (tmp_path / "plain.json").write_text(json.dumps({"step": i, "last_error": "x" * (20_000 + i)}))

    torn, whole = torn_reads(tmp_path / "status.json", atomic)
    assert torn == 0 and whole > 50, (torn, whole)
    assert json.loads((tmp_path / "status.json").read_text())["step"] == 599
    assert torn_reads(tmp_path / "plain.json", in_place)[0] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json", "status.json"]  # no temporary file left


def test_status_json_is_rewritten_at_its_interval_and_at_once_on_a_new_phase(tmp_path):
    path = tmp_path / "status.json"
    status = StatusFile(path, interval=3600)
    status.update(phase="training", step=0, total_steps=10)
    assert json.loads(path.read_text())["phase"] == "training"
    status.update(step=5, loss=0.5)  # within the interval: kept for the next write
    assert json.loads(path.read_text())["step"] == 0
    status.update(phase="done")
    final = json.loads(path.read_text())
    assert (final["phase"], final["step"], final["loss"]) == ("done", 5, 0.5)
    assert set(final["phase_started"]) == {"training", "done"}


@pytest.mark.slow
def test_a_run_leaves_its_final_status(reference):
    final = json.loads((reference / "status.json").read_text())
    assert (final["phase"], final["step"], final["total_steps"]) == ("done", STEPS, STEPS)
    assert {"caching", "training", "done"} <= set(final["phase_started"]), final["phase_started"]


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_corrupts_nothing(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    env = clean_env(**{**settings(tiny_model, data, out), "max_train_steps": 500, "checkpoint_step_interval": 1})
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), "train"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        while steps_logged(out) < 3 and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        # the second signal once the first was taken (two at once arrive as one), then it must not wait for the step
        while "stopping after the current step" not in log.read_text() and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 143 and "second signal 15: exiting now" in err, err[-2000:]
    assert "stopped by signal" not in err  # the first signal's orderly stop never finished
    from job import checkpoint

    kept = checkpoint.complete(out / "checkpoints")
    assert kept  # checkpoint-1.. were written before the signals
    for path in kept:
        adapter, _, meta = checkpoint.load(path)
        assert meta["step"] == checkpoint.step_of(path) and all(torch.isfinite(t).all() for t in adapter.values())
