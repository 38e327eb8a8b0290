"""Typed, validated training configuration: one YAML file plus ``key.sub=value`` overrides.

Everything is checked here, before Ray or any model starts, so that a bad value fails at once
with a message naming the field.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from apex_ray.method.consistency import ConsistencyConfig
from apex_ray.method.objective import APEXConfig, FlowMatchingConfig
from apex_ray.models.lora import LoRAConfig


class ConfigError(ValueError):
    """A configuration problem, with a message that names the field and says what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    backbone: str = "sana-tiny"  # see apex_ray.models.BACKBONE_PRESETS
    # Starting (teacher) weights: a local path, a hub id, bundled:shapes-teacher (the tiny ShapeEval
    # teacher shipped in apex_ray/assets, the embedded default) or null for random init.
    pretrained: str | None = "bundled:shapes-teacher"
    text_encoder: str = "minilm"  # see apex_ray.models.TEXT_ENCODER_PRESETS
    text_encoder_path: str | None = None
    max_text_length: int = Field(32, gt=0)
    backbone_overrides: dict[str, Any] = Field(default_factory=dict)  # extra diffusers config keys
    lora: LoRAConfig = Field(default_factory=LoRAConfig)


class DataConfig(_Section):
    # shapeeval: ShapeEval raw parquet generated on first use, prepared by Ray Data, streamed;
    # prepared: a folder made by `python -m data_pipelines.prepare_latents` (data.path);
    # inline-shapeeval: each worker generates and encodes ShapeEval in memory (no Ray Data; the
    # data order is exactly reproducible, so resumes are bit-exact).
    source: Literal["shapeeval", "prepared", "inline-shapeeval"] = "shapeeval"
    path: str | None = None  # prepared dataset folder or URI (s3://...; required for source=prepared)
    cache_dir: str = "~/.cache/apex-ray/data"  # where source=shapeeval keeps its prepared set (local or shared mount)
    num_samples: int = Field(2048, gt=0)  # ShapeEval pairs generated for the embedded default
    image_size: Literal[32, 64] = 32
    seed: int = 0


class ObjectiveConfig(_Section):
    # consistency: the one-step peer, discrete consistency distillation from the frozen starting model
    # (apex_ray.method.consistency); its target network is the run's EMA (ema.decay, left as is).
    kind: Literal["apex", "flow_matching", "consistency"] = "apex"
    apex: APEXConfig = Field(default_factory=APEXConfig)
    flow_matching: FlowMatchingConfig = Field(default_factory=FlowMatchingConfig)
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    buffer_size: int = Field(1024, gt=0)  # per-worker FIFO of one-step generations
    # A fake-sample buffer made by `python -m data_pipelines.fake_buffer`: seeds every worker's FIFO
    # before step 1, so L_adv has fake data from the first step.
    seed_buffer: str | None = None

    @property
    def method(self) -> str:
        """What the objective trains, in words (run descriptions, model cards)."""
        return {"apex": "APEX one-step fine-tune", "flow_matching": "flow-matching training",
                "consistency": "consistency distillation (one-step peer)"}[self.kind]


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)  # linear learning-rate warm-up
    decay: Literal["constant", "cosine"] = "constant"  # after warm-up; cosine runs to train.steps
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor as a share of lr
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; None disables


class EMAConfig(_Section):
    decay: float = Field(0.99, ge=0, lt=1)
    warmup: float = Field(10.0, ge=0)  # decay = min(decay, (1 + n) / (warmup + n)); 0 disables


class ScheduleConfig(_Section):
    steps: int = Field(200, gt=0)  # optimiser steps
    global_batch: int = Field(32, gt=0)  # samples per optimiser step over all workers
    micro_batch: int | None = Field(None, gt=0)  # per worker per forward; default global / workers
    seed: int = 0
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    max_nonfinite_steps: int = Field(5, gt=0)  # abort (with a checkpoint) after this many in a row
    # Ray Train hears of the run at checkpoints, evaluations and at most this often otherwise: each
    # report waits for the controller's next poll (every 2 s), so a report per step caps the rate.
    report_interval_s: float = Field(10.0, gt=0)
    # A step_* checkpoint folder (path or URI, of any run) that a new run starts from: weights,
    # optimiser, EMA, step and data position. Once the run has checkpoints of its own, a restart
    # resumes from those.
    resume_from: str | None = None


