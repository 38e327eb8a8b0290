"""Prepare throughput: the Ray Data job's fixed start-up, steady rate and peak memory, against a
plain single-process loop on one core, same encoders, same images.

    python bench/bench_prepare.py [--n 2000 20000] [--batch-size 64] [--text-actors N] [--codec-actors N]

For each ``--n`` the job prepares ``n`` ShapeEval images (``write_pairs``) with the tiny preset's
encoders (pixel codec + MiniLM) on a fresh local Ray instance (``num_cpus = os.cpu_count()``,
started before the clock). Its time splits into a fixed start-up (workers and actors starting,
models loading, the stream filling: the time not spent at the steady rate) and a steady rate
(rows per second after the first write task), both from when the write tasks finished
(:func:`data_pipelines.prepare_latents.prepare_timed`). Peak memory is the largest sum of RSS of
this process and every process under it (the Ray instance: raylet, GCS, workers, actors),
sampled every 0.2 s; shared pages count once per process, so it overstates, alike at every n.

The plain loop calls the same ``read_units``, ``decode_rows``, ``ImageEncoder`` and
``CaptionEncoder`` the job runs, in this process with one torch thread, on ``--plain-n`` images:
its rows per second after loading the encoders is the rate of one core. The ratio compares the
job's steady rate with that rate times the cores the job was given (what a perfect scale-out of
the loop would reach); the job's actor pools are sized by the job itself from the cluster (a
quarter of the CPUs for decoding + codec, three quarters for MiniLM) unless ``--*-actors`` say.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from apex_ray.shapeeval import write_pairs
from data_pipelines.actors import CaptionEncoder, ImageEncoder
from data_pipelines.config import InputConfig, load_prepare_config
from data_pipelines.decode import decode_rows
from data_pipelines.prepare_latents import prepare_timed
from data_pipelines.readers import plan_input, read_units
from data_pipelines.sink import parquet_options

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result import report

MB = 2 ** 20


class MemorySampler:
    """Peak sum of RSS over this process and all its descendants, sampled on a thread; also the
    CPU seconds each of them used (last sample), by process title, to see where the time went."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s, self.peak_bytes, self.peak_processes = every_s, 0, 0
        self.cpu_s: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._base = {p.pid: sum(p.cpu_times()[:2]) for p in self._processes()}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_by_title(self) -> dict[str, float]:
        """CPU seconds used while sampling, summed by process title (``ray::MapWorker(...)``...)."""
        totals: dict[str, float] = {}
        for title, seconds in self.cpu_s.values():
            totals[title] = totals.get(title, 0.0) + seconds
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def _processes(self) -> list[psutil.Process]:
        me = psutil.Process()
        return [me, *me.children(recursive=True)]

    def _run(self) -> None:
        while not self._stop.is_set():
            total, processes = 0, 0
            for process in self._processes():
                try:
                    total += process.memory_info().rss
                    cpu = sum(process.cpu_times()[:2]) - self._base.get(process.pid, 0.0)
                    title = _title(process)
                    if title == "ray::IDLE":  # a worker between tasks: keep the name of what it ran
                        title = self.cpu_s.get(process.pid, (title, 0.0))[0]
                    self.cpu_s[process.pid] = (title, cpu)
                    processes += 1
                except psutil.Error:  # exited between listing and reading
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self.peak_processes = max(self.peak_processes, processes)
            self._stop.wait(self.every_s)


def _title(process: psutil.Process) -> str:
    """``ray::<actor or task>``, the executable's name for Ray's own daemons, ``driver`` for us."""
    if process.pid == os.getpid():
        return "driver"
    title = process.name() if not process.cmdline() else process.cmdline()[0]
    if title.startswith("ray::"):
        return title.split(" ")[0][:60]
    return os.path.basename(title) if "python" not in title else os.path.basename(process.cmdline()[1] if len(process.cmdline()) > 1 else title)


