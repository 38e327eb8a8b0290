"""LoRA fine-tuning (peft) of a backbone's diffusers transformer, with the EMA kept as a second adapter.

The paper tunes Qwen-Image 20B with LoRA of rank 32 and 64 on a frozen base (Sec. 4.1, Tables 1
and 5; the design note's section 4: "under LoRA the EMA can be a second adapter on the same
base model"). Here the trained adapter is peft's ``"default"`` and the EMA theta^- of Algorithm 1
(line 24) is an adapter ``"ema"`` on the same layers, so there is one copy of the base weights.

Order of use (before sharding; FSDP2 then shards base and both adapters alike)::

    summary = apply_lora(model, config.model.lora)      # freeze the base, add "default"
    ema = AdapterEMA(model, decay, warmup)              # add "ema", a copy of "default"
    parallelize(model, ...)                             # FSDP2 per block, then the root
    optimizer = build_optimizer(model, ...)             # only "default" requires grad
    state = LoRATrainingState(model, optimizer, ema)    # engine.checkpointing: adapters only, not the base

Adapters are saved in the diffusers/peft LoRA format that ``SanaPipeline.load_lora_weights`` /
``QwenImagePipeline.load_lora_weights`` read (:func:`save_adapter`); :func:`save_merged` writes one
folded into the base weights as a plain ``save_pretrained`` folder (:func:`merge_adapter` does the
folding in place on an unsharded model).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist
from diffusers.loaders import QwenImageLoraLoaderMixin, SanaLoraLoaderMixin
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from apex_ray.method.conditioning import Conditioning
from apex_ray.method.ema import warmup_decay
from apex_ray.models.base import VelocityModel, full_state_dict
from apex_ray.models.loading import fill_from_full_, local

TRAINED_ADAPTER = "default"
"""peft's name for the adapter the optimiser trains."""
EMA_ADAPTER = "ema"
"""The EMA of the trained adapter, on the same layers."""

LORA_LOADERS = {"sana": SanaLoraLoaderMixin, "qwen-image": QwenImageLoraLoaderMixin}
"""The diffusers pipeline mixin whose ``save_lora_weights`` / ``load_lora_weights`` fit each family."""


class LoRAConfig(BaseModel):
    """LoRA adapters (peft) on a frozen base; the EMA is a second adapter on the same base."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False
    rank: int = Field(32, gt=0)
    alpha: float | None = Field(None, gt=0)  # None = rank (scale 1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Storage dtype of the frozen base (adapters stay fp32): auto = bf16 when FSDP2 computes in bf16
    # (GPUs; it casts every gathered weight for every forward), else fp32; bf16 needs exactly that.
    base_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    # Module-name patterns (peft target_modules) for attention, MLP and timestep-embedding projections.
    target_modules: list[str] = Field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
        "timestep_embedder.linear_1", "timestep_embedder.linear_2",
    ])


@dataclass(frozen=True)
class LoRASummary:
    """What :func:`apply_lora` did: which target patterns exist in this architecture and the sizes."""

    rank: int
    matched: list[str]
    skipped: list[str]
    adapted_modules: int
    trainable_params: int
    frozen_params: int

    def __str__(self) -> str:
        line = (f"LoRA rank {self.rank} on {self.adapted_modules} modules ({', '.join(self.matched)}): "
                f"{self.trainable_params:,} trainable, {self.frozen_params:,} frozen parameters")
        if self.skipped:
            line += f"; patterns absent in this architecture: {', '.join(self.skipped)}"
        return line


def _matches(module_name: str, pattern: str) -> bool:
    """peft's rule for a list of ``target_modules``: the name equals the pattern or ends with ``.pattern``."""
    return module_name == pattern or module_name.endswith("." + pattern)


