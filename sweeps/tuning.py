"""What every ablation sweep shares: trials as Ray Tune trials that each run a TorchTrainer.

A sweep is a list of cells (grid search) or a search space (Optuna), a base :class:`Config`
and a metric. Each Tune trial is a small driver function (:func:`run_trial`) that builds its
config and calls :func:`apex_ray.train.run` with Tune's ``TuneReportCallback``: the Train V2
way to nest Train in Tune. The driver holds no CPU; the Train workers hold theirs, and trial
concurrency is derived from the cluster's resources so trainers never wait on each other.

MLflow (the training runs' store and experiment unless told otherwise, see :func:`sweep_tracking_uri`):
one parent run per sweep (sweep config, final table as markdown and CSV, heatmap,
best trial, per-cell means and intervals) and one child run per trial (``mlflow.parentRunId``),
written by the trial's own training run (params, metric curves, NFE-1 sample grid).

Seeds and intervals: every cell runs once per ``Sweep.seeds`` (``train.seed``). After the trials,
the driver scores each finished trial's exported EMA and student offline
(:func:`apex_ray.engine.scoring.score_export`, ``images_per_prompt`` images per prompt at every
scored NFE) and reports per cell the mean and a 95% bootstrap interval over prompts (stratified by
task) and seeds (:mod:`apex_ray.shapeeval.intervals`).
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from apex_ray.common import storage
from apex_ray.config import Config, ConfigError
from apex_ray.orchestration.tracking import RunLogger, redact_credentials, resolve_tracking_uri

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall")
ROLES = ("ema", "student")  # the exported models scored offline (export/ema, export/student)


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
    seeds: list[int] = field(default_factory=list)  # train.seed of each cell's trials (default: the base seed)
    images_per_prompt: int = 4  # ShapeEval images per prompt when the exports are scored (the tables)
    n_boot: int = 2000  # bootstrap replicates of each interval
    score_exports: bool = True  # score every finished trial's export/ema and export/student after the sweep

    def __post_init__(self) -> None:
        self.output_dir = storage.resolve(self.output_dir)  # Tune needs an absolute path (or a URI)
        if not self.seeds:
            self.seeds = [self.base.train.seed]

    def trial_name(self, cell: Cell, seed: int) -> str:
        """``<cell label> seed=<s>``; with a single seed the cell's label alone (as before seeds)."""
        return cell.label if len(self.seeds) == 1 else f"{cell.label} seed={seed}"

    def grid_trials(self) -> list[tuple[str, Cell, int]]:
        """Every grid trial as (label, cell, seed): each cell once per seed, cell by cell."""
        return [(self.trial_name(c, s), c, s) for c in self.cells for s in self.seeds]

    @property
    def trial_count(self) -> int:
        return len(self.cells) * len(self.seeds) if self.cells else self.num_samples

    @property
    def scored_nfe(self) -> list[int]:
        """The table's NFE first, then the others of ``eval.score_nfe``."""
        return [self.nfe, *sorted(n for n in self.base.eval.score_nfe if n != self.nfe)]

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
    cell: str = ""  # the grid cell's label (default: ``label``): a cell's seeds share it
    seed: int | None = None  # train.seed
    export_path: str | None = None  # <checkpoint>/export, holding ema/ and student/
    # Offline scores of the exports: (role, nfe) -> per-image correctness [prompts, images_per_prompt].
    correct: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cell = self.cell or self.label

    @property
    def overall(self) -> float:
        """Overall at the final training-time evaluation (the EMA, ``eval.images_per_prompt`` images)."""
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
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value:.4g}" for key, value in sorted(params.items())
                    if key != "train.seed")


def trial_label(params: dict) -> str:
    """A grid cell's label, or a searched trial's sampled values."""
    cell = params.get("cell")
    return cell["label"] if cell else search_label(params)


