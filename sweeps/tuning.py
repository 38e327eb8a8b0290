"""What every ablation sweep shares: trials as Ray Tune trials that each run a TorchTrainer.

A sweep is a list of cells (grid search) or a search space (Optuna), a base :class:`Config`
and a metric. Each Tune trial is a small driver function (:func:`run_trial`) that builds its
config and calls :func:`apex_ray.train.run` with Tune's ``TuneReportCallback``: the Train V2
way to nest Train in Tune. The driver holds no CPU; the Train workers hold theirs, and trial
concurrency is derived from the cluster's resources so trainers never wait on each other.

MLflow (the training runs' store and experiment unless told otherwise, see :func:`sweep_tracking_uri`):
one parent run per sweep (sweep config, final table as markdown and CSV, heatmap,
best trial) and one child run per trial (``mlflow.parentRunId``), written by the trial's own
training run (params, metric curves, NFE-1 sample grid).
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from apex_ray.common import storage
from apex_ray.config import Config, ConfigError
from apex_ray.orchestration.tracking import RunLogger, redact_credentials, resolve_tracking_uri

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall")


@dataclass(frozen=True)
class Cell:
    """One grid trial: a label, the config keys it sets, and where it sits in the table."""

    label: str
    overrides: dict[str, Any]
    row: str = ""
    column: str = ""


@dataclass(frozen=True)
class SearchRange:
    """A continuous range for ``--search optuna``: ``key`` is a dotted config path."""

    key: str
    low: float
    high: float
    log: bool = False


@dataclass
class Sweep:
    """A whole sweep, validated before any trial starts (see :func:`build_trial_config`)."""

    name: str
    kind: str  # "condition_shift" | "loss_weights": the table layout
    base: Config
    output_dir: str  # a local folder or a URI (s3://...), see apex_ray.common.storage
    cells: list[Cell] = field(default_factory=list)  # grid search
    search: list[SearchRange] = field(default_factory=list)  # optuna
    num_samples: int = 0  # optuna trial budget
    nfe: int = 1
    concurrency: int | None = None
    scheduler: str = "none"  # none | asha
    resume: bool = False
    verbose: bool = False
    train_loop: Callable[[dict], None] | None = None  # the per-worker loop of every trial (default: train_worker)

    def __post_init__(self) -> None:
        self.output_dir = storage.resolve(self.output_dir)  # Tune needs an absolute path (or a URI)

    @property
    def metric(self) -> str:
        return f"shapeeval_nfe{self.nfe}/overall"

    @property
    def directory(self) -> str:
        return storage.join(self.output_dir, self.name)


@dataclass
class TrialOutcome:
    label: str
    row: str
    column: str
    params: dict[str, Any]
    status: str  # ok | failed | diverged | unfinished
    scores: dict[str, float]
    run_id: str | None = None
    error: str | None = None
    overall_at: dict[int, float] = field(default_factory=dict)  # Overall at the other scored NFEs

    @property
    def overall(self) -> float:
        return self.scores.get("overall", float("nan"))


class SweepError(RuntimeError):
    """A sweep cannot start (bad option, existing sweep without --resume, too few resources)."""


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", label).strip("_")


def build_trial_config(sweep: Sweep, label: str, overrides: dict[str, Any], tracking_uri: str,
                       parent_run_id: str | None) -> Config:
    """The trial's full config: base + the cell's keys + where it logs and writes."""
    tags = {**sweep.base.tracking.tags, "sweep": sweep.name, "sweep_trial": label}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # nests the child under the parent in the UI
    changes = {**overrides, "tracking.tracking_uri": tracking_uri, "tracking.run_name": f"{sweep.name}/{label}",
               "tracking.tags": tags, "output_dir": storage.join(sweep.directory, "trials", slug(label))}
    try:
        return sweep.base.with_changes(changes)
    except ConfigError as err:  # the message names the field
        raise ConfigError(f"trial {label!r}: {err}") from None


def trial_resources(config: Config) -> dict[str, float]:
    """What one trial's Train workers hold (the Tune driver itself holds nothing)."""
    needs = {"CPU": config.world_size * config.distributed.cpus_per_worker}
    if config.distributed.use_gpu:
        needs["GPU"] = float(config.world_size)
    return needs


