"""The run's final files in OUTPUT_DIR, each written under a temporary name and renamed."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from job import config
from job.errors import ConfigError

ADAPTER_FILE = "pytorch_lora_weights.safetensors"


def comfyui_file(repo: str) -> str:
    """The ComfyUI copy's name, after the output repo (or OUTPUT_DIR's folder): ComfyUI lists LoRAs by file name,
    where a second `pytorch_lora_weights` would say nothing."""
    return f"{repo.rstrip('/').split('/')[-1] or 'adapter'}_comfyui.safetensors"


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no torn temporary file behind
        raise


def write_run_files(out: Path, lycoris_config: dict, training_config: dict) -> None:
    write_json(out / "lycoris_config.json", lycoris_config)
    write_json(out / "training_config.json", training_config)


def loss_series(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """loss, eval_loss and lr by step from metrics.jsonl, for the loss plot."""
    series: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": [], "lr": []}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        for k in series:
            if row.get(k) is not None:  # skipped (non-finite) steps carry no loss
                series[k].append((row["step"], row[k]))
    return {k: v for k, v in series.items() if v}


COMPLETION = "completed.json"
# Settings that change how a run is carried out or reported, not what it produces.
OPERATIONAL = {"output_dir", "hub_retries", "report_to", "tracker_project_name", "tracker_run_name", "webhook_url",
               "pod_action_on_success", "pod_action_on_failure", "hf_home", "hf_endpoint", "wandb_mode",
               "num_processes", "resume_from_checkpoint", "push_checkpoints_to_hub", "vae_batch_size", "profile",
               "download_stall_timeout", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
               "rendezvous_timeout"}


def result_settings(public: dict) -> dict:
    return {k: v for k, v in sorted(public.items()) if k not in OPERATIONAL}


def finished_run(out: Path, public: dict) -> dict | None:
    """The completion record when `out` holds a run finished with these settings; None when it holds no finished
    run; a ConfigError (exit 2, nothing touched) when it holds one finished with other settings."""
    path = out / COMPLETION
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    now = result_settings(public)
    # A record written by an older version lacks the settings added since: at their defaults they change nothing.
    # One this version no longer has cannot be set, so cannot differ.
    then = {**{k: config.public_default(k) for k in now.keys() - record["settings"].keys() if k in config.SPEC_BY_NAME},
            **{k: v for k, v in record["settings"].items() if k in now}}
    changed = sorted(k for k in now if now[k] != then.get(k))
    if changed:
        raise ConfigError([f"OUTPUT_DIR={out} holds a finished run with other settings ({', '.join(changed)}); "
                           "its files are left as they are: start a new run with a new OUTPUT_DIR"])
    return record


def write_completion(out: Path, public: dict, pushed: str | None, pod_action: str) -> dict:
    """`pod_action_done` stays false until the platform said yes, so a restart repeats a failed pod action."""
    adapter = out / ADAPTER_FILE
    record = {"settings": result_settings(public), "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest(),
              "pushed": pushed, "pod_action": pod_action, "pod_action_done": pod_action == "none"}
    write_json(out / COMPLETION, record)
    return record


def mark_pod_action_done(out: Path) -> None:
    record = json.loads((out / COMPLETION).read_text())
    write_json(out / COMPLETION, {**record, "pod_action_done": True})