def run_trial(params: dict, sweep: Sweep, tracking_uri: str, parent_run_id: str) -> None:
    """One Tune trial: a TorchTrainer run of the trial's config (a Train V2 driver function)."""
    from ray import tune

    from apex_ray.orchestration.launcher import run

    cell = params.get("cell")
    # optuna: params are dotted config keys, and the one seed validate() allows is the trial's
    overrides = cell["overrides"] if cell else {**params, "train.seed": sweep.seeds[0]}
    label = trial_label(params)
    config = build_trial_config(sweep, label, overrides, tracking_uri, parent_run_id)
    result = run(config, verbose=sweep.verbose, callbacks=[evaluation_report_callback(sweep.metric)],
                 train_loop=sweep.train_loop)
    # The last word: status and child run id, on top of the final evaluation.
    final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    score = final.get(sweep.metric, float("nan"))
    status = "diverged" if final.get("aborted") or not math.isfinite(score) else "ok"
    tune.report({**final, sweep.metric: score, "trial_status": status, "mlflow_run_id": result.run_id,
                 "trial_label": label, "export_path": str(result.export_path or "")})


def _param_space(sweep: Sweep) -> dict:
    from ray import tune

    if sweep.search:
        return {r.key: (tune.loguniform if r.log else tune.uniform)(r.low, r.high) for r in sweep.search}
    return {"cell": tune.grid_search(grid_trial_params(sweep))}


def grid_trial_params(sweep: Sweep) -> list[dict]:
    """The grid's trials as Tune sees them: label, cell label, seed and the config keys they set."""
    return [{"label": label, "cell_label": c.label, "seed": seed, "overrides": {**c.overrides, "train.seed": seed}}
            for label, c, seed in sweep.grid_trials()]


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
    if not sweep.seeds or len(set(sweep.seeds)) != len(sweep.seeds):
        raise SweepError(f"--seeds: expected distinct seeds, got {sweep.seeds}")
    if sweep.search and len(sweep.seeds) > 1:
        raise SweepError("--seeds with more than one seed needs --search grid (Optuna samples one trial per point)")
    if not 1 <= sweep.images_per_prompt <= 1000:
        raise SweepError(f"--images-per-prompt must be in 1..1000, got {sweep.images_per_prompt}")
    if sweep.n_boot < 1:
        raise SweepError(f"bootstrap replicates must be at least 1, got {sweep.n_boot}")
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
    trials = [(label, {**c.overrides, "train.seed": seed}) for label, c, seed in sweep.grid_trials()] or \
        [("probe", {**{r.key: r.low for r in sweep.search}, "train.seed": sweep.seeds[0]})]
    configs = [build_trial_config(sweep, label, overrides, uri, None) for label, overrides in trials]
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
        params = {"sweep": sweep.kind, "metric": sweep.metric, "trials": sweep.trial_count,
                  "scheduler": sweep.scheduler, "search": "optuna" if sweep.search else "grid",
                  "seeds": ",".join(str(s) for s in sweep.seeds), "images_per_prompt": sweep.images_per_prompt,
                  "bootstrap_replicates": sweep.n_boot, "score_exports": sweep.score_exports,
                  **{f"base.{k}": v for k, v in sweep.base.to_flat_dict().items()}}
        parent = RunLogger.create(uri, sweep.base.tracking.experiment, sweep.name,
                                  {"sweep": sweep.kind, "role": "sweep-parent"}, params)
    needs = trial_resources(first)
    concurrency = derive_concurrency(needs, ray.cluster_resources(), sweep.concurrency)
    print(f"apex-ray sweep {sweep.name!r}: {sweep.trial_count} trials, "
          f"{concurrency} at a time ({needs} each), scoring {sweep.metric}", flush=True)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep, tracking_uri=uri, parent_run_id=parent.run_id),
        {"CPU": 0, "memory": 64 * 1024**2},  # the driver only waits; it must not hold a CPU a worker needs
    )
    state = storage.join(sweep.directory, "tune")
    progress = _progress_printer(sweep, sweep.trial_count)
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
    outcomes += [TrialOutcome(label, c.row, c.column, {**c.overrides, "train.seed": seed}, "unfinished", {},
                              cell=c.label, seed=seed)
                 for label, c, seed in sweep.grid_trials() if label not in seen]
    outcomes += [TrialOutcome(f"trial {i + 1}", "", "", {}, "unfinished", {})
                 for i in range(len(outcomes), sweep.num_samples if sweep.search else 0)]
    order = {label: i for i, (label, _, _) in enumerate(sweep.grid_trials())}
    outcomes.sort(key=lambda o: order.get(o.label, len(order)))
    if sweep.score_exports:
        try:
            score_outcomes(sweep, outcomes)
        except BaseException:
            parent.finish("KILLED")
            raise
    _log_parent(parent, sweep, outcomes)
    return outcomes


