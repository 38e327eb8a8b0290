"""The ``diag/*`` metrics at each evaluation (issue 15): :mod:`apex_ray.method.diagnostics` on one
micro-batch per rank, sums averaged over ranks, ratios taken after. No Ray here.

Every rank must call :func:`evaluate_diagnostics` at the same steps: the forwards go through the
(FSDP-sharded) model, the EMA and the frozen copy, and the same calls are made on every rank (the
micro-batch has the same size everywhere); then one all-reduce.
"""
from __future__ import annotations

import torch

from apex_ray.common.seeds import derive_seed
from apex_ray.engine.collectives import all_reduce_mean
from apex_ray.method.batch import Batch
from apex_ray.method.diagnostics import Decode, branch_metrics, branch_statistics

PREFIX = "diag/"


def evaluate_diagnostics(training, batch: Batch, decode: Decode | None = None, rank: int = 0) -> dict[str, float]:
    """``{"diag/fit_shifted_gen": ..., ...}`` on ``batch`` (this rank's share), identical on every rank;
    ``{}`` when ``eval.diagnostics`` is off or the objective is not APEX. The noise is seeded from
    ``train.seed`` and the rank alone, so successive evaluations differ only by the weights and batch.
    ``diag/cos_delta_frozen`` and ``diag/plain_drift_rms`` are absent without a frozen starting model
    (``eval.diagnostics_frozen=false``)."""
    config, runner = training.config, training.runner
    if not config.eval.diagnostics or config.objective.kind != "apex":
        return {}
    device = runner.device
    batch = batch.to(device)
    generator = torch.Generator(device).manual_seed(derive_seed(config.train.seed, "diagnostics", rank))
    model = runner.model
    was_training = model.training
    model.eval()
    try:
        with runner._autocast():
            stats = branch_statistics(model, batch.latents, batch.cond, config.objective.apex, ema=training.ema,
                                      frozen=training.frozen, generator=generator, decode=decode)
    finally:
        model.train(was_training)
    return {PREFIX + key: value for key, value in branch_metrics(all_reduce_mean(stats)).items()}