def plain_loop(raw: Path, output: Path, batch_size: int, size: int = 32) -> tuple[int, float, float, float]:
    """The whole preparation in this process: read, decode, encode, write one parquet file.
    Returns (rows written, seconds loading the encoders, seconds for the rows, CPU seconds for them)."""
    started = time.perf_counter()
    image_encoder = ImageEncoder({"name": "pixel"}, size, "float32")
    caption_encoder = CaptionEncoder("minilm", None, 32, "float16")
    loaded, cpu_started = time.perf_counter(), time.process_time()
    plan = plan_input(InputConfig(path=str(raw)))
    written, writer = 0, None
    try:
        for chunk in read_units(plan, plan.units):
            rows = {name: np.array(chunk.column(name).to_pylist(), dtype=object) for name in chunk.column_names}
            for start in range(0, len(rows["id"]), batch_size):
                batch = {key: value[start:start + batch_size] for key, value in rows.items()}
                encoded = caption_encoder(image_encoder(decode_rows(batch, size, size // 2)))
                keep = encoded["reason"] == ""
                table = pa.table({
                    "id": pa.array(list(encoded["id"][keep]), pa.string()),
                    "caption": pa.array(list(encoded["caption"][keep]), pa.string()),
                    **{name: pa.FixedShapeTensorArray.from_numpy_ndarray(encoded[name][keep])
                       for name in ("latent", "text_embeds", "text_mask", "pooled")},
                })
                # the job's writer options (page CRCs, dictionaries for strings only): the same work
                writer = writer or pq.ParquetWriter(output, table.schema, **parquet_options(table.schema))
                writer.write_table(table)
                written += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return written, loaded - started, time.perf_counter() - loaded, time.process_time() - cpu_started


def run_job(folder: Path, n: int, args: argparse.Namespace, cpus: int) -> dict:
    """One job on a fresh Ray instance; its timing, peak memory and pool sizes."""
    raw = write_pairs(folder / f"raw-{n}.parquet", n, seed=0, rows_per_group=args.batch_size * 4)
    overrides = [
        f"codec.batch_size={args.batch_size}", f"text.batch_size={args.batch_size}",
        # CPU accounting for Ray, not limits: decoding + the pixel codec are ~2% of the work, so one
        # codec actor on a quarter of the CPUs; MiniLM actors of 0.75 CPU fill the rest (one per core).
        f"codec.num_cpus={0.25 * cpus / (args.codec_actors or 1)}",
        f"text.num_cpus={0.75 * cpus / args.text_actors if args.text_actors else 0.75}",
        # Many write tasks, so that the steady rate has many points to come from.
        f"storage.rows_per_shard={max(args.batch_size, n // 16)}",
    ]
    overrides += [f"codec.concurrency={args.codec_actors}"] if args.codec_actors else []
    overrides += [f"text.concurrency={args.text_actors}"] if args.text_actors else []
    config = load_prepare_config(None, overrides, {"input.path": str(raw), "output": str(folder / f"ray-{n}")})
    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - started
    try:
        with MemorySampler() as memory:
            started = time.perf_counter()
            manifest, timing = prepare_timed(config)
            total_s = time.perf_counter() - started
    finally:
        ray.shutdown()
    assert manifest["rows_written"] == n, manifest["rows_written"]
    return {"n": n, "ray_init_s": ray_init_s, "total_s": total_s, "first_rows_s": timing.first_rows_s,
            "startup_s": timing.startup_s, "steady": timing.steady_rows_per_s,
            "peak_mb": memory.peak_bytes / MB, "processes": memory.peak_processes, "cpu": memory.cpu_by_title()}


def main() -> None:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2000], help="images, one job per value")
    parser.add_argument("--plain-n", type=int, default=2000, help="images for the plain loop (its rate does not grow with n)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--text-actors", type=int, help="MiniLM actors (default: the job sizes the pool)")
    parser.add_argument("--codec-actors", type=int, help="decode + pixel codec actors (default: the job sizes the pool)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        jobs = [run_job(Path(folder), n, args, cpus) for n in args.n]
        torch.set_num_threads(1)
        plain_n = min(args.plain_n, max(args.n))
        raw = write_pairs(Path(folder) / "raw-plain.parquet", plain_n, seed=0, rows_per_group=args.batch_size * 4)
        written, load_s, loop_s, loop_cpu_s = plain_loop(raw, Path(folder) / "plain.parquet", args.batch_size)
        assert written == plain_n
    per_core = written / loop_s
    fair = per_core * cpus
    print(f"setup: ShapeEval images 32x32, pixel codec + MiniLM, batch {args.batch_size}, Ray on {cpus} CPUs "
          f"(pools sized by the job unless --*-actors); plain loop: {plain_n} images, 1 torch thread, "
          f"{per_core:.1f} rows/s after {load_s:.1f} s loading the encoders")
    for job in jobs:
        print(f"prepare n={job['n']}: start-up {job['startup_s']:.1f} s (first rows at {job['first_rows_s']:.1f} s, "
              f"total {job['total_s']:.1f} s, + {job['ray_init_s']:.1f} s ray.init), steady {job['steady']:.1f} rows/s "
              f"vs plain loop {per_core:.1f} rows/s per core x {cpus} cores = {fair:.1f} rows/s: "
              f"ratio {job['steady'] / fair:.2f}; peak memory {job['peak_mb']:.0f} MB in {job['processes']} processes")
        cpu = job["cpu"]
        print(f"  CPU seconds: {sum(cpu.values()):.1f} in all ({sum(cpu.values()) / job['n'] * 1000:.1f} per 1000 rows; "
              f"plain loop {loop_cpu_s / written * 1000:.1f}): "
              + ", ".join(f"{title} {seconds:.1f}" for title, seconds in list(cpu.items())[:8]))
    last = jobs[-1]
    report("data_prepare_throughput", last["steady"] / fair,
           f"Ray Data steady rows/s / (plain loop rows/s per core x {cpus} cores), n={last['n']}",
           images=[job["n"] for job in jobs], startup_s=[round(job["startup_s"], 1) for job in jobs],
           steady_rows_s=[round(job["steady"], 1) for job in jobs], plain_rows_s_per_core=round(per_core, 1),
           cores=cpus, peak_mem_mb=[round(job["peak_mb"]) for job in jobs])


if __name__ == "__main__":
    main()
