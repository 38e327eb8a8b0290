"""The mission's first cluster command, end to end: `ray job submit -- python -m apex_ray.train`
against a real Ray head (`ray start --head`, token auth on), on this machine.

The head gets its own temp dir, ports and token (RAY_AUTH_TOKEN, so ~/.ray is not touched) and is
stopped afterwards, so no other test joins it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A fresh head: (dashboard address, environment of a token-auth client)."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths are capped
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    gcs, dashboard = free_port(), free_port()
    # Every port of its own: with Ray's defaults, a second Ray instance on the machine (a user's, a
    # test's) holds the job agent's port and this head's job agent never starts ("No available agent").
    agent_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "ray-client-server-port")]
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    started = subprocess.run(
        [ray, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         *agent_ports, f"--temp-dir={temp_dir}", "--num-cpus=4", "--include-dashboard=true",
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}", env, ray
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(temp_dir: str, grace_s: float = 10.0) -> None:
    """Stop the Ray processes of the cluster in ``temp_dir`` only. ``ray stop`` stops every Ray
    process on the machine (it ignores ``RAY_ADDRESS``): another cluster on the same machine, a
    user's or another test session's, would die with this one."""
    import psutil

    def ours(process: psutil.Process) -> bool:
        try:
            return any(temp_dir in part for part in process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    processes = [p for p in psutil.process_iter() if p.pid != os.getpid() and ours(p)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


@pytest.mark.slow
def test_ray_job_submit_trains_tracks_checkpoints_and_exports(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    address, env, ray = ray_head
    out = tmp_path / "run"
    command = [ray, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
               "python", "-m", "apex_ray.train", f"output_dir={out}", "tracking.run_name=submitted",
               "data.source=inline-shapeeval", "data.num_samples=32", "train.steps=3", "train.global_batch=4",
               "train.log_every=1", "train.checkpoint_every=3", "train.eval_every=3", "eval.grid_nfe=[1]",
               "eval.score_nfe=[1]", "eval.grid_size=4"]
    for attempt in range(6):
        job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        # `ray start` returns before the head's job agent is up (seconds later on a loaded machine);
        # Ray refuses the submission with "No available agent ... try again later" until then.
        if "No available agent to submit job" not in job.stderr:
            break
        time.sleep(10)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower(), log[-4000:]  # the CLI's "Job '...' succeeded"
    checkpoints = sorted(p.name for p in (out / "ray" / "submitted").glob("step_*"))
    assert checkpoints == ["step_0000003"]
    export = out / "ray" / "submitted" / "step_0000003" / "export"
    assert (export / "ema" / "diffusion_pytorch_model.safetensors").is_file()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "apex-ray"]
    [run] = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'submitted'")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert client.get_metric_history(run.info.run_id, "shapeeval_nfe1/overall")
    logged = client.search_logged_models([experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert {m.name for m in logged} == {"ema", "student"}
