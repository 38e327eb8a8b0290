"""Launch APEX training on a Ray Train TorchTrainer: preflight checks, Ray start-up, MLflow run, fit.

With no arguments: the embedded default (local Ray, 2 CPU workers, tiny SANA, ShapeEval,
MLflow in a local sqlite file). With ``RAY_ADDRESS`` set (e.g. under ``ray job submit``) it
joins that cluster instead of starting one.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
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
    if config.eval.prompts and storage.is_uri(config.eval.prompts):  # a local file was read by load_config
        from apex_ray.config import read_prompt_file

        try:
            read_prompt_file(config.eval.prompts)
        except ValueError as err:
            raise ConfigError(f"{err}; check the URI and the store's credentials / endpoint") from None
    if storage.is_uri(config.output_dir):
        try:
            storage.check_writable(config.output_dir)
        except OSError as err:
            raise ConfigError(f"output_dir: cannot write to {config.output_dir} ({err}); check the bucket, the "
                              "credentials and the endpoint (AWS_ENDPOINT_URL, ...)") from None


def quiet_console() -> None:
    """Keep Ray's own output off this process's console (``--verbose`` skips this), so that it
    shows only apex-ray's lines: Ray Data's progress bars and console logs (its log files under
    the session's ``logs/ray-data`` stay complete), Python warnings raised inside Ray or MLflow
    and Ray Train's driver-side logs. Ray Core's start-up lines, its workers' and the Train controller's
    output are kept off by :func:`start_ray`."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module=r"(ray|mlflow)(\.|$)")
    import ray.data
    from ray.data._internal.logging import SessionFileHandler

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, (SessionFileHandler, logging.FileHandler)):
            handler.setLevel(logging.ERROR)
    logging.getLogger("ray.train").setLevel(logging.ERROR)
    # MLflow's artifact progress bars (logging the exported models downloads and uploads them).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


_CXX_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [A-Z] \d+ \d+\] ")
"""A line of Ray's C++ log (``[2026-01-01 12:00:00,000 E 123 123] core_worker.cc:...``)."""


@contextlib.contextmanager
def _quiet_ray_init() -> Iterator[None]:
    """Around a quiet ``ray.init``: this driver's core worker logs C++ lines only at FATAL, and
    what it prints while starting (the line saying so) is dropped; anything else written to
    stderr meanwhile is passed on afterwards.

    Without this the console gets a red ``[E] core_worker.cc: Actor with class name:
    'MapWorker(...)' ... has constructor arguments in the object store and max_restarts > 0``
    at the first Ray Data actor pool (the data preparation's encoders): Ray Data always hands its
    actors their DataContext and UDF as object refs and lets them restart (ray-project/ray#53727),
    which is harmless here. ``RAY_BACKEND_LOG_LEVEL`` is read when the driver connects; it is set
    only for that moment, so the processes a local ``ray.init`` starts (GCS, raylet, workers) keep
    Ray's default log level in their log files. A value the user set is left alone."""
    import sys
    import tempfile

    import ray._private.worker as ray_worker

    original = ray_worker.connect
    user_level = "RAY_BACKEND_LOG_LEVEL" in os.environ

    def connect(*args, **kwargs):
        if user_level:
            return original(*args, **kwargs)
        os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
        try:
            return original(*args, **kwargs)
        finally:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)

    sys.stderr.flush()
    saved = os.dup(2)
    capture = tempfile.TemporaryFile()
    os.dup2(capture.fileno(), 2)
    ray_worker.connect = connect
    try:
        yield
    finally:
        ray_worker.connect = original
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        capture.seek(0)
        kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                if not _CXX_LOG_LINE.match(line)]
        capture.close()
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def start_ray(verbose: bool, workers: int, cpus_per_worker: float) -> None:
    import logging

    import ray

    if not verbose:
        quiet_console()
    if ray.is_initialized():
        return
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    with contextlib.nullcontext() if verbose else _quiet_ray_init():
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


@dataclass(frozen=True)
class RunStart:
    """How :func:`run` starts a run name (:func:`plan_run_start`)."""

    action: str
    """``resume``: the run folder exists, Ray Train resumes it from its latest checkpoint and the
    MLflow run of that name continues; ``retry``: a named run that died before its first
    checkpoint (its FAILED / KILLED MLflow run continues, if any); ``new``: a new run (and MLflow
    run), also after ``--fresh`` moved the old folder aside."""
    run_folder: str
    moved_to: str | None = None
    """``--fresh``: where the old run folder goes (``<name>.replaced-<timestamp>`` beside it)."""
    resume_from: str | None = None
    """``train.resume_from`` as the run must see it (moved along when it was inside the old folder)."""


