"""The run as a short story: preflight → pull → data → model → train → outputs.

Each phase is one call into the module that owns it; this file decides only the order.
"""
from __future__ import annotations

import functools
import gc
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from job import (
    builtin,
    card,
    checkpoint,
    cloud,
    comfyui,
    data,
    disk,
    hub,
    memory,
    model,
    outputs,
    plots,
    sample,
    webhook,
)
from job.config import Settings, datasets, tokenizer_max_length
from job.distributed import Context, Ranks, started
from job.errors import ConfigError, DataError, Fault, Interrupted, JobError
from job.faults import Injection, Scene, explain, forget_earlier_failures, peer_failure, record_failure
from job.log import MetricsSink, NullSink, StatusFile, Tracker, make_tracker, quiet_libraries
from job.loss import eval_loss
from job.signals import StopFlag
from job.train import Trainer

log = logging.getLogger("job")

VOLUME = Path("/workspace")  # where RunPod and Vast.ai mount the persistent volume
UPLOAD_GRACE_S = 60.0  # how long the end of a run waits for a checkpoint upload still in flight

# LoKr over every Linear of the transformer: the seed's Attention-only preset barely moves a tiny model.
DEMO_LYCORIS = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4,
                "apply_preset": {"target_module": ["AuraFlowTransformer2DModel"]}}


def demo_layers(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(defaults the user may override, settings the demo forces) for `demo`."""
    size = str(builtin.TINY_RESOLUTION)
    first, *others = builtin.demo_captions().items()
    # LoKr factor 1 (a scalar times a full matrix: an unrestricted update of each Linear) and shift 3 (mostly high
    # noise, where sampling starts and a model this small is weakest): with factor 4 or shift 1, 300 steps leave
    # the pictures unrecognisable
    lycoris = {**DEMO_LYCORIS, "factor": 1}
    defaults = {
        "output_dir": "./output/demo", "resolution": size, "resolution_type": "pixel", "crop": "true",
        "max_train_steps": "300", "train_batch_size": "4", "learning_rate": "1e-2", "optimizer": "adamw",
        "mixed_precision": "no", "gradient_checkpointing": "false", "lycoris_config": json.dumps(lycoris),
        "checkpoint_step_interval": "100", "flow_schedule_shift": "3.0",
        "validation_resolution": f"{size}x{size}", "validation_num_inference_steps": "8",
        "validation_step_interval": "100", "validation_guidance": "1.0", "eval_steps_interval": "25",
        "validation_prompt": first[1], "user_prompt_library": json.dumps(dict(others)),
    }
    forced = {
        "model_id": str(builtin.tiny_model_dir(root)), "dataset_id": str(builtin.demo_dataset_dir(root)),
        "caption_strategy": "textfile", "data_backend_config": "", "push_to_hub": "false",
        "push_checkpoints_to_hub": "false",
    }
    return defaults, forced


def run(command: str, settings: Settings, creds: cloud.Credentials, ranks: Ranks | None = None, *,
        debug: bool = False, test_fault: str = "") -> None:
    """`ranks`: this process's place among NUM_PROCESSES (for `check`, the layout a run would have; default: one
    process). Every rank runs this; rank 0 alone talks to the Hub and writes the outputs. `debug` (DEBUG): a
    failure's traceback on the terminal too; `test_fault` (JOB_TEST_FAULT): test-only, see faults.Injection."""
    ranks = ranks or Ranks()
    injection = Injection.parse(test_fault, ranks.rank)
    out = Path(settings.output.output_dir)
    record = outputs.finished_run(out, settings.public_dict()) if command != "check" else None
    if record:
        if ranks.rank == 0:
            log.info("%s already holds this run, finished (%s); nothing to do", out, outputs.COMPLETION)
            if not record.get("pod_action_done", True):  # the pod action failed last time: try it again
                pod_action(record["pod_action"], creds, out)
        return
    quiet_libraries()
    # the libraries' objects (diffusers and torch import hundreds of thousands) live as long as the process: frozen,
    # they are not traversed by every collection model.release asks for (half a second each here)
    gc.freeze()
    if command == "check":
        preflight(settings, model.pick_device(), ranks.world, ranks.nodes)
        return
    with started(ranks, model.pick_device()) as ctx:
        shared_storage(settings, ctx)
        geo = ctx.main_only(lambda: preflight(settings, ctx.device, ctx.world, ctx.nodes))
        if command == "demo":
            log.info("demo: tiny built-in AuraFlow, four toy pictures, LoKr over all Linear layers (not the seed's "
                     "Attention-only preset, which cannot move a model this small)")
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
        status = StatusFile(out / "status.json" if ctx.is_main else None)
        notify = webhook.make(settings.output.webhook_url if ctx.is_main else "",
                              settings.output.hub_model_id or out.resolve().name)
        scene = Scene(settings, geo, ctx.device, status, ctx.rank, debug, injection, world=ctx.world)
        forget_earlier_failures(scene)
        try:
            finish = train(settings, ctx, geo, status, notify, scene)
        except Exception as e:
            error = failed(e, scene, creds, notify)
            if not isinstance(error, Fault):
                ctx.barrier()  # the others leave only once rank 0 has reported it (and uploaded the last checkpoint)
            raise error from None
        if ctx.nodes > 1:  # the other machines stay until rank 0 has published: one of their torchruns may host
            ctx.main_only(lambda: publish_or_fail(finish, scene, creds, notify))  # the rendezvous it needs
    if not ctx.is_main:
        return
    if ctx.nodes == 1:
        publish_or_fail(finish, scene, creds, notify)  # rank 0 alone: the others are done
    notify.close()
    pod_action(settings.cloud.pod_action_on_success, creds, out)


