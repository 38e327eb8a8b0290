"""``python sweeps/condition_shift.py``: the paper's Table 6, the (a, b) condition-shift grid.

Every trial is an APEX fine-tune of the same length from the same teacher and data, once per
``--seeds`` seed, with ``c' = a c + b`` (eq. 16) applied where ``--target`` says; each trial's
exported EMA and student are scored by ShapeEval at NFE 1 (mean [95% interval] per cell).

  python sweeps/condition_shift.py                              # a in {-1,-0.5,0.5} x b in {0,0.1,1,10}
  python sweeps/condition_shift.py --a=-1,-0.5 --b=0.1,1 --steps 100
  python sweeps/condition_shift.py --search optuna --trials 12 --a-range=-1.5,1 --b-range=0.01,10
  python sweeps/condition_shift.py --resume                     # finish an interrupted sweep
  python sweeps/condition_shift.py --seeds 0,1,2                # 3 trials per cell: mean [95% interval]
"""
from __future__ import annotations

import argparse
import sys

from sweeps.cli import base_config, execute, floats, parser, search_ranges, seed_options, value_range
from sweeps.tuning import Cell, SearchRange, Sweep

PAPER_A = [-1.0, -0.5, 0.5]
PAPER_B = [0.0, 0.1, 1.0, 10.0]


def number(value: float) -> str:
    return f"{value:.1f}" if value == round(value, 1) else f"{value:g}"


def cells(a_values: list[float], b_values: list[float]) -> list[Cell]:
    return [Cell(f"a={number(a)} b={number(b)}",
                 {"objective.apex.shift_a": a, "objective.apex.shift_b": b}, number(a), number(b))
            for a in a_values for b in b_values]


def build(args: argparse.Namespace) -> Sweep:
    base = base_config(args, (f"objective.apex.shift_target={args.target}",))
    ranges = search_ranges(args, [SearchRange("objective.apex.shift_a", *args.a_range),
                                  SearchRange("objective.apex.shift_b", *args.b_range, log=args.b_range[0] > 0)])
    return Sweep(name=args.name, kind="condition_shift", base=base, output_dir=args.output_dir,
                 cells=[] if ranges else cells(args.a, args.b), search=ranges, num_samples=args.trials,
                 nfe=args.nfe, concurrency=args.concurrency, scheduler=args.scheduler, resume=args.resume,
                 verbose=args.verbose, **seed_options(args))


def arguments() -> argparse.ArgumentParser:
    p = parser("python sweeps/condition_shift.py", __doc__, "condition-shift")
    p.add_argument("--a", type=floats, default=PAPER_A, help="scales a (default -1.0,-0.5,0.5)")
    p.add_argument("--b", type=floats, default=PAPER_B, help="biases b (default 0.0,0.1,1.0,10.0)")
    p.add_argument("--target", choices=["text", "time", "both"], default="text",
                   help="where the shift acts (default text, the paper's framing)")
    p.add_argument("--a-range", type=value_range, default=(-1.5, 1.0), help="optuna range for a")
    p.add_argument("--b-range", type=value_range, default=(0.01, 10.0), help="optuna range for b (log if > 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    return execute(build, arguments().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