def plan_run_start(ray_storage: str, run_name: str, named: bool, fresh: bool = False,
                   resume_from: str | None = None, now: dt.datetime | None = None) -> RunStart:
    """Decide how a run named ``run_name`` (``named``: given as ``tracking.run_name``) starts.

    Without ``fresh`` a name that has a run folder resumes it (``resume_from`` then has no effect:
    it seeds only a run's first start, so rerunning an interrupted ``--resume-from`` command
    continues that run). With ``fresh`` the old folder is to be renamed aside, never deleted, and
    a new run (and MLflow run of the same name) starts, from ``resume_from`` if given, else from
    step 0; a ``resume_from`` inside the old folder follows it to its new place. A URI output_dir
    is refused: an object store has no rename. Nothing is moved here: see :func:`apply_run_start`."""
    folder = storage.join(ray_storage, run_name)
    if not storage.exists(folder):
        return RunStart("new" if fresh or not named else "retry", folder, resume_from=resume_from)
    if not fresh:
        return RunStart("resume", folder, resume_from=resume_from)
    if storage.is_uri(folder):
        raise ConfigError(f"--fresh: the run folder {folder} is in an object store, which has no rename, and "
                          "apex-ray does not delete checkpoints: choose a new tracking.run_name, or move or delete "
                          "that prefix with the store's own tools first")
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    moved_to = f"{folder}.replaced-{stamp}"
    n = 2
    while os.path.exists(moved_to):
        moved_to, n = f"{folder}.replaced-{stamp}-{n}", n + 1
    if resume_from and not storage.is_uri(resume_from):
        source = Path(resume_from).expanduser().resolve()
        if source.is_relative_to(Path(folder).resolve()):
            resume_from = str(Path(moved_to) / source.relative_to(Path(folder).resolve()))
    return RunStart("new", folder, moved_to, resume_from)


def apply_run_start(start: RunStart, config: Config) -> Config:
    """Move the old run folder aside for ``--fresh`` and return ``config`` with the run's
    ``train.resume_from``."""
    if start.moved_to:
        os.rename(start.run_folder, start.moved_to)
        print(f"apex-ray: --fresh: moved the old run folder aside to {start.moved_to}", flush=True)
    elif start.action == "resume" and start.resume_from:
        print(f"apex-ray: run folder {start.run_folder} exists, so the run resumes from its own latest checkpoint; "
              "--resume-from seeds only a run's first start (add --fresh to start this name again from it)",
              flush=True)
    if start.resume_from != config.train.resume_from:
        config = config.model_copy(update={"train": config.train.model_copy(update={"resume_from": start.resume_from})})
    return config