def publish_or_fail(finish: Callable[[], None], scene: Scene, creds: cloud.Credentials, notify) -> None:
    try:
        finish()
    except Exception as e:
        raise failed(e, scene, creds, notify) from None


def failed(e: Exception, scene: Scene, creds: cloud.Credentials, notify) -> JobError:
    """The one place where any failure after preflight becomes its outcome: the failure kind with its exit code and
    a one-line message (a fault's traceback in OUTPUT_DIR/logs/), then, from rank 0, status.json, the webhook event
    and POD_ACTION_ON_FAILURE. Returns the error the job exits with."""
    own = explain(e, scene)
    error = peer_failure(own, scene)  # when `own` only follows from another rank's failure: that one
    if scene.rank != 0:
        if error is own:
            record_failure(own, scene)
        return error
    interrupted = isinstance(error, Interrupted)
    try:
        scene.status.update(phase="interrupted" if interrupted else "failed", last_error=str(error))
    except OSError as write_error:  # a full disk may refuse even this; the log line and the webhook still go out
        log.warning("status.json not updated (%s)", write_error)
    notify.send("interrupted" if interrupted else "failed", str(error).splitlines()[0], exit_code=error.exit_code)
    notify.close()
    if not interrupted and scene.settings.cloud.pod_action_on_failure == "stop":
        cloud.act("stop", creds)  # a signal means the platform is stopping us already
    return error


def pod_action(action: str, creds: cloud.Credentials, out: Path) -> None:
    """After the results are safely written and pushed, never before (terminate deletes the volume)."""
    if action != "none" and cloud.act(action, creds):
        outputs.mark_pod_action_done(out)


def shared_storage(s: Settings, ctx: Context) -> None:
    """Several machines: OUTPUT_DIR, and any cache folder set apart from it, must be one folder that every machine sees
    at the same path. The caches every rank fills, the checkpoints and the outputs live there."""
    if ctx.nodes == 1:
        return
    specs, text_dir, _, _ = datasets(s)
    named = [("OUTPUT_DIR", s.output.output_dir)] + [
        (f"DATA_BACKEND_CONFIG[{spec.id}].cache_dir_vae", spec.cache_dir_vae) for spec in specs if spec.cache_dir_vae
    ] + ([("DATA_BACKEND_CONFIG text_embeds cache_dir", text_dir)] if text_dir else [])
    unseen = ctx.unshared([Path(folder) for _, folder in named])
    problems = [f"{name}={folder!r} is not shared by every machine: machine(s) {', '.join(map(str, machines))} "
                "(MACHINE_RANK) do not see the file the main process wrote there. With NUM_MACHINES > 1 it must be one "
                "folder on a filesystem that every machine mounts at the same path (a network volume): the caches, "
                "checkpoints and outputs live there. HF_HOME may stay on each machine's own disk"
                for (name, folder), machines in zip(named, unseen) if machines]
    if problems:
        raise ConfigError(problems)