def derive_concurrency(needs: dict[str, float], available: dict[str, float], requested: int | None) -> int:
    """How many trials fit side by side: more would leave trainers waiting on each other."""
    fits = min(int(available.get(name, 0.0) // amount) for name, amount in needs.items() if amount > 0)
    if fits < 1:
        raise SweepError(f"one trial needs {needs} but the cluster has {available}; lower "
                         "distributed.num_workers / cpus_per_worker or add nodes")
    return fits if requested is None else max(1, min(requested, fits))


def evaluation_report_callback(metric: str):
    """Tune's ``TuneReportCallback``, forwarding only evaluation reports (those carrying ``metric``)
    and aborts: evaluation steps are the rungs at which ASHA compares trials."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardEvaluations(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = metrics[0] if metrics else {}
            if metric in first or first.get("aborted"):
                super().after_report(run_context, metrics, checkpoint)

    return ForwardEvaluations()


def _progress_printer(sweep: Sweep, total: int):
    """A Tune callback printing one line per finished trial, with the count and the elapsed time."""
    import time

    from ray.tune import Callback

    class Progress(Callback):
        def setup(self, **info) -> None:  # also on --resume: the clock restarts
            self.started = time.perf_counter()

        def _say(self, trials, trial, status: str) -> None:
            done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
            result = trial.last_result or {}
            label = trial_label(trial.config)
            score = result.get(sweep.metric)
            shown = f" {sweep.metric} {score:.3f}" if status == "ok" and score is not None else ""
            minutes = (time.perf_counter() - getattr(self, "started", time.perf_counter())) / 60
            print(f"trial {label}: {status}{shown} [{done}/{total} done, {minutes:.1f} min]", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._say(trials, trial, (trial.last_result or {}).get("trial_status", "ok"))

        def on_trial_error(self, iteration, trials, trial, **info):
            self._say(trials, trial, "failed")

    return Progress()


def search_label(params: dict) -> str:
    """A searched trial's name: its sampled values, e.g. ``shift_a=-0.4 shift_b=0.8``."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value:.4g}" for key, value in sorted(params.items()))


def trial_label(params: dict) -> str:
    """A grid cell's label, or a searched trial's sampled values."""
    cell = params.get("cell")
    return cell["label"] if cell else search_label(params)


def run_trial(params: dict, sweep: Sweep, tracking_uri: str, parent_run_id: str) -> None:
    """One Tune trial: a TorchTrainer run of the trial's config (a Train V2 driver function)."""
    from ray import tune

    from apex_ray.orchestration.launcher import run

    cell = params.get("cell")
    overrides = cell["overrides"] if cell else dict(params)  # optuna: params are dotted config keys
    label = trial_label(params)
    config = build_trial_config(sweep, label, overrides, tracking_uri, parent_run_id)
    result = run(config, verbose=sweep.verbose, callbacks=[evaluation_report_callback(sweep.metric)],
                 train_loop=sweep.train_loop)
    # The last word: status and child run id, on top of the final evaluation.
    final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    score = final.get(sweep.metric, float("nan"))
    status = "diverged" if final.get("aborted") or not math.isfinite(score) else "ok"
    tune.report({**final, sweep.metric: score, "trial_status": status, "mlflow_run_id": result.run_id,
                 "trial_label": label})


def _param_space(sweep: Sweep) -> dict:
    from ray import tune

    if sweep.search:
        return {r.key: (tune.loguniform if r.log else tune.uniform)(r.low, r.high) for r in sweep.search}
    return {"cell": tune.grid_search([{"label": c.label, "overrides": c.overrides} for c in sweep.cells])}


def _tune_config(sweep: Sweep, concurrency: int):
    from ray import tune

    scheduler = search_alg = None
    if sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="step", max_t=sweep.base.train.steps,
                                  grace_period=min(sweep.base.train.eval_every, sweep.base.train.steps),
                                  reduction_factor=2)
    if sweep.search:
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=sweep.base.train.seed)
    return tune.TuneConfig(metric=sweep.metric, mode="max", scheduler=scheduler, search_alg=search_alg,
                           num_samples=sweep.num_samples if sweep.search else 1,
                           max_concurrent_trials=concurrency,
                           trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}")


