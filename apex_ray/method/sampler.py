"""The any-step sampler (paper Algorithm 2, Appendix E).

Each step predicts the clean data and the noise from the current state (eq. 3, 9) and rebuilds
the next state on the straight path, ``x_next = (1 - t_next) x_hat + t_next z_next``, with
``z_next = sqrt(1 - rho) z_hat + sqrt(rho) eps`` (controlled stochasticity). ``N = 1`` with
order 1 is one network call: ``x_0 = z - F(z, 1, c)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from apex_ray.method.conditioning import Conditioning, VelocityFn
from apex_ray.method.transport import f_x, f_z


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 1  # N
    order: int = 1  # 1: Euler-like; 2: Heun predictor-corrector
    stochastic_ratio: float = 0.0  # rho in [0, 1]
    extrapolation: float = 0.0  # kappa in [0, 1]
    warp: tuple[float, float, float] = (1.0, 1.0, 1.0)  # Kumaraswamy (a, b, c); (1, 1, 1) = identity
    gap_data: float = 0.0  # eps0: gap at the data end of the grid
    gap_noise: float = 0.0  # eps1: gap at the noise end (0 starts at pure noise, t = 1)

    def __post_init__(self) -> None:
        errors = []
        if self.steps < 1:
            errors.append(f"steps must be >= 1, got {self.steps}")
        if self.order not in (1, 2):
            errors.append(f"order must be 1 or 2, got {self.order}")
        if not 0 <= self.stochastic_ratio <= 1:
            errors.append(f"stochastic_ratio must be in [0, 1], got {self.stochastic_ratio}")
        if not 0 <= self.extrapolation <= 1:
            errors.append(f"extrapolation must be in [0, 1], got {self.extrapolation}")
        if len(self.warp) != 3 or min(self.warp) <= 0:
            errors.append(f"warp must be three positive numbers (a, b, c), got {self.warp}")
        if self.gap_data < 0 or self.gap_noise < 0 or self.gap_data + self.gap_noise >= 1:
            errors.append(f"gaps must be >= 0 with gap_data + gap_noise < 1, got {self.gap_data}, {self.gap_noise}")
        if errors:
            raise ValueError("invalid sampler config: " + "; ".join(errors))

    @classmethod
    def for_nfe(cls, nfe: int, order: int = 1, **options) -> "SamplerConfig":
        """The sampler with the most steps that spends at most ``nfe`` network calls: ``nfe`` steps
        for order 1, ``(nfe + 1) // 2`` for order 2 (``2 * steps - 1`` calls; even ``nfe`` leave one unused)."""
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        return cls(steps=nfe if order == 1 else (nfe + 1) // 2, order=order, **options)

    @property
    def nfe(self) -> int:
        """Network calls: one per step, plus a corrector call on every step but the last for order 2."""
        return self.steps if self.order == 1 else 2 * self.steps - 1


def kumaraswamy(u: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """The generalised Kumaraswamy warp ``(1 - (1 - u^a)^b)^c`` of [0, 1] onto itself (App. E)."""
    return (1 - (1 - u.pow(a)).pow(b)).pow(c)


def time_grid(config: SamplerConfig) -> torch.Tensor:
    """Times ``t_N > ... > t_1 > t_0 = 0`` from noise to data, ``N + 1`` values (float64).

    A uniform grid on ``[eps0, 1 - eps1]`` is warped, then reversed; the network is evaluated at
    ``t_N .. t_1`` and the last prediction is the sample, so the grid ends at 0.
    """
    u = torch.linspace(config.gap_data, 1.0 - config.gap_noise, config.steps + 1, dtype=torch.float64)
    grid = kumaraswamy(u, *config.warp).flip(0)
    grid[-1] = 0.0
    return grid


@dataclass
class SampleResult:
    images: torch.Tensor  # the generated latents/pixels, [B, C, H, W]
    nfe: int  # network calls spent


@torch.no_grad()
def sample(
    model: VelocityFn,
    cond: Conditioning,
    shape: tuple[int, ...],
    config: SamplerConfig = SamplerConfig(),
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> SampleResult:
    """Draw ``shape[0]`` samples for ``cond`` with any number of steps (Algorithm 2)."""
    x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
    if x.shape[0] != cond.batch_size:
        raise ValueError(f"noise batch {x.shape[0]} does not match conditioning batch {cond.batch_size}")
    grid = time_grid(config).tolist()
    batch = x.shape[0]
    nfe = 0

    def predict(state: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal nfe
        t_vec = torch.full((batch,), t, device=state.device, dtype=state.dtype)
        velocity = model(state, t_vec, cond)
        nfe += 1
        return velocity, t_vec

    x_hat_prev = z_hat_prev = None
    x_hat = x
    for i in range(config.steps):
        t, t_next = grid[i], grid[i + 1]
        velocity, t_vec = predict(x, t)
        if config.order == 2 and t_next > 0:
            # Heun: evaluate at the deterministic Euler candidate and average the two velocities;
            # the averaged estimates at x are the mean of the two noise (and data) estimates.
            candidate = x + (t_next - t) * velocity
            velocity_next, _ = predict(candidate, t_next)
            velocity = 0.5 * (velocity + velocity_next)
        x_hat, z_hat = f_x(velocity, x, t_vec), f_z(velocity, x, t_vec)
        raw_x_hat, raw_z_hat = x_hat, z_hat
        if config.extrapolation > 0 and x_hat_prev is not None:
            # Estimation extrapolation from the previous step's raw prediction (App. E).
            x_hat = x_hat + config.extrapolation * (x_hat - x_hat_prev)
            z_hat = z_hat + config.extrapolation * (z_hat - z_hat_prev)
        x_hat_prev, z_hat_prev = raw_x_hat, raw_z_hat
        if t_next > 0:
            rho = config.stochastic_ratio
            z_next = z_hat
            if rho > 0:
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                z_next = (1 - rho) ** 0.5 * z_hat + rho**0.5 * eps
            x = (1 - t_next) * x_hat + t_next * z_next
    return SampleResult(x_hat, nfe)
