"""What a run shows in the MLflow UI, read back through the tracking server's REST API (what the UI
itself calls): logged models, dataset input, images, system metrics, tags, config, the registry."""
from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request

import pytest

from servers import mlflow_server
from test_train import tiny_config


def get(uri: str, endpoint: str, **query) -> dict:
    url = f"{uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def post(uri: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def fast_system_metrics():
    """System metrics every second (not 10 s) in the workers, which inherit this from the Ray
    cluster started after it: the short run below ends within seconds."""
    saved = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    yield
    if saved is None:
        os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", None)
    else:
        os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = saved


@pytest.mark.slow
def test_a_run_shows_models_dataset_images_system_metrics_and_registry(fast_system_metrics, ray_cluster, tmp_path):
    import mlflow
    import pandas as pd

    (tmp_path / "server").mkdir()
    with mlflow_server(tmp_path / "server") as uri:
        config = tiny_config(tmp_path, "train.steps=2", "train.checkpoint_every=2", "eval.grid_nfe=[1]",
                             "eval.score_nfe=[1]", "tracking.run_name=ui-run", f"tracking.tracking_uri={uri}",
                             "tracking.register_model=apex-ema")
        from apex_ray.orchestration.launcher import run

        result = run(config)
        assert result.export_path is not None

        found = get(uri, "runs/get", run_id=result.run_id)["run"]
        assert found["info"]["status"] == "FINISHED"
        tags = {t["key"]: t["value"] for t in found["data"]["tags"]}
        assert tags["mlflow.user"] and "APEX one-step fine-tune" in tags["mlflow.note.content"]
        experiment_id = found["info"]["experiment_id"]
        experiment = get(uri, "experiments/get", experiment_id=experiment_id)["experiment"]
        assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"

        # The prepared set, with its manifest's content hash as the digest.
        from apex_ray.engine.prepared import read_manifest
        from apex_ray.orchestration.launcher import _prepared_path

        manifest = read_manifest(_prepared_path(config))
        [dataset_input] = found["inputs"]["dataset_inputs"]
        assert dataset_input["dataset"]["digest"] == manifest["content_hash"][:36]
        assert dataset_input["dataset"]["source"] and dataset_input["dataset"]["name"]

        # The EMA and the student: logged models of this run, tagged with role and step.
        models = post(uri, "logged-models/search", {"experiment_ids": [experiment_id]})["models"]
        mine = {m["info"]["name"]: m["info"] for m in models if m["info"].get("source_run_id") == result.run_id}
        assert set(mine) == {"ema", "student"}, models
        for role, info in mine.items():
            model_tags = {t["key"]: t["value"] for t in info.get("tags", [])}
            assert model_tags["role"] == role and model_tags["step"] == "2"
        outputs = {o["model_id"] for o in found.get("outputs", {}).get("model_outputs", [])}
        assert outputs == {mine["ema"]["model_id"], mine["student"]["model_id"]}

        # Metrics and sample images; system metrics from rank 0's node.
        metric_keys = {m["key"] for m in found["data"]["metrics"]}
        assert "shapeeval_nfe1/overall" in metric_keys and "loss" in metric_keys
        system = sorted(k for k in metric_keys if k.startswith("system/"))
        assert system, metric_keys
        history = get(uri, "metrics/get-history", run_id=result.run_id, metric_key=system[0])["metrics"]
        assert history
        images = [f["path"] for f in get(uri, "artifacts/list", run_id=result.run_id, path="images").get("files", [])]
        assert any("samples~nfe1" in path and path.endswith(".png") for path in images), images
        root = [f["path"] for f in get(uri, "artifacts/list", run_id=result.run_id)["files"]]
        # The weights are uploaded once, inside the models (no copy as the run's export/ artifacts).
        assert "config.yaml" in root and "export" not in root, root

        # The EMA in the registry, pointing at its logged model.
        registered = get(uri, "registered-models/get", name="apex-ema")["registered_model"]
        [version] = registered["latest_versions"]
        assert version["run_id"] == result.run_id and mine["ema"]["model_id"] in version["source"]

        # The logged model loads and makes an image.
        previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
        mlflow.set_tracking_uri(uri)
        try:
            model = mlflow.pyfunc.load_model(f"models:/{mine['ema']['model_id']}")
            [image] = model.predict(pd.DataFrame({"prompt": ["a red circle"]}), params={"nfe": 1, "seed": 0})
            download = tmp_path / "ema-model"  # the model card's download command
            mlflow.artifacts.download_artifacts(f"models:/{mine['ema']['model_id']}", dst_path=str(download))
        finally:
            mlflow.set_tracking_uri(previous)
        assert image.dtype.name == "uint8" and image.shape == (config.data.image_size, config.data.image_size, 3)
        assert image.std() > 0

        # Logged from code, not pickled; the model card's download command gives apex-ray's folder.
        assert (download / "mlflow_model_code.py").is_file() and not list(download.rglob("*.pkl"))
        card = (download / "README.md").read_text()
        assert 'mlflow artifacts download --artifact-uri "models:/<model_id>" --dst-path ema-model' in card
        assert "--checkpoint ema-model/artifacts/ema" in card
        from apex_ray.models import load_backbone

        assert sum(p.numel() for p in load_backbone(download / "artifacts" / "ema").parameters()) > 1e6
