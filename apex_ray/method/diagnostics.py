"""Branch-separation diagnostics of the self-adversarial signal (issue 15): is the shifted branch
``F(., ., shift(c))`` still a distinct "fake score", and where does ``delta_d`` (eq. 18) point?

Pure tensor math, no distribution: :func:`branch_statistics` returns **sums** over one batch
(so that ranks can average them and the ratios stay exact: ratios of summed squares, not means of
ratios), :func:`branch_metrics` turns (averaged) sums into the logged numbers:

- ``fit_shifted_gen`` / ``fit_plain_gen``: relative velocity-fit error ``|F - v| / |v|`` of the
  shifted and the plain branch on the model's own one-step generations ``x_hat = z - F(z, 1, c)``,
  noised as in eq. 18 (``y = t z' + (1 - t) x_hat``, ``v = z' - x_hat``, ``t ~ U(0, 1)``). APEX wants
  the shifted branch to fit the generations better than the plain one (eq. 17);
- ``fit_shifted_real`` / ``fit_plain_real``: the same on real data ``x``; the plain branch should fit better;
- ``delta_ratio``: ``|delta_d| / |F(y, t, c)|`` with ``delta_d = F(y, t', shift(c)) - F_ref(y, t, c)``
  on the noised generations, ``F_ref`` as ``shift_reference`` says, before ``delta_clip``;
- ``cos_delta_frozen``: cosine of ``delta_d`` with ``F(y, t', shift(c)) - F_frozen(y, t, c)`` (the delta
  against the frozen starting model; 1 when ``shift_reference=frozen``), only with a frozen model;
- ``plain_drift_rms``: rms of ``F(y, t, c) - F_frozen(y, t, c)`` (how far the plain branch moved from
  the teacher on noised generations; compare with ``delta_ratio``), only with a frozen model;
- ``contrast_gen`` / ``contrast_real``: mean per-image standard deviation of the decoded one-step
  generations and of the decoded real images (a collapsed, washed-out generator shows as a drop).

Network calls: the generation (``n`` rows), one call on ``4 n`` rows (plain and shifted, generations
and real data), plus ``n`` rows through the EMA (``shift_reference=ema``) and ``n`` through the frozen
model (when given); every call is the same on every rank.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from apex_ray.method.conditioning import Conditioning, VelocityFn, shift_condition
from apex_ray.method.objective import APEXConfig
from apex_ray.method.transport import interpolate

Decode = Callable[[torch.Tensor], torch.Tensor]


def _sq(x: torch.Tensor) -> torch.Tensor:
    return x.double().pow(2).sum()


def _contrast(images: torch.Tensor) -> torch.Tensor:
    return images.double().flatten(1).std(dim=1).mean()


@torch.no_grad()
def branch_statistics(
    model: VelocityFn,
    x: torch.Tensor,
    cond: Conditioning,
    config: APEXConfig,
    *,
    ema: VelocityFn | None = None,
    frozen: VelocityFn | None = None,
    generator: torch.Generator | None = None,
    decode: Decode | None = None,
) -> dict[str, torch.Tensor]:
    """Summed squares and dot products over the batch ``x`` (0-d float64 tensors); see the module doc."""
    n, device = x.shape[0], x.device

    def randn(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)

    z = randn(x)
    x_hat = z - model(z, torch.ones(n, device=device), cond)  # the one-step generation (eq. 3 at t = 1)
    noise_g, noise_r = randn(x), randn(x)
    t_g = torch.rand(n, generator=generator, device=device)
    t_r = torch.rand(n, generator=generator, device=device)
    y_g, y_r = interpolate(x_hat, noise_g, t_g), interpolate(x, noise_r, t_r)
    v_g, v_r = noise_g - x_hat, noise_r - x
    cs_g, ts_g = shift_condition(cond, t_g, config.shift_a, config.shift_b, config.shift_target,
                                 config.shift_stage)
    cs_r, ts_r = shift_condition(cond, t_r, config.shift_a, config.shift_b, config.shift_target,
                                 config.shift_stage)
    out = model(torch.cat([y_g, y_g, y_r, y_r]), torch.cat([t_g, ts_g, t_r, ts_r]),
                Conditioning.cat([cond, cs_g, cond, cs_r])).float()
    plain_g, shift_g, plain_r, shift_r = out.split(n)
    f_frozen = None if frozen is None else frozen(y_g, t_g, cond).float()
    if config.shift_reference == "online":
        ref = plain_g
    elif config.shift_reference == "ema":
        if ema is None:
            raise ValueError("shift_reference=ema: the diagnostics need the EMA")
        ref = ema(y_g, t_g, cond).float()
    else:
        if f_frozen is None:
            raise ValueError("shift_reference=frozen: the diagnostics need the frozen model")
        ref = f_frozen
    delta = shift_g - ref
    stats = {
        "fit_shifted_gen_sq": _sq(shift_g - v_g), "fit_plain_gen_sq": _sq(plain_g - v_g), "v_gen_sq": _sq(v_g),
        "fit_shifted_real_sq": _sq(shift_r - v_r), "fit_plain_real_sq": _sq(plain_r - v_r), "v_real_sq": _sq(v_r),
        "delta_sq": _sq(delta), "plain_sq": _sq(plain_g),
        "elements": torch.tensor(float(plain_g.numel()), dtype=torch.float64, device=device),
    }
    if f_frozen is not None:
        delta_frozen = shift_g - f_frozen
        stats.update(delta_dot_frozen=(delta.double() * delta_frozen.double()).sum(),
                     delta_frozen_sq=_sq(delta_frozen), drift_sq=_sq(plain_g - f_frozen))
    decode = decode or (lambda latents: latents)
    stats["contrast_gen"] = _contrast(decode(x_hat).float().clamp(-1, 1))
    stats["contrast_real"] = _contrast(decode(x).float().clamp(-1, 1))
    return stats


def _ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else float("nan")


def branch_metrics(stats: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """The diagnostics from (rank-averaged) :func:`branch_statistics` sums; see the module doc."""
    s = {k: float(v) for k, v in stats.items()}
    metrics = {
        "fit_shifted_gen": _ratio(s["fit_shifted_gen_sq"], s["v_gen_sq"]),
        "fit_plain_gen": _ratio(s["fit_plain_gen_sq"], s["v_gen_sq"]),
        "fit_shifted_real": _ratio(s["fit_shifted_real_sq"], s["v_real_sq"]),
        "fit_plain_real": _ratio(s["fit_plain_real_sq"], s["v_real_sq"]),
        "delta_ratio": _ratio(s["delta_sq"], s["plain_sq"]),
        "contrast_gen": s["contrast_gen"],
        "contrast_real": s["contrast_real"],
    }
    if "delta_dot_frozen" in s:
        norm = math.sqrt(s["delta_sq"] * s["delta_frozen_sq"])
        metrics["cos_delta_frozen"] = s["delta_dot_frozen"] / norm if norm > 0 else float("nan")
        metrics["plain_drift_rms"] = _ratio(s["drift_sq"], s["elements"])
    return metrics
