"""Runs whose data, checkpoints and exports live in object storage (a real S3 server on localhost,
moto's server mode), on a Ray cluster of several nodes on this machine.

The storage layer's round trips and the URI refusals are fast; the two-node run is the cluster
path of the README: one worker per node (STRICT_SPREAD), prepared set read from S3, checkpoints
and export written there, one node taken away mid-run and a replacement added, resume from the
S3 checkpoint, nothing written to this machine's working directory.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import servers
from servers import simulated_cluster
from apex_ray.common import storage
from apex_ray.config import Config, ConfigError, load_config
from apex_ray.orchestration.launcher import preflight
from apex_ray.orchestration.tracking import TrackingError

BUCKET = "apex-bucket"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3():
    with servers.s3_server(BUCKET) as endpoint:
        yield endpoint


def test_uris_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Config(output_dir="s3://b/runs").output_dir == "s3://b/runs"
    assert storage.resolve("s3://b/runs/") == "s3://b/runs"  # not <cwd>/s3:/b/runs
    assert storage.join("s3://b/runs", "ray", "x") == "s3://b/runs/ray/x"
    assert storage.resolve("runs") == str(tmp_path / "runs")
    assert storage.resolve("file:///tmp/x") == "/tmp/x"
    assert not storage.is_uri("/mnt/efs/runs") and storage.is_uri("gs://b/x")


def test_round_trips_through_s3(s3, tmp_path):
    root = f"s3://{BUCKET}/roundtrip"
    storage.write_bytes(f"{root}/a/b.json", b'{"x": 1}')
    assert storage.read_json(f"{root}/a/b.json") == {"x": 1}
    assert storage.is_file(f"{root}/a/b.json") and not storage.is_file(f"{root}/a")
    assert storage.list_dir(root) == ["a"] and storage.list_dir(f"{root}/missing") == []

    local = tmp_path / "folder"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "w.bin").write_bytes(bytes(range(256)))
    storage.upload_dir(local, f"{root}/folder")
    with storage.local_copy(f"{root}/folder") as copy:
        assert (copy / "sub" / "w.bin").read_bytes() == bytes(range(256))
        downloaded = copy
    assert not downloaded.exists()  # the temporary download is gone

    with storage.local_output(f"{root}/out") as out:
        (out / "f.txt").write_text("done")
    assert storage.read_bytes(f"{root}/out/f.txt") == b"done"
    with pytest.raises(RuntimeError), storage.local_output(f"{root}/failed") as out:
        (out / "f.txt").write_text("half")
        raise RuntimeError("the writer failed")
    assert not storage.exists(f"{root}/failed")  # nothing uploaded for a failed write

    cached = storage.cached_copy(f"{root}/folder", tmp_path / "cache")
    assert (cached / "sub" / "w.bin").read_bytes() == bytes(range(256))
    assert storage.cached_copy(f"{root}/folder", tmp_path / "cache") == cached
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cached.name]  # no partial download left


def test_uri_mistakes_fail_before_any_cluster_work(s3, tmp_path):
    import ray

    with pytest.raises(ConfigError, match="data.cache_dir"):
        load_config(None, ["data.cache_dir=s3://b/cache"])
    with pytest.raises(TrackingError, match="tracking.tracking_uri"):
        preflight(load_config(None, [f"output_dir=s3://{BUCKET}/runs"]))
    with servers.mlflow_server(tmp_path) as uri:
        base = [f"tracking.tracking_uri={uri}"]
        config = load_config(None, [*base, "data.source=prepared", f"data.path=s3://{BUCKET}/no-such-set"])
        with pytest.raises(ConfigError, match=r"data.path: s3://apex-bucket/no-such-set has no manifest.json"):
            preflight(config)
        config = load_config(None, [*base, f"objective.seed_buffer=s3://{BUCKET}/no-buffer"])
        with pytest.raises(ConfigError, match="objective.seed_buffer"):
            preflight(config)
        config = load_config(None, [*base, "output_dir=s3://no-such-bucket/runs"])
        with pytest.raises(ConfigError, match="output_dir: cannot write to s3://no-such-bucket/runs"):
            preflight(config)
        preflight(load_config(None, [*base, f"output_dir=s3://{BUCKET}/probe"]))  # a writable bucket passes
        assert storage.list_dir(f"s3://{BUCKET}/probe") == []  # and its probe is gone
    assert not ray.is_initialized()

    # The CLI says the same with exit 2 before Ray starts.
    result = subprocess.run([sys.executable, "-m", "apex_ray.train", "data.source=prepared",
                             f"data.path=s3://{BUCKET}/no-such-set", "tracking.tracking_uri=sqlite:///" +
                             str(tmp_path / "m.db")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "data.path: s3://apex-bucket/no-such-set has no manifest.json" in result.stderr
    assert "apex-ray: run" not in result.stdout


@pytest.fixture(scope="module")
def two_node_cluster(s3, tmp_path_factory):
    """A head that runs only the driver's actors (0 CPUs) and two worker nodes of 2 CPUs."""
    import ray

    with simulated_cluster({"num_cpus": 0, "include_dashboard": False, "object_store_memory": 300 * 1024**2},
                           [{"num_cpus": 2, "object_store_memory": 300 * 1024**2}] * 2) as cluster:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
        ray.shutdown()


