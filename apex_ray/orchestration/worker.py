"""The Ray Train worker: build, shard, resume, train, evaluate, checkpoint, export.

Runs on every worker of the ``TorchTrainer``. The optimisation step itself lives in
``apex_ray.engine.step``; this module wires it to Ray Train (context, checkpoints, reports),
torch.distributed (FSDP2/DDP, gathers) and MLflow (rank 0 only).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from apex_ray.config import Config
from apex_ray.engine.checkpointing import (
    TrainingState,
    full_state_dict,
    load_checkpoint,
    save_checkpoint,
    write_run_description,
)
from apex_ray.engine.evaluation import generate, image_grid, sampler_for_nfe
from apex_ray.engine.parallel import (
    apply_fsdp,
    gradient_sync,
    mixed_precision_dtype,
    parallelize,
    unwrap,
)
from apex_ray.engine.prepared import load_fake_buffer, read_manifest, to_training_batch
from apex_ray.engine.step import (
    NonFiniteLossError,
    StepRunner,
    build_lr_scheduler,
    build_objective,
    build_optimizer,
)
from apex_ray.engine.streams import BatchStream, ShardStream, shapeeval_dataset
from apex_ray.method.conditioning import Conditioning
from apex_ray.method.ema import EMA
from apex_ray.models import build_backbone, build_text_encoder
from apex_ray.models.codecs import load_codec
from apex_ray.models.lora import (
    EMA_ADAPTER,
    TRAINED_ADAPTER,
    AdapterEMA,
    LoRATrainingState,
    apply_lora,
    save_adapter,
    save_merged,
)
from apex_ray.orchestration.tracking import RunLogger
from apex_ray.shapeeval import evaluation_set, score_images

# Metrics averaged over ranks before they are reported (the rest are rank 0's).
AVERAGED_METRICS = ("loss", "loss_path", "loss_adv", "loss_shift", "loss_endpoint")


def _all_ranks_mean(metrics: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = [k for k in AVERAGED_METRICS if k in metrics]
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {**metrics, **dict(zip(keys, (values / dist.get_world_size()).tolist()))}


class EvalPrompts:
    """The fixed ShapeEval items, encoded once; each rank generates its own share."""

    def __init__(self, encoder, images_per_prompt: int, rank: int, world_size: int) -> None:
        self.prompts, self.seeds = evaluation_set(images_per_prompt)
        captions = [p.caption for p in self.prompts]
        unique = sorted(set(captions))
        table = encoder.encode(unique)
        self._row = {caption: i for i, caption in enumerate(unique)}
        self._table = table
        # Every rank takes the same number of items (the last one repeated) so FSDP's
        # collectives line up; the repeats are dropped after the gather.
        per_rank = -(-len(captions) // world_size)
        mine = list(range(rank, len(captions), world_size))
        self.items = mine + [mine[-1]] * (per_rank - len(mine))
        self.captions = captions
        self.world_size = world_size

    def encode(self, captions: list[str]) -> Conditioning:
        return self._table.index(torch.tensor([self._row[c] for c in captions]))

    def generate(self, model, nfe: int, latent_shape, device, decode) -> torch.Tensor | None:
        """All ranks call this; rank 0 gets every image in prompt order, others ``None``."""
        images = generate(model, self.encode, [self.captions[i] for i in self.items],
                          [self.seeds[i] for i in self.items], latent_shape, sampler_for_nfe(nfe),
                          decode=decode, device=device)
        if not dist.is_initialized() or self.world_size == 1:
            return images
        gathered = [None] * self.world_size if dist.get_rank() == 0 else None
        dist.gather_object((self.items, images), gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        out = torch.empty(len(self.captions), *images.shape[1:])
        for items, imgs in gathered:
            out[torch.tensor(items)] = imgs
        return out


def evaluate(model, prompts: EvalPrompts, config: Config, latent_shape, device, step: int,
             logger: RunLogger | None, decode) -> dict[str, float]:
    """Sample grids at ``eval.grid_nfe`` and ShapeEval at ``eval.score_nfe`` (rank 0 logs them)."""
    metrics: dict[str, float] = {}
    model.eval()
    for nfe in sorted(set(config.eval.grid_nfe) | set(config.eval.score_nfe)):
        images = prompts.generate(model, nfe, latent_shape, device, decode)
        if images is None:
            continue
        if nfe in config.eval.score_nfe:
            for task, value in score_images(images, prompts.prompts).items():
                metrics[f"shapeeval_nfe{nfe}/{task}"] = value
        if nfe in config.eval.grid_nfe and logger is not None:
            pick = torch.linspace(0, len(images) - 1, min(config.eval.grid_size, len(images))).long()
            logger.log_image(image_grid(images[pick]), f"samples/nfe{nfe}/step_{step:07d}.png")
    return metrics


def train_worker(loop_config: dict[str, Any]) -> None:
    config = Config.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    progress = loop_config.get("progress_queue")

    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    prepared = loop_config.get("prepared_path")
    manifest = read_manifest(prepared) if prepared else None
    encoder = _text_encoder(config, manifest)
    overrides = dict(config.model.backbone_overrides)
    if config.model.pretrained is None and config.model.backbone.endswith("-tiny"):
        overrides.setdefault("caption_channels" if "sana" in config.model.backbone else "joint_attention_dim",
                             encoder.embed_dim)
    backbone = build_backbone(config.model.backbone, config.model.pretrained, **overrides).to(device)
    latent_shape = (backbone.latent_channels, backbone.sample_size, backbone.sample_size)
    if manifest is not None and tuple(manifest["latent_shape"]) != latent_shape:
        raise ValueError(f"the prepared set {prepared} holds latents of shape {manifest['latent_shape']} but "
                         f"{config.model.backbone} takes {list(latent_shape)}; prepare the data for this backbone")

    compute_dtype = mixed_precision_dtype(config.distributed.mixed_precision, device)
    lora = config.model.lora.enabled
    if lora:  # frozen base, trainable adapter; the EMA is a second adapter on the same base
        _say(progress, rank, str(apply_lora(backbone, config.model.lora)))
        ema = AdapterEMA(backbone, config.ema.decay, config.ema.warmup)
    else:
        ema = EMA(backbone, config.ema.decay, config.ema.warmup)  # built before sharding, then sharded alike
    model = parallelize(backbone, backbone.blocks(), config.distributed.strategy, device, compute_dtype,
                        config.distributed.activation_checkpointing)
    if config.distributed.strategy == "fsdp" and not lora:
        apply_fsdp(ema.module, ema.module.blocks(), compute_dtype)
    optimizer = build_optimizer(model, config.optim)
    runner = StepRunner(
        model, ema, build_objective(config), optimizer, build_lr_scheduler(
            optimizer, config.optim.warmup_steps, config.optim.decay, config.train.steps, config.optim.min_lr_ratio
        ),
        grad_clip=config.optim.grad_clip, seed=config.train.seed, rank=rank, device=device,
        max_nonfinite_steps=config.train.max_nonfinite_steps, grad_sync=gradient_sync(model),
        autocast_dtype=compute_dtype if config.distributed.strategy != "fsdp" else None,
    )
    state = LoRATrainingState(model, optimizer, ema) if lora else TrainingState(model, optimizer, ema)

    stream_seed = config.train.seed * 7919 + rank
    if manifest is None:
        dataset = shapeeval_dataset(encoder.encode, config.data.num_samples, config.data.seed, config.data.image_size)
        stream = BatchStream(dataset.shard(rank, world_size), config.micro_batch, seed=stream_seed)
    else:
        stream = ShardStream(ray.train.get_dataset_shard("train"), config.micro_batch, stream_seed, to_training_batch)
    prompts = EvalPrompts(encoder, config.eval.images_per_prompt, rank, world_size)
    decode = _decoder(manifest, device)
    del encoder  # captions are encoded; free the text encoder's memory for training

    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None
    if config.objective.seed_buffer and runner.buffer is not None and not resumed:
        pushed = load_fake_buffer(config.objective.seed_buffer, runner.buffer)
        _say(progress, rank, f"fake-sample buffer seeded with {pushed} samples from {config.objective.seed_buffer}")
    if resumed:
        with checkpoint.as_directory() as directory:
            extra = load_checkpoint(directory, state)
        runner.load_extra_state(extra["runner"])
        if extra["world_size"] == world_size:
            stream.load_state_dict(extra["data"])
        else:  # resharded: a new data order from the next epoch, per-rank noise re-seeded
            stream.epoch = extra["data"]["epoch"] + 1
            runner.noise_generator.manual_seed(config.train.seed * 1_000_003 + rank + 7 * runner.step)
        _say(progress, rank, f"resumed from step {runner.step} ({extra['world_size']} -> {world_size} workers)")

    total, accum = config.train.steps, config.grad_accum_steps
    started, start_step = time.perf_counter(), runner.step
    while runner.step < total:
        step = runner.step + 1
        if config.debug.crash_worker_at_step == step and rank == world_size - 1 and not resumed:
            _crash_once(Path(config.output_dir) / ".crash_drill_done")
        aborted = False
        try:
            metrics = runner.train_step([next(stream) for _ in range(accum)])
        except NonFiniteLossError as err:
            metrics, aborted = {"aborted": 1.0, "skipped_steps": float(runner.skipped_steps)}, True
            _say(progress, rank, f"aborting: {err}")
        metrics = _all_ranks_mean(metrics) if not aborted else metrics
        last = runner.step >= total or aborted
        if not aborted and (runner.step % config.train.eval_every == 0 or last):
            metrics.update(evaluate(ema, prompts, config, latent_shape, device, runner.step, logger, decode))
        if runner.step % config.train.log_every == 0 or last or runner.step % config.train.checkpoint_every == 0:
            metrics["step"] = runner.step
            if logger is not None:
                logger.log_metrics({k: v for k, v in metrics.items() if k != "step"}, runner.step)
                _say(progress, rank, _progress_line(metrics, runner.step, total, start_step, started,
                                                    config.train.global_batch))
            if runner.step % config.train.checkpoint_every == 0 or last:
                extra = {"runner": runner.extra_state(), "data": stream.state_dict(), "world_size": world_size}
                with tempfile.TemporaryDirectory() as directory:
                    save_checkpoint(directory, state, extra)
                    if rank == 0:  # what `python -m apex_ray.export` needs to rebuild the model
                        write_run_description(directory, config, _backbone_shape_overrides(unwrap(model)))
                    if last and not aborted:
                        (_export_lora if lora else _export)(model, ema, config, Path(directory) / "export", rank)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                     checkpoint_dir_name=f"step_{runner.step:07d}")
            else:
                ray.train.report(metrics)
        if aborted:
            return


def _crash_once(marker: Path) -> None:
    """Fault drill: this worker process dies, once per output folder (the marker survives restarts)."""
    if marker.exists():
        return
    marker.touch()
    time.sleep(2)  # like a real crash, not in the same instant as the last report reaches the controller
    os._exit(1)


def _text_encoder(config: Config, manifest: dict | None):
    """The encoder the training captions were embedded with (the prepared set's, if any), for the
    evaluation prompts."""
    if manifest is None:
        return build_text_encoder(config.model.text_encoder, config.model.text_encoder_path,
                                  max_length=config.model.max_text_length)
    spec = manifest["text_encoder"]
    return build_text_encoder(spec["preset"], spec.get("path"), max_length=spec["max_length"])


def _decoder(manifest: dict | None, device):
    """Latents -> images in [-1, 1] for evaluation: identity for pixel data, else the set's VAE."""
    if manifest is None or manifest["codec"]["name"] == "pixel":
        return lambda latents: latents
    spec = manifest["codec"]
    codec = load_codec(spec["name"], spec.get("path"), spec.get("subfolder"), device=device)
    return codec.decode


def _export(model, ema: EMA, config: Config, directory: Path, rank: int) -> None:
    """Unsharded EMA and student weights in diffusers format (``save_pretrained``), on rank 0."""
    for name, module in (("ema", ema.module), ("student", unwrap(model))):
        weights = full_state_dict(module)  # a collective: every rank takes part
        if rank == 0:
            fresh = build_backbone(config.model.backbone, None, **_backbone_shape_overrides(module))
            fresh.load_state_dict(weights)
            fresh.save_pretrained(directory / name)


def _export_lora(model, ema: AdapterEMA, config: Config, directory: Path, rank: int) -> None:
    """Both adapters in diffusers LoRA format (``lora/ema``, ``lora/student``) and each merged into
    the base (``ema``, ``student``: what ``load_backbone`` and ``apex_ray.sample`` read). Collectives."""
    backbone = unwrap(model)
    for name, adapter in (("ema", EMA_ADAPTER), ("student", TRAINED_ADAPTER)):
        save_adapter(backbone, directory / "lora" / name, adapter)
        save_merged(backbone, directory / name, adapter)


def _backbone_shape_overrides(module) -> dict[str, Any]:
    """The exact diffusers config of ``module`` (so the export rebuilds the same architecture)."""
    config = dict(module.transformer.config)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _progress_line(metrics: dict[str, float], step: int, total: int, start_step: int, started: float,
                   global_batch: int) -> str:
    elapsed = time.perf_counter() - started
    rate = (step - start_step) / elapsed if elapsed > 0 else 0.0
    eta = (total - step) / rate if rate > 0 else float("inf")
    parts = [f"step {step}/{total}", f"loss {metrics.get('loss', float('nan')):.4f}"]
    for key in ("loss_path", "loss_adv", "loss_shift"):
        if key in metrics:
            parts.append(f"{key[5:]} {metrics[key]:.4f}")
    parts += [f"{rate * global_batch:.1f} samples/s", f"ETA {_duration(eta)}"]
    scores = [f"nfe{k.split('nfe')[1].split('/')[0]} {v:.3f}" for k, v in metrics.items()
              if k.startswith("shapeeval") and k.endswith("/overall")]
    if scores:
        parts.append("ShapeEval " + ", ".join(scores))
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _say(queue, rank: int, line: str) -> None:
    """Send a progress line to the driver (rank 0 only)."""
    if rank == 0:
        if queue is not None:
            queue.put(line)
        else:
            print(line, flush=True)
