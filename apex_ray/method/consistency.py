"""Discrete consistency distillation (CD), the one-step peer of APEX (issue 15, item 3).

Song, Dhariwal, Chen and Sutskever, "Consistency Models" (ICML 2023), Algorithm 2, rewritten for
the linear transport of :mod:`apex_ray.method.transport` (t = 1 noise, t = 0 data) and the same
velocity networks APEX trains. Pure tensor functions, one per equation, then one objective object
with :class:`~apex_ray.method.objective.APEXObjective`'s call signature. Nothing here knows about
Ray or distribution.

The consistency function is read off the velocity network exactly as the NFE-1 sampler reads it
(``x = z - F(z, 1, c)``, :mod:`apex_ray.method.sampler`):

    f_theta(x_t, t) = x_t - t F_theta(x_t, t, c)        (CM eq. 3 with c_skip = 1, c_out = -t)

so the boundary condition ``f_theta(x, 0) = x`` holds by construction for any weights, and the
one-step generation of a trained CD model is the one APEX's sampler already makes.

One step (batch B) makes three network calls, 3B rows:
  1. the student ``F_theta(x_{t_{n+1}}, t_{n+1}, c)`` with gradient (B rows);
  2. the teacher ``F_phi(x_{t_{n+1}}, t_{n+1}, c)``, the frozen starting model, no grad (B rows):
     one Euler step of the probability-flow ODE to ``x_hat_{t_n}`` (CM eq. 6);
  3. the target network (the run's EMA) ``F_ema(x_hat_{t_n}, t_n, c)``, no grad (B rows).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch

from apex_ray.method.conditioning import Conditioning, VelocityFn
from apex_ray.method.objective import StepLoss, multiscale_adaptive_l2
from apex_ray.method.transport import expand_time, f_x, interpolate

TIME_GRIDS = ("uniform", "karras")
DISTANCES = ("adaptive", "l2", "pseudo_huber")
WEIGHTINGS = ("uniform", "inverse_step")

# ---------------------------------------------------------------------------------------------
# Equations
# ---------------------------------------------------------------------------------------------


def time_grid(num_steps: int, t_min: float, kind: Literal["uniform", "karras"] = "uniform", rho: float = 7.0,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """The discretisation ``t_0 = t_min < t_1 < ... < t_N = 1`` of CM Sec. 4 (``N = num_steps``), ``[N + 1]``.

    ``uniform``: ``t_i = t_min + (1 - t_min) i / N``, the grid flow-matching teachers are sampled on.
    ``karras``: the EDM / CM formula ``t_i = (t_min^(1/rho) + i / N (1 - t_min^(1/rho)))^rho`` applied
    to flow time, denser near the data (``rho = 7`` as in CM).
    """
    i = torch.arange(num_steps + 1, dtype=torch.float64, device=device) / num_steps
    if kind == "uniform":
        grid = t_min + (1.0 - t_min) * i
    elif kind == "karras":
        lo = t_min ** (1.0 / rho)
        grid = (lo + i * (1.0 - lo)) ** rho
    else:
        raise ValueError(f"time grid must be one of {TIME_GRIDS}, got {kind!r}")
    grid[0], grid[-1] = t_min, 1.0  # exact ends whatever the rounding
    return grid.float()


def consistency_function(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``f(x_t, t) = x_t - t F(x_t, t, c)`` (CM eq. 3, ``c_skip = 1``, ``c_out = -t``): ``f(x, 0) = x``."""
    return f_x(velocity, x_t, t)


def teacher_euler_step(teacher_velocity: torch.Tensor, x_next: torch.Tensor, t_next: torch.Tensor,
                       t_cur: torch.Tensor) -> torch.Tensor:
    """``x_hat_{t_n} = x_{t_{n+1}} + (t_n - t_{n+1}) Phi(x_{t_{n+1}}, t_{n+1}; phi)`` (CM eq. 6, Alg. 2 l. 5).

    The ODE solver ``Phi`` is one Euler step of the teacher's flow ``dx/dt = F_phi(x_t, t, c)``,
    i.e. ``x_{t_{n+1}} - (t_{n+1} - t_n) F_phi``.
    """
    return x_next - expand_time(t_next - t_cur, x_next) * teacher_velocity


