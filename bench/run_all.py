"""Every benchmark in one command, summarised as a table of ratios.

    python bench/run_all.py [--quick] [--only NAME ...] [--out FILE.md]

Runs each ``bench/bench_*.py`` in its own process (so thread settings and Ray instances do not
leak between them), collects the ``BENCH-RESULT`` line each one prints, and prints one table:
APEX vs flow-matching step time, Ray Train overhead (1 and 2 workers, log_every 1 and 10),
checkpoint stall (async vs sync) and bytes, FSDP2 memory per rank, Ray Data prepare
throughput (start-up, steady state, memory), NFE-1 vs NFE-50 sampling speed-up. ``--quick`` uses smaller sizes (minutes, noisier).
A benchmark that fails is listed with its exit code; the others still run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from result import PREFIX  # noqa: E402

GPU_SECTION = "## GPU path"
# name -> (script, full arguments, --quick arguments)
BENCHES = {
    "step": ("bench_step.py", ["--steps", "10"], ["--steps", "4", "--warmup", "1"]),
    "ray": ("bench_ray_overhead.py", ["--steps", "30"], ["--steps", "10", "--warmup", "2", "--log-every", "1"]),
    "checkpoint": ("bench_checkpoint.py", ["--repeats", "5"], ["--repeats", "2", "--buffer", "256"]),
    "fsdp": ("bench_fsdp_memory.py", [], ["--width", "128", "--layers", "4"]),
    "prepare": ("bench_prepare.py", ["--n", "2000", "20000"], ["--n", "2000"]),
    "sampling": ("bench_sampling.py", ["--repeats", "20"], ["--repeats", "6"]),
}


def run_one(name: str, quick: bool) -> tuple[dict | None, str, float]:
    script, full, fast = BENCHES[name]
    started = time.perf_counter()
    process = subprocess.run([sys.executable, str(HERE / script), *(fast if quick else full)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - started
    results = [json.loads(line[len(PREFIX):]) for line in process.stdout.splitlines() if line.startswith(PREFIX)]
    if process.returncode != 0 or not results:
        tail = (process.stderr or process.stdout).strip().splitlines()[-3:]
        return None, f"exit {process.returncode}: " + " / ".join(tail), seconds
    return results[-1], "", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=list(BENCHES))
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()
    lines = ["| benchmark | ratio | meaning | numbers | time |", "|---|---|---|---|---|"]
    failed = 0
    for name in args.only:
        print(f"running {name} ...", flush=True)
        result, error, seconds = run_one(name, args.quick)
        if result is None:
            failed += 1
            lines.append(f"| {name} | failed | {error} | | {seconds:.0f} s |")
            continue
        detail = {k: v for k, v in result.items() if k not in ("name", "ratio", "meaning")}
        lines.append(f"| {result['name']} | **{result['ratio']:.2f}** | {result['meaning']} | "
                     f"{json.dumps(detail)} | {seconds:.0f} s |")
    header = (f"apex-ray benchmarks ({'quick' if args.quick else 'full'}), {dt.date.today()}, "
              f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    table = header + "\n\n" + "\n".join(lines)
    print("\n" + table)
    if args.out:  # the CPU table is replaced; the GPU section below it (bench/gpu_smoke.py) is kept
        out = Path(args.out)
        kept = out.read_text().partition(GPU_SECTION)[1:] if out.exists() else ("", "")
        out.write_text(table + "\n" + ("\n" + "".join(kept) if kept[0] else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
