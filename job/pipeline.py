"""The run as a short story: preflight → pull → data → model → train → outputs.

Each phase is one call into the module that owns it; this file decides only the order.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from job import builtin, card, checkpoint, cloud, comfyui, data, disk, hub, memory, model, outputs, sample, webhook
from job.cache import TensorCache, component_identity
from job.config import Settings, datasets
from job.distributed import SINGLE, Context, Ranks, started
from job.errors import ConfigError, DataError, Interrupted, JobError
from job.log import MetricsSink, NullSink, StatusFile, Tracker, make_tracker, quiet_libraries
from job.signals import StopFlag
from job.train import Trainer, eval_loss

log = logging.getLogger("job")

VOLUME = Path("/workspace")  # where RunPod and Vast.ai mount the persistent volume
UPLOAD_GRACE_S = 60.0  # how long the end of a run waits for a checkpoint upload still in flight

# LoKr over every Linear of the transformer: the seed's Attention-only preset barely moves a tiny model.
DEMO_LYCORIS = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4,
                "apply_preset": {"target_module": ["AuraFlowTransformer2DModel"]}}


def demo_layers(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(defaults the user may override, settings the demo forces) for `demo`."""
    size = str(builtin.TINY_RESOLUTION)
    defaults = {
        "output_dir": "./output/demo", "resolution": size, "resolution_type": "pixel", "crop": "true",
        "max_train_steps": "300", "train_batch_size": "4", "learning_rate": "3e-3", "optimizer": "adamw",
        "mixed_precision": "no", "gradient_checkpointing": "false", "lycoris_config": json.dumps(DEMO_LYCORIS),
        "checkpoint_step_interval": "100", "flow_schedule_shift": "1.0",
        "validation_resolution": f"{size}x{size}", "validation_num_inference_steps": "8",
        "validation_step_interval": "100", "validation_guidance": "1.0", "eval_steps_interval": "25",
    }
    forced = {
        "model_id": str(builtin.tiny_model_dir(root)), "dataset_id": str(builtin.toy_dataset_dir(root)),
        "caption_strategy": "textfile", "data_backend_config": "", "push_to_hub": "false",
        "push_checkpoints_to_hub": "false",
    }
    return defaults, forced


def run(command: str, settings: Settings, creds: cloud.Credentials, ranks: Ranks | None = None) -> None:
    """`ranks`: this process's place among NUM_PROCESSES (for `check`, the layout a run would have; default: one
    process). Every rank runs this; rank 0 alone talks to the Hub and writes the outputs."""
    ranks = ranks or Ranks()
    out = Path(settings.output.output_dir)
    record = outputs.finished_run(out, settings.public_dict()) if command != "check" else None
    if record:
        if ranks.rank == 0:
            log.info("%s already holds this run, finished (%s); nothing to do", out, outputs.COMPLETION)
            if not record.get("pod_action_done", True):  # the pod action failed last time: try it again
                pod_action(record["pod_action"], creds, out)
        return
    quiet_libraries()
    if command == "check":
        preflight(settings, model.pick_device(), ranks.world)
        return
    with started(ranks, model.pick_device()) as ctx:
        geo = ctx.main_only(lambda: preflight(settings, ctx.device, ctx.world))
        if command == "demo":
            log.info("demo: tiny built-in AuraFlow, toy shapes, LoKr over all Linear layers (not the seed's "
                     "Attention-only preset, which cannot move a model this small)")
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
        status = StatusFile(out / "status.json" if ctx.is_main else None)
        notify = webhook.make(settings.output.webhook_url if ctx.is_main else "",
                              settings.output.hub_model_id or out.resolve().name)
        try:
            finish = train(settings, ctx, geo, status, notify)
        except JobError as e:
            if ctx.is_main:
                failed(e, settings, creds, status, notify)
            ctx.barrier()  # the others leave only once rank 0 has reported it (and uploaded the last checkpoint)
            raise
    if not ctx.is_main:
        return
    try:
        finish()  # rank 0 alone: the others are done
    except JobError as e:
        failed(e, settings, creds, status, notify)
        raise
    notify.close()
    pod_action(settings.cloud.pod_action_on_success, creds, out)


