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

        def train_step(runner, micro_batches, *args, **kwargs):
            if armed and runner.step + 1 == drill.step and not (drill.marker and Path(drill.marker).exists()):
                if drill.marker:
                    Path(drill.marker).touch()
                time.sleep(2)  # like a real crash, not in the same instant as the last report
                _wait_for_durable_checkpoint(loop_config, runner.step)
                os._exit(1)
            return original(runner, micro_batches, *args, **kwargs)

        StepRunner.train_step = train_step
        try:
            train_worker(loop_config)
        finally:
            StepRunner.train_step = original


def _wait_for_durable_checkpoint(loop_config: dict, step: int, timeout_s: float = 120.0) -> None:
    """Until the newest checkpoint due by ``step`` is intact in the run folder. Checkpoints are
    written and uploaded in the background, so a crash right after one may lose it and resume from
    the one before (correct, but not what the drills assert); the drills crash once it is durable."""
    from apex_ray.common import storage
    from apex_ray.engine.checkpointing import checkpoint_problem

    every = loop_config["config"]["train"]["checkpoint_every"]
    due = step // every * every
    folder = loop_config.get("run_folder")
    if not due or not folder:
        return
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        names = [n for n in storage.list_dir(folder) if n.startswith(f"step_{due:07d}")]
        if any(checkpoint_problem(storage.join(folder, n)) is None for n in names):
            return
        time.sleep(0.2)


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

        def train_step(runner, micro_batches, *args, **kwargs):
            if armed and runner.step + 1 == drill.step and not Path(drill.marker).exists():
                _wait_for_durable_checkpoint(loop_config, runner.step)  # then the test may take the node
                Path(drill.marker).write_text(ray.get_runtime_context().get_node_id())
                time.sleep(drill.wait_s)  # the test removes this node meanwhile
            return original(runner, micro_batches, *args, **kwargs)

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


def report_log(path: str | os.PathLike):
    """A Ray Train ``UserCallback`` appending ``step checkpointed`` for every report the controller
    takes (it runs in the controller, so it writes to a file)."""
    import ray.train

    class ReportLog(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as log:
                log.write(f"{metrics[0].get('step')} {int(checkpoint is not None)}\n")

    return ReportLog()
