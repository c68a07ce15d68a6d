"""NUM_PROCESSES: data parallel under torchrun (gloo on CPU), through the real CLI on the tiny model.

2 processes × batch 1 train the adapter that 1 process × batch 2 trains; rank 0 alone writes the outputs; a killed
rank ends the job promptly; SIGTERM to the job reaches every rank and they checkpoint together; a resume is exact
with the same process count and warned about with another. Plus the pieces in-process: the data split and the
random draws per rank, the process count, the exit code.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import AuraFlowTransformer2DModel
from safetensors.torch import load_file

from conftest import (
    ALL_LINEAR,
    HEAVY,
    LIST_IMPORTS,
    ROOT,
    TINY,
    adapter,
    clean_env,
    imported,
    losses,
    max_diff,
    run_cli,
    wait_for_steps,
)
from job import builtin, data, launch, model
from job.cache import TensorCache
from job.errors import ConfigError
from job.loss import train_loss

SEED = 5
# accumulation and caption dropout on: each rank's rows must get their own micro-batch draws, step after step
COMMON = dict(**TINY, max_train_steps=4, gradient_accumulation_steps=2, learning_rate=1e-3,
              lycoris_config=ALL_LINEAR, caption_dropout_probability=0.3, checkpoint_step_interval=2, seed=SEED)
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return builtin.toy_dataset_dir(tmp_path_factory.mktemp("ddp-data"), count=8)


def train(out: Path, model_dir: Path, dataset: Path, **over) -> subprocess.CompletedProcess:
    settings = {**COMMON, "model_id": model_dir, "dataset_id": dataset, "output_dir": out, **over}
    return run_cli("train", timeout=240, **settings)


def start(out: Path, model_dir: Path, dataset: Path, **over) -> subprocess.Popen:
    """A long run (10 000 steps) in the background, its output in out.log."""
    settings = {**COMMON, "model_id": model_dir, "dataset_id": dataset, "output_dir": out, "max_train_steps": 10_000,
                "checkpoint_step_interval": 0, **over}
    out.mkdir(parents=True)
    log = (out.parent / f"{out.name}.log").open("w")
    return subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), "train"], cwd=ROOT, env=clean_env(**settings),
                            stdout=log, stderr=subprocess.STDOUT, text=True)




@pytest.fixture(scope="module")
def two(tiny_model, dataset, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("two") / "out"
    return out, train(out, tiny_model, dataset, num_processes=2, train_batch_size=1)


@pytest.fixture(scope="module")
def one(tiny_model, dataset, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("one") / "out"
    return out, train(out, tiny_model, dataset, num_processes=1, train_batch_size=2)


# ------------------------------------------------------------------ equivalence


@pytest.mark.slow
def test_group_offload_and_int8_work_per_process(tiny_model, dataset, tmp_path):
    """Each rank quantises its own transformer and offloads it to its own folder under the shared path."""
    spill = tmp_path / "spill"
    int8 = dict(base_model_precision="int8-quanto", gradient_checkpointing="true", max_train_steps=2)
    r2 = train(tmp_path / "two", tiny_model, dataset, num_processes=2, train_batch_size=1, enable_group_offload="true",
               group_offload_to_disk_path=spill, **int8)
    r1 = train(tmp_path / "one", tiny_model, dataset, num_processes=1, train_batch_size=2, **int8)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert max_diff(adapter(tmp_path / "two"), adapter(tmp_path / "one")) <= TOLERANCE
    assert spill.is_dir() and list(spill.iterdir()) == []  # both ranks' folders removed at exit


@pytest.mark.slow
def test_two_processes_train_the_adapter_of_one_with_their_joint_batch(two, one, tiny_model, record_property):
    (out2, r2), (out1, r1) = two, one
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r1.returncode == 0, r1.stderr[-3000:]
    diff = max_diff(adapter(out2), adapter(out1))
    record_property("max_abs_diff", diff)
    print(f"2 processes × batch 1 vs 1 × batch 2: max abs difference {diff:.3g}")
    assert diff <= TOLERANCE
    assert losses(out2) == pytest.approx(losses(out1), abs=TOLERANCE)  # the loss of the global batch, step by step
    # ... and the tolerance is far below what training moves: from the untrained adapter, and over two steps
    transformer = AuraFlowTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    torch.manual_seed(SEED)
    init = model.create_adapter(transformer, json.loads(ALL_LINEAR), torch.float32).state_dict()
    trained = adapter(out2)
    halfway = load_file(str(out1 / "checkpoints" / "checkpoint-2" / "adapter.safetensors"))
    moved = max_diff(trained, {k: init[k] for k in trained}), max_diff(trained, halfway)
    print(f"the adapter moved {moved[0]:.3g} from its init, {moved[1]:.3g} in the last two steps")
    assert min(moved) > 100 * TOLERANCE


@pytest.mark.slow
def test_rank_0_alone_writes_the_outputs(two):
    out, r = two
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "grid.png", "step-000000", "step-000004", "validation.png"]
    hidden = [p for p in out.rglob(".*")]  # temporary names left by a second writer racing the first
    assert not hidden, hidden
    meta = json.loads((out / "checkpoints" / "checkpoint-4" / "meta.json").read_text())
    assert meta["num_processes"] == 2 and meta["global_batch"] == 2
    state = torch.load(out / "checkpoints" / "checkpoint-4" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # every rank's RNG
    assert json.loads((out / "status.json").read_text())["phase"] == "done"
    # one voice: rank 0 says the plan once, with the effective batch; rank 1 says only warnings and errors
    log = r.stderr
    assert log.count("plan:") == 1 and "× 2 processes = effective batch 4" in log
    rank1 = [ln for ln in log.splitlines() if "[rank 1]" in ln]
    assert all(" WARNING " in ln or " ERROR " in ln for ln in rank1), rank1


def test_the_data_split_and_random_draws_match_one_process(dataset):
    """In-process: rank r's rows of each global batch, with the caption dropout, sigmas and noise that one process
    gives those rows."""
    g = data.Framing(64, "pixel", True, "center", "square", 4, 64)
    samples = data.discover(data.Folder(dataset, "textfile", ""), g)
    single, split = data.make_plan(samples, 2, SEED), data.make_plan(samples, 1, SEED, processes=2)
    assert [single.micro_batch(i) for i in range(12)] == [split.micro_batch(i) for i in range(12)]
    latents = {i: (type("Cache", (), {"get": staticmethod(lambda k: torch.full((4, 8, 8), float(k)))}), i)
               for i in range(len(samples))}
    text = type("Cache", (), {"get": staticmethod(lambda k: torch.full((3, 5), float(len(k))))})
    keys = {c: c for s in samples for c in s.captions} | {"": ""}

    def fetch(rows):
        return data.batch_fetcher(single, latents, text, keys, 0.5, rows)

    seen = []

    def transformer(hidden_states, encoder_hidden_states, timestep, return_dict):
        seen.append((hidden_states, encoder_hidden_states, timestep))
        return (hidden_states * 0.5,)

    t = type("T", (), {"flow_use_uniform_schedule": False, "flow_schedule_auto_shift": False,
                       "flow_schedule_shift": 3.0})
    cpu = torch.device("cpu")
    for index in range(6):
        draws = []
        for rank, world, rows in ((0, 1, slice(None)), (0, 2, slice(0, 1)), (1, 2, slice(1, 2))):
            gen = torch.Generator().manual_seed(index)
            batch = fetch(rows)(index, gen)
            seen.clear()
            loss = train_loss(transformer, batch, gen, t, 2, cpu, torch.float32, share=(rank, world)).mean()
            draws.append((*seen[0], loss))
        whole, first, second = draws
        for part in range(3):  # noised latents, text embeddings (dropout), timesteps
            torch.testing.assert_close(torch.cat([first[part], second[part]]), whole[part], rtol=0, atol=0)
        assert ((first[3] + second[3]) / 2).item() == pytest.approx(whole[3].item(), rel=1e-6)


def test_ranks_encode_disjoint_shares_of_the_cache(dataset, tmp_path):
    samples = data.discover(data.Folder(dataset, "textfile", ""), data.Framing(64, "pixel", True, "center", "square", 4, 64))
    cache, encoded = TensorCache(tmp_path, "vae"), []

    def encode(pixels):
        encoded.append(len(pixels))
        return pixels[:, :1, ::8, ::8].clone()

    keys = [data.cache_latents(samples, cache, encode, 4, mine=lambda i, r=r: i % 2 == r) for r in (0, 1)]
    assert sum(encoded) == len(samples)  # each image encoded once, by one rank
    assert keys[0] == keys[1] and all(cache.has(k) for k in keys[0].values())


# ------------------------------------------------------------------ resume


@pytest.mark.slow
def test_resume_with_the_same_process_count_is_exact(two, tiny_model, dataset, tmp_path):
    out2, r2 = two
    assert r2.returncode == 0, r2.stderr[-3000:]
    out = tmp_path / "out"
    shutil.copytree(out2 / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    r = train(out, tiny_model, dataset, num_processes=2, train_batch_size=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "resumed with NUM_PROCESSES" not in r.stderr
    a, b = adapter(out), adapter(out2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(out) == losses(out2)[2:]


@pytest.mark.slow
def test_sigterm_reaches_every_rank_then_another_count_resumes_with_a_warning(tiny_model, dataset, tmp_path):
    out = tmp_path / "out"
    proc = start(out, tiny_model, dataset, num_processes=2, train_batch_size=1)
    try:
        wait_for_steps(out, [proc], [tmp_path / "out.log"])
        proc.send_signal(signal.SIGTERM)  # to the parent only, as docker stop and tini do
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    log = (tmp_path / "out.log").read_text()
    assert rc == 143, log[-3000:]
    assert "[rank 1]" in log and log.count("stopping after the current step") == 2, log[-3000:]
    (ckpt,) = (out / "checkpoints").iterdir()  # written once, by rank 0, at the step both ranks stopped after
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    assert json.loads((out / "status.json").read_text())["phase"] == "interrupted"
    # another process count: a warning, then the run goes on from there
    r = train(out, tiny_model, dataset, num_processes=1, train_batch_size=1, max_train_steps=step + 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("resumed with NUM_PROCESSES=1, checkpoint was written with 2: data order differs from an "
            "uninterrupted run") in r.stderr
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()][-2:] == [step + 1,
                                                                                                        step + 2]


# ------------------------------------------------------------------ failures


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_promptly(tiny_model, dataset, tmp_path, record_property):
    out = tmp_path / "out"
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = start(out, tiny_model, dataset, num_processes=2, train_batch_size=1, tmpdir=temp)  # where the pid files go
    try:
        wait_for_steps(out, [proc], [tmp_path / "out.log"], 2)
        (pid_file,) = temp.glob("job-ranks-*/pid-1")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    record_property("exit_after_kill_s", round(elapsed, 2))
    print(f"rank 1 killed: the job exited {rc} after {elapsed:.1f}s")
    log = (tmp_path / "out.log").read_text()
    assert rc not in (0, None), log[-3000:]
    assert elapsed < 30, log[-3000:]
    assert "rank(s) 1 ended without reporting an exit code" in log


def test_a_bad_setting_fails_fast_and_starts_no_process(tmp_path, record_property):
    r = run_cli("train", timeout=60, num_processes=2, learning_rate="abc", dataset_id=tmp_path, push_to_hub="false",
                **LIST_IMPORTS)
    record_property("bad_setting_exit_s", round(r.elapsed, 2))
    assert r.returncode == 2 and "LEARNING_RATE" in r.stderr
    assert "torchrun" not in r.stderr and "starting" not in r.stderr
    assert not HEAVY & imported(r), r  # refused before torch was imported: within a second or two


@pytest.mark.slow
def test_check_plans_for_the_processes_without_starting_them(tiny_model, dataset, tmp_path):
    r = run_cli("check", **{**COMMON, "model_id": tiny_model, "dataset_id": dataset, "output_dir": tmp_path / "o"},
                num_processes=3, train_batch_size=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "× 3 processes = effective batch 12" in r.stderr and "torchrun" not in r.stderr


# ------------------------------------------------------------------ the launcher's arithmetic


def test_process_count():
    assert launch.process_count(0, 0) == 1  # auto without a GPU
    assert launch.process_count(0, 4) == 4  # auto: one per visible GPU
    assert launch.process_count(2, 0) == 2  # CPU processes over gloo (the tests)
    assert launch.process_count(2, 4) == 2
    with pytest.raises(ConfigError, match=r"NUM_PROCESSES=8: this machine has 4 visible GPU"):
        launch.process_count(8, 4)


def test_exit_code_is_the_first_failure(tmp_path):
    assert launch.exit_code(0, tmp_path, 2) == 0
    assert launch.exit_code(1, tmp_path, 2) == 1  # nobody could say: torchrun's
    assert launch.exit_code(-9, tmp_path, 2) == 137
    assert launch.exit_code(1, tmp_path, 2, signalled=signal.SIGINT) == 130  # a second Ctrl-C: no rank said
    (tmp_path / "exit-0").write_text("143 20.5")  # stopped by torchrun after rank 1 failed
    (tmp_path / "exit-1").write_text("5 20.0")
    assert launch.exit_code(1, tmp_path, 2) == 5
    (tmp_path / "exit-1").write_text("0 19.0")
    assert launch.exit_code(1, tmp_path, 2) == 143


@pytest.mark.slow
def test_ranks_that_finish_loading_apart_meet_before_the_first_step_collective(tmp_path):
    """Loading and quantising the base can take ranks minutes apart, longer than the step collectives' timeout:
    the first of them waits on the long-timeout group. Here: a 1 s step timeout, one rank 4 s late."""
    import socket

    import torch.multiprocessing as mp

    from rank_workers import first_collective  # a light module: each spawned rank imports only it and torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(first_collective, args=(port, 4.0, str(tmp_path)), nprocs=2, start_method="spawn")
    assert [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)] == [[1.0] * 3, [1.0] * 3]