def on_every_machine(ctx: Context, pulled: hub.Pulled, pull: Callable[[str], hub.Pulled], what: str) -> hub.Pulled:
    """What rank 0 pulled, on this machine too: each other machine's local rank 0 pulls the same commit into its own
    HF_HOME, all at once (where HF_HOME is shared, it finds the files there and downloads nothing); a local folder
    must be on every machine at the same path."""
    if ctx.nodes == 1:
        return pulled

    def here() -> hub.Pulled:
        if ctx.is_main:
            return pulled
        if pulled.commit is None:
            if not Path(pulled.path).is_dir():
                raise ConfigError([f"{what}={str(pulled.path)!r} is a folder on the main process's machine but not on "
                                   f"machine {ctx.machine}: every machine needs it at the same path (or use a Hub repo)"])
            return pulled
        return pull(pulled.commit)

    return ctx.per_machine(here)


def preflight(s: Settings, device: torch.device, processes: int = 1, machines: int = 1) -> model.Grid:
    """Everything that can be refused before weights move: Hub access, device needs, the model's patch grid."""
    problems = model.device_problems(s, device)
    if problems:
        raise ConfigError(problems)
    output, specs = s.output, datasets(s)[0]
    hub.preflight(token=s.access.hf_token, model=(s.model_id, s.model.model_revision),
                  datasets=[(spec.source, spec.revision) for spec in specs],
                  output_repo=output.hub_model_id if output.push_to_hub else None, attempts=output.hub_retries)
    config_dir = hub.model_configs(s.model_id, s.model.model_revision, s.access.hf_token, output.hub_retries)
    geo = model.read_grid(config_dir)
    problems += model.resolution_problems(s, geo, [spec.resolution for spec in specs])
    problems += model.text_length_problems(s, config_dir)
    problems += dataset_problems(s, specs)
    adapter_problems, adapter_params, size = model.adapter_check(config_dir, s.adapter.lycoris_config)
    problems += adapter_problems
    if not problems:
        needs = disk_needs(s, specs, adapter_params, size)
        problems += disk.problems(needs)
        for warning in disk.placement_warnings(needs, VOLUME if os.path.ismount(VOLUME) else None):
            log.warning("%s", warning)
    if problems:
        raise ConfigError(problems)
    training = s.training
    log.info("plan: %s → LoKr (%s), %s × batch %d × accumulation %d × %d process%s%s = effective batch %d on %s, %s, "
             "base %s; output %s%s", s.model_id, s.adapter.lycoris_config.get("algo"),
             f"{training.max_train_steps} steps" if training.max_train_steps else f"{training.num_train_epochs} epochs", training.train_batch_size,
             training.gradient_accumulation_steps, processes, "es" if processes > 1 else "",
             f" on {machines} machines" if machines > 1 else "",
             training.train_batch_size * training.gradient_accumulation_steps * processes, device.type, training.mixed_precision,
             training.base_model_precision, s.output.output_dir, f", push to {s.output.hub_model_id}" if s.output.push_to_hub else "")
    report_memory(s, device, size, adapter_params, max(spec.resolution for spec in specs), processes // machines)
    return geo


def report_memory(s: Settings, device: torch.device, size, adapter_params: int, resolution: int,
                  processes: int = 1) -> None:
    """The predicted peak accelerator memory and host RAM, with a warning where they exceed what this machine has."""
    mem = s.memory
    est = model.memory_estimate(s, size, adapter_params, resolution, device)
    offload = (f"group offload {mem.group_offload_type}" + (", stream" if model.use_stream(s, device) else "")
               if mem.enable_group_offload else "model CPU offload" if mem.enable_model_cpu_offload else "no offload")
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


def train(s: Settings, ctx: Context, grid: model.Grid, status: StatusFile, notify,
          scene: Scene | None = None) -> Callable[[], None]:
    """Every rank: pull (rank 0 alone), cache (each rank its share), train. Returns what rank 0 does next, alone:
    publishing the results. `scene` learns the model folder and the trainer, for a failure's message."""
    scene = scene or Scene(s, grid, ctx.device, status, ctx.rank)
    out = Path(s.output.output_dir)
    device, training, output = ctx.device, s.training, s.output
    stop = StopFlag().install()
    status.update(phase="download")

    # data: every dataset pulled and discovered (before the model, so a dataset that does not fit the settings stops
    # the run before gigabytes of weights move), latents and text embeddings cached (encoders freed after)
    specs, text_dir, _, warnings = datasets(s)
    for warning in warnings if ctx.is_main else []:
        log.warning("%s", warning)
    copies = [on_every_machine(
        ctx, ctx.main_only(lambda spec=spec: pull_dataset(s, spec)),
        lambda commit, spec=spec: pull_dataset(s, spec, commit),
        f"DATA_BACKEND_CONFIG[{spec.id}].instance_data_dir" if s.data.data_backend_config else "DATASET_ID")
        for spec in specs]
    sources = [(spec.source, copy.commit) for spec, copy in zip(specs, copies)]
    samples, cache_dirs = data.discover_all(specs, [copy.path for copy in copies], grid, out)
    pulled = on_every_machine(ctx, ctx.main_only(lambda: hub.pull_model(s.model_id, s.model.model_revision,
                                                                        s.access.hf_token, output.hub_retries)),
                              lambda commit: hub.pull_model(s.model_id, commit, s.access.hf_token, output.hub_retries),
                              "MODEL_ID")
    model_dir = scene.model_dir = pulled.path
    status.update(phase="caching")
    t0 = time.monotonic()
    samples, latents_of = data.encode_images(model_dir, samples, cache_dirs, s.data.vae_batch_size, device, ctx)
    masks_of = data.encode_masks(samples, latents_of, grid.vae_scale_factor, ctx)
    plan = data.make_plan(samples, training.train_batch_size, training.seed, ctx.world)
    fallback = samples[0].captions[0]  # validation prompt when none is configured
    captions = [c for smp in samples for c in smp.captions] + [""] + sample.prompts_to_cache(s, fallback)
    text_cache, text_keys = data.encode_captions(model_dir, captions, Path(text_dir) if text_dir else out / "cache" / "text",
                                                 device, ctx, max_length=tokenizer_max_length(s))
    cached = data.Cached(samples, latents_of, text_cache, text_keys, masks_of)
    log.info("caching done in %.1fs", time.monotonic() - t0)

    # model: frozen base + LoKr (seeded, so a fresh run's adapter init is reproducible)
    total = training.max_train_steps or training.num_train_epochs * max(
        1, plan.batches_per_epoch // training.gradient_accumulation_steps)
    transformer = model.load_transformer(model_dir, s, device)  # each rank its own, on its own GPU
    torch.manual_seed(training.seed)
    network = model.create_adapter(transformer, s.adapter.lycoris_config, model.train_dtype(s), device)
    ctx.broadcast_params(list(network.parameters()))
    log.info("adapter: %d LyCORIS modules, %d trainable parameters", len(network.loras),
             sum(p.numel() for p in network.parameters() if p.requires_grad))
    # ENABLE_GROUP_OFFLOAD (each rank its own, in its own folder): the folder goes at exit, however the run ends
    offloaded = model.offload_transformer(transformer, network, s, device, model_dir) if s.memory.enable_group_offload \
        else None

    # side concerns, each rank-0's: checkpoint uploads, validation rounds, trackers, metrics (see Context.hook)
    uploader = (hub.CheckpointUploader(output.hub_model_id, token=s.access.hf_token, private=output.hub_private,
                                       limit=s.checkpoints.checkpoints_total_limit, attempts=output.hub_retries)
                if output.push_checkpoints_to_hub and ctx.is_main else None)
    resume = ctx.main_only(lambda: checkpoint.choose(s.checkpoints.resume_from_checkpoint, out / "checkpoints",
                                                     remote_checkpoints(s, out / "checkpoints")))
    validator, tracker = None, Tracker()
    if ctx.is_main:
        validator = sample.Validator(s, out, transformer, model.load_vae(model_dir, device),
                                     model.load_scheduler(model_dir), cached.embeds, device, fallback,
                                     park_vae=s.memory.offload_during_startup or s.memory.enable_model_cpu_offload,
                                     park_transformer=s.memory.enable_model_cpu_offload)
        tracker = make_tracker(output.report_to, out, s.public_dict(), output.tracker_project_name,
                               output.tracker_run_name or Path(output.hub_model_id or out.resolve()).name)
    rounds = s.validation.validation_step_interval if sample.validation_jobs(s, fallback) else 0
    eval_batches = (cached.eval_batches(s.validation.num_eval_images)
                    if ctx.is_main and s.validation.eval_steps_interval else [])
    trainer = Trainer(
        transformer=transformer, network=network, t=training, total_steps=total, patch_size=grid.patch_size,
        device=device, dtype=model.train_dtype(s), dist=ctx,
        fetch=cached.fetcher(plan, s.data.caption_dropout_probability, ctx.rows(training.train_batch_size)),
        checkpoint_dir=out / "checkpoints", checkpoint_interval=s.checkpoints.checkpoint_step_interval,
        checkpoints_total_limit=s.checkpoints.checkpoints_total_limit, resume_from=resume,
        hooks=[ctx.hook(every(s.validation.eval_steps_interval), lambda tr: eval_metrics(tr, eval_batches)),
               ctx.hook(every(rounds), lambda tr: validate(tr, validator, tr.step, notify, tracker))],
        metrics=(MetricsSink(out / "metrics.jsonl", resume_step=resume.step if resume else 0, tracker=tracker)
                 if ctx.is_main else NullSink()),
        should_stop=stop, status=status, on_checkpoint=lambda path: checkpointed(path, uploader, notify),
        fault=scene.injection)
    scene.trainer = trainer
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
    regularisation = tuple(spec.source for spec in specs if spec.regularisation)
    return functools.partial(publish, s, trainer, validator, pulled, sources, total, status, notify, offloaded,
                             regularisation)


def publish(s: Settings, trainer: Trainer, validator: sample.Validator, pulled: hub.Pulled, sources, total: int,
            status: StatusFile, notify, offloaded=None, regularisation: tuple[str, ...] = ()) -> None:
    """The adapter (EMA weights when on), final samples, loss plot, resolved settings, model card, push, and last
    the completion record."""
    out, output = Path(s.output.output_dir), s.output
    status.update(phase="sampling")
    with trainer.final_weights():
        model.save_adapter(trainer.network, out / outputs.ADAPTER_FILE, s.adapter.lycoris_config)
        final_images = validator.render(trainer.step, final=True)
    comfyui.write(out / outputs.ADAPTER_FILE, out / outputs.comfyui_file(output.hub_model_id or out.name),
                  trainer.transformer, enabled=output.export_comfyui)
    plots.plot_losses(outputs.loss_series(out / "metrics.jsonl"), out / "loss.png",
                      title=output.tracker_run_name or Path(output.hub_model_id or out.resolve()).name)
    resolved = {"resolved_total_steps": total, "resolved_tokenizer_max_length": tokenizer_max_length(s),
                "model_commit": pulled.commit,
                "dataset_commits": {ref: commit for ref, commit in sources}}
    outputs.write_run_files(out, s.adapter.lycoris_config, {**s.public_dict(), **resolved})
    card.write(out / "README.md", card.render(s, repo=output.hub_model_id or out.name, model_commit=pulled.commit,
                                              datasets=sources, steps_done=trainer.step, regularisation=regularisation,
                                              samples=[(f"samples/{p.name}", prompt) for p, prompt in validator.finals()]))
    log.info("done: %s", out / outputs.ADAPTER_FILE)
    pushed = None
    if output.push_to_hub:
        status.update(phase="push")
        pushed = hub.push(out, output.hub_model_id, token=s.access.hf_token, private=output.hub_private,
                          attempts=output.hub_retries)
    if offloaded:
        offloaded.close()
    # last: a restart with these settings exits at once
    outputs.write_completion(out, s.public_dict(), pushed, s.cloud.pod_action_on_success)
    status.update(phase="done")
    notify.send("finished", f"done after {trainer.step} steps: {pushed or out}", final_images, url=pushed,
                output_dir=str(out))


def every(n: int) -> Callable[[int], bool]:
    return lambda step: n > 0 and step % n == 0


def dataset_files(s: Settings, spec) -> tuple[Path | None, dict[str, int]]:
    """(the local folder or None, {file: size}) of a dataset: listed on disk, or asked of the Hub."""
    if folder := hub.local_folder(spec.source):
        return folder, {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    return None, hub.pending_download(spec.source, spec.revision, s.access.hf_token, "dataset", None,
                                      s.output.hub_retries)[1]


def dataset_problems(s: Settings, specs) -> list[str]:
    """What the datasets' file names already refuse: a DATASET_SPLIT (or an entry's split) that names no shards."""
    problems = []
    for spec in specs:
        _, files = dataset_files(s, spec)
        if problem := data.split_problem(list(files), spec.split, spec.source):
            problems.append(problem)
    return problems


def pull_dataset(s: Settings, spec, revision: str | None = None) -> hub.Pulled:
    """A Hub dataset with only what its layout needs (a parquet dataset's split), at `revision` (default: the
    dataset's setting); a local folder as it is."""
    allow = None
    if not hub.local_folder(spec.source):
        _, files = dataset_files(s, spec)
        if problem := data.split_problem(list(files), spec.split, spec.source):
            raise DataError(problem)
        allow = data.pull_patterns(list(files), spec.split)
    return hub.pull_dataset(spec.source, revision or spec.revision, s.access.hf_token, s.output.hub_retries,
                            allow=allow)


def disk_needs(s: Settings, specs, adapter_params: int, size) -> list[disk.Need]:
    """The facts disk.run_needs sums: what is still to download (asked of the Hub), how many images (counted, or
    for a Hub dataset of parquet shards or archives estimated from their size), what archives extract to."""
    retries = s.output.hub_retries
    model_download = None
    if not hub.local_folder(s.model_id):
        model_download, _ = hub.pending_download(s.model_id, s.model.model_revision, s.access.hf_token, "model",
                                                 hub.MODEL_FILES, retries)
    plans = []
    for spec in specs:
        download = None
        folder, files = dataset_files(s, spec)
        if folder is None:
            download, files = hub.pending_download(spec.source, spec.revision, s.access.hf_token, "dataset",
                                                   data.pull_patterns(list(files), spec.split), retries)
        found = data.footprint(files, spec.split, folder)
        if found.estimated:
            log.info("disk: dataset %s: about %d image(s), estimated from the size of its files (counted once they "
                     "are downloaded)", spec.source, found.images)
        latent_cache = Path(spec.cache_dir_vae) if spec.cache_dir_vae else Path(s.output.output_dir) / "cache" / "vae"
        plans.append(disk.DatasetPlan(spec.source, download, found.images, spec.resolution, latent_cache,
                                      found.unpacked))
    mem = s.memory
    offload_folder = Path(mem.group_offload_to_disk_path) if mem.enable_group_offload and mem.group_offload_to_disk_path \
        else None
    return disk.run_needs(hf_home=hub.cache_folder(), out=Path(s.output.output_dir), model_download=model_download,
                          datasets=plans, offload_folder=offload_folder,
                          offload_bytes=int(memory.weight_bytes(size, s.training.base_model_precision,
                                                                s.training.mixed_precision)) if offload_folder else 0,
                          adapter_params=adapter_params, keep_checkpoints=s.checkpoints.checkpoints_total_limit,
                          text_tokens=tokenizer_max_length(s))


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


def eval_metrics(trainer: Trainer, batches: list) -> dict:
    """The stable eval loss on the first NUM_EVAL_IMAGES training images (every EVAL_STEPS_INTERVAL steps)."""
    return {"eval_loss": eval_loss(trainer.transformer, batches, trainer.device, trainer.dtype)} if batches else {}


def remote_checkpoints(s: Settings, folder: Path) -> Callable[[], Path | None] | None:
    """Where RESUME_FROM_CHECKPOINT=latest looks when `folder` has none: the Hub, when checkpoints are pushed."""
    output = s.output
    if not (output.push_checkpoints_to_hub and output.hub_model_id):
        return None
    return lambda: hub.fetch_latest_checkpoint(output.hub_model_id, folder, token=s.access.hf_token, attempts=output.hub_retries)
