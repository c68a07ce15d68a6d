"""Faults in the middle of a run (issue 21): a disk that fills, a GPU out of memory, a failed CUDA device, a cache
entry damaged on disk. Each ends in one line with its own exit code, status.json and the webhook say so, nothing
half-written stays behind, and the same command resumes to the adapter an uninterrupted run writes.

A full disk is real where the test may mount a small tmpfs (root), else simulated in the checkpoint writer through
JOB_TEST_FAULT; out-of-memory and device failures are injected at a step boundary through JOB_TEST_FAULT (CPU)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, clean_env, run_cli
from job import builtin, checkpoint, hub, log, model
from job.cache import TensorCache
from job.config import build_settings
from job.errors import (
    DataError,
    DeviceFailed,
    DiskFull,
    HubAccessError,
    OutOfMemory,
    Unexpected,
    disk_full,
    exit_code,
)
from job.faults import Injection, Scene, explain, memory_size
from job.log import StatusFile
from job.pipeline import DEMO_LYCORIS

TOKEN = "hf_" + "F" * 34
PAGE = 4096
# the tiny model at 64 px in fp32, six steps of one image, a checkpoint every two
SETTINGS = dict(resolution=64, resolution_type="pixel", validation_resolution="64x64", push_to_hub="false",
                mixed_precision="no", gradient_checkpointing="false", optimizer="adamw", flow_schedule_shift="1.0",
                validation_num_inference_steps="2", validation_step_interval=0, max_train_steps=6,
                checkpoint_step_interval=2, lycoris_config=json.dumps(DEMO_LYCORIS), hf_token=TOKEN)


# ---------------------------------------------------------------- helpers

@pytest.fixture
def volume(tmp_path):
    """A 128 MiB tmpfs (the preflight asks for ~80 MB) (a volume that can really fill up), or None where this process may not mount one."""
    path = tmp_path / "volume"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(volume: Path, leave: int) -> Path:
    """Another process's file taking all but `leave` bytes of the volume."""
    filler = volume / "filler.bin"
    with filler.open("wb") as f:
        chunk = bytes(1 << 20)
        while (free := shutil.disk_usage(volume).free) > leave:
            f.write(chunk[:min(len(chunk), free - leave)])
            f.flush()
    return filler




def error_lines(stderr: str) -> list[str]:
    return [ln.split(" ERROR ", 1)[1].strip() for ln in stderr.splitlines() if " ERROR " in ln]


def the_one_line(r, out: Path) -> str:
    """The run's failure: one ERROR line and no traceback on the terminal; the same line in status.json, and the
    traceback, redacted, in the file the line names under OUTPUT_DIR/logs/."""
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    line = lines[0]
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "failed" and status["last_error"] == line
    trace = Path(re.search(r"\(traceback: (\S+)\)$", line).group(1))
    assert trace.parent == out / "logs" and "Traceback (most recent call last)" in trace.read_text()
    assert TOKEN not in trace.read_text() + r.stderr + (out / "status.json").read_text()
    return line