def sweep_tracking_uri(sweep: Sweep) -> str:
    """Where the sweep's parent and child runs go: ``tracking.tracking_uri``, else
    ``$MLFLOW_TRACKING_URI``, else the store training runs use by default (the sqlite file in the
    base config's ``output_dir``, ``runs/apex/mlflow.db``), in the same experiment, so sweeps sit
    beside ordinary runs. A sweep or base output_dir in object storage needs a tracking server. A
    sweep folder holding its own ``mlflow.db`` (begun before this default) keeps using it."""
    configured = sweep.base.tracking.tracking_uri
    own = resolve_tracking_uri(configured, sweep.directory)  # a URI sweep folder: refused without a server
    if own.startswith("sqlite:///") and Path(own[len("sqlite:///"):]).is_file():
        return own  # a sweep begun when each sweep had its own store: --resume keeps it in one place
    return resolve_tracking_uri(configured, sweep.base.output_dir)


def validate(sweep: Sweep) -> tuple[str, Config]:
    """Everything that can fail before a trial starts: every trial's config is built and checked.

    Returns the tracking URI and the first trial's config (its resources size the concurrency)."""
    if not sweep.cells and not sweep.search:
        raise SweepError("the sweep has no trials")
    if sweep.search and sweep.num_samples < 1:
        raise SweepError("--search optuna needs --trials N (N >= 1)")
    if sweep.scheduler not in ("none", "asha"):
        raise SweepError(f"--scheduler: unknown {sweep.scheduler!r}; use none or asha")
    if sweep.nfe not in sweep.base.eval.score_nfe:
        raise SweepError(f"the sweep scores NFE {sweep.nfe} but eval.score_nfe is {sweep.base.eval.score_nfe}")
    for r in sweep.search:
        if not r.low < r.high:
            raise SweepError(f"search range for {r.key}: low {r.low} must be below high {r.high}")
        if r.log and r.low <= 0:
            raise SweepError(f"search range for {r.key}: a log range needs low > 0")
    state = storage.join(sweep.directory, "tune")
    if storage.exists(state) and not sweep.resume:
        raise SweepError(f"sweep {sweep.name!r} already exists in {sweep.directory}; pass --resume to "
                         "finish it, or --name NEW to start another")
    if sweep.resume and not storage.exists(state):
        raise SweepError(f"--resume: no sweep {sweep.name!r} in {sweep.directory}")
    from apex_ray.orchestration.launcher import preflight

    uri = sweep_tracking_uri(sweep)
    cells = sweep.cells or [Cell("probe", {r.key: r.low for r in sweep.search})]
    configs = [build_trial_config(sweep, c.label, c.overrides, uri, None) for c in cells]
    preflight(configs[0])  # the tracking server: shared by all trials
    if not sweep.resume and parent_runs(uri, sweep.base.tracking.experiment, sweep.name):
        # The store outlives the sweep's folder (it is the training runs' store): a new sweep of the
        # same name would sit beside the old parent, and its trials would take over the old sweep's
        # failed child runs of the same names (a rerun name resumes that run).
        raise SweepError(f"the MLflow store {redact_credentials(uri)} already holds a sweep {sweep.name!r} (experiment "
                         f"{sweep.base.tracking.experiment!r}), but {sweep.directory} has no Tune state to resume; "
                         "start this one with --name NEW, or delete the old sweep's runs in MLflow to reuse the name")
    return uri, configs[0]


