"""Fault drills injected from tests: per-worker loops that wrap the real one and kill a worker.

Production code has no test branches; a test passes one of these as ``run(..., train_loop=...)``
(or ``Sweep.train_loop``). The module is pickled by value, so Ray workers need not import tests/.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CrashAtStep:
    """Run the real worker loop, but the chosen rank's process dies (``os._exit(1)``) just before
    optimiser step ``step``: once per ``marker`` file (it survives restarts), or on every attempt
    without one; only in runs whose name ends with ``run_name_suffix`` when that is given."""

    def __init__(self, step: int, marker: str | os.PathLike | None = None, rank: int | None = None,
                 run_name_suffix: str | None = None) -> None:
        self.step, self.rank, self.run_name_suffix = step, rank, run_name_suffix
        self.marker = None if marker is None else str(marker)

    def __call__(self, loop_config: dict) -> None:
        import ray.train

        from apex_ray.engine.step import StepRunner
        from apex_ray.orchestration.worker import train_worker

        context = ray.train.get_context()
        rank = context.get_world_rank()
        target = context.get_world_size() - 1 if self.rank is None else self.rank
        name = loop_config["config"]["tracking"]["run_name"] or ""
        armed = rank == target and (self.run_name_suffix is None or name.endswith(self.run_name_suffix))
        original, drill = StepRunner.train_step, self

        def train_step(runner, micro_batches):
            if armed and runner.step + 1 == drill.step and not (drill.marker and Path(drill.marker).exists()):
                if drill.marker:
                    Path(drill.marker).touch()
                time.sleep(2)  # like a real crash, not in the same instant as the last report
                os._exit(1)
            return original(runner, micro_batches)

        StepRunner.train_step = train_step
        try:
            train_worker(loop_config)
        finally:
            StepRunner.train_step = original


class PauseAtStep:
    """Run the real worker loop, but rank ``rank`` stops just before optimiser step ``step`` (once:
    the ``marker`` file survives restarts) and waits, having written its Ray node id into
    ``marker``, so that a test can take that node away while the run is in flight."""

    def __init__(self, step: int, marker: str | os.PathLike, rank: int = 1, wait_s: float = 300.0) -> None:
        self.step, self.marker, self.rank, self.wait_s = step, str(marker), rank, wait_s

    def __call__(self, loop_config: dict) -> None:
        import ray
        import ray.train

        from apex_ray.engine.step import StepRunner
        from apex_ray.orchestration.worker import train_worker

        armed = ray.train.get_context().get_world_rank() == self.rank
        original, drill = StepRunner.train_step, self

        def train_step(runner, micro_batches):
            if armed and runner.step + 1 == drill.step and not Path(drill.marker).exists():
                Path(drill.marker).write_text(ray.get_runtime_context().get_node_id())
                time.sleep(drill.wait_s)  # the test removes this node meanwhile
            return original(runner, micro_batches)

        StepRunner.train_step = train_step
        try:
            train_worker(loop_config)
        finally:
            StepRunner.train_step = original


class CountAttempts:
    """Run the real worker loop; rank 0 appends a line to ``log`` each time a worker group starts."""

    def __init__(self, log: str | os.PathLike) -> None:
        self.log = str(log)

    def __call__(self, loop_config: dict) -> None:
        import ray.train

        from apex_ray.orchestration.worker import train_worker

        if ray.train.get_context().get_world_rank() == 0:
            with open(self.log, "a") as file:
                file.write(f"{time.time()}\n")
        train_worker(loop_config)
