"""Training checkpoints with torch.distributed.checkpoint (DCP), and weight export.

A checkpoint folder holds the DCP shards of model, EMA and optimiser (every rank writes its
own shard; loading reshards to any worker count) plus one small ``extra_rank{r}.pt`` per rank:
step, RNG states, data position, LR scheduler and the rank's fake-sample buffer. Works the
same in one process (no process group) and under torch.distributed.
"""
from __future__ import annotations

import io
import os
import pickle
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from apex_ray.common import storage
from apex_ray.common.errors import InputError
from apex_ray.common.files import atomic_path, write_json_atomic
from apex_ray.models.lora import (
    TRAINED_ADAPTER,
    AdapterEMA,
    adapter_state_dict,
    load_adapter_tensors,
)

EXTRA_FILE = "extra_rank{rank}.pt"
RUN_FILE = "apex_run.json"  # the resolved training config and the backbone's exact diffusers config


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class TrainingState(Stateful):
    """Model + optimiser + EMA as one DCP ``Stateful`` (FQN mapping and sharding handled by DCP)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: torch.nn.Module | None) -> None:
        self.model, self.optimizer, self.ema = model, optimizer, ema

    def state_dict(self) -> dict[str, Any]:
        complete_optimizer_state(self.optimizer)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        if self.ema is not None:
            state["ema"] = get_model_state_dict(self.ema)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if self.ema is not None:
            set_model_state_dict(self.ema, state["ema"])


class LoRATrainingState(Stateful):
    """Adapters + optimiser + adapter EMA as one DCP ``Stateful``: the frozen base is not saved.

    Same interface as :class:`TrainingState`, so ``save_checkpoint`` /
    ``load_checkpoint`` take it unchanged. On resume the base comes from ``config.model.pretrained``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: AdapterEMA | None) -> None:
        self.model, self.optimizer, self.ema = model, optimizer, ema

    def state_dict(self) -> dict[str, Any]:
        complete_optimizer_state(self.optimizer)
        state = {"adapter": adapter_state_dict(self.model, (TRAINED_ADAPTER,)),
                 "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_adapter_tensors(self.model, state["adapter"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def complete_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter without AdamW state the state AdamW would create at its first
    gradient (step 0, zero moments), so updates are unchanged.

    A parameter that never receives a gradient (Qwen-Image's last block computes a text stream
    whose output is discarded) has no state; a resumed optimiser's template would then hold keys
    the checkpoint lacks and DCP refuses to load it.
    """
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"checkpoints expect Adam/AdamW (build_optimizer), got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad and not optimizer.state[param]:
                local = param.to_local() if hasattr(param, "to_local") else param
                step_device = local.device if group["fused"] or group["capturable"] else torch.device("cpu")
                moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
                optimizer.state[param] = {
                    "step": torch.zeros((), dtype=torch.float32, device=step_device),
                    **{name: torch.zeros_like(param) for name in moments},
                }


def save_checkpoint(directory: str | os.PathLike, state: TrainingState, extra: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (call on every rank); returns
    when it is on disk."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save({"train": state}, checkpoint_id=directory)
    _write_extra(directory, extra)


def _write_extra(directory: Path, extra: dict[str, Any]) -> None:
    with atomic_path(directory / EXTRA_FILE.format(rank=_rank())) as tmp:
        torch.save(extra, tmp)


class AsyncCheckpointer:
    """Checkpoints written while training goes on: ``dcp.async_save`` copies the state (the
    stall a step sees), then writes the shards on a background thread; the extra state (fresh
    tensors already, :meth:`StepRunner.extra_state`) is written on another. ``save`` returns a
    future that is done when both are on disk. One save is in flight at a time: the next waits
    for the last.

    Under torch.distributed the background write's collectives (DCP's plan and metadata
    exchange) run on a gloo group of their own, made once on every rank at the first save, so
    they never interleave with the training's collectives on the default group.
    """

    def __init__(self) -> None:
        self._group = None
        self._pending: Future | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apex-ray-checkpoint")

    def save(self, directory: str | os.PathLike, state: TrainingState, extra: dict[str, Any]) -> Future:
        self.wait()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            if self._group is None:
                self._group = dist.new_group(backend="gloo")
            shards = dcp.async_save({"train": state}, checkpoint_id=directory, process_group=self._group)
        else:
            shards = dcp.async_save({"train": state}, checkpoint_id=directory, no_dist=True)

        def write_extra_then_wait() -> None:
            _write_extra(directory, extra)
            shards.result()

        self._pending = self._pool.submit(write_extra_then_wait)
        return self._pending

    def wait(self) -> None:
        """Until the save in flight (if any) is on disk; raises its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