def parent_runs(uri: str, experiment: str, name: str) -> list:
    """The sweep parent runs called ``name`` in ``experiment``, newest first. The store is shared
    with ordinary training runs, so a parent is told by its ``role`` tag, not by its name alone."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return []  # no store yet: do not create one before the sweep starts
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], f"attributes.run_name = '{name}' and tags.role = 'sweep-parent'",
                              order_by=["attributes.start_time DESC"])


def run_sweep(sweep: Sweep) -> list[TrialOutcome]:
    """Run (or resume) the sweep; log the parent run; return one outcome per trial."""
    import ray
    from ray import tune

    from apex_ray.orchestration.launcher import connect

    uri, first = validate(sweep)
    connect(first, uri, sweep.verbose)  # before the parent run or any trial
    if not storage.is_uri(sweep.directory):
        Path(sweep.directory).mkdir(parents=True, exist_ok=True)
    parent = None
    if sweep.resume:  # the interrupted sweep's parent run, reopened
        found = parent_runs(uri, sweep.base.tracking.experiment, sweep.name)
        if found:
            parent = RunLogger(uri, found[0].info.run_id)
            parent.client.update_run(parent.run_id, status="RUNNING")
    if parent is None:
        params = {"sweep": sweep.kind, "metric": sweep.metric, "trials": len(sweep.cells) or sweep.num_samples,
                  "scheduler": sweep.scheduler, "search": "optuna" if sweep.search else "grid",
                  **{f"base.{k}": v for k, v in sweep.base.to_flat_dict().items()}}
        parent = RunLogger.create(uri, sweep.base.tracking.experiment, sweep.name,
                                  {"sweep": sweep.kind, "role": "sweep-parent"}, params)
    needs = trial_resources(first)
    concurrency = derive_concurrency(needs, ray.cluster_resources(), sweep.concurrency)
    print(f"apex-ray sweep {sweep.name!r}: {len(sweep.cells) or sweep.num_samples} trials, "
          f"{concurrency} at a time ({needs} each), scoring {sweep.metric}", flush=True)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep, tracking_uri=uri, parent_run_id=parent.run_id),
        {"CPU": 0, "memory": 64 * 1024**2},  # the driver only waits; it must not hold a CPU a worker needs
    )
    state = storage.join(sweep.directory, "tune")
    progress = _progress_printer(sweep, len(sweep.cells) or sweep.num_samples)
    try:
        if sweep.resume:
            tuner = tune.Tuner.restore(state, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(trainable, param_space=_param_space(sweep), tune_config=_tune_config(sweep, concurrency),
                               run_config=tune.RunConfig(name="tune", storage_path=sweep.directory,
                                                         verbose=1 if sweep.verbose else 0, callbacks=[progress]))
        tuner.fit()
    except BaseException:
        parent.finish("KILLED")
        raise
    from ray.tune import ExperimentAnalysis

    outcomes = [_outcome(trial, sweep) for trial in ExperimentAnalysis(state).trials]
    # An interrupted sweep may not have created every trial yet: those are unfinished too.
    seen = {o.label for o in outcomes}
    outcomes += [TrialOutcome(c.label, c.row, c.column, c.overrides, "unfinished", {})
                 for c in sweep.cells if c.label not in seen]
    outcomes += [TrialOutcome(f"trial {i + 1}", "", "", {}, "unfinished", {})
                 for i in range(len(outcomes), sweep.num_samples if sweep.search else 0)]
    order = {c.label: i for i, c in enumerate(sweep.cells)}
    outcomes.sort(key=lambda o: order.get(o.label, len(order)))
    _log_parent(parent, sweep, outcomes)
    return outcomes


def _outcome(trial, sweep: Sweep) -> TrialOutcome:
    """A Tune trial as a table entry: ok | diverged | failed | unfinished (interrupted)."""
    params = trial.config or {}
    cell = params.get("cell")
    metrics = trial.last_result or {}
    label = trial_label(params) if params else trial.trial_id
    coords = {c.label: c for c in sweep.cells}.get(label, Cell(label, {}))
    scores = {task: float(metrics[f"shapeeval_nfe{sweep.nfe}/{task}"]) for task in TASKS
              if f"shapeeval_nfe{sweep.nfe}/{task}" in metrics}
    overall_at = {n: float(metrics[f"shapeeval_nfe{n}/overall"]) for n in sweep.base.eval.score_nfe
                  if n != sweep.nfe and f"shapeeval_nfe{n}/overall" in metrics}
    error = None
    if trial.status == "ERROR":
        status = "failed"
        error = (trial.get_error() and str(trial.get_error()).strip().splitlines()[-1][:300]) or None
    elif trial.status == "TERMINATED":
        # ASHA-stopped trials end without the driver's last word: their last evaluation stands.
        status = metrics.get("trial_status") or ("ok" if scores else "failed")
    else:
        status = "unfinished"
    flat = cell["overrides"] if cell else dict(params)
    return TrialOutcome(label, coords.row, coords.column, flat, status, scores, metrics.get("mlflow_run_id"), error,
                        overall_at)


def cell_text(outcome: TrialOutcome | None) -> str:
    if outcome is None:
        return "—"
    if outcome.status != "ok":
        return outcome.status
    return f"{outcome.overall:.3f}"


def grid_table(outcomes: list[TrialOutcome], rows: list[str], columns: list[str], corner: str) -> str:
    """Markdown in the paper's layout: one row per ``row``, one column per ``column``."""
    by_place = {(o.row, o.column): o for o in outcomes}
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cell_text(by_place.get((row, c))) for c in columns) + " |")
    return "\n".join(lines)