def _outcome(trial, sweep: Sweep) -> TrialOutcome:
    """A Tune trial as a table entry: ok | diverged | failed | unfinished (interrupted)."""
    params = trial.config or {}
    cell = params.get("cell")
    metrics = trial.last_result or {}
    label = trial_label(params) if params else trial.trial_id
    cell_label = (cell or {}).get("cell_label", label)  # sweeps begun before --seeds: the label is the cell's
    coords = {c.label: c for c in sweep.cells}.get(cell_label, Cell(cell_label, {}))
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
    seed = cell.get("seed", flat.get("train.seed")) if cell else sweep.seeds[0]
    export = metrics.get("export_path") or (find_export(sweep, label) if status == "ok" else None)
    return TrialOutcome(label, coords.row, coords.column, flat, status, scores, metrics.get("mlflow_run_id"), error,
                        overall_at, cell=cell_label, seed=seed, export_path=export or None)


def find_export(sweep: Sweep, label: str) -> str | None:
    """The newest ``export`` folder (holding ``ema/``) under the trial's output folder
    ``<sweep dir>/trials/<slug(label)>``, for trials whose last report carries no export path
    (ASHA-stopped trials, sweeps begun before exports were reported). Local sweep folders only."""
    if storage.is_uri(sweep.directory):
        return None
    root = Path(sweep.directory) / "trials" / slug(label)
    found = sorted((p.parent for p in root.rglob("export/ema") if p.is_dir()), key=lambda p: str(p))
    return str(found[-1]) if found else None


Scorer = Callable[[str, int, int], np.ndarray]  # (model folder, images_per_prompt, nfe) -> [prompts, images]


def export_scorer(sweep: Sweep) -> Scorer:
    """:func:`apex_ray.engine.scoring.score_export` with the base config's text encoder, built once."""
    import torch

    from apex_ray.engine.scoring import score_export
    from apex_ray.models import build_text_encoder

    device = "cuda" if sweep.base.distributed.use_gpu and torch.cuda.is_available() else "cpu"
    encoder = []

    def score(folder: str, images_per_prompt: int, nfe: int) -> np.ndarray:
        if not encoder:
            encoder.append(build_text_encoder(sweep.base.model.text_encoder, sweep.base.model.text_encoder_path,
                                              device=device))
        return score_export(folder, images_per_prompt, nfe, encoder[0], device)

    return score


def score_outcomes(sweep: Sweep, outcomes: list[TrialOutcome], scorer: Scorer | None = None) -> None:
    """Score each finished trial's ``export/ema`` and ``export/student`` at every scored NFE with
    ``sweep.images_per_prompt`` images per prompt, into ``outcome.correct``. Scores are cached as
    ``<sweep dir>/scores/<trial>/<role>_nfe<N>_ipp<I>.npy`` (local sweep folders), so ``--resume``
    does not score a trial twice. A trial whose export is missing or fails to score keeps no
    offline scores (its cell then shows the training-time evaluation; the line says why)."""
    todo = [o for o in outcomes if o.status == "ok"]
    missing = [o.label for o in todo if not o.export_path]
    if missing:
        print(f"apex-ray sweep: no export to score for {len(missing)} trial(s): {', '.join(missing)}", flush=True)
    todo = [o for o in todo if o.export_path]
    if not todo:
        return
    scorer = scorer or export_scorer(sweep)
    cache = None if storage.is_uri(sweep.directory) else Path(sweep.directory) / "scores"
    print(f"apex-ray sweep: scoring {len(todo)} trial(s) x {len(ROLES)} exports at NFE "
          f"{','.join(str(n) for n in sweep.scored_nfe)}, {sweep.images_per_prompt} images per prompt", flush=True)
    for o in todo:
        try:
            with storage.local_copy(o.export_path) as local:
                for role in ROLES:
                    for nfe in sweep.scored_nfe:
                        path = None if cache is None else (
                            cache / slug(o.label) / f"{role}_nfe{nfe}_ipp{sweep.images_per_prompt}.npy")
                        if path is not None and path.is_file():
                            o.correct[(role, nfe)] = np.load(path)
                            continue
                        correct = np.asarray(scorer(str(Path(local) / role), sweep.images_per_prompt, nfe), dtype=bool)
                        o.correct[(role, nfe)] = correct
                        if path is not None:
                            path.parent.mkdir(parents=True, exist_ok=True)
                            np.save(path, correct)
        except Exception as err:  # the sweep's table still comes out
            print(f"apex-ray sweep: could not score the export of {o.label} ({type(err).__name__}: {err})", flush=True)