def adapter_of(name: str) -> str | None:
    """The adapter a parameter/state-dict key belongs to (``...lora_A.ema.weight`` -> ``"ema"``), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def _tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def apply_lora(model: VelocityModel, config: LoRAConfig) -> LoRASummary:
    """Freeze ``model`` and add the trainable LoRA adapter ``"default"`` to ``model.transformer``.

    Only the ``config.target_modules`` patterns that name modules of this architecture are used
    (the default list covers SANA and Qwen-Image; the summary says which were absent). A
    ValueError is raised when none matches. Call before sharding and before :class:`AdapterEMA`.
    """
    transformer = model.transformer
    if TRAINED_ADAPTER in getattr(transformer, "peft_config", {}):
        raise ValueError("this model already has LoRA adapters; apply_lora must be called once, on a fresh model")
    names = [name for name, _ in transformer.named_modules()]
    matched = [p for p in config.target_modules if any(_matches(name, p) for name in names)]
    if not matched:
        linear = sorted({name.split(".")[-1] for name, module in transformer.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise ValueError(
            f"none of model.lora.target_modules {config.target_modules} names a module of "
            f"{type(transformer).__name__}; its Linear layers end in: {linear}"
        )
    model.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=config.rank, lora_alpha=config.alpha or config.rank, lora_dropout=config.dropout,
                   target_modules=matched),
        adapter_name=TRAINED_ADAPTER,
    )
    _set_trainable(_tuner_layers(transformer))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoRASummary(
        rank=config.rank,
        matched=matched,
        skipped=[p for p in config.target_modules if p not in matched],
        adapted_modules=len(_tuner_layers(transformer)),
        trainable_params=trainable,
        frozen_params=sum(p.numel() for p in model.parameters()) - trainable,
    )


def cast_base(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen base (every frozen parameter outside the adapters) in ``dtype``; the adapters
    keep theirs (fp32). Call after :class:`AdapterEMA` and before sharding (on a meta skeleton this
    allocates nothing). Returns how many parameters were cast."""
    cast = 0
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            full_name = f"{module_name}.{name}" if module_name else name
            if param is None or param.requires_grad or adapter_of(full_name) is not None or param.dtype == dtype:
                continue
            module._parameters[name] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=False)
            cast += 1
    return cast


@torch.no_grad()
def initialize_adapters(model: torch.nn.Module, seed: int) -> None:
    """peft's initialisation of the trained adapter, drawn on the CPU from a generator seeded with
    ``seed`` (``lora_A`` Kaiming-uniform like an ``nn.Linear``, ``lora_B`` zero, so the adapted
    model starts equal to the base), then the EMA adapter set equal to it.

    For adapters allocated uninitialised (:func:`~apex_ray.models.loading.materialize`), sharded or
    not: every rank draws every full tensor in the same order and keeps its block, so the values
    do not depend on the worker count (an export on one CPU rebuilds those of an N-GPU run).
    """
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name, param in params.items():
        if adapter_of(name) != TRAINED_ADAPTER:
            continue
        full = torch.empty(param.shape, dtype=torch.float32)
        if ".lora_A." in name and name.endswith(".weight"):
            torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        elif ".lora_B." in name:
            full.zero_()
        else:
            raise ValueError(f"no initialisation rule for adapter parameter {name}")
        fill_from_full_(param, full)
    for name, param in params.items():
        if adapter_of(name) == EMA_ADAPTER:
            local(param).copy_(local(params[name.replace(f".{EMA_ADAPTER}.", f".{TRAINED_ADAPTER}.")]))


def _set_trainable(layers: list[BaseTunerLayer]) -> None:
    """``requires_grad`` = True on the trained adapter only (never on the base or the EMA adapter).

    peft's ``set_adapter`` makes the *active* adapter trainable; switching to the EMA adapter and
    back would otherwise leave ``"default"`` frozen or ``"ema"`` trainable. Acts on the parameter
    objects the layers hold now (under FSDP2: sharded, or gathered while a forward holds them).
    """
    for layer in layers:
        for attribute in layer.adapter_layer_names:
            for name, holder in getattr(layer, attribute).items():
                holder.requires_grad_(name == TRAINED_ADAPTER)