def load_checkpoint(directory: str | os.PathLike, state: TrainingState) -> dict[str, Any]:
    """Load model/EMA/optimiser in place (resharding as needed) and return this rank's extra state.

    A rank that did not exist when the checkpoint was written (more workers now) gets rank 0's
    extra state with ``"from_rank": 0`` so the caller can re-seed what must differ per rank.
    """
    directory = Path(directory)
    if not (directory / ".metadata").exists():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no DCP .metadata)")
    dcp.load({"train": state}, checkpoint_id=directory)
    own = directory / EXTRA_FILE.format(rank=_rank())
    source = own if own.exists() else directory / EXTRA_FILE.format(rank=0)
    extra = read_extra_state(source)
    extra["from_rank"] = _rank() if own.exists() else 0
    return extra


class DamagedCheckpointError(InputError):
    """No checkpoint of the run can be loaded; the message lists each one's problem."""


def checkpoint_problem(location: str | os.PathLike) -> str | None:
    """Why the checkpoint at ``location`` (a folder or a URI) cannot be loaded, or None when it is
    intact.

    Structural, cheap (no shard is downloaded) and the same on every rank: DCP's ``.metadata``
    (written after every rank's shards) reads; every shard file it names exists and is long
    enough for every tensor stored in it; rank 0's extra state loads as plain data and the extra
    state of every rank it names exists. A crash mid-write, an upload cut short, a truncated copy
    or a deleted file fails here rather than in the middle of ``dcp.load``."""
    location = storage.resolve(location)
    if not storage.is_file(storage.join(location, ".metadata")):
        return "no DCP .metadata (the write did not finish)"
    try:
        with tempfile.TemporaryDirectory() as tmp:  # DCP reads its metadata from a folder
            (Path(tmp) / ".metadata").write_bytes(storage.read_bytes(storage.join(location, ".metadata")))
            metadata = dcp.FileSystemReader(tmp).read_metadata()
    except Exception as err:  # a damaged pickle raises anything
        return f".metadata does not read ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        found = storage.size(storage.join(location, name))
        if found is None:
            return f"shard file {name} is missing"
        if found < size:
            return f"shard file {name} is truncated ({found} of {size} bytes)"
    first = storage.join(location, EXTRA_FILE.format(rank=0))
    if not storage.is_file(first):
        return f"{EXTRA_FILE.format(rank=0)} is missing"
    try:
        extra = read_extra_state(io.BytesIO(storage.read_bytes(first)))
    except Exception as err:
        return f"{EXTRA_FILE.format(rank=0)} does not load ({type(err).__name__}: {str(err).splitlines()[0]})"
    for rank in range(1, int(extra.get("world_size", 1))):
        if not storage.is_file(storage.join(location, EXTRA_FILE.format(rank=rank))):
            return f"{EXTRA_FILE.format(rank=rank)} is missing (the checkpoint was written by {extra['world_size']} workers)"
    return None


def read_extra_state(path: str | os.PathLike | io.BytesIO) -> dict[str, Any]:
    """A rank's ``extra_rank*.pt``: tensors, numbers and containers only. A checkpoint copied from
    elsewhere is data; a pickle that asks to build any other object is refused, not run."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds more than tensors and numbers, so it is not loaded (it could run "
                         f"code): {str(err).splitlines()[0]}") from None


def write_run_description(directory: str | os.PathLike, config, backbone_config: dict[str, Any]) -> None:
    """Record the training config and backbone config beside the shards (rank 0)."""
    write_json_atomic(Path(directory) / RUN_FILE,
                      {"config": config.model_dump(mode="json"), "backbone_config": backbone_config})
