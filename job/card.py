"""The model card (README.md): Hub metadata and a body with an inference snippet that works as written."""
from __future__ import annotations

import json
from pathlib import Path

from job.config import Settings, mask_secrets, tokenizer_max_length

SNIPPET = '''```python
import torch
from diffusers import AuraFlowPipeline
from huggingface_hub import hf_hub_download
from lycoris import create_lycoris_from_weights

pipe = AuraFlowPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16)
adapter = hf_hub_download("{repo}", "pytorch_lora_weights.safetensors")
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
           samples: list[tuple[str, str]], steps_done: int) -> str:
    """`samples`: (path relative to the card, prompt) of the final validation images."""
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
        *[f"- `{ref}`" + (f" at `{rev}`" if rev else "") for ref, rev in datasets],
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
        "## Inference", "",
        SNIPPET.format(base=s.model_id, repo=repo, prompt=prompt, negative=v.validation_negative_prompt,
                       steps=v.validation_num_inference_steps, guidance=v.validation_guidance, width=w, height=h,
                       seed=v.validation_seed, max_length=tokenizer_max_length(s)),
    ]
    text = mask_secrets(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n", s.secrets())
    ModelCard(text, ignore_metadata_errors=False)  # parses the metadata block back: a malformed card fails here
    return text


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
