"""The APEX objective (paper Sec. 3, eq. 10-19, Algorithm 1) and the plain flow-matching baseline.

Pure tensor functions, one per equation, then two objective objects that compute one step's
loss and return its parts for logging. Nothing here knows about Ray or distribution.

Forward passes per APEX step (batch B, ``n_a`` anchors, ``n_adv`` buffer draws):
  1. one call with gradient on ``B + n_adv`` rows: the main forward ``F_theta(x_t, t, c)``
     batched with the shifted-condition forward of L_adv;
  2. one EMA call without gradient on ``2B`` rows: ``F_ema`` at ``x_t`` and ``x_s`` (eq. 10)
     (``3B`` with ``guidance_ratio > 0``: also at ``x_t`` under the empty prompt);
  3. one call without gradient on ``2 n_a`` rows: the shifted and reference forwards of
     ``delta_d`` (eq. 18), or two calls when the reference is the EMA or the frozen starting model.

A fake-score-only step (``adv_steps_per_generator_step > 1``) makes call 1 alone, on the
``n_a + n_adv`` anchor and L_adv rows.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from apex_ray.method.buffer import FakeSampleBuffer
from apex_ray.method.conditioning import (
    SHIFT_STAGES,
    SHIFT_TARGETS,
    Conditioning,
    ShiftStage,
    ShiftTarget,
    VelocityFn,
    shift_condition,
)
from apex_ray.method.transport import expand_time, f_x, interpolate

# ---------------------------------------------------------------------------------------------
# Equations
# ---------------------------------------------------------------------------------------------


def path_target(
    f_ema_t: torch.Tensor,
    f_ema_s: torch.Tensor,
    x_t: torch.Tensor,
    x_s: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    clip: float | None = 1.0,
) -> torch.Tensor:
    """Curvature-aware target ``F_ema(x_t) - 2 clip(delta_f / delta_a, -1, 1)`` (eq. 10-12).

    ``delta_f`` is the secant of the EMA's clean-data estimates between ``s`` and ``t``;
    ``delta_a = a(t) - a(s) = -(t - s)`` since ``a(t) = -t`` for linear transport (eq. 11).
    ``clip=None`` disables the element-wise clip.
    """
    delta_f = f_x(f_ema_t, x_t, t) - f_x(f_ema_s, x_s, s)
    delta_a = -expand_time(t - s, x_t)
    secant = delta_f / delta_a
    if clip is not None:
        secant = secant.clamp(-clip, clip)
    return f_ema_t - 2.0 * secant


def path_weight(t: torch.Tensor, s: torch.Tensor, kind: Literal["tan", "uniform"] = "tan") -> torch.Tensor:
    """``beta(t, s)`` of eq. 13: ``tan((1 - (t - s)) pi / 2.5) + 1`` (released code) or 1."""
    if kind == "uniform":
        return torch.ones_like(t)
    if kind == "tan":
        return torch.tan((1.0 - (t - s)) * math.pi / 2.5) + 1.0
    raise ValueError(f"path weight must be 'tan' or 'uniform', got {kind!r}")


def adaptive_l2(error: torch.Tensor, power: float = 0.5, eps: float = 1e-3) -> torch.Tensor:
    """Per-sample adaptive squared error ``sg(w) * m`` with ``m = mean(E^2)``, ``w = (m + eps)^-power``.

    The weight is detached: an adaptive re-weighting of the plain MSE gradient (as in the
    released code and MeanFlow), not a different loss surface.
    """
    m = error.pow(2).flatten(1).mean(dim=1)
    weight = (m.detach() + eps).pow(-power)
    return weight * m


def multiscale_adaptive_l2(error: torch.Tensor, power: float = 0.5, eps: float = 1e-3) -> torch.Tensor:
    """The multi-scale norm of eq. 14: mean of ``adaptive_l2`` at full, 2x and 4x average-pooled scale.

    Per-sample, shape ``[B]``. Scales whose spatial size would drop below 1 are skipped and the
    mean is over the scales used.
    """
    height, width = error.shape[-2:]
    terms = [adaptive_l2(error, power, eps)]
    for factor in (2, 4):
        if height // factor >= 1 and width // factor >= 1:
            terms.append(adaptive_l2(F.avg_pool2d(error, factor), power, eps))
    return torch.stack(terms).mean(dim=0)


def adversarial_loss(f_shifted: torch.Tensor, z_fake: torch.Tensor, x_fake: torch.Tensor, **norm) -> torch.Tensor:
    """``L_adv`` per sample (eq. 17): the shifted branch regresses the velocity of fake samples."""
    return multiscale_adaptive_l2(f_shifted - (z_fake - x_fake), **norm)


def shift_loss(f_anchor: torch.Tensor, delta_d: torch.Tensor, **norm) -> torch.Tensor:
    """``L_shift`` per sample (eq. 19): ``|| F_anchor - sg(F_anchor + delta_d) ||``.

    Its gradient moves ``F_anchor`` by ``+delta_d``; with ``F_anchor = -F_A`` and the one-step
    sample ``x_hat = z - F_A`` that moves ``x_hat`` by ``+delta_d``, away from the fake score.
    """
    return multiscale_adaptive_l2(f_anchor - (f_anchor + delta_d).detach(), **norm)


def guidance_enhanced(target: torch.Tensor, f_cond: torch.Tensor, f_uncond: torch.Tensor, t: torch.Tensor,
                      ratio: float, time_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """``target + ratio (F(x_t, t, c) - F(x_t, t, empty))`` on rows with ``lo < t < hi``, the others
    unchanged (LINs-lab/APEX ``enhance_target``: eq. 12's target pushed along a classifier-free
    guidance direction of the EMA)."""
    inside = ((t > time_range[0]) & (t < time_range[1])).to(target.dtype)
    return target + ratio * expand_time(inside, target) * (f_cond - f_uncond)


def sample_time(n: int, beta_params: tuple[float, float, float], generator: torch.Generator | None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """``t ~ Beta(p1, p2) * p3``; the Beta draw is ``G1 / (G1 + G2)`` with seeded Gamma draws."""
    p1, p2, p3 = beta_params
    if p1 == 1.0 and p2 == 1.0:
        u = torch.rand(n, generator=generator, device=device)
    else:
        g1 = torch._standard_gamma(torch.full((n,), p1, device=device), generator=generator)
        g2 = torch._standard_gamma(torch.full((n,), p2, device=device), generator=generator)
        u = g1 / (g1 + g2)
    return u * p3


def stochastic_count(expected: float, generator: random.Random | torch.Generator | None) -> int:
    """``floor(expected)`` plus one with probability ``frac(expected)``: right on average at any batch size.

    A ``random.Random`` draws on the host (what :class:`~apex_ray.engine.step.StepRunner` passes:
    no tensor, so no device synchronisation); a ``torch.Generator`` draws where it lives.
    """
    whole = math.floor(expected)
    if isinstance(generator, random.Random):
        return whole + int(generator.random() < expected - whole)
    on = generator.device if generator is not None else "cpu"  # the draw runs where its generator lives
    return whole + int(torch.rand((), generator=generator, device=on).item() < expected - whole)


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------


SHIFT_REFERENCES = ("online", "ema", "frozen")
RELEASED_ADV_WEIGHT = 1.0  # LINs-lab/APEX: adversarial rows in the main loss's mean over the batch
RELEASED_SHIFT_WEIGHT = 2.0  # LINs-lab/APEX: dist_match_cof 0.5 times the mean over a quarter of the batch


@dataclass
class APEXConfig:
    """Hyper-parameters of the APEX objective. Defaults follow the paper and the design page."""

    lambda_path: float = 1.0  # lambda_p (Table 7: 1 : 1)
    lambda_endpoint: float = 1.0  # lambda_e
    time_beta: tuple[float, float, float] = (1.0, 1.0, 1.0)  # t ~ Beta(p1, p2) * p3
    min_interval: float = 1e-4  # guard t - s >= min_interval so delta_f / delta_a is safe
    path_weight: Literal["tan", "uniform"] = "tan"  # beta(t, s) of eq. 13
    target_clip: float | None = 1.0  # element-wise clip of the secant (eq. 12); None disables
    norm_power: float = 0.5  # p of the adaptive norm (eq. 14)
    norm_eps: float = 1e-3  # c of the adaptive norm
    anchor_frac: float = 0.25  # share of the batch used as t = 1 anchors
    adv_frac: float = 0.25  # buffer draws for L_adv, as a share of the batch
    shift_a: float = -0.5  # c' = a c + b (eq. 16); Table 6's best cell
    shift_b: float = 1.0
    shift_target: ShiftTarget = "text"  # paper: text; released code: time with a = -1, b = 0
    # Where the text part of the shift acts (eq. 16, c' = a c + b): input = on the text encoder's token
    # embeddings c (the paper's framing); projected = on the backbone's projected text features
    # h' = a h + b, h = caption_norm(caption_projection(c)) (SANA) or txt_in(txt_norm(c)) (Qwen-Image), as
    # the released LINs-lab/APEX trainer does (src/networks/qwen_image/transformer_qwenimage.py negates
    # txt_in(txt_norm(c)) on its shifted rows: a = -1, b = 0). Issue 15; no effect for shift_target=time.
    shift_stage: ShiftStage = "input"
    # F_ref of delta_d (eq. 18): online (the network itself, eq. 18), ema (Alg. 1 l. 16) or frozen (the
    # starting model, no grad: a sharded no-grad copy under a full fine-tune, the base with the adapter
    # off under LoRA; issue 15: the plain branch drifts from the teacher by more than delta_d itself).
    shift_reference: Literal["online", "ema", "frozen"] = "online"
    # Element-wise clip of delta_d to [-delta_clip, delta_clip] (eq. 18); the released trainer clamps
    # to [-1, 1] (``dist_match``): delta_clip=1.0. None disables.
    delta_clip: float | None = None
    # Per-row weights of L_adv (eq. 17) and L_shift (eq. 19) in the total loss (eq. 20):
    # paper: the mean over the n_adv draws and over the n_a anchors (4/B per row each at the default
    # quarter-batch shares); released: LINs-lab/APEX's weights, 1/B per adversarial row (its rows sit in
    # the main loss's batch mean) and 2/B per anchor row (dist_match_cof 0.5 over a quarter batch),
    # i.e. L_adv = sum_adv / B and L_shift = 2 sum_shift / B.
    weighting: Literal["paper", "released"] = "paper"
    # L_adv steps per generator step (eq. 15 vs eq. 19 / 10-13, DMD2's fake-score update ratio): on
    # steps with step % k != 0 only the fake score trains, L = lambda_e L_adv (the anchors still make
    # fresh fakes for the buffer; no L_path, no L_shift, no EMA or delta_d forwards); every k-th step
    # (step 0 first) is a full step. 1 = every step is a full step (the paper).
    adv_steps_per_generator_step: int = 1
    # Guidance-enhanced path target (LINs-lab/APEX ``enhance_target``, its default ratio 0.5): on the
    # rows with guidance_range[0] < t < guidance_range[1] (so never the t = 1 anchors), eq. 12's target
    # gains w (F_ema(x_t, t, c) - F_ema(x_t, t, empty prompt)), a classifier-free-guidance direction
    # of the EMA, so the one-step model learns a guided endpoint. One more EMA forward (B rows, batched
    # into the EMA call). 0 = off (the paper's eq. 12).
    guidance_ratio: float = 0.0
    guidance_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.time_beta = tuple(float(v) for v in self.time_beta)  # type: ignore[assignment]
        errors = []
        if self.lambda_path < 0 or self.lambda_endpoint < 0:
            errors.append("lambda_path and lambda_endpoint must be >= 0")
        if self.lambda_path == 0 and self.lambda_endpoint == 0:
            errors.append("lambda_path and lambda_endpoint cannot both be 0")
        if len(self.time_beta) != 3 or min(self.time_beta) <= 0 or self.time_beta[2] > 1:
            errors.append(f"time_beta must be (p1 > 0, p2 > 0, 0 < p3 <= 1), got {self.time_beta}")
        if not 0 < self.min_interval < 1:
            errors.append(f"min_interval must be in (0, 1), got {self.min_interval}")
        if self.path_weight not in ("tan", "uniform"):
            errors.append(f"path_weight must be 'tan' or 'uniform', got {self.path_weight!r}")
        if not 0 < self.anchor_frac < 1:
            errors.append(f"anchor_frac must be in (0, 1), got {self.anchor_frac}")
        if not 0 < self.adv_frac <= 1:
            errors.append(f"adv_frac must be in (0, 1], got {self.adv_frac}")
        if self.shift_target not in SHIFT_TARGETS:
            errors.append(f"shift_target must be one of {SHIFT_TARGETS}, got {self.shift_target!r}")
        if self.shift_stage not in SHIFT_STAGES:
            errors.append(f"shift_stage must be one of {SHIFT_STAGES}, got {self.shift_stage!r}")
        if self.shift_reference not in SHIFT_REFERENCES:
            errors.append(f"shift_reference must be one of {SHIFT_REFERENCES}, got {self.shift_reference!r}")
        if self.weighting not in ("paper", "released"):
            errors.append(f"weighting must be 'paper' or 'released', got {self.weighting!r}")
        if not isinstance(self.adv_steps_per_generator_step, int) or self.adv_steps_per_generator_step < 1:
            errors.append(f"adv_steps_per_generator_step must be an integer >= 1, got {self.adv_steps_per_generator_step!r}")
        self.guidance_range = tuple(float(v) for v in self.guidance_range)  # type: ignore[assignment]
        if self.guidance_ratio < 0:
            errors.append(f"guidance_ratio must be >= 0, got {self.guidance_ratio}")
        if len(self.guidance_range) != 2 or not 0 <= self.guidance_range[0] < self.guidance_range[1] <= 1:
            errors.append(f"guidance_range must be (lo, hi) with 0 <= lo < hi <= 1, got {self.guidance_range}")
        for name in ("target_clip", "delta_clip"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                errors.append(f"{name} must be > 0 or None, got {value}")
        if errors:
            raise ValueError("invalid APEX config: " + "; ".join(errors))


@dataclass
class StepLoss:
    """A step's scalar loss (with graph) and its detached parts for logging.

    The parts stay on the device as 0-d tensors: reading them (``float``) waits for the step to
    finish, so the caller does it only on the steps it logs."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor | float] = field(default_factory=dict)
    forward_calls: int = 0  # network calls made
    forward_rows: int = 0  # samples pushed through the network, summed over calls


