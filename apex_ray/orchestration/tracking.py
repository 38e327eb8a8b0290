"""MLflow tracking: the driver opens the run and logs the config; rank 0 logs metrics and images.

The tracking URI comes from the config, else ``$MLFLOW_TRACKING_URI``, else a sqlite file in the
output folder. A remote server that cannot be reached fails at start-up, before any Ray work.
"""
from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from apex_ray.common import storage

MLFLOW_BATCH_LIMIT = 100  # params / metrics per log_batch call accepted by MLflow servers
MLFLOW_PARAM_LENGTH = 6000


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says which URI and what to do."""


_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@")


def redact_credentials(text: str) -> str:
    """``https://user:token@host/...`` -> ``https://***@host/...`` anywhere in ``text``: what is
    logged to MLflow or printed never carries a password or token from a URI."""
    return _USERINFO.sub(r"\1***@", text)


def resolve_tracking_uri(configured: str | None, output_dir: str | os.PathLike) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if storage.is_uri(output_dir):
        raise TrackingError(f"output_dir is {output_dir}, and the default tracking store (a sqlite file in output_dir) "
                            "cannot live in object storage: run an MLflow server every node can reach and set "
                            "tracking.tracking_uri=http://HOST:5000 or MLFLOW_TRACKING_URI")
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def check_sqlite_writable(uri: str) -> None:
    """A ``sqlite:///FILE`` store whose folder cannot be made or written fails now, with its path,
    not as a SQLAlchemy traceback when the run is created."""
    if not uri.startswith("sqlite:///"):
        return
    file = Path(uri[len("sqlite:///"):])
    folder = file.parent
    missing = []  # made to prove they can be, then removed: a later check may still refuse the run
    parent = folder
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK) and (not file.exists() or os.access(file, os.W_OK))
    except OSError as err:
        raise TrackingError(f"tracking store {uri}: cannot create its folder {folder} ({err.strerror}); set output_dir "
                            "or tracking.tracking_uri to a writable place") from None
    finally:
        for made in missing:
            try:
                made.rmdir()
            except OSError:
                break
    if not writable:
        raise TrackingError(f"tracking store {uri}: {file if file.exists() else folder} is not writable; set "
                            "output_dir or tracking.tracking_uri to a writable place")


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when an HTTP tracking server does not answer its health endpoint."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow server {redact_credentials(uri)} answered /health with HTTP {response.status}")
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {redact_credentials(uri)} ({err}). Start it (e.g. `mlflow server "
            f"--host 127.0.0.1 --port 5000`), fix tracking.tracking_uri / MLFLOW_TRACKING_URI, or unset "
            f"both to log to a local sqlite file."
        ) from None


def _chunks(items: list, size: int = MLFLOW_BATCH_LIMIT):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class RunLogger:
    """Logs to one MLflow run through an explicit client (safe to use from any process)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self._held: list[Metric] = []
        self._held_since: float | None = None
        self._last_logged: float | None = None

    @classmethod
    def create(cls, tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str],
               params: dict[str, Any], description: str | None = None,
               config_yaml: str | None = None) -> "RunLogger":
        """Create the experiment if needed and a new run with ``params``, ``tags`` and the
        standard MLflow tags of where it came from (user, source, git commit, Ray job), its
        ``description`` (the run page's note) and the resolved config as ``config.yaml``."""
        client = MlflowClient(tracking_uri)
        experiment_id = ensure_experiment(client, tracking_uri, experiment)
        all_tags = {**source_tags(), **tags}
        if description:
            all_tags[NOTE_TAG] = description
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={k: redact_credentials(str(v)) for k, v in all_tags.items()})
        logger = cls(tracking_uri, run.info.run_id)
        logger.log_params(params)
        if config_yaml is not None:
            logger.log_text(redact_credentials(config_yaml), "config.yaml")
        return logger

    @classmethod
    def find(cls, tracking_uri: str, experiment: str, run_name: str,
             statuses: tuple[str, ...] | None = None) -> "RunLogger | None":
        """The latest run called ``run_name`` (to keep logging into it when training resumes);
        with ``statuses``, only if that run ended in one of them."""
        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = client.search_runs([found.experiment_id], f"attributes.run_name = '{run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs or (statuses is not None and runs[0].info.status not in statuses):
            return None
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return cls(tracking_uri, runs[0].info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        entries = [Param(key, redact_credentials(str(value))[:MLFLOW_PARAM_LENGTH]) for key, value in params.items()]
        for chunk in _chunks(entries):
            self.client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None,
                    hold_s: float = 0.0) -> None:
        """``timestamp_ms``: when the values were measured (default now); a background writer
        passes it so that the charts' wall-time axis shows the steps, not the writer's lag.
        ``hold_s`` > 0: when points come faster than that, keep them and write them together once
        the oldest held one is that old (one store commit for several logged steps: at
        ``log_every=1`` a commit per step costs rank 0's node a share of a core); points that come
        slower are written at once. :meth:`flush_metrics` writes what is held."""
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        self._held += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        clock = time.monotonic()
        fast = self._last_logged is not None and clock - self._last_logged < hold_s
        self._last_logged = clock
        self._held_since = self._held_since or clock
        if not fast or clock - self._held_since >= hold_s:
            self.flush_metrics()

    def flush_metrics(self) -> None:
        """Write the metric points :meth:`log_metrics` holds."""
        held, self._held, self._held_since = self._held, [], None
        for chunk in _chunks(held):
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: dict[str, str]) -> None:
        for chunk in _chunks([RunTag(k, redact_credentials(str(v))) for k, v in tags.items()]):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_image(self, image, key: str | None = None, step: int | None = None,
                  artifact_file: str | None = None) -> None:
        """An image under ``key`` at ``step`` (the UI's image panel shows it with a step slider and
        side by side across runs), or a plain ``artifact_file`` (a figure such as a heatmap)."""
        if artifact_file is not None:
            self.client.log_image(self.run_id, image, artifact_file)
        else:
            self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def last_logged_step(self, key: str = "loss") -> int:
        """The highest step of metric ``key`` already in the run (0 if none): a resumed attempt
        logs only steps above it, so the charts get no duplicate points."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=0)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the UI's training view (runs, charts), not the GenAI one
NOTE_TAG = "mlflow.note.content"


def ensure_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    """The experiment's id, created if needed: tagged for model training and, for a store on
    this machine's disk, with its artifacts in ``mlartifacts/`` beside the store (not in the
    working directory's ``./mlruns``)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
        experiment_id = client.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    else:
        experiment_id = found.experiment_id
        if EXPERIMENT_KIND_TAG not in found.tags:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment_id


