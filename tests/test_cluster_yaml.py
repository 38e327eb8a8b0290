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
