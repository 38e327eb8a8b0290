"""cluster.yaml is a valid Ray autoscaler config and keeps the security settings we promise."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema():
    validate_config(prepare_config(load()))


def test_schema_check_is_not_vacuous():
    broken = copy.deepcopy(load())
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_dashboard_on_localhost_token_auth_on_and_project_installed():
    config = load()
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text().replace("do not set RAY_AUTH_MODE=disabled", "")
    assert any("apex-ray" in cmd for cmd in config["setup_commands"])
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1


RAYJOB = CLUSTER_YAML.parent / "k8s" / "rayjob.yaml"


def test_cluster_yaml_gives_workers_mlflow_shared_storage_and_nccl_placement():
    config = load()
    commands = " ".join(config["initialization_commands"] + config["head_start_ray_commands"]
                        + config["worker_start_ray_commands"])
    assert "mount" in commands and "/mnt/shared" in commands
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in commands  # workers log to the head's server
    assert "--host 0.0.0.0" in commands and "--allowed-hosts" in commands  # reachable; MLflow 3 host check
    assert "/mnt/shared/mlflow" in commands  # the store outlives `ray down`
    worker = config["available_node_types"]["gpu_worker"]["node_config"]
    assert "Placement" in worker and worker["NetworkInterfaces"][0]["InterfaceType"] == "efa"
    assert config["available_node_types"]["head"]["resources"]["CPU"] > 0  # the head runs the driver


def test_kuberay_rayjob_has_what_a_run_needs():
    from apex_ray.config import load_config

    job, claim = list(yaml.safe_load_all(RAYJOB.read_text()))
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    words = job["spec"]["entrypoint"].split()
    assert words[:3] == ["python", "-m", "apex_ray.train"] and words[3] == "--config"
    config = load_config(CLUSTER_YAML.parent / words[4], words[5:], check_files=False)
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    images = {c["image"] for pod in pods for c in pod["containers"]}
    assert len(images) == 1
    for pod in pods:
        [container] = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/mnt/shared"] == "shared" and "/dev/shm" in mounts
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert config.output_dir.startswith("/mnt/shared/") and config.data.path.startswith("/mnt/shared/")
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in cluster["workerGroupSpecs"])
    assert gpus == config.world_size and config.distributed.use_gpu
    cpus = int(cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    per_pod = int(cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cpus >= per_pod * config.distributed.cpus_per_worker
