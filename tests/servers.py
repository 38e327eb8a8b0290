"""Real servers on 127.0.0.1 for integration tests: an MLflow tracking server and an
S3-compatible object store (moto's server mode), each stopped when its block ends."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """`mlflow server` with a sqlite store and proxied artifacts under ``folder``; yields its URI."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline or process.poll() is not None:
                    raise RuntimeError("mlflow server did not come up in 120 s") from None
                time.sleep(1)
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # the server's workers can linger after SIGTERM
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


@contextmanager
def s3_server(*buckets: str) -> Iterator[str]:
    """moto's S3 server with ``buckets`` created; the standard AWS variables point this process
    (and the processes it starts, e.g. Ray nodes) at it. Yields the endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {name: os.environ.get(name) for name in S3_ENV}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@contextmanager
def simulated_cluster(head: dict, nodes: list[dict]) -> Iterator[object]:
    """A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``), in its own temp dir.

    ``Cluster`` writes its address to ``<default temp dir>/ray_current_cluster``, where a later
    ``ray.init()`` would find it (and fails if ``/tmp/ray`` does not exist): ``RAY_TMPDIR`` points
    that default at the cluster's own short-lived folder (short: Ray's socket paths are capped at
    107 bytes) while it runs.
    """
    import shutil
    import tempfile

    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    ray_dir = os.path.join(temp_dir, "ray")  # what Ray takes as the default temp dir under RAY_TMPDIR
    os.makedirs(ray_dir)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={**head, "temp_dir": ray_dir})
        for node in nodes:
            cluster.add_node(**node)
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(temp_dir, ignore_errors=True)
