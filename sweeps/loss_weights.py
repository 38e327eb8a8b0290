"""``python sweeps/loss_weights.py``: the paper's Table 7, lambda_p : lambda_e.

  python sweeps/loss_weights.py                                 # 1:0, 0:1, 1:0.5, 1:1, 1:2
  python sweeps/loss_weights.py --ratios 1:0,1:1 --steps 100
  python sweeps/loss_weights.py --search optuna --trials 8 --endpoint-range=0.1,4
  python sweeps/loss_weights.py --seeds 0,1,2                   # 3 trials per cell: mean [95% interval]
"""
from __future__ import annotations

import argparse
import sys

from sweeps.cli import base_config, execute, parser, search_ranges, seed_options, value_range
from sweeps.tuning import Cell, SearchRange, Sweep

PAPER_RATIOS = [(1.0, 0.0), (0.0, 1.0), (1.0, 0.5), (1.0, 1.0), (1.0, 2.0)]
NAMES = {(1.0, 0.0): "Path Only", (0.0, 1.0): "Endpoint Only", (1.0, 1.0): "default"}


def ratios(text: str) -> list[tuple[float, float]]:
    out = []
    for item in text.split(","):
        try:
            path, endpoint = (float(v) for v in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected P:E pairs like 1:0.5, got {item!r}") from None
        if path < 0 or endpoint < 0 or path + endpoint == 0:
            raise argparse.ArgumentTypeError(f"{item!r}: weights must be >= 0 and not both 0")
        out.append((path, endpoint))
    return out


def cells(pairs: list[tuple[float, float]]) -> list[Cell]:
    out = []
    for path, endpoint in pairs:
        row = f"{path:.1f} : {endpoint:.1f}" + (f" ({NAMES[(path, endpoint)]})" if (path, endpoint) in NAMES else "")
        out.append(Cell(f"lp={path:g} le={endpoint:g}",
                        {"objective.apex.lambda_path": path, "objective.apex.lambda_endpoint": endpoint},
                        row, "Overall"))
    return out


def build(args: argparse.Namespace) -> Sweep:
    ranges = search_ranges(args, [SearchRange("objective.apex.lambda_endpoint", *args.endpoint_range,
                                              log=args.endpoint_range[0] > 0)])
    return Sweep(name=args.name, kind="loss_weights", base=base_config(args), output_dir=args.output_dir,
                 cells=[] if ranges else cells(args.ratios), search=ranges, num_samples=args.trials,
                 nfe=args.nfe, concurrency=args.concurrency, scheduler=args.scheduler, resume=args.resume,
                 verbose=args.verbose, **seed_options(args))


def arguments() -> argparse.ArgumentParser:
    p = parser("python sweeps/loss_weights.py", __doc__, "loss-weights")
    p.add_argument("--ratios", type=ratios, default=PAPER_RATIOS,
                   help="lambda_p:lambda_e pairs (default 1:0,0:1,1:0.5,1:1,1:2)")
    p.add_argument("--endpoint-range", type=value_range, default=(0.1, 4.0),
                   help="optuna range for lambda_e at lambda_p = 1")
    return p


def main(argv: list[str] | None = None) -> int:
    return execute(build, arguments().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
