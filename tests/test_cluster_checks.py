"""Cluster-config errors that must fail before any cluster work, naming what to change."""
from __future__ import annotations


import pytest

from apex_ray.config import load_config
from servers import simulated_cluster
from apex_ray.orchestration.tracking import TrackingError, check_store_reachable, is_local_store


@pytest.mark.parametrize("uri, local", [("sqlite:////tmp/runs/mlflow.db", True), ("file:///tmp/mlruns", True),
                                        ("runs/mlruns", True), ("http://mlflow:5000", False),
                                        ("https://mlflow.example.com", False), ("databricks", True)])
def test_which_stores_are_files_on_this_machine(uri, local):
    assert is_local_store(uri) == local


def test_a_local_store_is_refused_on_several_nodes_or_through_a_ray_client():
    check_store_reachable("sqlite:////tmp/x.db", 1, None)  # one machine: fine
    check_store_reachable("sqlite:////tmp/x.db", 1, "127.0.0.1:6379")  # ray job submit on one node
    check_store_reachable("http://mlflow:5000", 8, "ray://head:10001")  # a server: always fine
    with pytest.raises(TrackingError, match="the cluster has 3 nodes.*tracking.tracking_uri=http"):
        check_store_reachable("sqlite:////tmp/x.db", 3, None)
    with pytest.raises(TrackingError, match="Ray client of ray://head:10001"):
        check_store_reachable("sqlite:////tmp/x.db", 1, "ray://head:10001")


@pytest.mark.slow
def test_training_on_a_two_node_cluster_refuses_the_sqlite_default_before_any_work(tmp_path):
    import ray

    from apex_ray.orchestration.launcher import run

    with simulated_cluster({"num_cpus": 1, "include_dashboard": False}, [{"num_cpus": 1}]) as cluster:
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            config = load_config(None, [f"output_dir={tmp_path / 'out'}", "distributed.num_workers=2"])
            with pytest.raises(TrackingError, match="the cluster has 2 nodes"):
                run(config)
            assert not (tmp_path / "out").exists()  # no MLflow store, no run folder, no data job
        finally:
            ray.shutdown()
