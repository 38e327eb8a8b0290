"""The Ray Train worker: build -> stream -> resume -> loop -> evaluate-if-due -> checkpoint-if-due.

Runs on every worker of the ``TorchTrainer``. What is built comes from
:func:`apex_ray.engine.build.build_training`; the optimisation step is
:class:`apex_ray.engine.step.StepRunner`; this module wires them to Ray Train (context, dataset
shard, checkpoints, reports), torch.distributed (metric means, gathers) and MLflow (rank 0).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from apex_ray.common import storage
from apex_ray.common.errors import InputError
from apex_ray.common.seeds import derive_seed
from apex_ray.config import Config, read_prompt_file
from apex_ray.engine.build import Training, backbone_config, build_training
from apex_ray.engine.checkpointing import (
    AsyncCheckpointer,
    DamagedCheckpointError,
    checkpoint_problem,
    load_checkpoint,
    write_run_description,
)
from apex_ray.engine.collectives import all_reduce_mean
from apex_ray.engine.diagnostics import evaluate_diagnostics
from apex_ray.engine.evaluation import EvalPrompts, evaluate_during_training
from apex_ray.engine.export import export_weights
from apex_ray.engine.prepared import load_empty_prompt, load_fake_buffer, read_manifest, to_training_batch
from apex_ray.engine.step import NonFiniteLossError
from apex_ray.engine.streams import BatchStream, ShardStream, shapeeval_dataset
from apex_ray.models import build_text_encoder
from apex_ray.models.codecs import load_codec
from apex_ray.orchestration.background import BackgroundWriter
from apex_ray.orchestration.tracking import RunLogger

AVERAGED_METRICS = ("loss", "loss_path", "loss_adv", "loss_shift", "loss_endpoint", "samples_per_s")
"""Metrics averaged over ranks before they are reported (the rest are rank 0's). ``samples_per_s``
is then made the global rate (the mean times the workers, as on the console); the mean is kept as
``samples_per_s_per_worker``."""


METRICS_HOLD_S = 5.0
"""Metric points logged faster than this are written to MLflow together, at most this late
(:meth:`RunLogger.log_metrics`), and always before a checkpoint is reported."""


def train_worker(loop_config: dict[str, Any]) -> None:
    config = Config.from_run(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives (and gather_object) use the current device
    logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    monitor = _system_metrics(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    try:
        _train_worker(config, loop_config, context, rank, world_size, device, logger)
    finally:
        if monitor is not None:
            monitor.finish()


def _system_metrics(tracking_uri: str, run_id: str):
    """MLflow's system metrics (CPU, memory, disk, network, GPUs) of rank 0's node every 10 s, as
    ``system/*`` metrics of the run; None where they cannot be sampled (no psutil)."""
    import os

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the monitor's own client logs here too
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10)
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception:  # psutil missing: train without them
        return None


def _train_worker(config: Config, loop_config: dict[str, Any], context, rank: int, world_size: int, device,
                  logger: RunLogger | None) -> None:
    progress = loop_config.get("progress_queue")

    # build
    prepared = loop_config.get("prepared_path")
    manifest = read_manifest(prepared) if prepared else None
    encoder = _text_encoder(config, manifest)
    training = build_training(config, device, rank, text_embed_dim=encoder.embed_dim)
    runner, latent_shape = training.runner, training.latent_shape
    if manifest is not None and runner.buffer is not None:  # fakes kept in the set's storage dtypes
        runner.buffer.sample_dtype = getattr(torch, manifest.get("latent_dtype", "float32"))
        runner.buffer.text_dtype = getattr(torch, manifest.get("text_dtype", "float32"))
    if getattr(runner.objective, "needs_empty_prompt", False):  # objective.apex.guidance_ratio > 0
        # The set's own empty prompt (same encoder, same storage dtype as its captions), else encoded here.
        empty = load_empty_prompt(prepared) if prepared else encoder.encode([""])
        runner.objective.empty_prompt = empty.to(device)
    if training.lora is not None:
        _say(progress, rank, str(training.lora))
    if manifest is not None and tuple(manifest["latent_shape"]) != latent_shape:
        raise InputError(f"the prepared set {prepared} holds latents of shape {manifest['latent_shape']} but "
                         f"{config.model.backbone} takes {list(latent_shape)}; prepare the data for this backbone")

    # stream
    stream_seed = derive_seed(config.train.seed, "data", rank)
    if manifest is None:
        dataset = shapeeval_dataset(encoder.encode, config.data.num_samples, config.data.seed, config.data.image_size)
        stream = BatchStream(dataset.shard(rank, world_size), config.micro_batch, seed=stream_seed)
    else:
        stream = ShardStream(ray.train.get_dataset_shard("train"), config.micro_batch, stream_seed, to_training_batch)
    prompts = EvalPrompts(encoder.encode, config.eval.images_per_prompt, rank, world_size)
    custom = (EvalPrompts(encoder.encode, config.eval.images_per_prompt, rank, world_size,
                          captions=_user_prompts(config.eval.prompts)) if config.eval.prompts else None)
    decode = _decoder(manifest, device)
    del encoder  # captions are encoded; free the text encoder's memory for training

    # resume
    run_folder = loop_config.get("run_folder")
    taken = {name for name in storage.list_dir(run_folder) if name.startswith("step_")} if run_folder else set()
    source = _resume_point(config, run_folder, taken, ray.train.get_checkpoint() is not None, progress, rank)
    if source is not None:
        fs, path = storage.filesystem(source)
        with ray.train.Checkpoint(path, filesystem=fs).as_directory() as directory:
            extra = load_checkpoint(directory, training.state)
        runner.load_extra_state(extra["runner"])
        if extra["world_size"] == world_size:
            stream.load_state_dict(extra["data"])
        else:  # resharded: a new data order from the next epoch, per-rank noise re-seeded
            stream.epoch = extra["data"]["epoch"] + 1
            runner.noise_generator.manual_seed(derive_seed(config.train.seed, "noise", rank, "resharded", runner.step))
        _say(progress, rank, f"resumed from step {runner.step} ({extra['world_size']} -> {world_size} workers)")
    elif config.objective.seed_buffer and runner.buffer is not None:
        pushed = load_fake_buffer(config.objective.seed_buffer, runner.buffer)
        _say(progress, rank, f"fake-sample buffer seeded with {pushed} samples from {config.objective.seed_buffer}")

    # loop: a resumed attempt logs only the steps MLflow does not have yet (no duplicate points)
    logged_until = logger.last_logged_step() if logger is not None and source is not None else 0
    with BackgroundWriter() as writer:
        _train_loop(config, training, stream, prompts, decode, logger, progress, writer, rank, world_size, taken,
                    logged_until, custom=custom, at_start=source is None and config.eval.at_start)


def _train_loop(config: Config, training: Training, stream, prompts: EvalPrompts, decode, logger: RunLogger | None,
                progress, writer: BackgroundWriter, rank: int, world_size: int, taken: set[str],
                logged_until: int = 0, custom: EvalPrompts | None = None, at_start: bool = False) -> None:
    """Steps until ``train.steps``. Only log steps wait for the device (metrics read in one
    transfer, averaged over ranks); MLflow and progress lines go through ``writer``; Ray Train
    hears of the run at checkpoints, evaluations and every ``train.report_interval_s`` (decided
    from the rank-averaged clock, so every rank reports at the same steps, as Ray Train needs).
    With ``at_start`` (a fresh run) the starting weights are evaluated first, logged at step 0
    (MLflow only: Ray Train and Tune hear of evaluations of trained steps)."""
    runner, schedule = training.runner, config.train
    checkpointer = AsyncCheckpointer()
    log_captions = _captions_logger(logger, writer) if logger is not None else None
    if at_start:  # before the clock starts: the progress line's rate and ETA are of training steps
        _evaluate_at_start(config, training, prompts, custom, decode, logger, progress, writer, rank, log_captions)
    started, start_step = time.perf_counter(), runner.step
    last_report = started
    log_image = None
    if logger is not None:
        def log_image(image, key: str, at: int) -> None:
            if at > logged_until:
                writer.submit(logger.log_image, image, key, at)
    while runner.step < schedule.steps:
        step = runner.step + 1
        last = step >= schedule.steps
        checkpoint_due = step % schedule.checkpoint_every == 0 or last
        eval_due = step % schedule.eval_every == 0 or last
        log_due = step % schedule.log_every == 0 or checkpoint_due or eval_due
        batches = [next(stream) for _ in range(config.grad_accum_steps)]
        try:
            metrics = runner.train_step(batches, read_metrics=log_due)
            aborted = False
        except NonFiniteLossError as err:
            metrics, aborted = {"aborted": 1.0, "skipped_steps": float(runner.skipped_steps)}, True
            _say(progress, rank, f"aborting: {err}")
            checkpoint_due = True
        if metrics is None:
            continue
        now = time.perf_counter()
        averaged = {k: metrics[k] for k in AVERAGED_METRICS if k in metrics} if not aborted else {}
        averaged["_since_report"] = now - last_report  # the same mean on every rank: one report decision
        averaged = all_reduce_mean(averaged)
        since_report = averaged.pop("_since_report")
        if "samples_per_s" in averaged:  # every worker's rate over the same interval: the global rate
            averaged["samples_per_s_per_worker"] = averaged["samples_per_s"]
            averaged["samples_per_s"] *= world_size
        metrics.update(averaged)
        if not aborted and eval_due:
            metrics.update(evaluate_during_training(
                training.ema, prompts, config.eval.score_nfe, config.eval.grid_nfe, config.eval.grid_size,
                training.latent_shape, runner.device, decode, log_image, step, custom=custom,
                log_captions=log_captions))
            # diag/*: branch separation on this step's first micro-batch (every rank; no-op if eval.diagnostics=false)
            metrics.update(evaluate_diagnostics(training, batches[0], decode, rank))
        metrics["step"] = step
        if logger is not None:
            if step > logged_until:
                writer.submit(logger.log_metrics, {k: v for k, v in metrics.items() if k != "step"}, step,
                              int(time.time() * 1000), hold_s=METRICS_HOLD_S)
            writer.submit(_say, progress, rank, _progress_line(metrics, step, schedule.steps, start_step, started,
                                                               schedule.global_batch))
        if checkpoint_due:
            if logger is not None:
                writer.submit(logger.flush_metrics)
            writer.flush()  # MLflow holds every point this checkpoint covers before Ray registers it
            _checkpoint_and_report(training, checkpointer, stream, metrics, rank, world_size,
                                   export=last and not aborted, name=_checkpoint_name(step, taken))
            last_report = time.perf_counter()
        elif eval_due or since_report >= schedule.report_interval_s:
            ray.train.report(metrics, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            last_report = time.perf_counter()
        if aborted:
            break
    if logger is not None:
        writer.submit(logger.flush_metrics)
    checkpointer.wait()


def _user_prompts(location: str) -> list[str]:
    """The ``eval.prompts`` file, read where the worker runs (a shared mount or a URI on a
    cluster); a missing or empty file is an :class:`InputError`: a restart would fail the same way."""
    try:
        return read_prompt_file(location)
    except ValueError as err:
        raise InputError(f"{err}; on a cluster, put it on a shared mount or in object storage (s3://...)") from None


def _captions_logger(logger: RunLogger, writer: BackgroundWriter):
    """``log_captions(key, captions, columns)`` for :func:`evaluate_during_training`: the captions of
    grid ``key`` in grid order (row by row) as ``captions/<key>.json``, once per attempt (they are
    the same at every evaluation: fixed prompts and picks)."""
    written: set[str] = set()

    def log_captions(key: str, captions: list[str], columns: int) -> None:
        if key not in written:
            written.add(key)
            text = json.dumps({"key": key, "columns": columns, "captions": captions}, indent=1)
            writer.submit(logger.log_text, text, f"captions/{key.replace('/', '_')}.json")

    return log_captions


def _evaluate_at_start(config: Config, training: Training, prompts: EvalPrompts, custom: EvalPrompts | None,
                       decode, logger: RunLogger | None, progress, writer: BackgroundWriter, rank: int,
                       log_captions=None) -> None:
    """ShapeEval and sample grids of the starting weights (the EMA is them before step 1), at step 0:
    every rank generates its share, rank 0 logs (metrics, grids, a progress line)."""
    if not (config.eval.score_nfe or config.eval.grid_nfe):
        return
    first = f"shapeeval_nfe{config.eval.score_nfe[0]}/overall" if config.eval.score_nfe else None
    if logger is not None and first and logger.client.get_metric_history(logger.run_id, first):
        logger = None  # an attempt restarted before its first checkpoint: step 0 is logged already
    log_image = None
    if logger is not None:
        def log_image(image, key: str, at: int) -> None:
            writer.submit(logger.log_image, image, key, at)
    metrics = evaluate_during_training(
        training.ema, prompts, config.eval.score_nfe, config.eval.grid_nfe, config.eval.grid_size,
        training.latent_shape, training.runner.device, decode, log_image, 0, custom=custom,
        log_captions=log_captions if logger is not None else None)
    if logger is not None and metrics:
        writer.submit(logger.log_metrics, metrics, 0, int(time.time() * 1000))
    scores = [f"nfe{k.split('nfe')[1].split('/')[0]} {v:.3f}" for k, v in metrics.items()
              if k.startswith("shapeeval") and k.endswith("/overall")]
    if scores:
        writer.submit(_say, progress, rank, "step 0 (starting weights) | ShapeEval " + ", ".join(scores))


def _resume_point(config: Config, run_folder: str | None, taken: set[str], ray_has_one: bool, progress,
                  rank: int) -> str | None:
    """Where this attempt starts: the newest intact checkpoint folder of the run, else (on the
    run's first start) ``train.resume_from``, else nowhere (step 0).

    The newest intact folder may be newer than Ray Train's latest registered checkpoint: when a
    node dies right after a checkpoint is written, before Ray Train's controller takes its report,
    the files are complete but unregistered. Damaged folders are skipped with a message; every rank
    checks the same files the same way (:func:`checkpoint_problem`), so all ranks agree. If Ray
    Train registered a checkpoint and none is intact, the run stops rather than start over."""
    problems = []
    for name in sorted(taken, reverse=True):  # step_0000008-2 > step_0000008 > step_0000004
        location = storage.join(run_folder, name)
        problem = checkpoint_problem(location)
        if problem is None:
            if problems:
                _say(progress, rank, "skipped damaged checkpoint(s): " + "; ".join(problems) + f"; resuming from {name}")
            return location
        problems.append(f"{name}: {problem}")
    if problems and ray_has_one:
        raise DamagedCheckpointError(
            "no intact checkpoint to resume from (" + "; ".join(problems) + "). Start again under a new "
            "tracking.run_name, or with train.resume_from=<an intact step_* folder>")
    if problems:
        _say(progress, rank, "ignored incomplete checkpoint(s) of an attempt that died while writing: "
             + "; ".join(problems))
    if config.train.resume_from:
        problem = checkpoint_problem(config.train.resume_from)
        if problem is not None:
            raise DamagedCheckpointError(f"train.resume_from {config.train.resume_from}: {problem}")
        return config.train.resume_from
    return None


def _checkpoint_name(step: int, taken: set[str]) -> str:
    """``step_0000200``, or ``step_0000200-2`` when a folder of that name exists (a damaged or
    partly written checkpoint of an earlier attempt: Ray Train would otherwise write into it and
    later delete the new checkpoint with the old one)."""
    name, attempt = f"step_{step:07d}", 1
    while name in taken:
        attempt += 1
        name = f"step_{step:07d}-{attempt}"
    return name


def _checkpoint_and_report(training: Training, checkpointer: AsyncCheckpointer, stream, metrics: dict[str, float],
                           rank: int, world_size: int, export: bool, name: str) -> None:
    """Every rank writes its shards (and at the end the exported weights) into a local folder and
    reports it to Ray Train. The shards are written in the background (``dcp.async_save``) and
    Ray uploads the folder in the background once they are (``CheckpointUploadMode.ASYNC``, the
    local folder deleted after): the step only waits for the state to be copied."""
    runner = training.runner
    extra = {"runner": runner.extra_state(), "data": stream.state_dict(), "world_size": world_size}
    directory = tempfile.mkdtemp(prefix=f"apex-ray-{name}-rank{rank}-")
    written = checkpointer.save(directory, training.state, extra)
    if rank == 0:  # what `python -m apex_ray.export` needs to rebuild the model
        write_run_description(directory, training.config, backbone_config(training.backbone))
    if export:
        export_weights(training, Path(directory) / "export")
    storage_context = ray.train.get_context().get_storage()

    def upload_when_written(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        written.result()  # the shards are on the local disk
        return storage_context.persist_current_checkpoint(checkpoint, dir_name)

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=upload_when_written)


def _text_encoder(config: Config, manifest: dict | None):
    """The encoder the training captions were embedded with (the prepared set's, if any), for the
    evaluation prompts."""
    if manifest is None:
        return build_text_encoder(config.model.text_encoder, config.model.text_encoder_path,
                                  max_length=config.model.max_text_length)
    spec = manifest["text_encoder"]
    return build_text_encoder(spec["preset"], spec.get("path"), max_length=spec["max_length"])


def _decoder(manifest: dict | None, device):
    """Latents -> images in [-1, 1] for evaluation: identity for pixel data, else the set's VAE."""
    if manifest is None or manifest["codec"]["name"] == "pixel":
        return lambda latents: latents
    spec = manifest["codec"]
    codec = load_codec(spec["name"], spec.get("path"), spec.get("subfolder"), device=device)
    return codec.decode


def _progress_line(metrics: dict[str, float], step: int, total: int, start_step: int, started: float,
                   global_batch: int) -> str:
    elapsed = time.perf_counter() - started
    rate = (step - start_step) / elapsed if elapsed > 0 else 0.0
    eta = (total - step) / rate if rate > 0 else float("inf")
    parts = [f"step {step}/{total}", f"loss {metrics.get('loss', float('nan')):.4f}"]
    for key in ("loss_path", "loss_adv", "loss_shift"):
        if key in metrics:
            parts.append(f"{key[5:]} {metrics[key]:.4f}")
    parts += [f"{rate * global_batch:.1f} samples/s", f"ETA {_duration(eta)}"]
    scores = [f"nfe{k.split('nfe')[1].split('/')[0]} {v:.3f}" for k, v in metrics.items()
              if k.startswith("shapeeval") and k.endswith("/overall")]
    if scores:
        parts.append("ShapeEval " + ", ".join(scores))
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _say(queue, rank: int, line: str) -> None:
    """Send a progress line to the driver (rank 0 only)."""
    if rank == 0:
        if queue is not None:
            try:
                queue.put(line)
                return
            except ray.exceptions.RayActorError:  # the driver's queue is gone: a progress line never stops training
                pass
        print(line, flush=True)