def retag_replaced_runs(tracking_uri: str, experiment: str, run_name: str, run_folder: str, moved_to: str) -> None:
    """After ``--fresh`` moved ``run_folder`` to ``moved_to``: the earlier MLflow runs of this name
    point their ``checkpoint_path`` / ``export_path`` tags at the moved folder. Left as they were,
    they would name the new run's checkpoints of the same step (``.../<name>/step_0000200``)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return
    for old in client.search_runs([found.experiment_id], f"attributes.run_name = '{run_name}'", max_results=1000):
        for key in ("checkpoint_path", "export_path"):
            value = old.data.tags.get(key, "")
            if value == run_folder or value.startswith(run_folder.rstrip("/") + "/"):
                client.set_tag(old.info.run_id, key, moved_to + value[len(run_folder.rstrip("/")):])


def run(config: Config, verbose: bool = False, callbacks: list | None = None,
        train_loop: Callable[[dict], None] | None = None, fresh: bool = False) -> TrainResult:
    """Train with ``config`` (already validated) and return where everything went.

    ``callbacks`` are Ray Train ``UserCallback``s (the sweeps pass Tune's report callback);
    ``train_loop`` is the per-worker loop, :func:`apex_ray.orchestration.worker.train_worker` by
    default (tests wrap it to inject faults). ``fresh`` (``--fresh``): a ``tracking.run_name``
    that already has a run folder starts again as a new run instead of resuming
    (:func:`plan_run_start`).
    """
    tracking_uri = preflight(config)
    output_dir = storage.resolve(config.output_dir)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_name = config.tracking.run_name or f"{config.objective.kind}-{config.model.backbone}-{stamp}"
    ray_storage = storage.join(output_dir, "ray")  # Ray Train's run state and checkpoints
    # Decided (and a --fresh refused) before Ray starts; the old folder moves once Ray is up.
    start = plan_run_start(ray_storage, run_name, bool(config.tracking.run_name), fresh, config.train.resume_from)
    connect(config, tracking_uri, verbose)
    if not storage.is_uri(output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    config = apply_run_start(start, config.model_copy(update={"output_dir": output_dir}))
    if start.moved_to:
        try:
            retag_replaced_runs(tracking_uri, config.tracking.experiment, run_name, start.run_folder, start.moved_to)
        except Exception as err:  # the new run trains regardless; say which tags are now stale
            print(f"apex-ray: could not point the earlier MLflow run(s) {run_name!r} at {start.moved_to} ({err}); "
                  "their checkpoint_path tags still name the old place", flush=True)
    tags = {"objective": config.objective.kind, "backbone": config.model.backbone,
            "strategy": config.distributed.strategy, "workers": str(config.world_size), **config.tracking.tags}
    logger = None
    if start.action == "resume":  # Ray Train resumes this run from its latest checkpoint
        logger = RunLogger.find(tracking_uri, config.tracking.experiment, run_name)
    elif start.action == "retry":  # an attempt that died before its first checkpoint: same run again
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
    method = config.objective.method
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


def _root_error(error: BaseException) -> BaseException:
    """The innermost exception under Ray's wrappers (as :func:`input_error_in` walks them, and
    through Ray Train's ``WorkerHealthCheckFailedError`` to why the worker's process is gone)."""
    seen = {id(error)}
    while True:
        nested = next((n for n in (getattr(error, "_base_exc", None), getattr(error, "cause", None),
                                   getattr(error, "health_check_failure", None), error.__cause__)
                       if isinstance(n, BaseException) and id(n) not in seen), None)
        if nested is None:
            return error
        seen.add(id(nested))
        error = nested


def _process_died(error: BaseException) -> bool:
    """Whether a worker's error says its process is gone (killed, crashed, its node lost) rather
    than that its training function raised."""
    from ray.exceptions import RayActorError

    seen = set()
    while isinstance(error, BaseException) and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RayActorError) or type(error).__name__ == "WorkerHealthCheckFailedError":
            return True
        error = next((n for n in (getattr(error, "_base_exc", None), getattr(error, "cause", None),
                                  getattr(error, "health_check_failure", None), error.__cause__)
                      if isinstance(n, BaseException)), None)
    return False


def describe_training_failure(error: BaseException) -> str:
    """``training failed (rank 1: RuntimeError: boom)`` for the error ``TorchTrainer.fit`` raised
    once no restarts were left (its workers' errors, where Ray gives them)."""
    workers = getattr(error, "worker_failures", None)
    if isinstance(workers, dict) and workers:
        line = describe_worker_failure(workers, 0, -1)
        return "training failed" + line[line.index(" ("):line.index("); ")] + ")"
    root = _root_error(error)
    text = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    return f"training failed ({type(root).__name__}: {text[:200]})"


def describe_worker_failure(worker_exceptions: dict, failures: int, max_failures: int) -> str:
    """The console line for the ``failures``-th worker group failure of a run allowed
    ``max_failures`` restarts (-1: unlimited), e.g. ``apex-ray: worker group failed (rank 1:
    RuntimeError: boom); restarting from the latest checkpoint, 1 of 2 restarts left``."""
    parts = []
    # The ranks whose process died first: when one dies, the others' collectives fail too (gloo /
    # NCCL "connection closed by peer"), and those errors are a consequence, not the reason.
    for rank, error in sorted(worker_exceptions.items(), key=lambda item: (not _process_died(item[1]), item[0])):
        root = _root_error(error)
        text = next((line.strip() for line in str(root).splitlines() if line.strip()), "").removesuffix(".")
        text = text if len(text) <= 200 else text[:197] + "..."
        parts.append(f"rank {rank}: {type(root).__name__}" + (f": {text}" if text else ""))
    why = "; ".join(parts[:3]) + (f"; {len(parts) - 3} more" if len(parts) > 3 else "")
    if max_failures == -1:
        return f"apex-ray: worker group failed ({why}); restarting from the latest checkpoint (unlimited restarts)"
    left = max_failures - failures
    if left < 0:
        return (f"apex-ray: worker group failed ({why}); no restarts left (distributed.max_failures="
                f"{max_failures}), the run stops")
    return (f"apex-ray: worker group failed ({why}); restarting from the latest checkpoint, {left} of "
            f"{max_failures} restart{'s' if max_failures != 1 else ''} left")


def _announce_restarts(queue, max_failures: int):
    """A Ray Train callback (it runs in the controller) that tells the driver's console, through
    the progress ``queue``, why the worker group failed and what happens next. It counts the
    failures as Ray Train's default failure policy does (a preempted node is charged to its own
    budget, so it is announced without using a restart); it never raises, which would turn a
    retryable failure into a controller error."""
    from ray.train import UserCallback

    class AnnounceRestarts(UserCallback):
        def __init__(self) -> None:
            self.failures = 0

        def after_exception(self, run_context, worker_exceptions):
            try:
                if _preempted(worker_exceptions):
                    line = describe_worker_failure(worker_exceptions, 0, -1).replace(
                        "worker group failed", "a node was preempted", 1)
                else:
                    self.failures += 1
                    line = describe_worker_failure(worker_exceptions, self.failures, max_failures)
                queue.actor.put_nowait.remote(line)  # not waited for: the controller's loop goes on
            except Exception:  # noqa: BLE001 - a console line must not fail the run
                pass

    return AnnounceRestarts()


def _preempted(worker_exceptions: dict) -> bool:
    try:
        from ray.train.v2._internal.execution.worker_group.poll import _is_preempted_actor
    except ImportError:
        return False
    return any(_is_preempted_actor(error) for error in worker_exceptions.values())


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
    if prepared is not None:
        _log_dataset_input(logger, prepared)
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
                callbacks=[_stop_on_input_error(), _announce_restarts(queue, config.distributed.max_failures),
                           *(callbacks or [])],
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
    aborted = bool(result.metrics and result.metrics.get("aborted"))
    if checkpoint_path and storage.exists(storage.join(checkpoint_path, "export")):
        export_path = storage.join(checkpoint_path, "export")
        with storage.local_copy(export_path) as local_export:
            _log_exported(config, tracking_uri, logger, Path(local_export), int((result.metrics or {}).get("step", 0)))
    else:
        print("apex-ray: no export in the last checkpoint (aborted or not finished), so no MLflow models logged",
              flush=True)
    logger.set_tags({"checkpoint_path": str(checkpoint_path), "export_path": str(export_path)})
    logger.finish("FAILED" if aborted else "FINISHED")
    return TrainResult(logger.run_id, tracking_uri, checkpoint_path, export_path, dict(result.metrics or {}),
                       ray_storage)


def _log_dataset_input(logger: RunLogger, prepared: str) -> None:
    """The prepared set as the run's dataset input (digest: its manifest's content hash)."""
    from apex_ray.orchestration.mlflow_model import log_prepared_input

    try:
        log_prepared_input(logger.client, logger.run_id, prepared)
    except Exception as err:  # the run trains without it
        print(f"apex-ray: could not log the prepared set {prepared} as an MLflow dataset input ({err})", flush=True)


def _log_exported(config: Config, tracking_uri: str, logger: RunLogger, local_export: Path, step: int) -> None:
    """The exported EMA and student as MLflow logged models of the run (the EMA registered as
    ``tracking.register_model`` when set). The weights are uploaded once, inside the models; the
    run's ``export/`` artifacts hold only what the models do not (the LoRA adapters), or all of
    the export if the models could not be logged."""
    from apex_ray.orchestration.mlflow_model import log_exported_models

    try:
        models = log_exported_models(tracking_uri, logger.run_id, local_export, config, step,
                                     register_as=config.tracking.register_model)
    except Exception as err:  # training finished: its weights go up as plain files, the run stays FINISHED
        print(f"apex-ray: could not log the exported weights as MLflow models ({type(err).__name__}: {err}); "
              "logging them as the run's export/ artifacts instead", flush=True)
        logger.log_artifacts(str(local_export), "export")
        return
    for entry in sorted(local_export.iterdir()):
        if entry.name in models:
            continue
        if entry.is_dir():
            logger.log_artifacts(str(entry), f"export/{entry.name}")
        else:
            logger.client.log_artifact(logger.run_id, str(entry), "export")
    if models:
        named = ", ".join(f"{role} {model_id}" for role, model_id in models.items())
        registered = f"; EMA registered as {config.tracking.register_model!r}" if config.tracking.register_model else ""
        print(f"apex-ray: MLflow models {named} (load with mlflow.pyfunc.load_model('models:/<id>')){registered}",
              flush=True)
