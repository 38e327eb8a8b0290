"""Launch APEX training on a Ray Train TorchTrainer: preflight checks, Ray start-up, MLflow run, fit.

With no arguments: the embedded default (local Ray, 2 CPU workers, tiny SANA, ShapeEval,
MLflow in a local sqlite file). With ``RAY_ADDRESS`` set (e.g. under ``ray job submit``) it
joins that cluster instead of starting one.
"""
from __future__ import annotations

import datetime as dt
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from apex_ray.config import Config
from apex_ray.orchestration.tracking import (
    RunLogger,
    check_store_reachable,
    check_tracking_server,
    resolve_tracking_uri,
)


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    checkpoint_path: str | None
    export_path: str | None
    metrics: dict
    storage_path: str


def preflight(config: Config) -> str:
    """The one check :func:`apex_ray.config.load_config` cannot make: the tracking store answers
    (and, for a Ray client, is not a file on this machine).

    Returns the tracking URI. Raises :class:`TrackingError`.
    """
    uri = resolve_tracking_uri(config.tracking.tracking_uri, config.output_dir)
    check_tracking_server(uri)
    check_store_reachable(uri, 1, os.environ.get("RAY_ADDRESS"))  # ray:// is refused before connecting
    return uri


def start_ray(verbose: bool, workers: int, cpus_per_worker: float) -> None:
    import logging

    import ray

    if ray.is_initialized():
        return
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)  # join the running cluster (e.g. under `ray job submit`)
    else:
        cpus = max(os.cpu_count() or 1, int(workers * cpus_per_worker) + 1)
        ray.init(num_cpus=cpus, include_dashboard=False, **quiet)


def connect(config: Config, tracking_uri: str, verbose: bool = False) -> None:
    """Start or join Ray for ``config``'s workers, then refuse a file-based tracking store that
    rank 0 could not open from another node (before any run, data job or trainer)."""
    import ray

    start_ray(verbose, config.world_size, config.distributed.cpus_per_worker)
    alive = sum(bool(node["Alive"]) for node in ray.nodes())
    check_store_reachable(tracking_uri, alive, os.environ.get("RAY_ADDRESS"))


def _prepared_path(config: Config) -> Path | None:
    """The prepared set to stream (made on first use for source=shapeeval); None for inline data."""
    if config.data.source == "prepared":
        return Path(config.data.path).resolve()
    if config.data.source == "shapeeval":
        from data_pipelines.shapeeval_set import ensure_shapeeval_prepared

        return ensure_shapeeval_prepared(
            Path(config.data.cache_dir).expanduser(), config.data.num_samples, config.data.seed,
            config.data.image_size, config.model.backbone, config.model.text_encoder, config.model.max_text_length)
    return None


def _print_progress(queue, stop: threading.Event) -> None:
    from ray.util.queue import Empty

    while not stop.is_set() or not queue.empty():
        try:
            print(queue.get(timeout=0.5), flush=True)
        except Empty:
            continue
        except Exception:  # the queue actor is gone at shutdown
            return


def run(config: Config, verbose: bool = False, callbacks: list | None = None,
        train_loop: Callable[[dict], None] | None = None) -> TrainResult:
    """Train with ``config`` (already validated) and return where everything went.

    ``callbacks`` are Ray Train ``UserCallback``s (the sweeps pass Tune's report callback);
    ``train_loop`` is the per-worker loop, :func:`apex_ray.orchestration.worker.train_worker` by
    default (tests wrap it to inject faults).
    """
    tracking_uri = preflight(config)
    connect(config, tracking_uri, verbose)
    output_dir = Path(config.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(update={"output_dir": str(output_dir)})
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_name = config.tracking.run_name or f"{config.objective.kind}-{config.model.backbone}-{stamp}"
    tags = {"objective": config.objective.kind, "backbone": config.model.backbone,
            "strategy": config.distributed.strategy, "workers": str(config.world_size), **config.tracking.tags}
    storage = output_dir / "ray"
    logger = None
    if (storage / run_name).exists():  # Ray Train resumes this run from its latest checkpoint
        logger = RunLogger.find(tracking_uri, config.tracking.experiment, run_name)
    elif config.tracking.run_name:  # an attempt that died before its first checkpoint: same run again
        logger = RunLogger.find(tracking_uri, config.tracking.experiment, run_name, ("FAILED", "KILLED"))
    if logger is None:
        logger = RunLogger.create(tracking_uri, config.tracking.experiment, run_name, tags, config.to_flat_dict())
    # From here on the MLflow run says how this attempt ended, whatever ends it.
    try:
        return _fit(config, run_name, storage, tracking_uri, logger, callbacks, train_loop)
    except KeyboardInterrupt:
        logger.finish("KILLED")
        raise
    except BaseException:
        logger.finish("FAILED")
        raise


def _fit(config: Config, run_name: str, storage: Path, tracking_uri: str, logger: RunLogger,
         callbacks: list | None, train_loop: Callable[[dict], None] | None) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from apex_ray.engine.prepared import prepared_dataset
    from apex_ray.orchestration.worker import train_worker

    prepared = _prepared_path(config)
    datasets = None if prepared is None else {"train": prepared_dataset(prepared)}
    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()
    printer = threading.Thread(target=_print_progress, args=(queue, stop), daemon=True)
    printer.start()
    try:  # the printer thread and the queue actor end with this attempt, however it ends
        trainer = TorchTrainer(
            train_loop or train_worker,
            train_loop_config={"config": config.model_dump(mode="json"), "tracking_uri": tracking_uri,
                               "run_id": logger.run_id, "progress_queue": queue,
                               "prepared_path": None if prepared is None else str(prepared)},
            datasets=datasets,
            scaling_config=ScalingConfig(num_workers=config.world_size, use_gpu=config.distributed.use_gpu,
                                         resources_per_worker={"CPU": config.distributed.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if config.distributed.use_gpu else "gloo"),
            run_config=RunConfig(
                name=run_name, storage_path=str(storage),
                checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
                failure_config=FailureConfig(max_failures=config.distributed.max_failures),
                callbacks=callbacks,
            ),
        )
        print(f"apex-ray: run {run_name!r} | {config.world_size} x {config.distributed.strategy} worker(s) | "
              f"{config.train.steps} steps of {config.objective.kind} on {config.model.backbone}", flush=True)
        result = trainer.fit()
    finally:
        stop.set()
        printer.join(timeout=5)
        ray.kill(queue.actor)

    checkpoint_path = result.checkpoint.path if result.checkpoint else None
    export_path = None
    if checkpoint_path and (Path(checkpoint_path) / "export").exists():
        export_path = str(Path(checkpoint_path) / "export")
        logger.log_artifacts(export_path, "export")
    logger.set_tags({"checkpoint_path": str(checkpoint_path), "export_path": str(export_path)})
    aborted = bool(result.metrics and result.metrics.get("aborted"))
    logger.finish("FAILED" if aborted else "FINISHED")
    return TrainResult(logger.run_id, tracking_uri, checkpoint_path, export_path, dict(result.metrics or {}),
                       str(storage))
