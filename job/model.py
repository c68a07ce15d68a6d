"""Load the AuraFlow components, set precision and quantisation, wrap the transformer with LyCORIS.

Knows nothing of datasets: it turns a model folder and settings into modules ready to train.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from job.config import Settings, grid_problems, tokenizer_max_length
from job.errors import ConfigError
from job.precision import BASE_PRECISIONS, MIXED_PRECISIONS, quantised_alternatives

log = logging.getLogger("job")

TOKENIZER_UNSET = 10**7  # transformers writes int(1e30) as model_max_length when a tokenizer declares no limit


@dataclass(frozen=True)
class Grid:
    """What the model's own small config files say about the sizes it accepts."""

    patch_size: int
    pos_embed_max_size: int
    vae_scale_factor: int
    latent_channels: int

    @property
    def pixel_step(self) -> int:  # image sides must be multiples of this
        return self.patch_size * self.vae_scale_factor


def read_grid(model_dir: Path) -> Grid:
    transformer = json.loads((model_dir / "transformer" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    return Grid(transformer["patch_size"], transformer["pos_embed_max_size"],
                2 ** (len(vae["block_out_channels"]) - 1), vae["latent_channels"])


def resolution_problems(settings: Settings, grid: Grid, resolutions: list[int]) -> list[str]:
    """`resolutions`: each dataset's; a square bucket for both types (data.py clamps other aspects to the grid)."""
    return grid_problems({"RESOLUTION": [(r, r) for r in resolutions],
                          "VALIDATION_RESOLUTION": list(settings.validation.validation_resolution)},
                         patch_size=grid.patch_size, pos_embed_max_size=grid.pos_embed_max_size,
                         vae_scale_factor=grid.vae_scale_factor, exact=("VALIDATION_RESOLUTION",))


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_problems(settings: Settings, device: torch.device) -> list[str]:
    """Settings that need hardware this machine lacks: refused before anything loads."""
    problems = []
    training, memory = settings.training, settings.memory
    base = BASE_PRECISIONS[training.base_model_precision]
    if device.type != "cuda":
        if training.optimizer.endswith("-paged"):
            problems.append(f"OPTIMIZER={training.optimizer}: paged optimizers need a CUDA GPU; "
                            "use the non-paged form on this machine")
        if base.needs_cuda:
            problems.append(f"BASE_MODEL_PRECISION={base.name} needs a CUDA GPU; use "
                            f"{quantised_alternatives(lambda p: not p.needs_cuda)} here")
        if (memory.enable_group_offload and memory.group_offload_to_disk_path and training.mixed_precision == "bf16"
                and not base.cpu_bf16_from_disk):
            problems.append(f"GROUP_OFFLOAD_TO_DISK_PATH with BASE_MODEL_PRECISION={base.name} "
                            "and MIXED_PRECISION=bf16 crashes torch's CPU kernels: on a machine without CUDA use "
                            "MIXED_PRECISION=no, or offload to RAM")
    return problems


def train_dtype(settings: Settings) -> torch.dtype:
    return getattr(torch, MIXED_PRECISIONS[settings.training.mixed_precision].dtype)


def load_text_encoder(model_dir: Path, device: torch.device):
    """The pipeline's own encode_prompt (tokenizer length, padding, masking) with only what it needs loaded."""
    from diffusers import AuraFlowPipeline

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = AuraFlowPipeline.from_pretrained(model_dir, transformer=None, vae=None, dtype=dtype)
    pipe.text_encoder.to(device).eval().requires_grad_(False)
    return pipe


@torch.no_grad()
def encode_prompts(text_pipe, prompts: list[str], device: torch.device, max_length: int) -> torch.Tensor:
    """(len(prompts), max_length, dim): each prompt truncated or padded to `max_length` tokens (TOKENIZER_MAX_LENGTH),
    as the pipeline's encode_prompt does at inference with max_sequence_length."""
    embeds, _, _, _ = text_pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                              max_sequence_length=max_length)
    return embeds


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Tokens of each text as the pipeline's tokenizer makes them (with the end-of-sequence token), untruncated."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []


def text_limit(config_dir: Path) -> tuple[int, str] | None:
    """(the longest token sequence the text encoder declares it takes, where it says so), from the small config
    files (read before any weights move); None when neither the tokenizer nor the encoder declares one (T5's
    relative positions have no fixed table)."""
    for rel, keys in (("tokenizer/tokenizer_config.json", ("model_max_length",)),
                      ("text_encoder/config.json", ("max_position_embeddings", "n_positions"))):
        try:
            cfg = json.loads((config_dir / rel).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in keys:
            value = cfg.get(key) if isinstance(cfg, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value < TOKENIZER_UNSET:
                return value, f"{rel} {key}"
    return None


def text_length_problems(settings: Settings, config_dir: Path) -> list[str]:
    """TOKENIZER_MAX_LENGTH (or the flavour's default) beyond what the model's text encoder declares."""
    limit = text_limit(config_dir)
    length = tokenizer_max_length(settings)
    if limit is None or length <= limit[0]:
        return []
    given = (f"TOKENIZER_MAX_LENGTH={length}" if settings.data.tokenizer_max_length else
             f"TOKENIZER_MAX_LENGTH (MODEL_FLAVOUR={settings.model.model_flavour}'s default {length})")
    return [f"{given}: this model's text encoder takes at most {limit[0]} tokens ({limit[1]}); set "
            f"TOKENIZER_MAX_LENGTH={limit[0]} or lower"]


def release(device: torch.device) -> None:
    """After a model is dropped: collect it (diffusers' modules hold reference cycles) and hand its cached GPU
    memory back, so the next model's allocations and `check`'s estimate start from what is really in use."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_vae(model_dir: Path, device: torch.device):
    """fp32, or bf16 on CUDA; never fp16: the SDXL-family VAE overflows in fp16."""
    from diffusers import AutoencoderKL

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=dtype).to(device).eval().requires_grad_(False)


def load_scheduler(model_dir: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")


def load_transformer(model_dir: Path, settings: Settings, device: torch.device):
    """The frozen base transformer at its training precision, quantised if asked. On `device`, or on the CPU
    when group offloading will move it block by block (`offload_transformer`, after the adapter is applied)."""
    from diffusers import AuraFlowTransformer2DModel

    training, memory = settings.training, settings.memory
    base = BASE_PRECISIONS[training.base_model_precision]
    dtype = train_dtype(settings)
    kwargs = {}
    if base.library == "bnb":  # quantised while loading, and placed on the GPU by bitsandbytes
        from diffusers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=base.weight_type,
                                                           bnb_4bit_compute_dtype=dtype)
    transformer = AuraFlowTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", dtype=dtype,
                                                             **kwargs)
    transformer.requires_grad_(False)
    if base.library == "quanto":
        # on the GPU unless QUANTIZE_VIA=cpu; group offloading always quantises there, its payload packed for the
        # device's kernels (offload.expose_quantized_payload)
        on = device if training.quantize_via == "accelerator" or memory.enable_group_offload else torch.device("cpu")
        quantize_blocks(transformer, base.name, on, keep=not memory.enable_group_offload,
                        expose=memory.enable_group_offload)
    if memory.enable_group_offload:
        transformer.to("cpu")
    elif base.movable:
        transformer.to(device)
        if memory.enable_model_cpu_offload and base.library == "quanto":
            from job import offload

            offload.expose_quantized_payload(transformer)  # on the device: the payload keeps that device's packing
    if checkpointing(settings):
        if not training.gradient_checkpointing:
            log.warning("ENABLE_GROUP_OFFLOAD=true turns on GRADIENT_CHECKPOINTING: without it autograd keeps every "
                        "block's weights until the backward, and offloading would save nothing")
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return transformer


def checkpointing(settings: Settings) -> bool:
    """GRADIENT_CHECKPOINTING, or group offloading, which needs it (see load_transformer)."""
    return settings.training.gradient_checkpointing or settings.memory.enable_group_offload


def use_stream(settings: Settings, device: torch.device) -> bool:
    """GROUP_OFFLOAD_USE_STREAM resolved: auto is on with CUDA when the grouping allows prefetching one block at a
    time in RAM. Without the stream every block is copied to the GPU and back synchronously, twice a step; disk
    spill and CPU-only machines keep that path."""
    memory = settings.memory
    if memory.group_offload_use_stream is not None:
        return memory.group_offload_use_stream
    return (device.type == "cuda" and memory.enable_group_offload and memory.group_offload_type == "block_level"
            and memory.group_offload_blocks_per_group == 1 and not memory.group_offload_to_disk_path)


def offload_transformer(transformer, network, settings: Settings, device: torch.device, model_dir: Path):
    """ENABLE_GROUP_OFFLOAD: the base transformer's weights move to `device` a group at a time (the adapter's
    never move). Returns the GroupOffload; its close() removes the run's disk folder."""
    from job import offload

    fingerprint = hashlib.sha256(json.dumps([str(Path(model_dir).resolve()), settings.training.base_model_precision,
                                             settings.training.mixed_precision]).encode()).hexdigest()[:12]
    m = settings.memory
    policy = offload.Policy(m.group_offload_type, m.group_offload_blocks_per_group, use_stream(settings, device),
                        m.group_offload_to_disk_path)
    off = offload.apply(transformer, network, device, policy, fingerprint)
    log.info("group offload: %d groups (%s, %d block(s) per group%s), to %s", len(off.groups),
             m.group_offload_type, m.group_offload_blocks_per_group,
             (", stream prefetch" + (" (GROUP_OFFLOAD_USE_STREAM=auto: on with CUDA)"
                                     if m.group_offload_use_stream is None else "")) if off.stream else "",
             off.folder.path if off.folder else "CPU memory")
    return off


def quantize_blocks(transformer: torch.nn.Module, precision: str, device: torch.device, *, keep: bool,
                    expose: bool) -> None:
    """Quantise one block at a time on `device`: never the whole bf16 model there, and each block's freed bf16
    memory is what the next block reuses, so the CUDA allocator is not left holding fragments of the bf16 model
    (reserved memory near the bf16 size while only the int8 one is in use). `keep`: blocks stay on `device`, else
    back to the CPU (group offloading moves them itself). `expose`: the payload as plain parameters, packed as
    `device`'s kernels expect (offload.expose_quantized_payload: for moving the weights). The same weights as
    quantize_quanto on the whole model, which leaves the non-block layers unquantised too."""
    from job import offload

    for block in offload.blocks(transformer):
        block.to(device)
        quantize_quanto(block, precision)
        if expose:
            offload.expose_quantized_payload(block)
        if not keep:
            block.to("cpu")


def quantize_quanto(transformer: torch.nn.Module, precision: str) -> None:
    import optimum.quanto
    from optimum.quanto import freeze, quantize

    # Embeddings, norms and the output projection are small and sensitive; quantise the block Linears.
    quantize(transformer, weights=getattr(optimum.quanto, BASE_PRECISIONS[precision].weight_type),
             exclude=["pos_embed*", "time_step*", "context_embedder", "norm_out*", "proj_out"])
    freeze(transformer)
    # quanto's freeze() creates new weight Parameters with requires_grad=True: freeze the base again.
    transformer.requires_grad_(False)


@contextlib.contextmanager
def _lycoris_preset(preset: dict):
    """LycorisNetwork.apply_preset writes class attributes; scope them to one network creation."""
    from lycoris import LycorisNetwork

    names = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
             "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {n: getattr(LycorisNetwork, n) for n in names}
    try:
        if preset:
            LycorisNetwork.apply_preset(preset)
        yield
    finally:
        for n, v in saved.items():
            setattr(LycorisNetwork, n, v)


def adapter_check(model_dir: Path, lycoris_config: dict):
    """(problems, trainable parameter count, the transformer's ModelSize): the LyCORIS network built over a
    weightless (meta) transformer, so a bad preset fails in a second, before any weights move."""
    from accelerate import init_empty_weights
    from diffusers import AuraFlowTransformer2DModel

    with init_empty_weights():
        shell = AuraFlowTransformer2DModel.from_config(AuraFlowTransformer2DModel.load_config(model_dir / "transformer"))
        size = model_size(shell, read_grid(model_dir))
        try:
            network = _lycoris_network(shell, lycoris_config)
        except ConfigError as e:
            return e.problems, 0, size
        except (TypeError, ValueError) as e:
            return [f"LYCORIS_CONFIG: lycoris rejected it: {e}"], 0, size
    # before apply_to() the LoKr modules are not yet registered on the network: count them directly
    return [], sum(p.numel() for lora in network.loras for p in lora.parameters()), size


def model_size(transformer: torch.nn.Module, grid: Grid):
    """Parameter counts for the memory estimate (works on a meta-device shell)."""
    from job.memory import ModelSize
    from job.offload import blocks as transformer_blocks

    blocks = transformer_blocks(transformer)
    linear = [sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in blocks]
    total = [sum(p.numel() for p in b.parameters()) for b in blocks]
    cfg = transformer.config
    numels = [p.numel() for b in blocks for p in b.parameters()]
    pinned = sum(1 << (n - 1).bit_length() for n in numels) / max(1, sum(numels))
    return ModelSize(outside=sum(p.numel() for p in transformer.parameters()) - sum(total),
                     block_linear=tuple(linear), block_other=tuple(tot - lin for tot, lin in zip(total, linear)),
                     hidden=cfg.num_attention_heads * cfg.attention_head_dim,
                     patch_size=grid.patch_size, vae_scale_factor=grid.vae_scale_factor, pinned_ratio=pinned)


def memory_estimate(settings: Settings, size, adapter_params: int, resolution: int, device: torch.device):
    from job.memory import estimate

    training, memory = settings.training, settings.memory
    return estimate(size, adapter_params, precision=training.base_model_precision,
                    mixed_precision=training.mixed_precision, optimizer=training.optimizer, resolution=resolution,
                    batch=training.train_batch_size, text_tokens=tokenizer_max_length(settings),
                    checkpointing=checkpointing(settings),
                    group_offload=memory.enable_group_offload, offload_type=memory.group_offload_type,
                    blocks_per_group=memory.group_offload_blocks_per_group, stream=use_stream(settings, device))


def host_memory_estimate(settings: Settings, size, device: torch.device):
    from job.memory import host_estimate

    training, memory = settings.training, settings.memory
    return host_estimate(size, precision=training.base_model_precision, mixed_precision=training.mixed_precision,
                         device=device.type, group_offload=memory.enable_group_offload,
                         stream=use_stream(settings, device), to_disk=bool(memory.group_offload_to_disk_path))


def create_adapter(transformer: torch.nn.Module, lycoris_config: dict, dtype: torch.dtype,
                   device: torch.device | None = None):
    """A LyCORIS network over the transformer, applied and trainable, on `device` (default: the transformer's)."""
    network = _lycoris_network(transformer, lycoris_config, bypass=dtype != torch.float32)
    network.apply_to()
    network.to(device=device or next(transformer.parameters()).device, dtype=dtype)
    network.requires_grad_(True)
    return network


def _lycoris_network(transformer: torch.nn.Module, lycoris_config: dict, bypass: bool = True):
    """create_lycoris with the config's preset scoped to this call; errors name what it could target. `bypass`: the
    default form of the adapted layers' forward, unless the config names one."""
    from lycoris import create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # set on import; its per-module lines bury ours
    cfg = dict(lycoris_config)
    # Bypass mode computes y = Wx + ΔW·x. LyCORIS's default for a plain Linear rebuilds the weight instead,
    # ((W + ΔW) - W)·x in the weight's dtype, which in bf16 drops every update below half an ulp of W: the forward
    # ignores a young adapter while its gradients still flow. In fp32 the two agree (to 1e-7 relative), and on a CPU
    # with small layers the rebuild is faster. Quantised layers get bypass anyway. The saved adapter is the same
    # either way. DoRA (dora_wd) has no bypass form.
    cfg.setdefault("bypass_mode", bypass and str(cfg.get("dora_wd", False)).lower() == "false")  # lycoris' str_bool
    preset = cfg.pop("apply_preset", {})
    multiplier = float(cfg.pop("multiplier", 1.0))
    linear_dim = cfg.pop("linear_dim", 4)
    linear_alpha = cfg.pop("linear_alpha", 1)
    with _lycoris_preset(preset):
        try:
            network = create_lycoris(transformer, multiplier, linear_dim, linear_alpha, **cfg)
        except KeyError as e:  # lycoris' own complaint about an unknown preset key
            raise ConfigError([f"LYCORIS_CONFIG: {e.args[0]}"]) from None
    if not network.loras:
        raise ConfigError([f"LYCORIS_CONFIG: apply_preset targets no module of this model; module classes "
                           f"that hold Linear layers: {', '.join(targetable_classes(transformer))}"])
    return network


def targetable_classes(model: torch.nn.Module) -> list[str]:
    names = {type(m).__name__ for m in model.modules()
             if any(isinstance(c, torch.nn.Linear) for c in m.children())
             and not isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential))}
    return sorted(names)


def adapter_metadata(lycoris_config: dict) -> dict[str, str]:
    return {"lycoris_config": json.dumps(lycoris_config)}


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] → the scaled latents the transformer trains on (the pipeline divides by the same factor)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return (dist.mean * vae.config.scaling_factor).float().cpu()


def save_adapter(network, path: Path, lycoris_config: dict) -> None:
    """Write via a temporary name so a crash never leaves a torn adapter under the final name."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # keeps the suffix: lycoris picks the format by it
    try:
        network.save_weights(str(tmp), None, adapter_metadata(lycoris_config))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no torn temporary file behind
        raise
