"""Launch APEX training on a Ray Train TorchTrainer: preflight checks, Ray start-up, MLflow run, fit.

With no arguments: the embedded default (local Ray, 2 CPU workers, tiny SANA, ShapeEval,
MLflow in a local sqlite file). With ``RAY_ADDRESS`` set (e.g. under ``ray job submit``) it
joins that cluster instead of starting one.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from apex_ray.common import storage
from apex_ray.common.errors import InputError
from apex_ray.config import Config, ConfigError
from apex_ray.orchestration.tracking import (
    RunLogger,
    check_sqlite_writable,
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
    """The checks :func:`apex_ray.config.load_config` cannot make offline: the tracking store
    answers (and, for a Ray client, is not a file on this machine); inputs and output_dir given
    as URIs (s3://...) can be opened.

    Returns the tracking URI. Raises :class:`TrackingError` or :class:`ConfigError`.
    """
    uri = resolve_tracking_uri(config.tracking.tracking_uri, config.output_dir)
    check_tracking_server(uri)
    check_sqlite_writable(uri)
    check_store_reachable(uri, 1, os.environ.get("RAY_ADDRESS"))  # ray:// is refused before connecting
    check_remote_locations(config)
    if config.data.source == "prepared":
        _check_enough_rows(config, storage.resolve(config.data.path))
    return uri


def check_remote_locations(config: Config) -> None:
    """Open every URI the run reads or writes, and the checkpoint it starts from, before any
    cluster work, naming the field that fails."""
    inputs = [("data.path", config.data.path if config.data.source == "prepared" else None),
              ("objective.seed_buffer", config.objective.seed_buffer)]
    for field, location in inputs:
        if not location or not storage.is_uri(location):
            continue
        try:
            found = storage.is_file(storage.join(location, "manifest.json"))
        except OSError as err:
            raise ConfigError(f"{field}: cannot open {location} ({err}); check the URI and the store's "
                              "credentials / endpoint (AWS_ENDPOINT_URL, ...)") from None
        if not found:
            raise ConfigError(f"{field}: {location} has no manifest.json, so it is not a complete prepared set "
                              "or fake-sample buffer; check the URI or rerun the data job that makes it")
    if config.train.resume_from:
        _check_resume_from(config.train.resume_from)
    if storage.is_uri(config.output_dir):
        try:
            storage.check_writable(config.output_dir)
        except OSError as err:
            raise ConfigError(f"output_dir: cannot write to {config.output_dir} ({err}); check the bucket, the "
                              "credentials and the endpoint (AWS_ENDPOINT_URL, ...)") from None


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


def _check_resume_from(location: str) -> None:
    from apex_ray.engine.checkpointing import checkpoint_problem

    if storage.is_uri(location):
        if not storage.is_file(storage.join(location, ".metadata")):
            raise ConfigError(f"train.resume_from: {location} has no DCP .metadata, so it is not a complete "
                              "checkpoint; pass a step_* folder of a run")
        return
    folder = Path(location).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"train.resume_from: {location!r} does not exist")
    problem = checkpoint_problem(folder)
    if problem is not None:
        steps = sorted(p.name for p in folder.glob("step_*"))
        hint = f"; it looks like a run folder: pass one of its step_* folders, e.g. {folder / steps[-1]}" if steps else ""
        raise ConfigError(f"train.resume_from: {location!r} is not an intact checkpoint ({problem}){hint}")


def _prepared_path(config: Config) -> str | None:
    """The prepared set to stream (made on first use for source=shapeeval); None for inline data."""
    if config.data.source == "prepared":
        return storage.resolve(config.data.path)
    if config.data.source == "shapeeval":
        from data_pipelines.shapeeval_set import ensure_shapeeval_prepared

        return str(ensure_shapeeval_prepared(
            Path(config.data.cache_dir).expanduser(), config.data.num_samples, config.data.seed,
            config.data.image_size, config.model.backbone, config.model.text_encoder, config.model.max_text_length))
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
    output_dir = storage.resolve(config.output_dir)
    if not storage.is_uri(output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    config = config.model_copy(update={"output_dir": output_dir})
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_name = config.tracking.run_name or f"{config.objective.kind}-{config.model.backbone}-{stamp}"
    tags = {"objective": config.objective.kind, "backbone": config.model.backbone,
            "strategy": config.distributed.strategy, "workers": str(config.world_size), **config.tracking.tags}
    ray_storage = storage.join(output_dir, "ray")  # Ray Train's run state and checkpoints
    logger = None
    if storage.exists(storage.join(ray_storage, run_name)):  # Ray Train resumes this run from its latest checkpoint
        logger = RunLogger.find(tracking_uri, config.tracking.experiment, run_name)
    elif config.tracking.run_name:  # an attempt that died before its first checkpoint: same run again
        logger = RunLogger.find(tracking_uri, config.tracking.experiment, run_name, ("FAILED", "KILLED"))
    if logger is None:
        logger = RunLogger.create(tracking_uri, config.tracking.experiment, run_name, tags, config.to_flat_dict(),
                                  description=_describe(config), config_yaml=_config_yaml(config))
    # From here on the MLflow run says how this attempt ended, whatever ends it.
    try:
        return _fit(config, run_name, ray_storage, tracking_uri, logger, callbacks, train_loop)
    except KeyboardInterrupt:
        logger.finish("KILLED")
        raise
    except BaseException:
        logger.finish("FAILED")
        raise


def _describe(config: Config) -> str:
    """The run page's description: what was trained, how, and where its config is."""
    method = "APEX one-step fine-tune" if config.objective.kind == "apex" else "flow-matching training"
    start = config.model.pretrained or "random init"
    lora = f", LoRA r{config.model.lora.rank}" if config.model.lora.enabled else ""
    return (f"{method} of {config.model.backbone}{lora} from {start}: {config.train.steps} steps at global batch "
            f"{config.train.global_batch} on {config.world_size} x {config.distributed.strategy} worker(s), "
            f"data {config.data.source}. The resolved config is the artifact config.yaml "
            f"(`python -m apex_ray.train --config config.yaml` reruns it).")


def _config_yaml(config: Config) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class RunFailed(RuntimeError):
    """Training stopped for good; the message says why (a worker's own error where there is one)."""


def input_error_in(error: BaseException | None) -> InputError | None:
    """The :class:`InputError` a worker raised, found through Ray's wrappers (the original
    exception travels as ``_base_exc`` / ``controller_failure`` / ``cause`` / ``__cause__``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, InputError):
            return error
        error = next((nested for nested in (getattr(error, "_base_exc", None), getattr(error, "controller_failure", None),
                                           getattr(error, "cause", None), error.__cause__)
                      if isinstance(nested, BaseException)), None)
    return None


def _stop_on_input_error():
    """A Ray Train callback (it runs in the controller) that ends the run at a worker's first
    :class:`InputError` instead of restarting the workers ``max_failures`` times into the same
    error: an exception raised by a callback is a controller error, which Ray Train does not retry."""
    from ray.train import UserCallback

    class StopOnInputError(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank, error in sorted(worker_exceptions.items()):
                found = input_error_in(error)
                if found is not None:
                    raise type(found)(f"worker {rank}: {found}")

    return StopOnInputError()


def _check_enough_rows(config: Config, prepared: str) -> None:
    from apex_ray.engine.prepared import read_manifest

    try:
        rows = read_manifest(prepared)["rows_written"]
    except FileNotFoundError as err:
        raise ConfigError(f"data.path: {err}") from None
    if rows // config.world_size < config.micro_batch:
        raise ConfigError(f"data.path: the prepared set {prepared} has {rows} rows, {rows // config.world_size} per "
                          f"worker for {config.world_size} workers: fewer than one micro-batch of {config.micro_batch}; "
                          "use more data or lower train.global_batch")


def _deterministic_split():
    """Ray Train's split of the streamed set, the same for the same seed on every run: blocks in
    read order (``preserve_order``; it also turns off locality-based dispatch, which depends on
    where blocks happen to land), each to the worker with the fewest rows so far. With the
    per-epoch local shuffle seeded from the run's seed, a resumed run sees exactly the batches an
    uninterrupted one would."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False)


@contextlib.contextmanager
def _sigint_watch() -> Iterator[Callable[[], bool]]:
    """Yields a function telling whether SIGINT arrived inside the block.

    Ray Train replaces the SIGINT handler during ``fit`` (it aborts the run, and Ctrl+C in a
    terminal also stops the local Ray processes), so ``fit`` then fails with a Ray error or a
    ``SystemExit`` rather than ``KeyboardInterrupt``. The signal module's wakeup fd records every
    signal whatever handler runs. Outside the main thread (Tune, tests) nothing is watched."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    try:
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:  # not the main thread
        os.close(read)
        os.close(write)
        yield lambda: False
        return

    def interrupted() -> bool:
        try:
            return signal.SIGINT in os.read(read, 4096)
        except BlockingIOError:
            return False

    try:
        yield interrupted
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)


def _fit(config: Config, run_name: str, ray_storage: str, tracking_uri: str, logger: RunLogger,
         callbacks: list | None, train_loop: Callable[[dict], None] | None) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from apex_ray.engine.prepared import prepared_dataset
    from apex_ray.orchestration.worker import train_worker

    prepared = _prepared_path(config)
    try:
        datasets = None if prepared is None else {"train": prepared_dataset(prepared)}
    except InputError as err:
        raise RunFailed(f"{err} (not retried: a restart would fail the same way)") from None
    # The progress queue lives on the driver's node: a worker node may be lost and replaced.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    stop = threading.Event()
    printer = threading.Thread(target=_print_progress, args=(queue, stop), daemon=True)
    printer.start()
    try:  # the printer thread and the queue actor end with this attempt, however it ends
        trainer = TorchTrainer(
            train_loop or train_worker,
            train_loop_config={"config": config.model_dump(mode="json"), "tracking_uri": tracking_uri,
                               "run_id": logger.run_id, "progress_queue": queue,
                               "prepared_path": prepared, "run_folder": storage.join(ray_storage, run_name)},
            datasets=datasets,
            dataset_config=_deterministic_split(),
            scaling_config=ScalingConfig(num_workers=config.world_size, use_gpu=config.distributed.use_gpu,
                                         resources_per_worker={"CPU": config.distributed.cpus_per_worker},
                                         placement_strategy=config.distributed.placement_strategy),
            torch_config=TorchConfig(backend="nccl" if config.distributed.use_gpu else "gloo"),
            run_config=RunConfig(
                name=run_name, storage_path=ray_storage,
                checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
                failure_config=FailureConfig(max_failures=config.distributed.max_failures),
                callbacks=[_stop_on_input_error(), *(callbacks or [])],
            ),
        )
        print(f"apex-ray: run {run_name!r} | {config.world_size} x {config.distributed.strategy} worker(s) | "
              f"{config.train.steps} steps of {config.objective.kind} on {config.model.backbone}", flush=True)
        with _sigint_watch() as interrupted:
            try:
                result = trainer.fit()
            except BaseException as err:
                if interrupted():  # however Ray reports it (its own SIGINT handler, dead local raylet)
                    raise KeyboardInterrupt from None
                if not isinstance(err, Exception):
                    raise
                found = input_error_in(err)
                if found is None:
                    raise
                raise RunFailed(f"{found} (not retried: a restart would fail the same way)") from None
    finally:
        stop.set()
        printer.join(timeout=5)
        ray.kill(queue.actor)

    checkpoint_path = storage.uri_of(result.checkpoint.filesystem, result.checkpoint.path) if result.checkpoint else None
    export_path = None
    if checkpoint_path and storage.exists(storage.join(checkpoint_path, "export")):
        export_path = storage.join(checkpoint_path, "export")
        with storage.local_copy(export_path) as local_export:
            logger.log_artifacts(str(local_export), "export")
    logger.set_tags({"checkpoint_path": str(checkpoint_path), "export_path": str(export_path)})
    aborted = bool(result.metrics and result.metrics.get("aborted"))
    logger.finish("FAILED" if aborted else "FINISHED")
    return TrainResult(logger.run_id, tracking_uri, checkpoint_path, export_path, dict(result.metrics or {}),
                       ray_storage)