def consistency_target(ema_velocity: torch.Tensor, x_cur: torch.Tensor, t_cur: torch.Tensor) -> torch.Tensor:
    """``f_{theta^-}(x_hat_{t_n}, t_n)``, the target network's consistency function (CM eq. 7), detached."""
    return consistency_function(ema_velocity, x_cur, t_cur).detach()


def consistency_weight(t_cur: torch.Tensor, t_next: torch.Tensor,
                       kind: Literal["uniform", "inverse_step"] = "uniform") -> torch.Tensor:
    """``lambda(t_n)`` of CM eq. 7: 1 (CM's CD runs) or ``1 / (t_{n+1} - t_n)`` (Song & Dhariwal 2023, iCT)."""
    if kind == "uniform":
        return torch.ones_like(t_cur)
    if kind == "inverse_step":
        return 1.0 / (t_next - t_cur)
    raise ValueError(f"consistency weighting must be one of {WEIGHTINGS}, got {kind!r}")


def consistency_distance(error: torch.Tensor, kind: Literal["adaptive", "l2", "pseudo_huber"] = "adaptive",
                         power: float = 0.5, eps: float = 1e-3, huber_c: float | None = None) -> torch.Tensor:
    """``d(f_theta, f_theta^-)`` of CM eq. 7 per sample, ``[B]``, on ``error = f_theta - target``.

    ``adaptive``: APEX's multi-scale adaptive norm (eq. 14 of the APEX paper), so the peer differs
    from APEX by its objective only; ``l2``: the mean squared error (CM's l2 metric);
    ``pseudo_huber``: ``sqrt(||e||^2 + c^2) - c`` (iCT), ``c = 0.00054 sqrt(d)`` by default, ``d``
    the sample's dimension.
    """
    if kind == "adaptive":
        return multiscale_adaptive_l2(error, power, eps)
    if kind == "l2":
        return error.pow(2).flatten(1).mean(dim=1)
    if kind == "pseudo_huber":
        dim = error[0].numel()
        c = huber_c if huber_c is not None else 0.00054 * math.sqrt(dim)
        return (error.pow(2).flatten(1).sum(dim=1) + c * c).sqrt() - c
    raise ValueError(f"consistency distance must be one of {DISTANCES}, got {kind!r}")


# ---------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------