def corrupt(path: Path) -> bytes:
    """Damage an entry behind an intact header: the tensor's name changes, so `has` passes and reading fails."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + data[8:8 + n].replace(b'"t":', b'"u":', 1) + data[8 + n:])
    return data


def tree_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


# ---------------------------------------------------------------- through the CLI

@pytest.mark.slow
def test_faults_mid_run_end_clearly_and_the_same_command_resumes(tiny_model, tmp_path, volume, receiver):
    """Out of memory at step 3 (exit 8, checkpoint-2 kept); then the volume fills and checkpoint-4 cannot be
    written (exit 7, no temporary folder); then, space freed and every cache entry damaged on disk, the same command
    resumes from checkpoint-2, recomputes the entries it reads, and writes the adapter of an uninterrupted run."""
    out = (volume or tmp_path) / "out"
    env = dict(SETTINGS, model_id=tiny_model, dataset_id=builtin.single_image_dataset_dir(tmp_path),
               output_dir=out, webhook_url=receiver.url + "/hook")

    # 1. out of GPU memory at step 3
    r = run_cli("train", **env, job_test_fault="oom@3")
    assert r.returncode == 8, r.stderr[-3000:]
    line = the_one_line(r, out)
    s = build_settings([{k: str(v) for k, v in env.items() if k != "webhook_url"}])
    _, params, size = model.adapter_check(tiny_model, s.adapter.lycoris_config)
    estimate = model.memory_estimate(s, size, params, 64, torch.device("cpu")).total
    assert line.startswith("out of GPU memory at step 3 (bucket 64×64 px, batch 1): the estimate for these settings "
                           f"is {memory_size(estimate)} (this run is on the cpu, not a GPU); lower it with "
                           "BASE_MODEL_PRECISION=int8-quanto, then GRADIENT_CHECKPOINTING=true, then "
                           "ENABLE_GROUP_OFFLOAD=true, then a smaller RESOLUTION; the last good checkpoint is "
                           f"checkpoint-2 (in {out / 'checkpoints'}), and the same command resumes from it"), line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    kept = {f.name: f.read_bytes() for f in (out / "checkpoints" / "checkpoint-2").iterdir()}
    assert receiver.events()[-1] | {"text": None} == {"event": "failed", "run": "out", "text": None, "exit_code": 8,
                                                 "images": []}
    assert receiver.events()[-1]["text"] == line

    # 2. the volume fills up while training (after the preflight's disk check): checkpoint-4 finds no room
    checkpoint_bytes = tree_size(out / "checkpoints" / "checkpoint-2")
    filler = None
    if volume:
        def another_process(job: subprocess.Popen) -> None:  # the job stops itself before step 3 (stop@3)
            nonlocal filler
            while Path(f"/proc/{job.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
                time.sleep(0.05)
            filler = fill(volume, leave=checkpoint_bytes // 2)
            os.kill(job.pid, signal.SIGCONT)

        r = run_cli_with("train", another_process, **env, job_test_fault="stop@3")
        assert filler is not None
    else:
        r = run_cli("train", **env, job_test_fault="enospc@4")
    assert r.returncode == 7, r.stderr[-3000:]
    line = the_one_line(r, out)
    found = re.match(r"disk full writing checkpoint-4: OUTPUT_DIR \((.+)\) has ([\d.]+) kB free, "
                     r"the write needed about ([\d.]+) kB; free space there \(or give OUTPUT_DIR a larger volume\) and "
                     r"start the same command again: the last good checkpoint is checkpoint-2 \(in (.+)\), and the "
                     r"same command resumes from it", line)
    assert found, line
    assert Path(found[1]) == out.resolve() and Path(found[4]) == out / "checkpoints"
    assert abs(float(found[3]) * 1000 - checkpoint_bytes) <= 50  # what a checkpoint takes, as it said
    if volume:  # what was free then; since, the job wrote its traceback file (one page) and status.json
        assert float(found[2]) * 1000 < checkpoint_bytes
        assert abs(float(found[2]) * 1000 - shutil.disk_usage(volume).free) <= 2 * PAGE
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]  # no .checkpoint-4.tmp-*
    assert {f.name: f.read_bytes() for f in (out / "checkpoints" / "checkpoint-2").iterdir()} == kept
    assert [p for p in out.rglob(".*")] == []  # no temporary file anywhere
    assert receiver.events()[-1]["event"] == "failed" and receiver.events()[-1]["exit_code"] == 7
    assert receiver.events()[-1]["text"] == line

    # 3. space freed; every cached latent and embedding damaged behind an intact header
    if filler:
        filler.unlink()
    damaged = {p: corrupt(p) for p in sorted((out / "cache").rglob("*.safetensors"))}
    r = run_cli("train", **env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "checkpoint-2" in r.stderr
    recomputed = {p for p in damaged if re.search(rf"cache entry {re.escape(str(p))} cannot be read \(KeyError\); "
                                                  "recomputing it", r.stderr)}
    latents = [p for p in damaged if "vae" in p.parts]
    assert set(latents) <= recomputed and len(recomputed - set(latents)) >= 1  # the image's latents, its caption
    for p in recomputed:  # encoded again to the very values that were there
        assert torch.equal(load_file(str(p))["t"], load_file_bytes(damaged[p]))

    # 4. the same adapter as a run that met none of this
    ref = tmp_path / "reference"
    r = run_cli("train", **{**env, "output_dir": ref, "webhook_url": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = load_file(str(out / "pytorch_lora_weights.safetensors")), load_file(str(ref / "pytorch_lora_weights.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "status.json").read_text())["phase"] == "done"


def run_cli_with(command: str, meanwhile, timeout: float = 300, **settings):
    """run_cli, with `meanwhile(process)` run beside the job."""
    job = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), command], cwd=ROOT,
                           env=clean_env(**settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    helper = threading.Thread(target=meanwhile, args=(job,), daemon=True)
    helper.start()
    stdout, stderr = job.communicate(timeout=timeout)
    helper.join(timeout=10)
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


def load_file_bytes(data: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(data)["t"]


# ---------------------------------------------------------------- in-process: the writers and the messages

@pytest.mark.slow
def test_a_checkpoint_that_meets_a_full_disk_leaves_nothing_half_written(tmp_path, volume):
    """On a real full disk torch.save says only "unexpected pos": the writer knows it by the free space left."""
    if volume is None:
        pytest.skip("no tmpfs here (not root); the CLI test covers the simulated ENOSPC")
    root = volume / "checkpoints"
    adapter = {"w": torch.ones(8)}
    first = checkpoint.save(root, 1, adapter, {"m": torch.zeros(1 << 18)}, {})  # 1 MiB of optimizer state
    fill(volume, leave=tree_size(first) // 2)
    free = shutil.disk_usage(volume).free
    with pytest.raises(DiskFull) as caught:
        checkpoint.save(root, 2, adapter, {"m": torch.ones(1 << 18)}, {})
    assert shutil.disk_usage(volume).free == free  # the failed writer's open file let go too, while `caught` lives
    assert caught.value.exit_code == 7 and caught.value.needed == tree_size(first)
    assert caught.value.path == root / "checkpoint-2"
    assert [p.name for p in root.iterdir()] == ["checkpoint-1"]
    assert torch.equal(checkpoint.load(first)[1]["m"], torch.zeros(1 << 18))


def test_a_simulated_enospc_in_the_writer_is_a_full_disk_too(tmp_path):
    root = tmp_path / "checkpoints"
    first = checkpoint.save(root, 2, {"w": torch.ones(8)}, {"m": torch.zeros(64)}, {})
    with pytest.raises(DiskFull) as caught:
        checkpoint.save(root, 4, {"w": torch.ones(8)}, {"m": torch.zeros(64)}, {},
                        fault=lambda tmp: Injection("enospc", 4)("checkpoint", 4, tmp))
    assert caught.value.needed == tree_size(first) and disk_full(caught.value.__cause__)
    assert [p.name for p in root.iterdir()] == ["checkpoint-2"]


@pytest.mark.parametrize("setting", ["none", "latest", "checkpoint-2"])
def test_what_an_interrupted_save_or_download_left_is_removed_at_the_next_start(tmp_path, setting):
    root = tmp_path / "checkpoints"
    checkpoint.save(root, 2, {"w": torch.ones(8)}, {}, {})
    for leftover in (".checkpoint-4.tmp-999", ".checkpoint-1.deleting-999", ".checkpoint-6.download"):
        (root / leftover / "sub").mkdir(parents=True)
    checkpoint.choose(setting, root)
    assert [p.name for p in root.iterdir()] == ["checkpoint-2"]


def test_raw_faults_map_to_their_exit_codes():
    assert exit_code(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")) == 8
    assert exit_code(torch.AcceleratorError("CUDA error: device-side assert triggered")) == 9
    assert exit_code(RuntimeError("CUDA error: an illegal memory access was encountered")) == 9
    assert exit_code(OSError(errno.ENOSPC, "No space left on device")) == 7
    assert exit_code(OSError(errno.EDQUOT, "Disk quota exceeded")) == 7
    wrapped = RuntimeError("writing failed")
    wrapped.__cause__ = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert exit_code(wrapped) == 7  # safetensors' words, under a wrapper
    assert exit_code(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) == 1
    assert exit_code(OSError(errno.EACCES, "Permission denied")) == 1
    assert exit_code(HubAccessError("x")) == 3


def scene(tmp_path, trainer=None, phase="training", **settings) -> Scene:
    s = build_settings([{"dataset_id": "x", "push_to_hub": "false", "output_dir": str(tmp_path / "out"), **settings}])
    status = StatusFile(None)
    status.update(phase=phase)
    return Scene(s, model.Grid(patch_size=2, pos_embed_max_size=64 * 64, vae_scale_factor=8, latent_channels=4),
                 torch.device("cpu"), status, trainer=trainer)


class AtStep:
    """What the message reads of a Trainer: its step, stage and last micro-batch."""

    def __init__(self, step, stage, batch_shape):
        self.step, self.stage, self.batch_shape = step, stage, batch_shape


def test_a_device_side_assert_says_whether_the_bucket_exceeds_the_positional_grid(tmp_path):
    # 64×64 patches of 2 latents of 8 px: at most 1024 px a side
    e = torch.AcceleratorError("CUDA error: device-side assert triggered\nCUDA kernel errors might be ...")
    over = explain(e, scene(tmp_path, AtStep(41, "step", (1, 4, 136, 128))))
    assert isinstance(over, DeviceFailed) and over.exit_code == 9
    assert str(over).startswith("the GPU failed at step 42 (bucket 1024×1088 px, batch 1): CUDA error: device-side "
                                "assert triggered; its CUDA context is unusable")
    assert "the bucket 1024×1088 px exceeds AuraFlow's positional-embedding grid (at most 1024 px a side for this " \
           "model): lower RESOLUTION" in str(over)
    assert "no checkpoint was written yet" in str(over) and "\n" not in str(over)
    within = explain(e, scene(tmp_path, AtStep(41, "step", (2, 4, 128, 128))))
    assert "the bucket is within AuraFlow's positional-embedding grid (at most 1024 px a side)" in str(within)


def test_a_full_disk_names_the_folder_that_holds_the_file(tmp_path):
    blob = hub.cache_folder() / "models--x--y" / "blobs" / "abc.incomplete"
    full = explain(OSError(errno.ENOSPC, "No space left on device", str(blob)), scene(tmp_path, phase="download"))
    assert isinstance(full, DiskFull)
    assert str(full).startswith(f"disk full while downloading the model, writing abc.incomplete: HF_HOME "
                                f"({hub.cache_folder().resolve()}) has ")
    assert "give HF_HOME a larger volume" in str(full)


def test_an_out_of_memory_outside_the_step_suggests_what_that_round_uses(tmp_path):
    oom = explain(torch.OutOfMemoryError("CUDA out of memory"),
                  scene(tmp_path, AtStep(200, "hooks", (1, 4, 128, 128)), train_batch_size="4",
                        base_model_precision="int8-quanto", enable_group_offload="true"))
    assert isinstance(oom, OutOfMemory) and oom.exit_code == 8
    assert str(oom).startswith("out of GPU memory in the eval or validation round after step 200: lower it with a "
                               "smaller VALIDATION_RESOLUTION or ENABLE_MODEL_CPU_OFFLOAD=true, then TRAIN_BATCH_SIZE=1 "
                               "(GRADIENT_ACCUMULATION_STEPS=4 keeps the effective batch), then a smaller RESOLUTION;")


def test_the_traceback_file_masks_secrets(tmp_path, caplog):
    secret = "sk_live_" + "Z" * 24
    log.register_secret(secret)
    at = scene(tmp_path)
    at.debug = True  # DEBUG=true: the traceback on the terminal too
    try:
        raise RuntimeError(f"upstream said: bad key {secret} and {TOKEN}")
    except RuntimeError as e:
        err = explain(e, at)
    assert "Traceback (most recent call last)" in caplog.text and "RuntimeError: upstream said" in caplog.text
    assert secret not in caplog.text and TOKEN not in caplog.text
    assert isinstance(err, Unexpected) and err.exit_code == 1
    assert str(err).startswith("unexpected error while preparing the training loop: RuntimeError: upstream said: bad "
                               "key *** and ***;")
    text = next((tmp_path / "out" / "logs").iterdir()).read_text()
    assert "RuntimeError: upstream said" in text and secret not in text and TOKEN not in text


def test_a_cache_entry_that_cannot_be_read_is_recomputed_once(tmp_path):
    cache = TensorCache(tmp_path, "id")
    key = "k" * 64
    cache.put(key, torch.arange(6.0))
    corrupt(cache.path(key))
    assert cache.has(key)  # the cheap check at start-up cannot see it
    calls = []
    cache.refill = lambda k: (calls.append(k), cache.put(k, torch.arange(6.0)))
    assert torch.equal(cache.get(key), torch.arange(6.0)) and calls == [key]
    corrupt(cache.path(key))
    cache.refill = lambda k: None  # cannot make it again now
    with pytest.raises(DataError, match="the same command encodes it again at start-up"):
        cache.get(key)
    assert not cache.path(key).exists()


@pytest.mark.slow
def test_the_other_ranks_leave_with_the_code_of_rank_0s_fault(tmp_path):
    """Rank 0's full disk: the others get exit 7 and, as for any fault, do not wait for rank 0 to report; its
    divergence: exit 5, and they wait (an orderly end)."""
    import socket

    import torch.multiprocessing as mp
    from fault_workers import rank_zero_failures

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_zero_failures, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    assert json.loads((tmp_path / "rank0").read_text()) == [["OSError", None, False], ["DivergedError", 5, False]]
    assert json.loads((tmp_path / "rank1").read_text()) == [["RankZeroFault", 7, True], ["RankZeroFailed", 5, False]]


@pytest.mark.slow
def test_another_ranks_fault_is_what_rank_0_reports(tiny_model, tmp_path, receiver):
    """Rank 1 runs out of memory: rank 0 only sees its collective break, yet status.json, the webhook and every exit
    code say what rank 1 said, with the checkpoint to resume from. A record left by an earlier run is not used."""
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    stale = {"rank": 3, "exit_code": 7, "line": "disk full, in an earlier run", "at": 0.0}
    (out / "logs" / "rank-3.failed.json").write_text(json.dumps(stale))
    r = run_cli("train", **SETTINGS, model_id=tiny_model, dataset_id=builtin.toy_dataset_dir(tmp_path, count=8),
                output_dir=out, webhook_url=receiver.url + "/hook", num_processes=2, train_batch_size=1,
                job_test_fault="oom@4/1")
    assert r.returncode == 8, r.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "failed", status
    assert status["last_error"].startswith("rank 1 failed: out of GPU memory at step 4 "), status
    assert status["last_error"].endswith(f"the last good checkpoint is checkpoint-2 (in {out / 'checkpoints'}), and "
                                         "the same command resumes from it"), status
    assert receiver.events()[-1] | {"text": None} == {"event": "failed", "run": "out", "text": None, "exit_code": 8,
                                                      "images": []}
    assert receiver.events()[-1]["text"] == status["last_error"]
    assert not (out / "logs" / "rank-3.failed.json").exists()
