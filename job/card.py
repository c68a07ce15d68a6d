"""The model card (README.md): Hub metadata and a body with an inference snippet that works as written."""
from __future__ import annotations

import json
from pathlib import Path

from job.config import Settings, tokenizer_max_length
from job.log import redact
from job.outputs import ADAPTER_FILE, comfyui_file

SNIPPET = '''```python
import torch
from diffusers import AuraFlowPipeline
from huggingface_hub import hf_hub_download
from lycoris import create_lycoris_from_weights

pipe = AuraFlowPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16)
adapter = hf_hub_download("{repo}", "{adapter}")
wrapper, _ = create_lycoris_from_weights(1.0, adapter, pipe.transformer)
wrapper.merge_to()
pipe.to("cuda" if torch.cuda.is_available() else "cpu")

image = pipe(
    {prompt!r},
    negative_prompt={negative!r},
    num_inference_steps={steps},
    guidance_scale={guidance},
    width={width},
    height={height},
    max_sequence_length={max_length},
    generator=torch.Generator("cpu").manual_seed({seed}),
).images[0]
image.save("output.png")
```'''


def render(s: Settings, *, repo: str, model_commit: str | None, datasets: list[tuple[str, str | None]],
           samples: list[tuple[str, str]], steps_done: int, regularisation: tuple[str, ...] = ()) -> str:
    """`samples`: (path relative to the card, prompt) of the final validation images; `regularisation`: the
    datasets (refs) that were regularisation data."""
    from huggingface_hub import ModelCard, ModelCardData

    v, t = s.validation, s.training
    on_hub = not Path(s.model_id).expanduser().is_dir()  # a local base model has no Hub page to link
    data = ModelCardData(
        base_model=s.model_id if on_hub else None, base_model_relation="adapter" if on_hub else None, library_name="diffusers", license="other",
        tags=["auraflow", "lycoris", "lokr", "text-to-image", "diffusers", "template:sd-lora"],
        pipeline_tag="text-to-image", instance_prompt=s.data.instance_prompt or None,
        widget=[{"text": prompt, "output": {"url": path}} for path, prompt in samples] or None,
    )
    w, h = v.validation_resolution[0]
    prompt = samples[0][1] if samples else (v.validation_prompt or s.data.instance_prompt or "a photo")
    lines = [
        f"# {repo.split('/')[-1]}", "",
        f"A LyCORIS {s.adapter.lycoris_config.get('algo', 'lokr')} adapter for "
        + (f"[{s.model_id}](https://huggingface.co/{s.model_id})" if on_hub else f"`{s.model_id}`")
        + f", trained for {steps_done} steps.", "",
        "## Trained on", "",
        *[f"- `{ref}`" + (f" at `{rev}`" if rev else "")
          + (": regularisation data (the adapter was held to the base model's own predictions on it)"
             if ref in regularisation else "") for ref, rev in datasets],
        f"- base model `{s.model_id}`" + (f" at `{model_commit}`" if model_commit else ""), "",
        "## Settings", "",
        "| setting | value |", "| --- | --- |",
        *[f"| {k} | `{val}` |" for k, val in (
            ("learning rate", t.learning_rate), ("optimizer", t.optimizer), ("scheduler", t.lr_scheduler),
            ("batch size", t.train_batch_size), ("gradient accumulation", t.gradient_accumulation_steps),
            ("mixed precision", t.mixed_precision), ("base precision", t.base_model_precision),
            ("resolution", f"{s.data.resolution} ({s.data.resolution_type})"), ("EMA", t.use_ema),
            ("LyCORIS config", json.dumps(s.adapter.lycoris_config)))], "",
        "## Samples", "",
        *[f"![{prompt}]({path})" for path, prompt in samples],
        "" if samples else "No validation images were rendered.", "",
        "Progress over training: `samples/grid.png` (prompts × rounds) and `loss.png`.", "",
        *files(s, repo),
        "## Inference with diffusers", "",
        SNIPPET.format(base=s.model_id, repo=repo, adapter=ADAPTER_FILE, prompt=prompt,
                       negative=v.validation_negative_prompt, steps=v.validation_num_inference_steps,
                       guidance=v.validation_guidance, width=w, height=h, seed=v.validation_seed,
                       max_length=tokenizer_max_length(s)),
        *comfyui_steps(s, repo),
    ]
    text = redact(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n", s.secrets())
    ModelCard(text, ignore_metadata_errors=False)  # parses the metadata block back: a malformed card fails here
    return text


def files(s: Settings, repo: str) -> list[str]:
    lines = ["## Files", "",
             f"- `{ADAPTER_FILE}`: the LyCORIS file, for diffusers with LyCORIS (below) and tools that read LyCORIS's "
             "own key names."]
    if s.output.export_comfyui:
        lines.append(f"- `{comfyui_file(repo)}`: the same adapter (same tensors and metadata) with the key names "
                     f"ComfyUI loads for AuraFlow (`transformer.<module path>`); ComfyUI skips every key of "
                     f"`{ADAPTER_FILE}`.")
    return [*lines, ""]


def comfyui_steps(s: Settings, repo: str) -> list[str]:
    if not s.output.export_comfyui:
        return []
    return ["", "## Inference with ComfyUI", "",
            f"1. Download `{comfyui_file(repo)}` from this repo into `ComfyUI/models/loras/`.",
            f"2. Load the base model you trained on (`{s.model_id}`, ComfyUI's checkpoint of it) as usual, add a "
            "`LoraLoaderModelOnly` node between its MODEL output and the sampler, and pick the file as `lora_name`.",
            "3. `strength_model` is the adapter's strength: 1.0 is the trained effect (what `merge_to()` applies "
            "above), lower weakens it. The adapter changes only the transformer, so no CLIP strength applies."]


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