class AdapterEMA:
    """The EMA of the trained LoRA adapter as a second adapter ``"ema"`` on the same base.

    Same interface as :class:`apex_ray.method.ema.EMA`: ``ema(x_t, t, cond)`` runs the model with the EMA
    adapter (no grad, eval mode) and switches back to the trained adapter; ``update(model)`` after
    each optimiser step; ``current_decay()``; ``state_dict()`` / ``load_state_dict()``. As with
    ``EMA`` (``AveragedModel``) the first update copies the trained adapter and update ``n >= 1``
    moves ``ema <- d ema + (1 - d) default`` with ``d = warmup_decay(decay, n, warmup)``.
    Under FSDP2 both adapters are sharded identically and the update lerps the local shards.
    """

    def __init__(self, model: VelocityModel, decay: float = 0.99, warmup: float = 10.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        transformer = model.transformer
        if TRAINED_ADAPTER not in getattr(transformer, "peft_config", {}):
            raise ValueError("AdapterEMA needs the LoRA adapter: call apply_lora(model, config) first")
        if any(isinstance(p, DTensor) for p in model.parameters()):
            raise ValueError("create AdapterEMA before sharding the model (it adds parameters)")
        self.model, self.decay, self.warmup = model, decay, warmup
        self.num_updates = 0
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: it is meant
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(copy.deepcopy(transformer.peft_config[TRAINED_ADAPTER]), adapter_name=EMA_ADAPTER)
        self._layers = _tuner_layers(transformer)
        self._activate(TRAINED_ADAPTER)  # add_adapter activated "ema"
        with torch.no_grad():
            for ema, trained in self._pairs(model):
                ema.copy_(trained)

    def _activate(self, adapter: str) -> None:
        for layer in self._layers:
            layer.set_adapter(adapter)
        _set_trainable(self._layers)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the model computes with the EMA adapter (in eval mode, so no LoRA dropout)."""
        was_training = self.model.training
        self._activate(EMA_ADAPTER)
        self.model.eval()
        try:
            yield
        finally:
            self._activate(TRAINED_ADAPTER)
            self.model.train(was_training)

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``F_ema(x_t, t, cond)``: the velocity with the EMA adapter (never differentiated)."""
        with self.active():
            return self.model(x_t, t, cond)

    def eval(self) -> "AdapterEMA":
        """The EMA always runs in eval mode; present for callers written for ``EMA`` (an nn.Module)."""
        return self

    def current_decay(self) -> float:
        """The decay the next update will use (0 for the first update, a copy)."""
        return 0.0 if self.num_updates == 0 else warmup_decay(self.decay, self.num_updates, self.warmup)

    def _pairs(self, model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ema, trained) parameter pairs, as local tensors (the shards under FSDP2)."""
        params = dict(model.named_parameters())
        pairs = []
        for name, param in params.items():
            if adapter_of(name) == EMA_ADAPTER:
                trained = params[name.replace(f".{EMA_ADAPTER}.", f".{TRAINED_ADAPTER}.")]
                pairs.append((local(param), local(trained)))
        return pairs

    @torch.no_grad()
    def update(self, model: torch.nn.Module, apply: torch.Tensor | None = None) -> None:
        """Move the EMA adapter toward the trained one; call after each optimiser step. ``apply``
        (a 0-d bool tensor on the device) gates the move without a host read (a skipped step)."""
        if model is not self.model and getattr(model, "module", None) is not self.model:
            raise ValueError("AdapterEMA.update takes the model it was created on (or its DDP wrapper)")
        if isinstance(self.model, FSDPModule):
            self.model.reshard()  # the root's parameters must be the sharded ones, not a gathered copy
        ema, trained = zip(*self._pairs(model))
        weight = 1.0 - self.current_decay()  # 1 on the first update: lerp(a, b, 1) is exactly b, a copy
        if apply is not None:
            weight = apply.to(ema[0].dtype) * weight
        torch._foreach_lerp_(list(ema), list(trained), weight)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The EMA adapter's tensors (sharded DTensors under FSDP2, for DCP) and the update count."""
        return {"weights": adapter_state_dict(self.model, (EMA_ADAPTER,)),
                "num_updates": torch.tensor(self.num_updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_adapter_tensors(self.model, state["weights"])
        self.num_updates = int(state["num_updates"])


def adapter_state_dict(model: torch.nn.Module,
                       adapters: tuple[str, ...] = (TRAINED_ADAPTER, EMA_ADAPTER)) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` only (no base weights), keyed by FQN with the adapter name.

    Under FSDP2 the values are the sharded DTensors (what DCP saves and reshards); no collective.
    """
    return {k: v for k, v in get_model_state_dict(model).items() if adapter_of(k) in adapters}


def load_adapter_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    result = set_model_state_dict(model, tensors, options=StateDictOptions(strict=False))
    if result.unexpected_keys:
        raise KeyError(f"adapter tensors the model does not have: {sorted(result.unexpected_keys)[:5]}")


def gather_adapter(model: VelocityModel, adapter: str = TRAINED_ADAPTER) -> dict[str, torch.Tensor]:
    """One adapter's weights in peft's format (keys relative to the transformer, without the
    adapter name), unsharded, on CPU. Under FSDP2 this is a collective: call it on every rank."""
    state = model.transformer.state_dict()
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in state.items() if adapter_of(k) == adapter}
    if not full:
        raise KeyError(f"the model has no LoRA adapter {adapter!r}")
    return get_peft_model_state_dict(model.transformer, state_dict=full, adapter_name=adapter)


def save_adapter(model: VelocityModel, directory: str | os.PathLike, adapter: str = TRAINED_ADAPTER) -> None:
    """Write one adapter as ``directory/pytorch_lora_weights.safetensors`` (diffusers LoRA format,
    with its LoraConfig as metadata), loadable by the family's pipeline ``load_lora_weights`` and
    by :func:`load_adapter_into`. A collective under FSDP2 (every rank calls; rank 0 writes)."""
    weights = gather_adapter(model, adapter)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    LORA_LOADERS[model.family].save_lora_weights(
        directory,
        transformer_lora_layers=weights,
        transformer_lora_adapter_metadata=model.transformer.peft_config[adapter].to_dict(),
    )


def load_adapter_into(model: VelocityModel, directory: str | os.PathLike, adapter: str = TRAINED_ADAPTER) -> None:
    """Load an adapter written by :func:`save_adapter` (or any diffusers LoRA of this family) into
    an unsharded ``model`` as ``adapter`` and make it the active one."""
    model.transformer.load_lora_adapter(str(directory), prefix="transformer", adapter_name=adapter,
                                        use_safetensors=True)
    model.transformer.set_adapter(adapter)


def save_merged(model: VelocityModel, directory: str | os.PathLike, adapter: str = TRAINED_ADAPTER) -> None:
    """Write ``adapter`` folded into the base as a plain ``save_pretrained`` folder (what
    ``load_backbone`` and ``python -m apex_ray.sample`` read), leaving ``model`` as it is.

    A collective under FSDP2: every rank takes part in the gather; rank 0 holds the full weights
    once on the CPU (the merged twin is built on the meta device and takes them over) and writes.
    """
    weights = full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    for key in weights:  # unsharded, the gather returns the model's own tensors: merging must not touch them
        weights[key] = weights[key].clone()
    with torch.device("meta"):
        twin = type(model)(type(model.transformer).from_config(model.transformer.config), sample_size=model.sample_size)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name, config in model.transformer.peft_config.items():
                twin.transformer.add_adapter(copy.deepcopy(config), adapter_name=name)
    twin.load_state_dict(weights, assign=True)
    merge_adapter(twin, adapter).save_pretrained(directory)


def merge_adapter(model: VelocityModel, adapter: str = TRAINED_ADAPTER) -> VelocityModel:
    """Fold ``adapter`` into the base weights and remove every LoRA layer, in place: ``model``
    becomes a plain backbone for ``save_pretrained`` / ``load_backbone`` (unsharded models only)."""
    if adapter not in getattr(model.transformer, "peft_config", {}):
        raise KeyError(f"the model has no LoRA adapter {adapter!r}")
    model.transformer.fuse_lora(adapter_names=[adapter])
    model.transformer.unload_lora()
    return model
