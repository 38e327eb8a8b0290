"""Recovery and early failures: damaged checkpoints are skipped for the newest intact one, a run
can start from a chosen checkpoint, errors a restart cannot fix fail once instead of
``max_failures`` times, and what can be checked before the cluster is."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apex_ray.config import ConfigError, load_config
from apex_ray.engine.checkpointing import checkpoint_problem
from apex_ray.orchestration.launcher import RunFailed, input_error_in, preflight, run
from faults import CountAttempts

FAST = ["data.source=inline-shapeeval", "data.num_samples=48", "train.global_batch=4", "eval.grid_nfe=[]",
        "eval.score_nfe=[]", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=2"]


def config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path}", *FAST, *overrides])


def _truncate_a_shard(checkpoint: Path) -> str:
    shard = sorted(checkpoint.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.name


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("first")
    result = run(config(out, "train.steps=4", "tracking.run_name=first"))
    return out, Path(result.storage_path) / "first"


def test_checkpoint_problems_are_named(finished_run, tmp_path):
    _, run_folder = finished_run
    intact = run_folder / "step_0000002"
    assert checkpoint_problem(intact) is None
    damaged = tmp_path / "damaged"
    for breakage, expected in [
        (lambda d: (d / ".metadata").unlink(), "no DCP .metadata"),
        (_truncate_a_shard, "is truncated"),
        (lambda d: sorted(d.glob("*.distcp"))[-1].unlink(), "is missing"),
        (lambda d: (d / "extra_rank0.pt").unlink(), "extra_rank0.pt is missing"),
        (lambda d: (d / "extra_rank0.pt").write_bytes(b"not a torch file"), "extra_rank0.pt does not load"),
    ]:
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(intact, damaged)
        breakage(damaged)
        assert expected in (checkpoint_problem(damaged) or ""), expected


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(finished_run, tmp_path, capsys):
    out, run_folder = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # the same run, so this test leaves the fixture's run intact
    name = _truncate_a_shard(copy / "ray" / "first" / "step_0000004")
    result = run(config(copy, "train.steps=6", "tracking.run_name=first"))
    printed = capsys.readouterr().out
    assert f"skipped damaged checkpoint(s): step_0000004: shard file {name} is truncated" in printed
    assert "resuming from step_0000002" in printed and "resumed from step 2" in printed
    assert result.metrics["step"] == 6
    # Step 4 was written again beside the damaged folder, not into it.
    folders = sorted(p.name for p in (copy / "ray" / "first").glob("step_*"))
    assert "step_0000004-2" in folders and result.checkpoint_path.endswith("step_0000006")


@pytest.mark.slow
def test_resume_from_starts_a_new_run_from_a_chosen_checkpoint(finished_run, tmp_path, capsys):
    _, run_folder = finished_run
    chosen = run_folder / "step_0000002"
    branch = run(config(tmp_path, "train.steps=3", "tracking.run_name=branch", f"train.resume_from={chosen}"))
    assert "resumed from step 2" in capsys.readouterr().out
    assert branch.metrics["step"] == 3
    assert sorted(p.name for p in (Path(branch.storage_path) / "branch").glob("step_*")) == ["step_0000003"]


def test_resume_from_a_run_folder_or_a_damaged_checkpoint_fails_before_ray(finished_run, tmp_path):
    _, run_folder = finished_run
    with pytest.raises(ConfigError, match=r"train.resume_from: .* pass one of its step_\* folders, e\.g\. .*step_0000004"):
        preflight(config(tmp_path, f"train.resume_from={run_folder}"))
    damaged = tmp_path / "damaged"
    shutil.copytree(run_folder / "step_0000002", damaged)
    (damaged / ".metadata").unlink()
    with pytest.raises(ConfigError, match="not an intact checkpoint .no DCP .metadata"):
        preflight(config(tmp_path, f"train.resume_from={damaged}"))
    # The CLI says so with exit 2, before any run starts.
    result = subprocess.run([sys.executable, "-m", "apex_ray.train", "--resume-from", str(damaged), *FAST,
                             f"output_dir={tmp_path / 'cli'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "train.resume_from" in result.stderr and "apex-ray: run" not in result.stdout


def test_too_few_samples_for_the_batch_fail_at_config_time():
    with pytest.raises(ConfigError, match="data.num_samples=8 gives each of the 2 workers 4 samples"):
        load_config(None, ["data.num_samples=8", "train.global_batch=16"])


def test_an_unwritable_sqlite_store_is_a_tracking_error_before_ray(tmp_path):
    from apex_ray.orchestration.tracking import TrackingError

    with pytest.raises(TrackingError, match="cannot create its folder /proc/apex-ray"):
        preflight(config(tmp_path, "tracking.tracking_uri=sqlite:////proc/apex-ray/mlflow.db"))
    result = subprocess.run([sys.executable, "-m", "apex_ray.train", "output_dir=/proc/apex-ray/runs"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "tracking store sqlite:////proc/apex-ray/runs/mlflow.db" in result.stderr


def test_input_errors_are_found_through_rays_wrappers():
    from apex_ray.engine.prepared import CorruptShardError

    class Wrapper(Exception):
        def __init__(self, base):
            self._base_exc = base

    class Controller(Exception):
        def __init__(self, failure):
            self.controller_failure = failure

    inner = CorruptShardError("shard 3 is damaged")
    assert input_error_in(Controller(Wrapper(inner))) is inner
    try:
        try:
            raise inner
        except CorruptShardError as err:
            raise RuntimeError("task failed") from err
    except RuntimeError as outer:
        assert input_error_in(outer) is inner
    assert input_error_in(Controller(Wrapper(OSError("node died")))) is None


@pytest.mark.slow
def test_a_damaged_shard_fails_the_run_once_without_restarts(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from data_pipelines.shapeeval_set import ensure_shapeeval_prepared

    prepared = ensure_shapeeval_prepared(tmp_path / "cache", 64, 0, 32, "sana-tiny", "minilm", 32)
    for shard in sorted((prepared / "shards").glob("*.parquet")):  # every shard: whichever a worker reads first
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0xFF
        shard.write_bytes(bytes(data))
    attempts = tmp_path / "attempts"
    settings = [f"output_dir={tmp_path}", "data.source=prepared", f"data.path={prepared}", "train.global_batch=4",
                "train.steps=4", "eval.grid_nfe=[]", "eval.score_nfe=[]", "distributed.max_failures=3",
                "tracking.run_name=damaged"]
    with pytest.raises(RunFailed, match=r"(?i)damaged.*checksum.*not retried"):
        run(load_config(None, settings), train_loop=CountAttempts(attempts))
    # No restarts: at most one worker-group start (none when planning the read finds the damage).
    assert not attempts.exists() or len(attempts.read_text().splitlines()) == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [logged] = client.search_runs([client.get_experiment_by_name("apex-ray").experiment_id])
    assert logged.info.status == "FAILED"



@pytest.mark.slow
def test_ctrl_c_marks_the_mlflow_run_killed_and_says_how_to_resume(tmp_path):
    import os
    import signal

    from mlflow.tracking import MlflowClient

    process = subprocess.Popen(
        [sys.executable, "-m", "apex_ray.train", f"output_dir={tmp_path}", "tracking.run_name=interrupted",
         "data.source=inline-shapeeval", "train.steps=100000", "train.log_every=1", "train.global_batch=4",
         "eval.grid_nfe=[]", "eval.score_nfe=[]"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, start_new_session=True)
    seen = []
    for line in process.stdout:  # Ctrl+C (to the whole terminal group) once training is under way
        seen.append(line)
        if "samples/s" in line:
            os.killpg(process.pid, signal.SIGINT)
            break
    rest, _ = process.communicate(timeout=300)
    log = "".join(seen) + rest
    assert process.returncode == 130, log
    assert "the MLflow run is marked KILLED" in log and "tracking.run_name to resume" in log
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("apex-ray").experiment_id],
                              "attributes.run_name = 'interrupted'")
    assert [r.info.status for r in runs] == ["KILLED"]


def test_how_a_run_name_starts_resume_retry_new_and_fresh(tmp_path):
    import datetime as dt

    from apex_ray.orchestration.launcher import apply_run_start, plan_run_start

    ray_storage = tmp_path / "ray"
    assert plan_run_start(str(ray_storage), "r", named=True).action == "retry"  # died before a checkpoint
    assert plan_run_start(str(ray_storage), "r", named=False).action == "new"
    assert plan_run_start(str(ray_storage), "r", named=True, fresh=True).action == "new"
    folder = ray_storage / "r"
    (folder / "step_0000002").mkdir(parents=True)
    (folder / "step_0000002" / "x").write_text("kept")
    # A rerun resumes its own folder; --resume-from seeds only a run's first start.
    resumed = plan_run_start(str(ray_storage), "r", named=True, resume_from="/elsewhere/step_0000004")
    assert (resumed.action, resumed.moved_to, resumed.resume_from) == ("resume", None, "/elsewhere/step_0000004")
    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    fresh = plan_run_start(str(ray_storage), "r", named=True, fresh=True, now=now)
    assert (fresh.action, fresh.moved_to) == ("new", f"{folder}.replaced-20260102-030405")
    assert folder.is_dir()  # deciding moves nothing
    # --fresh --resume-from one of the old folder's own checkpoints: it follows the folder.
    inside = plan_run_start(str(ray_storage), "r", named=True, fresh=True, now=now,
                            resume_from=str(folder / "step_0000002"))
    assert inside.resume_from == f"{folder}.replaced-20260102-030405/step_0000002"
    cfg = config(tmp_path, "tracking.run_name=r", f"train.resume_from={folder / 'step_0000002'}")
    moved = apply_run_start(inside, cfg)
    assert not folder.exists() and (Path(inside.moved_to) / "step_0000002" / "x").read_text() == "kept"
    assert moved.train.resume_from == inside.resume_from and cfg.train.resume_from != moved.train.resume_from
    # Another --fresh in the same second does not overwrite the first one's folder.
    (folder / "step_0000004").mkdir(parents=True)
    assert plan_run_start(str(ray_storage), "r", True, True, now=now).moved_to.endswith(".replaced-20260102-030405-2")


def test_fresh_points_the_replaced_mlflow_run_at_its_moved_checkpoints(tmp_path):
    from mlflow import MlflowClient

    from apex_ray.orchestration.launcher import retag_replaced_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("apex-ray")
    folder, moved = str(tmp_path / "ray" / "r"), str(tmp_path / "ray" / "r.replaced-20260102-030405")
    old = client.create_run(experiment, run_name="r", tags={
        "checkpoint_path": f"{folder}/step_0000200", "export_path": f"{folder}/step_0000200/export"}).info.run_id
    older = client.create_run(experiment, run_name="r", tags={  # replaced by an earlier --fresh: untouched
        "checkpoint_path": f"{folder}.replaced-20250101-000000/step_0000100"}).info.run_id
    other = client.create_run(experiment, run_name="other", tags={"checkpoint_path": f"{folder}/step_0000200"}).info.run_id
    retag_replaced_runs(uri, "apex-ray", "r", folder, moved)
    tags = client.get_run(old).data.tags
    assert (tags["checkpoint_path"], tags["export_path"]) == (f"{moved}/step_0000200", f"{moved}/step_0000200/export")
    assert client.get_run(older).data.tags["checkpoint_path"] == f"{folder}.replaced-20250101-000000/step_0000100"
    assert client.get_run(other).data.tags["checkpoint_path"] == f"{folder}/step_0000200"


def test_fresh_refuses_a_run_folder_in_an_object_store(monkeypatch):
    from apex_ray.common import storage
    from apex_ray.orchestration import launcher

    monkeypatch.setattr(storage, "exists", lambda location: True)
    with pytest.raises(ConfigError, match="no rename.*new tracking.run_name"):
        launcher.plan_run_start("s3://bucket/runs/ray", "r", named=True, fresh=True)
    assert launcher.plan_run_start("s3://bucket/runs/ray", "r", named=True).action == "resume"


def test_a_worker_failure_line_says_why_and_how_many_restarts_are_left():
    from ray.exceptions import RayTaskError

    from apex_ray.orchestration.launcher import describe_worker_failure

    boom = RuntimeError("boom\nsecond line")
    assert describe_worker_failure({1: boom}, 1, 2) == (
        "apex-ray: worker group failed (rank 1: RuntimeError: boom); restarting from the latest checkpoint, "
        "1 of 2 restarts left")
    wrapped = RayTaskError("train_fn", "Traceback ...", boom, RuntimeError)
    line = describe_worker_failure({0: ValueError("x"), 1: wrapped}, 2, 2)
    assert "(rank 0: ValueError: x; rank 1: RuntimeError: boom)" in line and "0 of 2 restarts left" in line
    assert "no restarts left" in describe_worker_failure({1: boom}, 3, 2)
    assert "unlimited restarts" in describe_worker_failure({1: boom}, 5, -1)
    # A crashed rank comes first, with why its process is gone (through Ray Train's health-check
    # wrapper); the survivor's broken collective is a consequence and follows.
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: ...", failure=ActorDiedError())
    peer = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41000")
    assert describe_worker_failure({0: peer, 1: died}, 1, 1).startswith(
        "apex-ray: worker group failed (rank 1: ActorDiedError: The actor died unexpectedly before finishing this "
        "task; rank 0: RuntimeError: [gloo")


def test_a_run_out_of_restarts_ends_with_its_workers_reason_not_a_traceback(monkeypatch, capsys):
    from ray.train import WorkerGroupError

    from apex_ray import train
    from apex_ray.orchestration.launcher import describe_training_failure

    failure = WorkerGroupError("Training failed due to worker errors", {1: RuntimeError("boom\nsecond line")})
    assert describe_training_failure(failure) == "training failed (rank 1: RuntimeError: boom)"

    def out_of_restarts(config, verbose=False, fresh=False):
        raise failure

    monkeypatch.setattr(train, "run", out_of_restarts)
    assert train.main(["train.steps=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: training failed (rank 1: RuntimeError: boom)") and "Traceback" not in err
    with pytest.raises(WorkerGroupError):  # --verbose keeps Ray's own error and traceback
        train.main(["--verbose", "train.steps=1"])
