"""The job against a Hub-compatible server on 127.0.0.1, through the real huggingface_hub client in a subprocess:
pull, preflight failures (exit 3), push with the card and samples, retries, exit 6, checkpoints on the Hub."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load as safetensors_load

from conftest import ALL_LINEAR, HUB_DATA, HUB_MODEL, TINY, run_cli
from hubserver import OTHER_TOKEN, READ_TOKEN, WRITE_TOKEN


def train(hub, tmp_path, *args, **settings):
    base = dict(**TINY, model_id=HUB_MODEL, dataset_id=HUB_DATA, lycoris_config=ALL_LINEAR, max_train_steps=4,
                output_dir=tmp_path / "out", hf_token=WRITE_TOKEN, hf_endpoint=hub.url, hf_home=tmp_path / "hf",
                hf_hub_offline="0", hf_hub_disable_xet="1", hub_retries=3)
    return run_cli(*(args or ("train",)), **{**base, **settings})


@pytest.fixture(scope="module")
def e2e(hub, tmp_path_factory):
    """Pull, train, push; the model's weights stall mid-file on the way in (the server stops sending bytes, and
    releases the connection only after 60 s): (run, OUTPUT_DIR, the requests the server saw)."""
    tmp = tmp_path_factory.mktemp("pushed")
    hub.clear_log()
    hub.stall_after(2000, match="diffusion_pytorch_model.safetensors", seconds=60)
    try:
        r = train(hub, tmp, push_to_hub="true", hub_model_id="tester/lokr", validation_prompt="a red circle",
                  download_stall_timeout=2, timeout=180)
    finally:
        hub.release()
    assert r.returncode == 0, r.stderr[-3000:]
    return r, tmp / "out", hub.requests(), hub.stalled.is_set()


@pytest.mark.slow
def test_pull_train_push_end_to_end(hub, e2e):
    r, out, _, _ = e2e
    pushed = hub.files("tester/lokr")
    for name in ("pytorch_lora_weights.safetensors", "lokr_comfyui.safetensors", "lycoris_config.json",
                 "training_config.json", "README.md", "loss.png", "samples/validation.png",
                 "samples/step-000000/validation.png"):
        assert pushed[name] == (out / name).read_bytes(), name
    lycoris, comfy = safetensors_load(pushed["pytorch_lora_weights.safetensors"]), safetensors_load(
        pushed["lokr_comfyui.safetensors"])
    assert len(comfy) == len(lycoris) == 90  # the tiny model's 30 Linears x (lokr_w1, lokr_w2, alpha)
    for key, t in comfy.items():  # the same tensors under ComfyUI's names
        path, _, suffix = key.removeprefix("transformer.").rpartition(".")
        assert key.startswith("transformer.") and torch.equal(t, lycoris[f"lycoris_{path.replace('.', '_')}.{suffix}"])
    assert not any(k.startswith("cache/") or k.startswith("checkpoints/") for k in pushed)
    card = ModelCard(pushed["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["base_model"] == HUB_MODEL and meta["pipeline_tag"] == "text-to-image"
    assert {"lycoris", "auraflow", "lokr"} <= set(meta["tags"])
    assert meta["widget"] == [{"text": "a red circle", "output": {"url": "samples/validation.png"}}]
    assert "create_lycoris_from_weights(1.0, adapter, pipe.transformer)" in card.text
    assert 'hf_hub_download("tester/lokr", "pytorch_lora_weights.safetensors")' in card.text
    assert "`lokr_comfyui.safetensors`" in card.text and "ComfyUI/models/loras/" in card.text
    assert "LoraLoaderModelOnly" in card.text
    resolved = json.loads(pushed["training_config.json"])
    assert resolved["model_commit"] == hub.model_commit and HUB_DATA in resolved["dataset_commits"]
    assert WRITE_TOKEN not in r.stderr + r.stdout and all(WRITE_TOKEN.encode() not in v for v in pushed.values())


@pytest.mark.slow
@pytest.mark.parametrize("settings,needle", [
    ({"hf_token": "hf_wrong_token_for_sure"}, "HF_TOKEN was refused"),
    ({"model_id": "mallory/gated-auraflow"}, "is gated: accept its terms at https://huggingface.co/mallory/gated"),
    ({"dataset_id": "tester/no-such-dataset"}, "dataset tester/no-such-dataset not found"),
    ({"push_to_hub": "true", "hub_model_id": "tester/x", "hf_token": READ_TOKEN}, "read-only token"),
    ({"push_to_hub": "true", "hub_model_id": "tester/x", "hf_token": OTHER_TOKEN}, "cannot write to tester"),
])
def test_hub_access_problems_exit_3_before_any_weights_move(hub, tmp_path, settings, needle):
    hub.clear_log()
    r = train(hub, tmp_path, "check", **settings)
    assert r.returncode == 3, r.stderr[-2000:]
    assert needle in r.stderr
    assert not hub.requests("GET", ".safetensors")  # preflight fetched no weights


@pytest.fixture(scope="module")
def retried(hub, tmp_path_factory):
    """A push whose first commit gets 503 and whose adapter upload is cut mid-body, without the ComfyUI copy (so the
    adapter is the one LFS file and a second PUT is the retry; a seed of its own: an adapter the server has seen
    before would not be uploaded again): (run, OUTPUT_DIR, the LFS PUTs the server saw)."""
    tmp = tmp_path_factory.mktemp("retried")
    hub.clear_log()
    hub.fail_next(1, status=503, match="/commit/")
    hub.drop_next(1, match="PUT /_lfs")
    try:
        r = train(hub, tmp, push_to_hub="true", hub_model_id="tester/retried", max_train_steps=1, seed=4321,
                  export_comfyui="false")
    finally:
        hub.clear_faults()
    assert r.returncode == 0, r.stderr[-2000:]
    return r, tmp / "out", hub.requests("PUT", "/_lfs")


@pytest.mark.slow
def test_push_retries_a_failed_commit(hub, retried):
    r, out, _ = retried
    assert "retrying" in r.stderr
    assert hub.files("tester/retried")["pytorch_lora_weights.safetensors"] == (
        out / "pytorch_lora_weights.safetensors").read_bytes()


@pytest.mark.slow
def test_hub_down_at_the_end_exits_6_and_keeps_everything(hub, tmp_path):
    hub.fail_next(20, status=503, match="/commit/")
    try:
        r = train(hub, tmp_path, push_to_hub="true", hub_model_id="tester/never", max_train_steps=1, hub_retries=2)
    finally:
        hub.clear_faults()
    assert r.returncode == 6, r.stderr[-2000:]
    out = tmp_path / "out"
    for name in ("pytorch_lora_weights.safetensors", "README.md", "training_config.json", "samples/validation.png"):
        assert (out / name).is_file(), name
    assert f"hf upload tester/never {out}" in r.stderr
    assert (out / "never_comfyui.safetensors").is_file() and "--include 'never_comfyui.safetensors'" in r.stderr


@pytest.mark.slow
def test_checkpoints_go_to_the_hub_and_a_fresh_pod_resumes_from_them(hub, tmp_path):
    common = dict(push_to_hub="true", hub_model_id="tester/ckpt", push_checkpoints_to_hub="true",
                  checkpoint_step_interval=2, checkpoints_total_limit=1)
    r = train(hub, tmp_path / "pod1", **common)
    assert r.returncode == 0, r.stderr[-2000:]
    names = {k.split("/")[1] for k in hub.files("tester/ckpt") if k.startswith("checkpoints/")}
    assert names == {"checkpoint-4"}  # rotated to CHECKPOINTS_TOTAL_LIMIT on the Hub too
    r = train(hub, tmp_path / "pod2", **{**common, "max_train_steps": 6})  # a new volume: nothing local
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr and "(step 4 of 6)" in r.stderr
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "pod2" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 6]


@pytest.mark.slow
def test_a_connection_dropped_mid_upload_is_retried(hub, retried):
    """The adapter's LFS upload is cut mid-body; the upload is retried and the push completes."""
    r, out, lfs_puts = retried
    pushed = hub.files("tester/retried")
    assert pushed["pytorch_lora_weights.safetensors"] == (out / "pytorch_lora_weights.safetensors").read_bytes()
    assert len(lfs_puts) >= 2


