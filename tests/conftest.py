"""Shared fixtures: one local Ray cluster for all integration tests of a session."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A fresh local Ray instance for each test module that asks for one (so no module sees what
    another left behind, whatever the order they run in); shut down after the module."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads per op are many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
