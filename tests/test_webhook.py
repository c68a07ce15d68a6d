"""WEBHOOK_URL against a receiver on 127.0.0.1: events in order with their fields, Discord's format for Discord
URLs, failures reported with their exit code, no token in any payload; and pod logs without carriage returns."""
from __future__ import annotations

import json
from email.parser import BytesParser
from email.policy import HTTP

import pytest

from conftest import ALL_LINEAR, TINY, run_cli
from job import builtin

pytestmark = pytest.mark.slow  # every test here runs the real CLI end to end

TOKEN = "hf_" + "W" * 34




def run(tiny_model, tmp_path, url, **kw):
    return run_cli("train", **{**dict(**TINY, model_id=tiny_model, dataset_id=builtin.single_image_dataset_dir(tmp_path),
                                      output_dir=tmp_path / "out", max_train_steps=4, lycoris_config=ALL_LINEAR,
                                      validation_step_interval=2, checkpoint_step_interval=2, webhook_url=url,
                                      hf_token=TOKEN), **kw})


def test_events_arrive_in_order_with_their_fields(tiny_model, tmp_path, receiver):
    r = run(tiny_model, tmp_path, receiver.url + "/hook")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr  # not a terminal: progress lines, no carriage-return bars
    events = [json.loads(body) for _, ctype, body in receiver.got]
    assert all(ctype == "application/json" for _, ctype, _ in receiver.got)
    assert [(e["event"], e.get("step")) for e in events] == [
        ("started", 0), ("validation", 0), ("validation", 2), ("checkpoint", 2), ("validation", 4),
        ("checkpoint", 4), ("finished", None)]
    assert events[0]["total_steps"] == 4
    shot = events[1]["images"][0]
    assert shot["name"] == "validation.png" and shot["png_base64"]
    assert events[-1]["output_dir"] == str(tmp_path / "out") and events[-1]["images"]
    assert all(TOKEN.encode() not in body for _, _, body in receiver.got)


def test_a_failure_is_reported_with_its_exit_code(tiny_model, tmp_path, receiver):
    r = run(tiny_model, tmp_path, receiver.url + "/hook", learning_rate=1e30, max_grad_norm=0)
    assert r.returncode == 5
    last = json.loads(receiver.got[-1][2])
    assert last["event"] == "failed" and last["exit_code"] == 5 and "diverged" in last["text"]


def test_discord_urls_get_discords_format(tiny_model, tmp_path, receiver):
    r = run(tiny_model, tmp_path, receiver.url + "/api/webhooks/123/abc", max_train_steps=2)
    assert r.returncode == 0, r.stderr[-2000:]
    path, ctype, body = receiver.got[1]  # the step-0 validation round
    assert path == "/api/webhooks/123/abc" and ctype.startswith("multipart/form-data")
    msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
    assert "validation" in json.loads(parts["payload_json"].get_content())["content"]
    assert parts["files[0]"].get_filename() == "validation.png"
    assert parts["files[0]"].get_content()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unreachable_webhook_never_stops_training(tiny_model, tmp_path):
    r = run(tiny_model, tmp_path, "http://127.0.0.1:9/hook", max_train_steps=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "webhook" in r.stderr and "not delivered" in r.stderr