def failed(e: JobError, settings: Settings, creds: cloud.Credentials, status: StatusFile, notify) -> None:
    """Say so in status.json and the webhook, and stop the pod when asked to."""
    status.update(phase="interrupted" if isinstance(e, Interrupted) else "failed", last_error=str(e))
    notify.send("interrupted" if isinstance(e, Interrupted) else "failed", str(e).splitlines()[0],
                exit_code=e.exit_code)
    notify.close()
    if not isinstance(e, Interrupted) and settings.cloud.pod_action_on_failure == "stop":
        cloud.act("stop", creds)  # a signal means the platform is stopping us already


def pod_action(action: str, creds: cloud.Credentials, out: Path) -> None:
    """After the results are safely written and pushed, never before (terminate deletes the volume)."""
    if action != "none" and cloud.act(action, creds):
        outputs.mark_pod_action_done(out)


def preflight(s: Settings, device: torch.device, processes: int = 1) -> model.Geometry:
    """Everything that can be refused before weights move: Hub access, device needs, the model's patch grid."""
    problems = model.device_problems(s, device)
    if problems:
        raise ConfigError(problems)
    o, specs = s.output, datasets(s)[0]
    hub.preflight(token=s.access.hf_token, model=(s.model_id, s.model.model_revision),
                  datasets=[(spec.source, s.data.dataset_revision) for spec in specs],
                  output_repo=o.hub_model_id if o.push_to_hub else None, attempts=o.hub_retries)
    config_dir = hub.model_configs(s.model_id, s.model.model_revision, s.access.hf_token, o.hub_retries)
    geo = model.read_geometry(config_dir)
    problems += model.geometry_problems(s, geo, [spec.resolution for spec in specs])
    adapter_problems, adapter_params, size = model.adapter_check(config_dir, s.adapter.lycoris_config)
    problems += adapter_problems
    if not problems:
        needs = disk_needs(s, specs, adapter_params, size)
        problems += disk.problems(needs)
        for warning in disk.placement_warnings(needs, VOLUME if os.path.ismount(VOLUME) else None):
            log.warning("%s", warning)
    if problems:
        raise ConfigError(problems)
    t = s.training
    log.info("plan: %s → LoKr (%s), %s × batch %d × accumulation %d × %d process%s = effective batch %d on %s, %s, "
             "base %s; output %s%s", s.model_id, s.adapter.lycoris_config.get("algo"),
             f"{t.max_train_steps} steps" if t.max_train_steps else f"{t.num_train_epochs} epochs", t.train_batch_size,
             t.gradient_accumulation_steps, processes, "es" if processes > 1 else "",
             t.train_batch_size * t.gradient_accumulation_steps * processes, device.type, t.mixed_precision,
             t.base_model_precision, s.output.output_dir, f", push to {s.output.hub_model_id}" if s.output.push_to_hub else "")
    report_memory(s, device, size, adapter_params, max(spec.resolution for spec in specs), processes)
    return geo


def report_memory(s: Settings, device: torch.device, size, adapter_params: int, resolution: int,
                  processes: int = 1) -> None:
    """The predicted peak accelerator memory and host RAM, with a warning where they exceed what this machine has."""
    m = s.memory
    est = model.memory_estimate(s, size, adapter_params, resolution, device)
    offload = (f"group offload {m.group_offload_type}" + (", stream" if model.use_stream(s, device) else "")
               if m.enable_group_offload else "model CPU offload" if m.enable_model_cpu_offload else "no offload")
    log.info("memory: %s at %d px, batch %d, %s", est.describe(), resolution, s.training.train_batch_size, offload)
    if device.type == "cuda":
        total = torch.cuda.mem_get_info()[1]
        if est.total > total:
            log.warning("memory: the estimate exceeds this GPU's %.1f GiB; expect out-of-memory. Lower it with "
                        "BASE_MODEL_PRECISION=int8-quanto, ENABLE_GROUP_OFFLOAD=true, GRADIENT_CHECKPOINTING=true or "
                        "a smaller RESOLUTION / TRAIN_BATCH_SIZE", total / 2**30)
    host = model.host_memory_estimate(s, size, device)
    log.info("memory: %s%s", host.describe(), f" per process, {processes} processes" if processes > 1 else "")
    ram = memory.machine_ram_bytes()
    if ram and host.total * processes > ram:
        # loading holds the dense transformer whatever the offload settings; only the training share can move to disk
        remedy = ("GROUP_OFFLOAD_TO_DISK_PATH (offloaded weights on a local disk instead of RAM), " if host.train > host.load
                  else "")
        log.warning("memory: the host RAM estimate (%.1f GiB) exceeds this machine's %.1f GiB; expect the job to be "
                    "killed while %s. Use %sa machine with more RAM, or fewer processes",
                    host.total * processes / 2**30, ram / 2**30,
                    "training" if host.train > host.load else "loading the transformer", remedy)