class DistributedConfig(_Section):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    strategy: Literal["fsdp", "ddp", "single"] = "fsdp"
    cpus_per_worker: float = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    max_failures: int = Field(2, ge=-1)  # worker failures to recover from; -1 = unlimited
    # How Ray places the workers: PACK fills a node first; STRICT_SPREAD puts each on its own node.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class TrackingConfig(_Section):
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite in output_dir
    experiment: str = "apex-ray"
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    register_model: str | None = None  # register the run's EMA logged model under this name


class EvalConfig(_Section):
    grid_nfe: list[int] = Field(default_factory=lambda: [1, 2, 4])
    score_nfe: list[int] = Field(default_factory=lambda: [1, 2])
    images_per_prompt: int = Field(1, gt=0)
    grid_size: int = Field(16, gt=0)  # images in each logged sample grid
    # Branch-separation diagnostics (issue 15) at each evaluation, MLflow keys diag/*: one micro-batch
    # per rank, no grad, 2-4 forwards (apex_ray.engine.diagnostics); objective.kind=apex only.
    diagnostics: bool = True
    # Also diag/cos_delta_frozen and diag/plain_drift_rms, against the frozen starting model. Under LoRA
    # that is the base with the adapter off (free); a full fine-tune keeps a no-grad copy of the starting
    # weights, sharded like the model (one more fp32 model over the ranks, like the EMA; the memory plan
    # counts it). false: no copy (unless shift_reference=frozen or kind=consistency needs it) and those two
    # metrics are absent.
    diagnostics_frozen: bool = True
    # A text file of prompts, one per non-empty line: at each evaluation images_per_prompt images of
    # each (fixed seeds) at every grid_nfe, logged as grids under prompts/nfe{N}, beside ShapeEval.
    prompts: str | None = None
    at_start: bool = True  # evaluate the starting weights at step 0 of a fresh run (not on resume)

    @field_validator("prompts")
    @classmethod
    def _absolute_prompts(cls, value: str | None) -> str | None:
        # Absolute, so that the workers (whose working directory may differ) read the same file.
        if value and _is_local(value):
            return str(Path(value).expanduser().absolute())
        return value

    @field_validator("grid_nfe", "score_nfe")
    @classmethod
    def _positive_nfe(cls, values: list[int]) -> list[int]:
        if any(nfe < 1 for nfe in values):
            raise ValueError("every NFE must be >= 1 (one network call at least)")
        return values


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    train: ScheduleConfig = Field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # Checkpoints, exports and Ray Train's run state: a local folder, a shared mount, or a URI
    # (s3://bucket/prefix, gs://...) for multi-node runs; see apex_ray.common.storage.
    output_dir: str = "runs/apex"

    @model_validator(mode="after")
    def _check_consistency(self, info: ValidationInfo) -> "Config":
        self._check_presets()
        if self.distributed.strategy == "single" and self.distributed.num_workers != 1:
            raise ValueError("distributed.strategy=single needs distributed.num_workers=1")
        if self.train.global_batch % (self.micro_batch * self.world_size):
            raise ValueError(
                f"train.global_batch={self.train.global_batch} is not divisible by "
                f"train.micro_batch={self.micro_batch} x distributed.num_workers={self.world_size}"
            )
        if self.data.source == "prepared" and not self.data.path:
            raise ValueError("data.path is required when data.source=prepared")
        if self.data.source != "prepared" and self.data.num_samples // self.world_size < self.micro_batch:
            raise ValueError(f"data.num_samples={self.data.num_samples} gives each of the {self.world_size} workers "
                             f"{self.data.num_samples // self.world_size} samples, fewer than one micro-batch of "
                             f"{self.micro_batch}; raise data.num_samples or lower train.global_batch")
        if self.data.source == "shapeeval" and not _is_local(self.data.cache_dir):
            raise ValueError(f"data.cache_dir: {self.data.cache_dir!r} is a URI, but the ShapeEval set is prepared "
                             "into a local folder (use a shared mount on a cluster); for a set in object storage "
                             "set data.source=prepared and data.path=s3://...")
        if (info.context or {}).get("check_files", True):
            self._check_files()
        return self

    def _check_presets(self) -> None:
        from apex_ray.assets import BUNDLED_MODELS
        from apex_ray.models.presets import BACKBONE_PRESETS
        from apex_ray.models.text_encoders import TEXT_ENCODER_PRESETS

        if self.model.backbone not in BACKBONE_PRESETS:
            raise ValueError(f"model.backbone: unknown preset {self.model.backbone!r}; "
                             f"valid presets: {sorted(BACKBONE_PRESETS)}")
        if self.model.text_encoder not in TEXT_ENCODER_PRESETS:
            raise ValueError(f"model.text_encoder: unknown preset {self.model.text_encoder!r}; "
                             f"valid presets: {sorted(TEXT_ENCODER_PRESETS)}")
        pretrained = self.model.pretrained
        if pretrained and pretrained.startswith("bundled:"):
            if pretrained not in BUNDLED_MODELS:
                raise ValueError(f"model.pretrained: unknown bundled model {pretrained!r}; shipped: "
                                 f"{sorted(BUNDLED_MODELS)}")
            preset, text_encoder, _ = BUNDLED_MODELS[pretrained]
            if self.model.text_encoder != text_encoder:
                raise ValueError(f"model.pretrained={pretrained} was trained with model.text_encoder={text_encoder}, "
                                 f"not {self.model.text_encoder!r}; keep {text_encoder} or set model.pretrained")
            if self.model.backbone != preset:
                raise ValueError(f"model.pretrained={pretrained} is a {preset} model but model.backbone is "
                                 f"{self.model.backbone!r}; set model.pretrained to a {self.model.backbone} "
                                 "checkpoint (path or hub id), or model.pretrained=null for random init")

    def _check_files(self) -> None:
        """Local files the run reads must exist where it is launched. URIs (``s3://``) and hub ids
        are left to the code that opens them; a config read back from a checkpoint skips this
        (``context={"check_files": False}``), since its files may live on another machine."""
        for field, value in (("model.pretrained", self.model.pretrained),
                             ("model.text_encoder_path", self.model.text_encoder_path)):
            if value and value.startswith((".", "/", "~")) and not Path(value).expanduser().exists():
                raise ValueError(f"{field}: path {value!r} does not exist")
        seed_buffer = self.objective.seed_buffer
        if seed_buffer and _is_local(seed_buffer) and not Path(seed_buffer).expanduser().exists():
            raise ValueError(f"objective.seed_buffer: {seed_buffer!r} does not exist; "
                             "make it with `python -m data_pipelines.fake_buffer`")
        if self.eval.prompts and _is_local(self.eval.prompts):
            read_prompt_file(self.eval.prompts)  # raises naming eval.prompts
        if self.data.source == "prepared" and _is_local(self.data.path):
            folder = Path(self.data.path).expanduser()
            if not folder.exists():
                raise ValueError(f"data.path: prepared dataset {self.data.path!r} does not exist; "
                                 "create it with `python -m data_pipelines.prepare_latents`")
            if not (folder / "manifest.json").is_file():
                raise ValueError(f"data.path: {self.data.path!r} is not a complete prepared set (no manifest.json); "
                                 "point it at a `python -m data_pipelines.prepare_latents` output, or rerun that job")

    @classmethod
    def from_run(cls, tree: dict[str, Any]) -> "Config":
        """A config that was validated where the run was launched (a worker's copy, a checkpoint's
        ``apex_run.json``): every check but the local-file ones."""
        return cls.model_validate(tree, context={"check_files": False})

    @property
    def world_size(self) -> int:
        return 1 if self.distributed.strategy == "single" else self.distributed.num_workers

    @property
    def micro_batch(self) -> int:
        return self.train.micro_batch or max(1, self.train.global_batch // self.world_size)

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch // (self.micro_batch * self.world_size)

    def with_changes(self, changes: dict[str, Any], check_files: bool = True) -> "Config":
        """A validated copy with ``{"section.field": value}`` changes. Raises :class:`ConfigError`."""
        tree = self.model_dump(mode="json")
        for key, value in changes.items():
            set_dotted(tree, key, value)
        return validate_tree(Config, tree, context={"check_files": check_files})

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"optim.lr": 1e-4, ...}``: the whole resolved config, for MLflow params."""
        return dict(_flatten(self.model_dump(mode="json")))


def _is_local(path: str) -> bool:
    return "://" not in path


def read_prompt_file(location: str) -> list[str]:
    """The prompts of an ``eval.prompts`` file: its non-empty lines, stripped (a path or a URI).
    Raises ``ValueError`` naming ``eval.prompts`` when the file is missing, unreadable or empty."""
    from apex_ray.common import storage

    try:
        text = storage.read_bytes(location).decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"eval.prompts: prompt file {location!r} does not exist; give a text file of prompts, "
                         "one per line, or eval.prompts=null") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"eval.prompts: cannot read prompt file {location!r} ({err})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"eval.prompts: prompt file {location!r} has no prompts (one per non-empty line)")
    return prompts


def _flatten(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree["a"]["b"]["c"] = value`` for ``key="a.b.c"``, making missing sections."""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"key {key!r} has an empty part")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"key {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({_first_line(err)})") from None
    try:
        set_dotted(tree, key, value)
    except ConfigError as err:
        raise ConfigError(f"override {override!r}: {err}") from None