@pytest.mark.slow
def test_without_the_comfyui_copy_nothing_of_it_is_written_or_pushed(hub, retried):
    r, out, _ = retried
    pushed = hub.files("tester/retried")
    assert not any("comfyui" in k for k in pushed) and not any(out.glob("*comfyui*"))
    assert "ComfyUI" not in pushed["README.md"].decode()


@pytest.mark.slow
def test_a_stalled_download_is_retried_by_the_watchdog(e2e):
    """After DOWNLOAD_STALL_TIMEOUT the stalled body is requested again and the run completes (the stalled connection
    is only released after 60 s: without the watchdog the run would hang)."""
    r, _, requests, stalled = e2e
    assert stalled  # the stall really happened
    assert len([h for h in requests if h.method == "GET" and "diffusion_pytorch_model.safetensors" in h.path]) >= 2


def test_only_network_trouble_is_retried():
    from job.hub import _transient

    assert _transient(ConnectionError()) and _transient(TimeoutError())
    assert not _transient(PermissionError("HF_HOME not writable")) and not _transient(OSError(28, "No space left"))


@pytest.mark.slow
def test_with_two_processes_rank_0_alone_talks_to_the_hub(hub, tmp_path):
    """NUM_PROCESSES=2 on an empty HF_HOME: the Hub sees the very reads of a one-process run, and one push."""
    reads = {}
    for n in (1, 2):
        hub.clear_log()
        r = train(hub, tmp_path / str(n), push_to_hub="true", hub_model_id=f"tester/ranks-{n}", num_processes=n,
                  max_train_steps=2, repeats=1, hf_home=tmp_path / str(n) / "hf")  # the image twice: a batch of 2
        assert r.returncode == 0, r.stderr[-2000:]
        reads[n] = Counter((h.method, h.path) for h in hub.log if h.method in ("GET", "HEAD"))
        assert len(hub.requests("POST", "/commit/")) == 1
    assert any(p.endswith(".safetensors") for _, p in reads[2]) and reads[2] == reads[1]
