"""The run's final files in OUTPUT_DIR, each written under a temporary name and renamed."""
from __future__ import annotations

import json
import os
from pathlib import Path

ADAPTER_FILE = "pytorch_lora_weights.safetensors"


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_run_files(out: Path, lycoris_config: dict, training_config: dict) -> None:
    write_json(out / "lycoris_config.json", lycoris_config)
    write_json(out / "training_config.json", training_config)


def loss_series(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """loss and eval_loss by step from metrics.jsonl, for the loss plot."""
    series: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": []}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        for k in series:
            if k in row:
                series[k].append((row["step"], row[k]))
    return {k: v for k, v in series.items() if v}