def source_tags() -> dict[str, str]:
    """MLflow's standard tags for who ran what from where: user, entry point, git commit (when
    run from a git checkout), and the Ray job (under ``ray job submit``)."""
    import getpass
    import subprocess
    import sys

    tags = {"mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_SUBMISSION_ID") else "LOCAL",
            "mlflow.source.name": " ".join(["python", *sys.argv[:1]]) if sys.argv and sys.argv[0] else "python"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.getcwd())
        if commit.returncode == 0 and commit.stdout.strip():
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("RAY_JOB_SUBMISSION_ID"):
        tags["ray.job_submission_id"] = os.environ["RAY_JOB_SUBMISSION_ID"]
    return tags


def is_local_store(uri: str) -> bool:
    """A tracking store on this machine's disk (sqlite, file or a bare path), not a server."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def check_store_reachable(uri: str, nodes: int, ray_address: str | None) -> None:
    """Refuse a store the workers cannot open: rank 0 logs from whichever node it lands on, so a
    sqlite file on the driver's disk only works when the whole cluster is this one machine."""
    if not is_local_store(uri):
        return
    where = None
    if ray_address and ray_address.startswith("ray://"):
        where = f"the driver is a Ray client of {ray_address}"
    elif nodes > 1:
        where = f"the cluster has {nodes} nodes"
    if where:
        raise TrackingError(
            f"tracking store {redact_credentials(uri)} is a file on this machine, but {where}: rank 0 may run on another "
            "node and could not open it. Run an MLflow server every node can reach (see cluster.yaml) "
            "and set tracking.tracking_uri=http://HOST:5000 or MLFLOW_TRACKING_URI.")