def train(s: Settings, ctx: Context, geo: model.Geometry, status: StatusFile, notify) -> Callable[[], None]:
    """Every rank: pull (rank 0 alone), cache (each rank its share), train. Returns what rank 0 does next, alone:
    publishing the results."""
    out = Path(s.output.output_dir)
    device = ctx.device
    stop = StopFlag().install()
    t = s.training
    o = s.output
    status.update(phase="download")
    pulled = ctx.main_only(lambda: hub.pull_model(s.model_id, s.model.model_revision, s.access.hf_token, o.hub_retries))
    model_dir = pulled.path

    # data: every dataset discovered, latents and text embeddings cached (encoders freed after)
    samples, cache_dirs, text_dir, sources = gather_samples(s, geo, out, ctx)
    status.update(phase="caching")
    t0 = time.monotonic()
    samples, latents_of = cache_latents(model_dir, samples, cache_dirs, s.data.vae_batch_size, device, ctx)
    plan = data.make_plan(samples, t.train_batch_size, t.seed, ctx.world)
    fallback = samples[0].captions[0]  # validation prompt when none is configured
    text_cache, text_keys = cache_text(model_dir, samples, sample.prompts_to_cache(s, fallback), text_dir, device,
                                       ctx)
    log.info("caching done in %.1fs", time.monotonic() - t0)
    fetch = data.batch_fetcher(plan, latents_of, text_cache, text_keys, s.data.caption_dropout_probability,
                               ctx.rows(t.train_batch_size))

    # model: frozen base + LoKr (seeded, so a fresh run's adapter init is reproducible)
    total = t.max_train_steps or t.num_train_epochs * max(1, plan.batches_per_epoch // t.gradient_accumulation_steps)
    transformer = model.load_transformer(model_dir, s, device)  # each rank its own, on its own GPU
    torch.manual_seed(t.seed)
    network = model.create_adapter(transformer, s.adapter.lycoris_config, model.train_dtype(s), device)
    ctx.broadcast_params(list(network.parameters()))
    log.info("adapter: %d LyCORIS modules, %d trainable parameters", len(network.loras),
             sum(p.numel() for p in network.parameters() if p.requires_grad))
    # ENABLE_GROUP_OFFLOAD (each rank its own, in its own folder): the folder goes at exit, however the run ends
    offloaded = model.offload_transformer(transformer, network, s, device, model_dir) if s.memory.enable_group_offload \
        else None

    uploader = (hub.CheckpointUploader(o.hub_model_id, token=s.access.hf_token, private=o.hub_private,
                                       limit=s.checkpoints.checkpoints_total_limit, attempts=o.hub_retries)
                if o.push_checkpoints_to_hub and ctx.is_main else None)
    trainer = Trainer(transformer, network, fetch, t, total, geo.patch_size, device, model.train_dtype(s),
                      out / "checkpoints", s.checkpoints.checkpoint_step_interval,
                      s.checkpoints.checkpoints_total_limit, should_stop=stop, status=status,
                      on_checkpoint=lambda path: checkpointed(path, uploader, notify), dist=ctx)
    resume = ctx.main_only(lambda: readable(resume_point(s, out / "checkpoints")))  # rank 0 sets damaged ones aside
    if resume:
        trainer.resume(resume)
    validator, tracker = None, Tracker()
    if ctx.is_main:  # validation rounds and trackers: rank 0's, while the others wait (see Context.hook)
        validator = sample.Validator(s, out, transformer, model.load_vae(model_dir, device),
                                     model.load_scheduler(model_dir), lambda prompt: text_cache.get(text_keys[prompt]),
                                     device, fallback,
                                     park_vae=s.memory.offload_during_startup or s.memory.enable_model_cpu_offload,
                                     park_transformer=s.memory.enable_model_cpu_offload)
        tracker = make_tracker(o.report_to, out, s.public_dict(), o.tracker_project_name,
                               o.tracker_run_name or Path(o.hub_model_id or out.resolve()).name)
    rounds = s.validation.validation_step_interval if sample.validation_jobs(s, fallback) else 0
    trainer.hooks = [
        ctx.hook(every(s.validation.eval_steps_interval),
                 evaluator(s, trainer, samples, latents_of, text_cache, text_keys) if ctx.is_main else None),
        ctx.hook(every(rounds), lambda step: validate(trainer, validator, step, notify, tracker)),
    ]
    trainer.metrics = (MetricsSink(out / "metrics.jsonl", resume_step=trainer.step, tracker=tracker) if ctx.is_main
                       else NullSink())
    status.update(phase="training", step=trainer.step, total_steps=total)
    notify.send("started", f"training {s.model_id} on {', '.join(ref for ref, _ in sources)}: "
                           f"{len(samples)} images, steps {trainer.step}→{total}", step=trainer.step, total_steps=total)
    try:
        if trainer.step == 0 and s.validation.validation_step_interval:
            ctx.main_only(lambda: validate(trainer, validator, 0, notify, tracker))  # the base model, for comparison
        ctx.barrier()  # into the loop together: its collectives wait only minutes for a peer
        trainer.run()
    finally:
        trainer.metrics.close()
        if uploader:
            uploader.wait(timeout=UPLOAD_GRACE_S)  # a stopped pod gets its last checkpoint onto the Hub
    return functools.partial(publish, s, trainer, validator, pulled, sources, total, status, notify, offloaded)


def publish(s: Settings, trainer: Trainer, validator: sample.Validator, pulled: hub.Pulled, sources, total: int,
            status: StatusFile, notify, offloaded=None) -> None:
    """The adapter (EMA weights when on), final samples, loss plot, resolved settings, model card, push, and last
    the completion record."""
    out, o = Path(s.output.output_dir), s.output
    status.update(phase="sampling")
    with trainer.final_weights():
        model.save_adapter(trainer.network, out / outputs.ADAPTER_FILE, s.adapter.lycoris_config)
        final_images = validator.render(trainer.step, final=True)
    comfyui.write(out / outputs.ADAPTER_FILE, out / outputs.comfyui_file(o.hub_model_id or out.name),
                  trainer.transformer, enabled=o.export_comfyui)
    sample.plot_losses(outputs.loss_series(out / "metrics.jsonl"), out / "loss.png")
    resolved = {"resolved_total_steps": total, "model_commit": pulled.commit,
                "dataset_commits": {ref: commit for ref, commit in sources}}
    outputs.write_run_files(out, s.adapter.lycoris_config, {**s.public_dict(), **resolved})
    card.write(out / "README.md", card.render(s, repo=o.hub_model_id or out.name, model_commit=pulled.commit,
                                              datasets=sources, steps_done=trainer.step,
                                              samples=[(f"samples/{p.name}", prompt) for p, prompt in validator.finals()]))
    log.info("done: %s", out / outputs.ADAPTER_FILE)
    pushed = None
    if o.push_to_hub:
        status.update(phase="push")
        pushed = hub.push(out, o.hub_model_id, token=s.access.hf_token, private=o.hub_private,
                          attempts=o.hub_retries)
    if offloaded:
        offloaded.close()
    # last: a restart with these settings exits at once
    outputs.write_completion(out, s.public_dict(), pushed, s.cloud.pod_action_on_success)
    status.update(phase="done")
    notify.send("finished", f"done after {trainer.step} steps: {pushed or out}", final_images, url=pushed,
                output_dir=str(out))


def every(n: int) -> Callable[[int], bool]:
    return lambda step: n > 0 and step % n == 0


def disk_needs(s: Settings, specs, adapter_params: int, size) -> list[disk.Need]:
    """What this run will write where: model and dataset downloads, caches, checkpoints, samples."""
    o, r = s.output, s.output.hub_retries
    hf, out = hub.cache_folder(), Path(o.output_dir)
    needs = []
    if not hub.local_folder(s.model_id):
        pending, _ = hub.pending_download(s.model_id, s.model.model_revision, s.access.hf_token, "model",
                                          hub.MODEL_FILES, r)
        needs.append(disk.Need(hf, "model download", pending))
    for spec in specs:
        if folder := hub.local_folder(spec.source):
            images = sum(1 for p in folder.rglob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES)
        else:
            pending, files = hub.pending_download(spec.source, s.data.dataset_revision, s.access.hf_token, "dataset",
                                                  None, r)
            needs.append(disk.Need(hf, f"dataset {spec.source}", pending))
            images = sum(1 for f in files if Path(f).suffix.lower() in data.IMAGE_SUFFIXES)
        cache = Path(spec.cache_dir_vae) if spec.cache_dir_vae else out / "cache" / "vae"
        needs.append(disk.Need(cache, "latent cache", disk.latent_bytes(spec.resolution, images)))
        needs.append(disk.Need(out / "cache" / "text", "text-embedding cache", disk.text_bytes(images + 32)))
    if s.memory.enable_group_offload and s.memory.group_offload_to_disk_path:
        from job.memory import weight_bytes

        needs.append(disk.Need(Path(s.memory.group_offload_to_disk_path), "group offload files",
                               int(weight_bytes(size, s.training.base_model_precision, s.training.mixed_precision))))
    needs.append(disk.Need(out, "checkpoints", disk.checkpoint_bytes(adapter_params,
                                                                    s.checkpoints.checkpoints_total_limit)))
    return needs


def validate(trainer: Trainer, validator: sample.Validator, step: int, notify, tracker) -> None:
    with trainer.final_weights():  # with USE_EMA, rounds show the EMA weights, as the published adapter will
        files = validator.render(step)
    if files:
        tracker.images(step, files)
        notify.send("validation", f"samples at step {step}", files, step=step)


def checkpointed(path: Path, uploader, notify) -> None:
    if uploader:
        uploader.submit(path)
    notify.send("checkpoint", f"{path.name} saved", step=checkpoint.step_of(path), path=str(path))


def evaluator(s: Settings, trainer: Trainer, samples, latents_of, text_cache, text_keys) -> Callable[[int], dict]:
    """The stable eval loss on the first NUM_EVAL_IMAGES training images (every EVAL_STEPS_INTERVAL steps)."""
    if not s.validation.eval_steps_interval:
        return lambda step: {}
    batches = [(latents_of[i][0].get(latents_of[i][1]).unsqueeze(0),
                text_cache.get(text_keys[samples[i].captions[0]]).unsqueeze(0))
               for i in range(min(s.validation.num_eval_images, len(samples)))]
    return lambda step: {"eval_loss": eval_loss(trainer.transformer, batches, trainer.device, trainer.dtype)}


def gather_samples(s: Settings, geo: model.Geometry, out: Path, ctx: Context = SINGLE):
    """Every dataset pulled (by rank 0) and discovered with its own geometry: (samples, each one's latent cache
    folder, the text-embedding cache folder, (source, commit) of each dataset)."""
    specs, text_dir, _, warnings = datasets(s)
    for w in warnings if ctx.is_main else []:
        log.warning("%s", w)
    samples, cache_dirs, sources = [], [], []
    for spec in specs:
        pulled = ctx.main_only(lambda spec=spec: hub.pull_dataset(spec.source, s.data.dataset_revision,
                                                                  s.access.hf_token, s.output.hub_retries))
        folder = pulled.path
        sources.append((spec.source, pulled.commit))
        g = data.Geometry(spec.resolution, spec.resolution_type, spec.crop, spec.crop_style, spec.crop_aspect,
                          geo.pixel_step, int(geo.pos_embed_max_size ** 0.5) * geo.pixel_step)
        found = data.discover(folder, spec.caption_strategy, spec.instance_prompt, g, repeats=spec.repeats,
                              minimum_image_size=spec.minimum_image_size)
        samples += found
        cache_dirs += [Path(spec.cache_dir_vae) if spec.cache_dir_vae else out / "cache" / "vae"] * len(found)
    return samples, cache_dirs, Path(text_dir) if text_dir else out / "cache" / "text", sources


def cache_latents(model_dir: Path, samples, cache_dirs: list[Path], batch_size: int, device: torch.device,
                  ctx: Context = SINGLE):
    """(the samples whose images decoded, their index → (cache, key)). The VAE lives only inside this call:
    loaded once, used for what the caches lack, freed on return. Each rank encodes its share."""
    vae = model.load_vae(model_dir, device)
    identity = component_identity(model_dir, "vae")
    latents_of = {}
    for folder in dict.fromkeys(cache_dirs):
        idx = [i for i, d in enumerate(cache_dirs) if d == folder]
        cache = TensorCache(folder, identity)
        keys = data.cache_latents([samples[i] for i in idx], cache, functools.partial(model.encode_latents, vae),
                                  batch_size, mine=ctx.share)
        latents_of.update({idx[j]: (cache, key) for j, key in keys.items()})
    del vae
    model.release(device)
    if ctx.world > 1:
        ctx.barrier()  # every share is encoded; what is still missing could not be decoded by its rank
        latents_of = {i: (cache, key) for i, (cache, key) in latents_of.items() if cache.has(key)}
    kept = sorted(latents_of)
    if not kept:
        raise DataError("no image could be decoded in any dataset")
    return [samples[i] for i in kept], {n: latents_of[i] for n, i in enumerate(kept)}


def cache_text(model_dir: Path, samples, extra: list[str], folder: Path, device: torch.device,
               ctx: Context = SINGLE):
    """Likewise the text encoder: training captions, the empty prompt (caption dropout) and the validation
    prompts, so sampling never needs the encoder again."""
    text_pipe = model.load_text_encoder(model_dir, device)
    cache = TensorCache(folder, f"{component_identity(model_dir, 'text_encoder')}-{model.MAX_SEQUENCE_LENGTH}")
    captions = [c for smp in samples for c in smp.captions] + [""] + extra
    keys = data.cache_text(captions, cache, functools.partial(encode_text, text_pipe, device),
                           mine=ctx.share)
    del text_pipe
    model.release(device)
    ctx.barrier()  # every rank's share is written
    return cache, keys


def encode_text(text_pipe, device: torch.device, captions: list[str]) -> torch.Tensor:
    return model.encode_prompts(text_pipe, captions, device).cpu()


def readable(path: Path | None) -> Path | None:
    """`path`, or when its files cannot be read (a disk fault, a crash in an older version), set aside and the one
    before it tried. One that reads but does not fit the model is an error, not damage (Trainer.resume)."""
    while path is not None:
        try:
            checkpoint.load(path)
            return path
        except Exception as e:  # torch/safetensors raise many kinds for a damaged file
            aside = path.with_name(path.name + ".unreadable")
            path.replace(aside)
            log.warning("checkpoint %s cannot be read (%s); set aside as %s", path.name, type(e).__name__, aside.name)
            path = checkpoint.latest(path.parent)
    return None


def resume_point(s: Settings, ckpt_dir: Path) -> Path | None:
    rc, o = s.checkpoints.resume_from_checkpoint, s.output
    if rc == "none":
        return None
    if rc == "latest":
        local = checkpoint.latest(ckpt_dir)
        if local or not (o.push_checkpoints_to_hub and o.hub_model_id):
            return local
        return hub.fetch_latest_checkpoint(o.hub_model_id, ckpt_dir, token=s.access.hf_token,
                                           attempts=o.hub_retries)  # a fresh pod after preemption
    path = ckpt_dir / rc if (ckpt_dir / rc).is_dir() else Path(rc)
    if not path.is_dir():
        raise ConfigError([f"RESUME_FROM_CHECKPOINT={rc!r}: no such checkpoint"])
    return path
