"""POD_ACTION_* against a local stand-in for RunPod's and Vast.ai's APIs: one call, only after the push; none on
failure unless asked; never a terminate after a failed push; missing credentials only warn; a restart repeats a
pod action that failed."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ALL_LINEAR, HUB_DATA, HUB_MODEL, TINY, run_cli
from hubserver import WRITE_TOKEN

pytestmark = pytest.mark.slow  # every test here runs the real CLI end to end

POD_KEY = "rpa_" + "K" * 30


@pytest.fixture
def platform(hub):
    """Records (method, path, auth, body, whether the adapter was already on the Hub at that moment)."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def _record(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            pushed = any("pytorch_lora_weights.safetensors" in hub.files(r) for r in ("tester/pod-ok",)
                         if ("model", r) in hub.repos)
            calls.append((self.command, self.path, self.headers.get("Authorization"), body, pushed))
            self.send_response(server.status)
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_PUT = do_DELETE = _record

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.status = 200
    server.calls, server.url = calls, f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()


def train(hub, platform, tmp_path, **settings):
    base = {**TINY, "model_id": HUB_MODEL, "dataset_id": HUB_DATA, "lycoris_config": ALL_LINEAR, "max_train_steps": 2,
            "output_dir": tmp_path / "out", "hf_token": WRITE_TOKEN, "hf_endpoint": hub.url, "hf_home": tmp_path / "hf",
            "hf_hub_offline": "0", "hf_hub_disable_xet": "1", "hub_retries": 2, "push_to_hub": "true",
            "hub_model_id": "tester/pod-ok", "validation_step_interval": 0}
    return run_cli("train", **{**base, **settings})


RUNPOD = {"runpod_pod_id": "pod123", "runpod_api_key": POD_KEY}


def test_success_terminates_once_after_the_push_on_runpod(hub, platform, tmp_path):
    r = train(hub, platform, tmp_path, pod_action_on_success="terminate", runpod_api_base=platform.url, **RUNPOD)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [(m, p, a, pushed) for m, p, a, _, pushed in platform.calls] == [
        ("DELETE", "/v1/pods/pod123", f"Bearer {POD_KEY}", True)]
    assert POD_KEY not in r.stderr
    assert json.loads((tmp_path / "out" / "completed.json").read_text())["pod_action_done"] is True


def test_success_stops_a_vast_instance(hub, platform, tmp_path):
    r = train(hub, platform, tmp_path, pod_action_on_success="stop", vast_api_base=platform.url,
              container_id="4242", container_api_key=POD_KEY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [(m, p, json.loads(b)) for m, p, _, b, _ in platform.calls] == [
        ("PUT", "/api/v0/instances/4242/", {"state": "stopped"})]


def test_a_failure_stops_the_pod_only_when_asked(hub, platform, tmp_path):
    bad = dict(learning_rate=1e30, max_grad_norm=0, runpod_api_base=platform.url, **RUNPOD)
    r = train(hub, platform, tmp_path / "a", pod_action_on_success="stop", **bad)
    assert r.returncode == 5 and platform.calls == []
    r = train(hub, platform, tmp_path / "b", pod_action_on_failure="stop", **bad)
    assert r.returncode == 5
    assert [(m, p) for m, p, *_ in platform.calls] == [("POST", "/v1/pods/pod123/stop")]


def test_a_failed_push_never_terminates(hub, platform, tmp_path):
    hub.fail_next(50, status=503, match="/commit/")
    try:
        r = train(hub, platform, tmp_path, pod_action_on_success="terminate", runpod_api_base=platform.url,
                  hub_model_id="tester/pod-never", **RUNPOD)
    finally:
        hub.clear_faults()
    assert r.returncode == 6 and platform.calls == []


def test_missing_credentials_only_warn(hub, platform, tmp_path):
    r = train(hub, platform, tmp_path, pod_action_on_success="stop")
    assert r.returncode == 0
    assert "POD_ACTION stop skipped" in r.stderr and "RUNPOD_POD_ID" in r.stderr


def test_a_restart_repeats_a_pod_action_that_failed(hub, platform, tmp_path):
    platform.status = 500
    r = train(hub, platform, tmp_path, pod_action_on_success="stop", runpod_api_base=platform.url, **RUNPOD)
    assert r.returncode == 0 and len(platform.calls) == 1 and "failed" in r.stderr
    platform.status = 200
    r = train(hub, platform, tmp_path, pod_action_on_success="stop", runpod_api_base=platform.url, **RUNPOD)
    assert r.returncode == 0 and "nothing to do" in r.stderr
    assert len(platform.calls) == 2
    assert json.loads((tmp_path / "out" / "completed.json").read_text())["pod_action_done"] is True