def prompt_tasks() -> list[str]:
    """The task of each ShapeEval evaluation prompt (the rows of ``TrialOutcome.correct``)."""
    from apex_ray.shapeeval import EVAL_PROMPTS

    return [p.task for p in EVAL_PROMPTS]


@dataclass
class CellSummary:
    """A grid cell over its seeds: its trials and, per (role, nfe) scored for every finished seed,
    ``task -> (mean, lo, hi)`` (see :func:`apex_ray.shapeeval.intervals.bootstrap_intervals`)."""

    label: str
    row: str
    column: str
    trials: list[TrialOutcome]
    intervals: dict[tuple[str, int], dict[str, tuple[float, float, float]]] = field(default_factory=dict)

    @property
    def ok(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.status == "ok"]

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        return "/".join(dict.fromkeys(t.status for t in self.trials)) or "—"

    @property
    def seeds_text(self) -> str:
        return f"{len(self.ok)}/{len(self.trials)}"

    def mean(self, role: str, nfe: int, task: str = "overall") -> float:
        """The offline mean, else (EMA only) the mean over seeds of the training-time evaluation."""
        if (role, nfe) in self.intervals:
            return self.intervals[(role, nfe)][task][0]
        return self._training_mean(role, nfe, task)

    def _training_mean(self, role: str, nfe: int, task: str) -> float:
        if role != "ema" or not self.ok:
            return float("nan")
        values = [t.scores.get(task) if task != "overall" or nfe not in t.overall_at else t.overall_at[nfe]
                  for t in self.ok]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else float("nan")


def summarize(items: list, n_boot: int = 2000) -> list[CellSummary]:
    """Trials grouped by cell (first-seen order) with intervals over the finished seeds for every
    (role, nfe) all of them were scored at. ``CellSummary`` items pass through unchanged."""
    if items and isinstance(items[0], CellSummary):
        return list(items)
    from apex_ray.shapeeval.intervals import bootstrap_intervals

    groups: dict[str, list[TrialOutcome]] = {}
    for o in items:
        groups.setdefault(o.cell, []).append(o)
    tasks = prompt_tasks()
    out = []
    for label, trials in groups.items():
        summary = CellSummary(label, trials[0].row, trials[0].column, trials)
        ok = summary.ok
        keys = set.intersection(*(set(t.correct) for t in ok)) if ok else set()
        for key in sorted(keys):
            stacked = np.stack([t.correct[key] for t in ok])  # [seeds, prompts, images]
            summary.intervals[key] = bootstrap_intervals(stacked, tasks, n_boot=n_boot, seed=0)
        out.append(summary)
    return out


def interval_text(summary: CellSummary | None, role: str = "ema", nfe: int = 1, task: str = "overall",
                  mark_partial: bool = True) -> str:
    """``mean [lo, hi]`` (offline scores), else the training-time mean (EMA), else the status;
    ``(k/n seeds)`` when only some of the cell's seeds finished (unless ``mark_partial`` is off)."""
    if summary is None:
        return "—"
    if not summary.ok:
        return summary.status
    partial = f" ({summary.seeds_text} seeds)" if mark_partial and len(summary.ok) < len(summary.trials) else ""
    if (role, nfe) in summary.intervals:
        mean, lo, hi = summary.intervals[(role, nfe)][task]
        return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]{partial}"
    value = summary._training_mean(role, nfe, task)
    return (f"{value:.3f}" if math.isfinite(value) else "—") + partial