@dataclass
class ConsistencyConfig:
    """Hyper-parameters of consistency distillation (``objective.kind=consistency``).

    The target network ``theta^-`` is the run's EMA (``ema.decay``, default 0.99 with warm-up): CM
    distils with ``mu`` in 0.95-0.999; the global value is left alone so that the peer's evaluated
    EMA is the same kind of average as APEX's.
    """

    # N of CM Sec. 4. 18 is CM's CIFAR-10 CD setting (32x32, the scale of ShapeEval's latents); a
    # smaller N propagates the boundary condition in fewer target refreshes, a larger one makes the
    # teacher's Euler step more exact.
    num_steps: int = 18
    # uniform: the grid a flow-matching teacher samples on (its Euler steps are what the grid
    # distils); karras: CM's EDM grid (rho) in flow time, denser near the data.
    time_grid: Literal["uniform", "karras"] = "uniform"
    rho: float = 7.0  # karras grid only
    t_min: float = 0.002  # t_0 (CM's epsilon); f(x, 0) = x holds exactly, so 0 is allowed too
    # d of CM eq. 7: adaptive = APEX's multi-scale adaptive norm (equal footing with APEX); l2; or
    # pseudo_huber (iCT).
    distance: Literal["adaptive", "l2", "pseudo_huber"] = "adaptive"
    norm_power: float = 0.5  # adaptive norm's p (as APEX)
    norm_eps: float = 1e-3  # adaptive norm's c (as APEX)
    huber_c: float | None = None  # pseudo_huber's c; None = 0.00054 sqrt(d)
    # lambda(t_n) of CM eq. 7: uniform (CM's CD) or inverse_step = 1 / (t_{n+1} - t_n) (iCT; on the
    # uniform grid a constant N, i.e. a loss scale only).
    weighting: Literal["uniform", "inverse_step"] = "uniform"

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            errors.append(f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        if self.time_grid not in TIME_GRIDS:
            errors.append(f"time_grid must be one of {TIME_GRIDS}, got {self.time_grid!r}")
        if not self.rho > 0:
            errors.append(f"rho must be > 0, got {self.rho}")
        if not 0 <= self.t_min < 1:
            errors.append(f"t_min must be in [0, 1), got {self.t_min}")
        if self.time_grid == "karras" and self.t_min == 0:
            errors.append("t_min must be > 0 with time_grid=karras")
        if self.distance not in DISTANCES:
            errors.append(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.norm_power < 0 or self.norm_eps <= 0:
            errors.append(f"norm_power must be >= 0 and norm_eps > 0, got {self.norm_power}, {self.norm_eps}")
        if self.huber_c is not None and self.huber_c <= 0:
            errors.append(f"huber_c must be > 0 or None, got {self.huber_c}")
        if self.weighting not in WEIGHTINGS:
            errors.append(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if errors:
            raise ValueError("invalid consistency config: " + "; ".join(errors))


class ConsistencyObjective:
    """``L_CD^N = E[lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_{theta^-}(x_hat_{t_n}, t_n))]`` (CM eq. 7,
    Algorithm 2 lines 3-7) for one batch.

    ``teacher`` is the frozen starting model (no grad; :mod:`apex_ray.engine.reference`), ``ema``
    in the call is the target network ``theta^-`` (Alg. 2 line 9 is the run's EMA update).
    """

    def __init__(self, config: ConsistencyConfig, teacher: VelocityFn) -> None:
        if teacher is None:
            raise ValueError("objective.kind=consistency needs the frozen teacher (ConsistencyObjective(..., teacher=...))")
        self.config = config
        self.teacher = teacher
        self._grids: dict[torch.device, torch.Tensor] = {}

    def grid(self, device: torch.device) -> torch.Tensor:
        """The time grid on ``device``, built once per device."""
        if device not in self._grids:
            cfg = self.config
            self._grids[device] = time_grid(cfg.num_steps, cfg.t_min, cfg.time_grid, cfg.rho, device)
        return self._grids[device]

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
        """One step's loss. ``generator`` draws the grid indices and the noise; the calls a step makes
        are fixed (three), so ``structure_generator`` and ``step`` are unused."""
        cfg = self.config
        batch, device = x.shape[0], x.device
        grid = self.grid(device)

        # Alg. 2 l. 3-4: n ~ U[[0, N - 1]], x_{t_{n+1}} ~ N(x, t_{n+1}^2 I) -- here on the straight path.
        n = torch.randint(0, cfg.num_steps, (batch,), generator=generator, device=device)
        t_cur, t_next = grid[n], grid[n + 1]
        z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        x_next = interpolate(x, z, t_next)

        # The with-gradient call: the student's consistency function at t_{n+1}.
        f_student = consistency_function(model(x_next, t_next, cond), x_next, t_next)

        with torch.no_grad():
            # Alg. 2 l. 5: one teacher Euler step back to t_n (CM eq. 6).
            x_cur = teacher_euler_step(self.teacher(x_next, t_next, cond), x_next, t_next, t_cur).to(x.dtype)
            # Alg. 2 l. 6: the target network at t_n.
            target = consistency_target(ema(x_cur, t_cur, cond), x_cur, t_cur)

        distance = consistency_distance(f_student - target, cfg.distance, cfg.norm_power, cfg.norm_eps, cfg.huber_c)
        loss = (consistency_weight(t_cur, t_next, cfg.weighting).to(distance.dtype) * distance).mean()
        return StepLoss(loss, {"loss": loss.detach()}, forward_calls=3, forward_rows=3 * batch)