def read_config_tree(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """A YAML file (optional) as a nested dict with ``key.sub=value`` overrides applied.

    A file may start from another with ``base: other.yaml`` (relative to the file): it is read
    first and this file's keys are merged over it, section by section, so a preset states only
    what differs from its base.
    """
    tree = _read_yaml_with_base(Path(path), ()) if path is not None else {}
    for override in overrides:
        apply_override(tree, override)
    return tree


def _read_yaml_with_base(file: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if not file.is_file():
        where = f" (the base of {str(chain[-1])!r})" if chain else ""
        raise ConfigError(f"config file {str(file)!r}{where} does not exist")
    if file.resolve() in chain:
        raise ConfigError(f"config file {str(file)!r} is its own base: "
                          + " -> ".join(str(p) for p in (*chain, file.resolve())))
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {_first_line(err)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(file)!r} must hold a mapping at the top level")
    tree = loaded or {}
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(file)!r}: base must be a file name, got {base!r}")
    return _merge(_read_yaml_with_base(file.parent / base, (*chain, file.resolve())), tree)


def _first_line(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or str(err).splitlines()[0]}{where}"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and value:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (),
                check_files: bool = True) -> Config:
    """Read a YAML file (optional), apply overrides, validate: the one gate every CLI passes.

    ``check_files=False`` skips only the local-file checks, for tools that read none of the
    files (``apex_ray.plan`` sizes a config whose data lives on the cluster).
    Raises :class:`ConfigError`.
    """
    return validate_tree(Config, read_config_tree(path, overrides), context={"check_files": check_files})


_Schema = TypeVar("_Schema", bound=BaseModel)


def validate_tree(schema: type[_Schema], tree: dict[str, Any], fields_in: str = "apex_ray/config.py",
                  context: dict[str, Any] | None = None) -> _Schema:
    """``schema`` from a nested dict; a :class:`ConfigError` naming each bad field otherwise."""
    try:
        return schema.model_validate(tree, context=context)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, fields_in)) from None


def format_validation_error(err: ValidationError, fields_in: str = "apex_ray/config.py") -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown key (check the spelling; see {fields_in} for the fields)"
        got = f" (got {item['input']!r})" if item["type"] != "extra_forbidden" and "input" in item and not isinstance(item["input"], dict) else ""
        lines.append(f"  {message}" if where == "config" else f"  {where}: {message}{got}")
    return "invalid config:\n" + "\n".join(lines)
