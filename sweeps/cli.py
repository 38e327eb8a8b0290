"""Command-line options every sweep shares, and the run-print-exit wrapper."""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Callable

from apex_ray.config import ConfigError, load_config
from apex_ray.orchestration.tracking import TrackingError
from sweeps.tuning import SearchRange, Sweep, SweepError, render, run_sweep


def _numbers(text: str, kind: type, name: str) -> list:
    """``"1,2,3"`` -> ``[kind(v), ...]``, at least one, as an argparse type error otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {name}s, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one {name}")
    return values


def floats(text: str) -> list[float]:
    return _numbers(text, float, "number")


def ints(text: str) -> list[int]:
    values = _numbers(text, int, "integer")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return values


def value_range(text: str) -> tuple[float, float]:
    values = floats(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}")
    return values[0], values[1]


def parser(prog: str, description: str, default_name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="base trial config (YAML); default: the embedded default (APEX from the "
                                    "bundled ShapeEval teacher)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per trial (default 300)")
    p.add_argument("--backbone", help="backbone preset of every trial (default: the config's)")
    p.add_argument("--nfe", type=int, default=1, help="score ShapeEval at this NFE (default 1): the table")
    p.add_argument("--also-nfe", type=int, nargs="*", default=[], help="also score these NFEs (extra columns)")
    p.add_argument("--seeds", type=ints, help="training seeds, e.g. 0,1,2: every cell runs once per seed "
                                            "(train.seed) and the tables show mean [95%% interval] over them "
                                            "(default: the config's train.seed, one trial per cell)")
    p.add_argument("--images-per-prompt", type=int, default=4,
                   help="ShapeEval images per prompt when the exported EMA and student are scored for the "
                        "tables (default 4)")
    p.add_argument("--eval-images-per-prompt", type=int, default=2,
                   help="ShapeEval images per prompt of the evaluations during training (curves, ASHA's "
                        "rungs; default 2)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates per interval (default 2000)")
    p.add_argument("--no-export-scores", action="store_true",
                   help="do not score the exports after the sweep: the tables show the training-time "
                        "evaluation, without intervals")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="Train workers per trial (default 1: trials run side by side instead)")
    p.add_argument("--search", choices=["grid", "optuna"], default="grid",
                   help="grid: every cell; optuna: OptunaSearch over --*-range with --trials N")
    p.add_argument("--trials", type=int, default=0, help="trial budget for --search optuna")
    p.add_argument("--scheduler", choices=["none", "asha"], default="none",
                   help="asha: stop poor trials early at evaluation steps")
    p.add_argument("--concurrency", type=int, help="at most this many trials at once (default: as many as "
                                                   "the cluster's CPUs/GPUs fit)")
    p.add_argument("--name", default=default_name, help=f"sweep name: parent MLflow run and folder "
                                                        f"(default {default_name})")
    p.add_argument("--output-dir", default="runs/sweeps", help="where sweeps write (default runs/sweeps)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep of this --name")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every trial, e.g. optim.lr=3e-5")
    return p


def base_config(args: argparse.Namespace, extra: tuple[str, ...] = ()):
    """The trial config every cell starts from; validated here, before Ray starts."""
    if args.steps < 1:
        raise SweepError("--steps must be at least 1")
    if args.workers_per_trial < 1:
        raise SweepError("--workers-per-trial must be at least 1")
    if args.concurrency is not None and args.concurrency < 1:
        raise SweepError("--concurrency must be at least 1")
    if not 1 <= args.images_per_prompt <= 1000 or not 1 <= args.eval_images_per_prompt <= 1000:
        raise SweepError("--images-per-prompt and --eval-images-per-prompt must be in 1..1000")
    if args.bootstrap < 1:
        raise SweepError("--bootstrap must be at least 1")
    eval_every = max(1, args.steps // 4)
    preset = [
        f"train.steps={args.steps}", f"train.eval_every={eval_every}", f"train.checkpoint_every={eval_every}",
        f"train.log_every={max(1, min(10, args.steps // 10))}", f"eval.score_nfe=[{','.join(str(n) for n in sorted({args.nfe, *args.also_nfe}))}]",
        f"eval.grid_nfe=[{args.nfe}]", f"eval.images_per_prompt={args.eval_images_per_prompt}",
        f"distributed.num_workers={args.workers_per_trial}",
    ]
    if args.workers_per_trial == 1:
        preset.append("distributed.strategy=single")
    if args.backbone:
        preset.append(f"model.backbone={args.backbone}")
    return load_config(args.config, [*preset, *extra, *args.overrides])


def seed_options(args: argparse.Namespace) -> dict:
    """The :class:`Sweep` fields of ``--seeds``, ``--images-per-prompt``, ``--bootstrap``, ``--no-export-scores``."""
    return {"seeds": list(args.seeds or []), "images_per_prompt": args.images_per_prompt, "n_boot": args.bootstrap,
            "score_exports": not args.no_export_scores}


def search_ranges(args: argparse.Namespace, ranges: list[SearchRange]) -> list[SearchRange]:
    if args.search != "optuna":
        return []
    if args.trials < 1:
        raise SweepError("--search optuna needs --trials N (N >= 1)")
    return ranges


def execute(build: Callable[[argparse.Namespace], Sweep], args: argparse.Namespace) -> int:
    """Build (validating everything), run, print the table; errors become one line and exit 2."""
    import logging

    if not args.verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        sweep = build(args)
        started = dt.datetime.now()
        outcomes = run_sweep(sweep)
    except (ConfigError, TrackingError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    minutes = (dt.datetime.now() - started).total_seconds() / 60
    print()
    print(render(sweep, outcomes))
    unfinished = [o for o in outcomes if o.status == "unfinished"]
    if unfinished:
        print(f"interrupted: {len(unfinished)} trial(s) unfinished; finish with the same command plus --resume")
        return 130
    failed = [o for o in outcomes if o.status != "ok"]
    for o in failed:
        print(f"  {o.label}: {o.status}" + (f" ({o.error})" if o.error else ""))
    print(f"{len(outcomes) - len(failed)}/{len(outcomes)} trials ok in {minutes:.1f} min; "
          f"results in {sweep.directory} and the MLflow run {sweep.name!r}")
    return 0 if len(failed) < len(outcomes) else 1