class APEXObjective:
    """``L = lambda_p L_path + lambda_e (L_adv + L_shift)`` for one batch (Algorithm 1, lines 2-22).

    ``model`` and ``ema`` are velocity networks ``F(x_t, t, cond)``; ``buffer`` holds recent
    one-step generations and is filled by this objective.
    """

    def __init__(self, config: APEXConfig, buffer: FakeSampleBuffer, frozen: VelocityFn | None = None) -> None:
        self.config = config
        self.buffer = buffer
        self.frozen = frozen  # the starting model, no grad: F_ref of delta_d when shift_reference=frozen
        if config.shift_reference == "frozen" and frozen is None:
            raise ValueError("shift_reference=frozen needs the frozen starting model (APEXObjective(..., frozen=...))")
        # The empty prompt's conditioning (one row), for guidance_ratio > 0: set by the caller, which
        # knows the text encoder (the prepared set's empty_prompt.safetensors).
        self.empty_prompt: Conditioning | None = None

    @property
    def needs_empty_prompt(self) -> bool:
        return self.config.guidance_ratio > 0

    def is_generator_step(self, step: int) -> bool:
        """Whether step ``step`` (0-based) trains the generator (L_path, L_shift) or only the fake score."""
        return step % self.config.adv_steps_per_generator_step == 0

    def _endpoint_weights(self, batch: int, n_adv: int, n_anchor: int) -> tuple[float, float]:
        """(per-row weight of L_adv, per-row weight of L_shift); see ``APEXConfig.weighting``."""
        if self.config.weighting == "released":
            return RELEASED_ADV_WEIGHT / batch, RELEASED_SHIFT_WEIGHT / batch
        return 1.0 / max(n_adv, 1), 1.0 / max(n_anchor, 1)

    def _norm(self, error: torch.Tensor) -> torch.Tensor:
        return multiscale_adaptive_l2(error, self.config.norm_power, self.config.norm_eps)

    def __call__(
        self,
        model: VelocityFn,
        ema: VelocityFn,
        x: torch.Tensor,
        cond: Conditioning,
        generator: torch.Generator | None = None,
        structure_generator: random.Random | torch.Generator | None = None,
        step: int = 0,
    ) -> StepLoss:
        """One step's loss. ``generator`` draws noise and times; ``structure_generator`` (default:
        the same) draws the anchor and buffer counts, which fix the network calls a step makes:
        distributed callers seed it identically on every rank so that all ranks make the same calls.
        ``step`` (0-based, the same on every rank) picks generator and fake-score-only steps
        (``adv_steps_per_generator_step``).
        """
        cfg = self.config
        structure_generator = structure_generator or generator
        batch, device = x.shape[0], x.device
        use_path, use_endpoint = cfg.lambda_path > 0, cfg.lambda_endpoint > 0
        generator_step = self.is_generator_step(step) or not use_endpoint or len(self.buffer) == 0
        calls = rows = 0

        # Line 2-3: times, noise and both path points from the same (x, z).
        z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        t = sample_time(batch, cfg.time_beta, generator, device)
        n_anchor = stochastic_count(cfg.anchor_frac * batch, structure_generator) if use_endpoint else 0
        t[:n_anchor] = 1.0  # anchors: x_t = z, so F_theta(z, 1, c) is the one-step generation
        t = t.clamp(min=cfg.min_interval)
        lam = torch.rand(batch, generator=generator, device=device)
        s = torch.minimum(lam * t, t - cfg.min_interval)
        x_t, x_s = interpolate(x, z, t), interpolate(x, z, s)

        # The with-gradient call: main forward, batched with the shifted L_adv forward (eq. 17).
        # L_adv draws from generations pushed on earlier steps (or seeded offline); on a fresh,
        # unseeded buffer the first step has no L_adv.
        n_adv = 0
        if use_endpoint and len(self.buffer) > 0:
            n_adv = stochastic_count(cfg.adv_frac * batch, structure_generator)
        generator_step = generator_step or n_adv == 0  # a fake-score step needs fakes to learn from
        use_path = use_path and generator_step  # a fake-score step: L_adv only (anchors still make fresh fakes)
        main = batch if generator_step else n_anchor  # a fake-score step runs only the anchors' rows
        inputs, times, conds = [x_t[:main]], [t[:main]], [cond if generator_step else cond.index(slice(0, main))]
        if n_adv > 0:
            x_fake, cond_fake = self.buffer.sample(n_adv, generator, device)
            x_fake = x_fake.to(x.dtype)
            z_fake = torch.randn(x_fake.shape, generator=generator, device=device, dtype=x.dtype)
            t_adv = torch.rand(n_adv, generator=generator, device=device)
            x_adv = interpolate(x_fake, z_fake, t_adv)
            cond_adv, t_adv_in = shift_condition(cond_fake, t_adv, cfg.shift_a, cfg.shift_b, cfg.shift_target,
                                                cfg.shift_stage)
            inputs.append(x_adv)
            times.append(t_adv_in)
            conds.append(cond_adv)
        out = model(torch.cat(inputs), torch.cat(times), Conditioning.cat(conds) if len(conds) > 1 else conds[0])
        calls, rows = calls + 1, rows + out.shape[0]
        f_theta, f_adv = out[:main], out[main:]

        parts: dict[str, torch.Tensor | float] = {}
        loss = x.new_zeros(())

        # Lines 5-9: path-integrability loss with EMA endpoint predictions (eq. 10-13).
        if use_path:
            guided = cfg.guidance_ratio > 0
            points, times_ema, conds_ema = [x_t, x_s], [t, s], [cond, cond]
            if guided:  # F_ema(x_t, t, empty prompt) for the guidance direction, in the same call
                points.append(x_t)
                times_ema.append(t)
                conds_ema.append(self._empty(batch, device))
            with torch.no_grad():
                f_ema = ema(torch.cat(points), torch.cat(times_ema), Conditioning.cat(conds_ema))
            calls, rows = calls + 1, rows + len(points) * batch
            f_ema_t, f_ema_s = f_ema[:batch], f_ema[batch:2 * batch]
            target = path_target(f_ema_t, f_ema_s, x_t, x_s, t, s, cfg.target_clip)
            if guided:
                target = guidance_enhanced(target, f_ema_t, f_ema[2 * batch:], t, cfg.guidance_ratio,
                                           cfg.guidance_range)
            l_path = (path_weight(t, s, cfg.path_weight) * self._norm(f_theta - target.detach())).mean()
            loss = loss + cfg.lambda_path * l_path
            parts["loss_path"] = l_path.detach()

        # Lines 11-19: endpoint fidelity by self-condition shifting (eq. 15-19).
        if use_endpoint:
            w_adv, w_shift = self._endpoint_weights(batch, n_adv, n_anchor)
            l_adv = x.new_zeros(())
            if n_adv > 0:
                l_adv = adversarial_loss(f_adv, z_fake, x_fake, power=cfg.norm_power, eps=cfg.norm_eps).sum() * w_adv
            l_shift = x.new_zeros(())
            if n_anchor > 0:
                f_a = f_theta[:n_anchor]
                cond_a = cond.index(slice(0, n_anchor))
                x_hat = (z[:n_anchor] - f_a).detach()  # one-step generation, eq. 3 at t = 1
                if generator_step:
                    delta_d, extra_calls = self._shift_residual(model, ema, x_hat, cond_a, generator)
                    calls, rows = calls + extra_calls, rows + 2 * n_anchor
                    # Paired row by row: delta_d[i] was computed from anchor i's own generation.
                    l_shift = shift_loss(-f_a, delta_d, power=cfg.norm_power, eps=cfg.norm_eps).sum() * w_shift
                self.buffer.push(x_hat, cond_a)
            loss = loss + cfg.lambda_endpoint * (l_adv + l_shift)
            parts.update(loss_adv=l_adv.detach(), loss_shift=l_shift.detach(),
                         loss_endpoint=(l_adv + l_shift).detach())

        parts["loss"] = loss.detach()
        parts.update(n_anchor=float(n_anchor), n_adv=float(n_adv), generator_step=float(generator_step))
        return StepLoss(loss, parts, calls, rows)

    def _empty(self, batch: int, device: torch.device) -> Conditioning:
        if self.empty_prompt is None:
            raise ValueError("guidance_ratio > 0 needs the empty prompt's conditioning (APEXObjective.empty_prompt)")
        empty = self.empty_prompt.to(device)
        return empty.index(torch.zeros(batch, dtype=torch.long, device=device))

    @torch.no_grad()
    def _shift_residual(
        self, model: VelocityFn, ema: VelocityFn, x_hat: torch.Tensor, cond: Conditioning,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, int]:
        """``delta_d = F(y, t'', shift(c)) - F_ref(y, t'', c)`` on noised generations (eq. 18)."""
        cfg = self.config
        n = x_hat.shape[0]
        noise = torch.randn(x_hat.shape, generator=generator, device=x_hat.device, dtype=x_hat.dtype)
        t = torch.rand(n, generator=generator, device=x_hat.device)
        y = interpolate(x_hat, noise, t)
        cond_shifted, t_shifted = shift_condition(cond, t, cfg.shift_a, cfg.shift_b, cfg.shift_target, cfg.shift_stage)
        if cfg.shift_reference == "online":
            both = model(torch.cat([y, y]), torch.cat([t_shifted, t]), Conditioning.cat([cond_shifted, cond]))
            f_shifted, f_ref, calls = both[:n], both[n:], 1
        else:
            reference = ema if cfg.shift_reference == "ema" else self.frozen
            f_shifted, f_ref, calls = model(y, t_shifted, cond_shifted), reference(y, t, cond), 2
        delta_d = f_shifted - f_ref
        if cfg.delta_clip is not None:
            delta_d = delta_d.clamp(-cfg.delta_clip, cfg.delta_clip)
        return delta_d, calls


@dataclass
class FlowMatchingConfig:
    """Plain rectified-flow training, the teacher's objective and the baseline."""

    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {self.time_sampling!r}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


class FlowMatchingObjective:
    """``|| F_theta(x_t, t, c) - (z - x) ||^2`` averaged over pixels and batch."""

    def __init__(self, config: FlowMatchingConfig | None = None) -> None:
        self.config = config or FlowMatchingConfig()

    def __call__(
        self, model: VelocityFn, ema: VelocityFn | None, x: torch.Tensor, cond: Conditioning,
        generator: torch.Generator | None = None, structure_generator: torch.Generator | None = None,
        step: int = 0,
    ) -> StepLoss:
        cfg = self.config
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if cfg.time_sampling == "uniform":
            t = torch.rand(x.shape[0], generator=generator, device=x.device)
        else:
            normal = torch.randn(x.shape[0], generator=generator, device=x.device)
            t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal)
        loss = F.mse_loss(model(interpolate(x, z, t), t, cond), z - x)
        return StepLoss(loss, {"loss": loss.detach()}, forward_calls=1, forward_rows=x.shape[0])