def cell_text(outcome: TrialOutcome | CellSummary | None, role: str = "ema", nfe: int = 1) -> str:
    if isinstance(outcome, TrialOutcome):
        outcome = summarize([outcome])[0]
    return interval_text(outcome, role, nfe)


def grid_table(outcomes: list, rows: list[str], columns: list[str], corner: str, role: str = "ema", nfe: int = 1,
               n_boot: int = 2000) -> str:
    """Markdown in the paper's layout: one row per ``row``, one column per ``column``; each cell
    ``mean [lo, hi]`` of ``role`` at ``nfe`` over its seeds (see :func:`interval_text`)."""
    by_place = {(c.row, c.column): c for c in summarize(outcomes, n_boot)}
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(interval_text(by_place.get((row, c)), role, nfe) for c in columns)
                     + " |")
    return "\n".join(lines)


def _other_nfe(cells: list[CellSummary], nfe: int) -> list[int]:
    found = {n for c in cells for (_, n) in c.intervals} | {n for c in cells for t in c.trials for n in t.overall_at}
    return sorted(found - {nfe})


def per_task_table(outcomes: list, role: str = "ema", nfe: int = 1, n_boot: int = 2000) -> str:
    """One row per cell: status, finished seeds, per task and Overall at ``nfe`` (``mean [lo, hi]``),
    Overall at the other NFEs."""
    cells = summarize(outcomes, n_boot)
    others = _other_nfe(cells, nfe)
    head = [*TASKS, *(f"overall NFE {n}" for n in others)]
    lines = ["| trial | status | seeds | " + " | ".join(head) + " |", "|---" * (len(head) + 3) + "|"]
    for c in cells:
        values = [interval_text(c, role, nfe, t, mark_partial=False) if c.ok else "—" for t in TASKS]
        values += [interval_text(c, role, n, mark_partial=False) if c.ok else "—" for n in others]
        lines.append(f"| {c.label} | {c.status} | {c.seeds_text} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def trials_table(outcomes: list[TrialOutcome], nfe: int = 1) -> str:
    """One row per trial (per seed): the training-time Overall and the offline Overall of each export."""
    keys = sorted({k for o in outcomes for k in o.correct}, key=lambda k: (k[1] != nfe, k[1], ROLES.index(k[0])))
    tasks = prompt_tasks()
    from apex_ray.shapeeval.intervals import overall_from_correct

    head = ["trial", "seed", "status", f"training-time overall NFE {nfe}",
            *(f"export/{r} overall NFE {n}" for r, n in keys)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for o in outcomes:
        values = [f"{o.overall:.3f}" if o.status == "ok" and "overall" in o.scores else "—"]
        values += [f"{overall_from_correct(o.correct[k], tasks):.3f}" if k in o.correct else "—" for k in keys]
        lines.append(f"| {o.label} | {'' if o.seed is None else o.seed} | {o.status} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def trials_csv(outcomes: list[TrialOutcome], n_boot: int = 2000) -> str:
    """One ``trial`` record per trial (per seed) and one ``cell`` record per cell (its aggregate over
    seeds). ``<role>_nfe<N>_<task>``: the offline score of that export (a trial: its own; a cell: the
    mean over its finished seeds), with ``_lo`` / ``_hi`` the cell's 95% bootstrap interval;
    ``train_<task>``: the final training-time evaluation (EMA; a cell: mean over finished seeds)."""
    from apex_ray.shapeeval.intervals import scores_from_correct

    cells = summarize(outcomes, n_boot)
    tasks = prompt_tasks()
    out = io.StringIO()
    params = sorted({k for o in outcomes for k in o.params})
    scored = sorted({k for o in outcomes for k in o.correct}, key=lambda k: (k[1], ROLES.index(k[0])))
    others = sorted({n for o in outcomes for n in o.overall_at})
    offline = [f"{role}_nfe{nfe}_{task}{end}" for role, nfe in scored for task in TASKS for end in ("", "_lo", "_hi")]
    writer = csv.writer(out)
    writer.writerow(["record", "label", "cell", "seed", *params, "status", "seeds_ok", *offline,
                     *(f"train_{t}" for t in TASKS), *(f"train_overall_nfe{n}" for n in others), "mlflow_run_id",
                     "export_path", "error"])
    number = "{:.4f}".format
    for o in outcomes:
        values = []
        for key in scored:
            own = scores_from_correct(o.correct[key], tasks) if key in o.correct else {}
            for task in TASKS:
                values += [number(own[task]) if task in own else "", "", ""]
        writer.writerow(["trial", o.label, o.cell, "" if o.seed is None else o.seed,
                         *(o.params.get(k, "") for k in params), o.status, int(o.status == "ok"), *values,
                         *(number(o.scores[t]) if t in o.scores else "" for t in TASKS),
                         *(number(o.overall_at[n]) if n in o.overall_at else "" for n in others),
                         o.run_id or "", o.export_path or "", o.error or ""])
    for c in cells:
        values = []
        for key in scored:
            found = c.intervals.get(key, {})
            for task in TASKS:
                values += [number(v) for v in found[task]] if task in found else ["", "", ""]
        train = [c._training_mean("ema", -1, t) for t in TASKS]
        train_at = [c._training_mean("ema", n, "overall") for n in others]
        writer.writerow(["cell", c.label, c.label, ";".join(str(t.seed) for t in c.ok if t.seed is not None),
                         *("" for _ in params), c.status, len(c.ok), *values,
                         *(number(v) if math.isfinite(v) else "" for v in train),
                         *(number(v) if math.isfinite(v) else "" for v in train_at), "", "", ""])
    return out.getvalue()


def heatmap(outcomes: list, rows: list[str], columns: list[str], title: str, xlabel: str, ylabel: str,
            nfe: int = 1, n_boot: int = 2000):
    """A PIL image of the grid: the EMA's mean over seeds, its interval under it (failed/diverged
    cells grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    by_place = {(c.row, c.column): c for c in summarize(outcomes, n_boot)}
    values = np.full((len(rows), len(columns)), np.nan)
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            c = by_place.get((row, col))
            if c is not None and c.ok:
                values[i, j] = c.mean("ema", nfe)
    fig, ax = plt.subplots(figsize=(1.8 * len(columns) + 2, 0.9 * len(rows) + 1.5), dpi=100)
    ax.set_facecolor("#cccccc")
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=max(1e-6, float(np.nanmax(values))) if np.isfinite(values).any() else 1)
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            text = interval_text(by_place.get((row, col)), "ema", nfe).replace(" [", "\n[").replace(" (", "\n(")
            ax.text(j, i, text, ha="center", va="center", color="white" if np.isfinite(values[i, j]) else "black",
                    fontsize=8)
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


def method_note(sweep: Sweep, cells: list[CellSummary]) -> str:
    """What the numbers are: models, prompts, images, seeds, replicates (printed above the tables)."""
    seeds = ",".join(str(s) for s in sweep.seeds)
    n_prompts = len(prompt_tasks())
    if not any(c.intervals for c in cells):
        return (f"No exported weights were scored: each cell is the final training-time evaluation of the EMA "
                f"({sweep.base.eval.images_per_prompt} images per prompt), mean over seeds {seeds}; no intervals.")
    spread = ("over prompts only (one training seed: no seed-to-seed variation in the interval)"
              if len(sweep.seeds) == 1 else f"over prompts (stratified by task) and the {len(sweep.seeds)} seeds")
    return (f"Exports scored offline: ShapeEval on {n_prompts} prompts x {sweep.images_per_prompt} images per prompt, "
            f"training seeds {seeds} ({len(sweep.seeds)} trial(s) per cell). Each cell: mean over its finished "
            f"seeds [95% bootstrap percentile interval {spread}, {sweep.n_boot} replicates]. "
            "A cell missing seeds says (k/n seeds). Per trial: the final training-time evaluation (EMA, "
            f"{sweep.base.eval.images_per_prompt} images per prompt) and each export's offline Overall.")


def render(sweep: Sweep, outcomes: list[TrialOutcome], cells: list[CellSummary] | None = None) -> str:
    """The tables printed and logged: for the EMA and the student, the paper layout for grids (a
    ranked list for Optuna) and per task, then one row per trial. ``cells``: ``summarize(outcomes)``
    when already computed."""
    cells = cells if cells is not None else summarize(outcomes, sweep.n_boot)
    scored = any(c.intervals for c in cells)
    title = f"ShapeEval Overall at NFE {sweep.nfe} ({sweep.base.train.steps} steps per trial)"
    parts = [title, method_note(sweep, cells)]
    for role in ROLES if scored else ("ema",):
        name = {"ema": "EMA (export/ema)", "student": "student (export/student)"}[role]
        if sweep.cells:
            rows, columns = layout(sweep)
            corner = {"condition_shift": "a \\ b", "loss_weights": "λp : λe"}.get(sweep.kind, "")
            parts += [f"{name}, Overall:", grid_table(cells, rows, columns, corner, role, sweep.nfe)]
            ordered = cells
        else:
            ordered = sorted(cells, key=lambda c: -c.mean(role, sweep.nfe) if c.ok else math.inf)
        parts += [f"{name}, per task:", per_task_table(ordered, role, sweep.nfe)]
    parts += ["Per trial:", trials_table(outcomes, sweep.nfe)]
    return "\n\n".join(parts) + "\n"


def metric_key(text: str) -> str:
    """``text`` in the characters an MLflow metric name may hold."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]+", "_", text).strip("_")


def cell_metrics(cells: list[CellSummary]) -> dict[str, float]:
    """``cell/<label>/<role>_nfe<N>_overall`` (``_lo``, ``_hi``) and ``.../seeds_ok`` per cell."""
    out: dict[str, float] = {}
    for c in cells:
        prefix = f"cell/{metric_key(c.label)}"
        out[f"{prefix}/seeds_ok"] = float(len(c.ok))
        for (role, nfe), found in c.intervals.items():
            mean, lo, hi = found["overall"]
            out.update({f"{prefix}/{role}_nfe{nfe}_overall": mean, f"{prefix}/{role}_nfe{nfe}_overall_lo": lo,
                        f"{prefix}/{role}_nfe{nfe}_overall_hi": hi})
    return out


def _log_parent(parent: RunLogger, sweep: Sweep, outcomes: list[TrialOutcome]) -> None:
    cells = summarize(outcomes, sweep.n_boot)
    text = render(sweep, outcomes, cells)
    parent.log_text(text, "table.md")
    parent.log_text(trials_csv(outcomes, sweep.n_boot), "table.csv")
    if sweep.cells:
        rows, columns = layout(sweep)
        labels = {"condition_shift": ("b", "a"), "loss_weights": ("", "λp : λe")}.get(sweep.kind, ("", ""))
        parent.log_image(heatmap(cells, rows, columns, f"{sweep.name}: EMA Overall @ NFE {sweep.nfe}", *labels,
                                 nfe=sweep.nfe), artifact_file="heatmap.png")
    counts = {status: sum(o.status == status for o in outcomes) for status in ("ok", "failed", "diverged")}
    parent.log_metrics({f"trials_{k}": v for k, v in counts.items()}, 0)
    metrics = cell_metrics(cells)
    if metrics:
        parent.log_metrics(metrics, 0)
    done = [c for c in cells if c.ok and math.isfinite(c.mean("ema", sweep.nfe))]
    if done:
        best = max(done, key=lambda c: c.mean("ema", sweep.nfe))
        parent.log_metrics({"best_overall": best.mean("ema", sweep.nfe)}, 0)
        top = max(best.ok, key=lambda o: o.overall if math.isfinite(o.overall) else -math.inf)
        parent.set_tags({"best_trial": best.label, "best_run_id": top.run_id or ""})
    if any(o.status == "unfinished" for o in outcomes):
        parent.finish("KILLED")  # interrupted: `--resume` reopens this run
    else:
        parent.finish("FINISHED" if counts["ok"] else "FAILED")