@pytest.fixture(scope="module")
def prepared_on_s3(two_node_cluster, tmp_path_factory):
    """A small ShapeEval prepared set made by the Ray Data job, uploaded, its local copy deleted."""
    import shutil

    from data_pipelines.shapeeval_set import ensure_shapeeval_prepared

    cache = tmp_path_factory.mktemp("cache")
    local = ensure_shapeeval_prepared(cache, 128, 0, 32, "sana-tiny", "minilm", 32)
    uri = f"s3://{BUCKET}/data/shapes"
    storage.upload_dir(local, uri)
    shutil.rmtree(cache)
    return uri


def test_prepared_set_readers_take_a_uri(prepared_on_s3):
    from apex_ray.engine.prepared import load_empty_prompt, load_prepared_arrays, read_manifest, shard_paths

    manifest = read_manifest(prepared_on_s3)
    assert manifest["rows_written"] == 128
    assert all(path.startswith(f"{prepared_on_s3}/shards/") for path in shard_paths(prepared_on_s3))
    latents, cond, captions = load_prepared_arrays(prepared_on_s3, limit=8)
    assert latents.shape[0] == 8 and len(captions) == 8 and cond.embeds.shape[0] == 8
    assert load_empty_prompt(prepared_on_s3).embeds.shape[0] == 1


@pytest.mark.slow
def test_two_node_run_on_s3_survives_losing_a_node(two_node_cluster, prepared_on_s3, tmp_path, monkeypatch, capsys):
    import ray
    from mlflow.tracking import MlflowClient

    from apex_ray.orchestration.launcher import run
    from faults import PauseAtStep

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything written to a relative local path would land here
    marker = tmp_path / "paused-node"
    output = f"s3://{BUCKET}/runs"
    with servers.mlflow_server(_mkdir(tmp_path / "mlflow")) as uri:
        config = load_config(None, [
            "data.source=prepared", f"data.path={prepared_on_s3}", f"output_dir={output}",
            f"tracking.tracking_uri={uri}", "tracking.run_name=two-node",
            "distributed.num_workers=2", "distributed.placement_strategy=STRICT_SPREAD",
            "distributed.cpus_per_worker=1", "train.steps=8", "train.checkpoint_every=4", "train.log_every=2",
            "train.eval_every=8", "train.global_batch=8", "objective.buffer_size=64",
            "eval.score_nfe=[1]", "eval.grid_nfe=[1]", "eval.grid_size=4"])

        # The run goes on in a thread; this (main) thread plays the cluster operator, since Ray
        # nodes can only be started from the main thread.
        outcome: dict = {}

        def train():
            try:
                outcome["result"] = run(config, train_loop=PauseAtStep(step=5, marker=marker, rank=1))
            except BaseException as err:  # re-raised below
                outcome["error"] = err

        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        deadline = time.time() + 600
        while not marker.exists() and trainer.is_alive() and time.time() < deadline:
            time.sleep(0.5)
        assert marker.exists(), f"the drill never paused: {outcome}"
        node_id = marker.read_text()
        victim = next(n for n in two_node_cluster.worker_nodes if n.node_id == node_id)
        two_node_cluster.remove_node(victim)
        two_node_cluster.add_node(num_cpus=2, object_store_memory=300 * 1024**2)
        trainer.join(timeout=900)
        assert not trainer.is_alive(), "the run did not finish in 15 minutes after the node was replaced"
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]

        printed = capsys.readouterr().out
        assert "resumed from step 4 (2 -> 2 workers)" in printed, printed
        assert result.metrics["step"] == 8
        assert result.checkpoint_path == f"{output}/ray/two-node/step_0000008"
        for name in ("ema", "student"):
            assert storage.is_file(f"{result.export_path}/{name}/config.json")
        assert storage.is_file(f"{output}/ray/two-node/step_0000008/.metadata")
        alive = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")]
        assert len(alive) == 2  # the replacement joined and the run spread over it

        client = MlflowClient(uri)
        logged = client.get_run(result.run_id)
        assert logged.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
        assert max(steps) == 8
        assert "shapeeval_nfe1/overall" in logged.data.metrics
    assert list(cwd.iterdir()) == []  # nothing went to local paths another node would need

    # A user exports the S3 checkpoint of step 4 to S3 with the CLI.
    exported = f"s3://{BUCKET}/exports/step4"
    done = subprocess.run([sys.executable, "-m", "apex_ray.export", f"{output}/ray/two-node/step_0000004",
                           "--out", exported], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("ema", "student"):
        assert storage.is_file(f"{exported}/{name}/config.json")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
