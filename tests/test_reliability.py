"""Nothing lost, nothing torn, no secret leaked, every bad input answered with exit 2."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import AuraFlowTransformer2DModel

from conftest import ALL_LINEAR, HEAVY, LIST_IMPORTS, ROOT, TINY, imported, run_cli
from job import builtin, checkpoint, disk, model
from job.cache import TensorCache
from job.config import SPECS, build_settings
from job.errors import DivergedError
from job.log import MetricsSink
from job.loss import Batch
from job.train import Trainer

HF_TOKEN = "hf_" + "S" * 34
WANDB_KEY = "0123456789abcdef" * 2 + "01234567"
WEBHOOK_KEY = "Zx9" * 20  # the key part of a Discord webhook URL


# ---------------------------------------------------------------- divergence guard

def trainer_with_a_nan_batch(tiny_model, tmp_path, skip: int) -> Trainer:
    s = build_settings([{"dataset_id": "x", "push_to_hub": "false", "mixed_precision": "no", "optimizer": "adamw",
                         "skip_nonfinite_steps": str(skip), "learning_rate": "1e-2"}])
    tr = AuraFlowTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").requires_grad_(False)
    net = model.create_adapter(tr, json.loads(ALL_LINEAR), torch.float32)

    def fetch(index, g):
        x = torch.randn(1, 4, 16, 16, generator=g)
        return Batch(x * float("nan") if index == 2 else x, torch.randn(1, 8, 32, generator=g))

    return Trainer(transformer=tr, network=net, fetch=fetch, t=s.training, total_steps=5, patch_size=2,
                   device=torch.device("cpu"), dtype=torch.float32, checkpoint_dir=tmp_path / "ckpt",
                   metrics=MetricsSink(tmp_path / "metrics.jsonl"))


def test_a_nonfinite_step_is_skipped_when_allowed(tiny_model, tmp_path):
    t = trainer_with_a_nan_batch(tiny_model, tmp_path, skip=1)
    t.run()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False, False, True, False, False]
    assert rows[2]["loss"] is None and all(torch.isfinite(p).all() for p in t.params)


def test_a_nonfinite_step_stops_the_run_by_default(tiny_model, tmp_path):
    t = trainer_with_a_nan_batch(tiny_model, tmp_path, skip=0)
    with pytest.raises(DivergedError, match="step 3"):
        t.run()
    assert t.step == 2


# ---------------------------------------------------------------- torn files

def test_a_torn_cache_entry_is_recomputed(tmp_path):
    cache = TensorCache(tmp_path, "id")
    cache.put("k" * 64, torch.arange(1000.0))
    assert cache.has("k" * 64)
    path = cache.path("k" * 64)
    path.write_bytes(path.read_bytes()[:-100])  # as a crash on a non-atomic writer would leave it
    assert not cache.has("k" * 64)


WRITER = """
import sys, torch
from pathlib import Path
from job import checkpoint
root = Path(sys.argv[1])
for step in range(1, 10**6):
    big = torch.full((256, 1024), float(step))  # 1 MiB: a kill often lands mid-write
    checkpoint.save(root, step, {"w": big}, {"step_tensor": torch.tensor(step)}, {"marker": step})
    checkpoint.rotate(root, 3)
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_never_leaves_a_lying_checkpoint(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "ckpts"
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], cwd=ROOT)
        deadline = time.monotonic() + 120  # the writer's imports take seconds on a loaded machine: time from its writes
        while not list(root.glob("checkpoint-*")) and time.monotonic() < deadline:  # one whole checkpoint first
            time.sleep(0.05)
        time.sleep(rng.random() * 1.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = checkpoint.complete(root)  # also clears the temporary folders a kill leaves behind
        assert found
        for path in found:
            adapter, state, meta = checkpoint.load(path)
            step = checkpoint.step_of(path)
            assert meta["step"] == meta["marker"] == step == int(state["step_tensor"])
            assert torch.equal(adapter["w"], torch.full((256, 1024), float(step)))
        assert not list(root.glob(".checkpoint-*"))


def interrupted_settings(tiny_model, root: Path) -> dict:
    return dict(**TINY, model_id=tiny_model, dataset_id=builtin.single_image_dataset_dir(root / "d"),
                lycoris_config=ALL_LINEAR, checkpoint_step_interval=2, validation_step_interval=0, max_train_steps=4)


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints 2 and 4, its OUTPUT_DIR without completed.json: as if the run had died at the
    very end. Tests copy it."""
    root = tmp_path_factory.mktemp("finished")
    r = run_cli("train", **interrupted_settings(tiny_model, root), output_dir=root / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    (root / "out" / "completed.json").unlink()
    return root


def a_copy(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "out", tmp_path / "out")
    return tmp_path / "out"


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_set_aside_and_the_one_before_is_used(tiny_model, finished, tmp_path):
    out = a_copy(finished, tmp_path)
    ckpts = out / "checkpoints"
    (ckpts / "checkpoint-4" / "training_state.pt").write_bytes(b"garbage")
    r = run_cli("train", **{**interrupted_settings(tiny_model, finished), "max_train_steps": 6}, output_dir=out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoint-4 cannot be read" in r.stderr and "(step 2 of 6)" in r.stderr
    assert (ckpts / "checkpoint-4.unreadable").is_dir()


# ---------------------------------------------------------------- disk

def test_disk_preflight_names_the_folder_and_both_numbers(tmp_path):
    free = disk.shutil.disk_usage(tmp_path).free
    ok = disk.problems([disk.Need(tmp_path / "a", "cache", 1024)])
    too_much = disk.problems([disk.Need(tmp_path / "not-yet" / "b", "latent cache", free),
                              disk.Need(tmp_path, "checkpoints", free // 2)])
    assert ok == []
    (line,) = too_much  # one filesystem, one line
    assert str(tmp_path / "not-yet" / "b") in line and "checkpoints" in line
    assert f"{free * 1.5 * 1.1 / disk.GB:.2f} GB needed" in line and f"{free / disk.GB:.2f} GB free" in line


# ---------------------------------------------------------------- bad input, through the CLI

def typed_specs():
    return [s for s in SPECS if not s.is_text]


WRONG_TYPE = {"bool": "maybe", "int": "ten", "float": "fast", "choice": "nonsense", "json": "{not json",
              "resolutions": "big"}
OUT_OF_RANGE = {"int": "-5", "float": "-1e9"}


def kind(spec) -> str:
    allowed = getattr(spec.parse, "allowed", "")
    if spec.parse.__name__ == "_bool":
        return "bool"
    if allowed.startswith("one of"):
        return "choice"
    if allowed.startswith("an integer") or allowed.startswith("auto or an integer"):
        return "int"
    if allowed.startswith("a number"):
        return "float"
    if allowed.startswith("inline JSON"):
        return "json"
    return "resolutions"


def guarded_output(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-7").mkdir(parents=True)
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"precious")
    (out / "checkpoints" / "checkpoint-7" / "meta.json").write_text("{}")
    return out, {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("variant", ["wrong type", "out of range", "empty"])
def test_every_setting_refuses_bad_values_all_at_once(tmp_path, variant):
    out, before = guarded_output(tmp_path)
    bad = {}
    for spec in typed_specs():
        k = kind(spec)
        value = {"wrong type": WRONG_TYPE.get(k), "out of range": OUT_OF_RANGE.get(k), "empty": ""}[variant]
        if value is not None and not (variant == "empty" and spec.default == ""):
            bad[spec.env] = value
    r = run_cli("train", dataset_id=str(tmp_path), output_dir=out, **bad, **LIST_IMPORTS)
    assert r.returncode == 2, r.stderr[-2000:]
    assert not HEAVY & imported(r), r  # refused before torch was imported: within a second or two
    missing = [var for var in bad if f"{var}=" not in r.stderr]
    assert not missing, missing
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    print(f"{variant}: {len(bad)} settings refused in one run")


FILE_SETTINGS = {"CONFIG_FILE": "{}", "DATA_BACKEND_CONFIG": "[]", "LYCORIS_CONFIG": "{}", "USER_PROMPT_LIBRARY": "{}"}


@pytest.mark.parametrize("var", sorted(FILE_SETTINGS))
@pytest.mark.parametrize("case", ["missing", "not json", "wrong shape"])
def test_broken_json_files_are_refused(tmp_path, var, case):
    out, before = guarded_output(tmp_path)
    path = tmp_path / "file.json"
    if case == "not json":
        path.write_text("{ this is: not json")
    elif case == "wrong shape":
        path.write_text('"a string"' if var != "DATA_BACKEND_CONFIG" else '{"an": "object"}')
    r = run_cli("train", dataset_id=str(tmp_path), output_dir=out, push_to_hub="false", **{var: str(path)})
    assert r.returncode == 2, r.stderr[-2000:]
    assert var in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- secrets

@pytest.mark.slow
def test_no_secret_in_any_byte_a_full_run_writes(tiny_model, tmp_path, receiver):
    """Secrets given in the environment, in CONFIG_FILE, or as a webhook URL's key (Discord's are credentials),
    and pasted into a prompt: none reaches a written file, the terminal or a webhook payload."""
    out = tmp_path / "out"
    webhook = f"{receiver.url}/api/webhooks/1234/{WEBHOOK_KEY}"
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"wandb_api_key": WANDB_KEY}), encoding="utf-8")
    r = run_cli("demo", output_dir=out, max_train_steps=6, checkpoint_step_interval=3, validation_step_interval=3,
                report_to="wandb", wandb_mode="offline", hf_token=HF_TOKEN, config_file=config_file,
                webhook_url=webhook, validation_prompt=f"a red circle {HF_TOKEN} {WANDB_KEY}",
                xdg_cache_home=tmp_path / "xdg")
    assert r.returncode == 0, r.stderr[-2000:]
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    logs = (r.stdout + r.stderr).encode()
    posted = b"".join(body for _, _, body in receiver.got)
    assert len(written) > 10_000  # the run really wrote its files: adapter, samples, checkpoints, wandb
    assert [path for path, _, _ in receiver.got][-1] == f"/api/webhooks/1234/{WEBHOOK_KEY}"  # and it was used
    for secret in (HF_TOKEN, WANDB_KEY, WEBHOOK_KEY):
        for where, data in (("files", written), ("terminal", logs), ("webhook", posted)):
            assert secret.encode() not in data, (secret, where)
    assert os.environ.get("HF_TOKEN") != HF_TOKEN  # and the test process itself was never given it


def test_folders_off_the_volume_are_named_with_their_bytes(tmp_path):
    volume = tmp_path / "workspace"
    volume.mkdir()
    needs = [disk.Need(volume / "hf", "model download", 3 * disk.GB), disk.Need(tmp_path / "out", "checkpoints", disk.GB)]
    (warning,) = disk.placement_warnings(needs, volume)
    assert "checkpoints (1.00 GB)" in warning and str(tmp_path / "out") in warning
    assert disk.placement_warnings(needs, None) == []


@pytest.mark.slow
def test_a_checkpoint_of_another_adapter_shape_is_an_error_not_damage(tiny_model, finished, tmp_path):
    out = a_copy(finished, tmp_path)
    ckpts = out / "checkpoints"
    before = {p: p.read_bytes() for p in ckpts.rglob("*") if p.is_file()}
    other = json.dumps({**json.loads(ALL_LINEAR), "factor": 2})
    r = run_cli("train", **{**interrupted_settings(tiny_model, finished), "lycoris_config": other}, output_dir=out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "RESUME_FROM_CHECKPOINT" in r.stderr and "another LYCORIS_CONFIG" in r.stderr
    assert {p: p.read_bytes() for p in ckpts.rglob("*") if p.is_file()} == before  # good checkpoints are never set aside
