"""RunLogger's held metric points: fast points go to the store together, slow ones at once, none lost."""
from __future__ import annotations

from mlflow import MlflowClient

from apex_ray.orchestration.tracking import RunLogger


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "loss")]


def test_fast_points_are_held_then_written_together_and_none_is_lost(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = RunLogger.create(uri, "held", "run", {}, {})
    client = MlflowClient(uri)
    logger.log_metrics({"loss": 1.0}, 1, hold_s=60)  # the first point: nothing came before it, written at once
    assert _steps(client, logger.run_id) == [1]
    for step in (2, 3, 4):  # each within hold_s of the previous one: held
        logger.log_metrics({"loss": 1.0 / step}, step, hold_s=60)
    assert _steps(client, logger.run_id) == [1]
    logger.flush_metrics()
    assert _steps(client, logger.run_id) == [1, 2, 3, 4]
    logger.log_metrics({"loss": 0.1}, 5)  # hold_s=0 (the default): every point at once
    assert _steps(client, logger.run_id) == [1, 2, 3, 4, 5]
    logger.flush_metrics()  # nothing held: writes nothing twice
    assert _steps(client, logger.run_id) == [1, 2, 3, 4, 5]


def test_held_points_are_written_once_the_oldest_is_hold_s_old(tmp_path, monkeypatch):
    import apex_ray.orchestration.tracking as tracking

    clock = [100.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: clock[0])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = RunLogger.create(uri, "held", "run", {}, {})
    client = MlflowClient(uri)
    logger.log_metrics({"loss": 1.0}, 1, hold_s=5)
    written = []
    for step in range(2, 12):  # a point per second
        clock[0] += 1.0
        logger.log_metrics({"loss": 1.0}, step, hold_s=5)
        written.append(len(_steps(client, logger.run_id)))
    # Held from step 2 (t=101) until a point comes 5 s after it (step 7, t=106), then again.
    assert written == [1, 1, 1, 1, 1, 7, 7, 7, 7, 7]
    clock[0] += 60.0  # a slow point: written at once, with what is held
    logger.log_metrics({"loss": 1.0}, 12, hold_s=5)
    assert _steps(client, logger.run_id) == list(range(1, 13))