def trials_csv(outcomes: list[TrialOutcome]) -> str:
    out = io.StringIO()
    keys = sorted({k for o in outcomes for k in o.params})
    writer = csv.writer(out)
    others = sorted({n for o in outcomes for n in o.overall_at})
    writer.writerow(["label", *keys, "status", *TASKS, *(f"overall_nfe{n}" for n in others), "mlflow_run_id",
                     "error"])
    for o in outcomes:
        writer.writerow([o.label, *(o.params.get(k, "") for k in keys), o.status,
                         *(f"{o.scores[t]:.4f}" if t in o.scores else "" for t in TASKS),
                         *(f"{o.overall_at[n]:.4f}" if n in o.overall_at else "" for n in others),
                         o.run_id or "", o.error or ""])
    return out.getvalue()


def per_task_table(outcomes: list[TrialOutcome]) -> str:
    others = sorted({n for o in outcomes for n in o.overall_at})
    head = [*TASKS, *(f"overall NFE {n}" for n in others)]
    lines = ["| trial | status | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for o in outcomes:
        cells = [f"{o.scores[t]:.3f}" if t in o.scores else "—" for t in TASKS]
        cells += [f"{o.overall_at[n]:.3f}" if n in o.overall_at else "—" for n in others]
        lines.append(f"| {o.label} | {o.status} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmap(outcomes: list[TrialOutcome], rows: list[str], columns: list[str], title: str, xlabel: str,
            ylabel: str):
    """A PIL image of the grid (failed/diverged cells hatched grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    by_place = {(o.row, o.column): o for o in outcomes}
    values = np.full((len(rows), len(columns)), np.nan)
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            o = by_place.get((row, col))
            if o is not None and o.status == "ok":
                values[i, j] = o.overall
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 2, 0.8 * len(rows) + 1.5), dpi=100)
    ax.set_facecolor("#cccccc")
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=max(1e-6, float(np.nanmax(values))) if np.isfinite(values).any() else 1)
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            ax.text(j, i, cell_text(by_place.get((row, col))), ha="center", va="center",
                    color="white" if np.isfinite(values[i, j]) else "black", fontsize=9)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def layout(sweep: Sweep) -> tuple[list[str], list[str]]:
    rows = list(dict.fromkeys(c.row for c in sweep.cells))
    columns = list(dict.fromkeys(c.column for c in sweep.cells))
    return rows, columns


def render(sweep: Sweep, outcomes: list[TrialOutcome]) -> str:
    """The table printed and logged: paper layout for grids, a ranked list for Optuna."""
    if sweep.cells:
        rows, columns = layout(sweep)
        corner = {"condition_shift": "a \\ b", "loss_weights": "λp : λe"}.get(sweep.kind, "")
        main = grid_table(outcomes, rows, columns, corner)
    else:
        ranked = sorted(outcomes, key=lambda o: -o.overall if o.status == "ok" else math.inf)
        main = per_task_table(ranked)
    title = f"ShapeEval Overall at NFE {sweep.nfe} ({sweep.base.train.steps} steps per trial)"
    return f"{title}\n\n{main}\n\nPer task:\n\n{per_task_table(outcomes)}\n"


def _log_parent(parent: RunLogger, sweep: Sweep, outcomes: list[TrialOutcome]) -> None:
    text = render(sweep, outcomes)
    parent.log_text(text, "table.md")
    parent.log_text(trials_csv(outcomes), "table.csv")
    if sweep.cells:
        rows, columns = layout(sweep)
        labels = {"condition_shift": ("b", "a"), "loss_weights": ("", "λp : λe")}.get(sweep.kind, ("", ""))
        parent.log_image(heatmap(outcomes, rows, columns, f"{sweep.name}: Overall @ NFE {sweep.nfe}", *labels),
                         artifact_file="heatmap.png")
    done = [o for o in outcomes if o.status == "ok"]
    counts = {status: sum(o.status == status for o in outcomes) for status in ("ok", "failed", "diverged")}
    parent.log_metrics({f"trials_{k}": v for k, v in counts.items()}, 0)
    if done:
        best = max(done, key=lambda o: o.overall)
        parent.log_metrics({"best_overall": best.overall}, 0)
        parent.set_tags({"best_trial": best.label, "best_run_id": best.run_id or ""})
    if any(o.status == "unfinished" for o in outcomes):
        parent.finish("KILLED")  # interrupted: `--resume` reopens this run
    else:
        parent.finish("FINISHED" if counts["ok"] else "FAILED")
