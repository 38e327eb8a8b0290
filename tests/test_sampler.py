"""The any-step sampler (Algorithm 2), the EMA and the fake-sample buffer."""
from __future__ import annotations

import math

import pytest
import torch

from apex_ray.method.buffer import FakeSampleBuffer
from apex_ray.method.conditioning import Conditioning
from apex_ray.method.ema import EMA, warmup_decay
from apex_ray.method.sampler import SamplerConfig, kumaraswamy, sample, time_grid

B, C, H, W = 4, 3, 8, 8


def cond(batch: int = B, length: int = 5) -> Conditioning:
    return Conditioning(torch.randn(batch, length, 4), torch.ones(batch, length, dtype=torch.long))


class CountingModel:
    def __init__(self, fn):
        self.fn, self.calls, self.times = fn, 0, []

    def __call__(self, x_t, t, c):
        self.calls += 1
        self.times.append(float(t[0]))
        return self.fn(x_t, t, c)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("order", [1, 2])
def test_nfe_is_exact(steps, order):
    model = CountingModel(lambda x, t, c: 0.1 * x)
    config = SamplerConfig(steps=steps, order=order, stochastic_ratio=0.3, extrapolation=0.5)
    result = sample(model, cond(), (B, C, H, W), config, torch.Generator().manual_seed(0))
    assert result.nfe == model.calls == config.nfe
    assert config.nfe == (steps if order == 1 else 2 * steps - 1)
    assert result.images.shape == (B, C, H, W)


def test_one_step_is_one_call_x0_equals_z_minus_f():
    weights = torch.randn(C, H, W)
    model = CountingModel(lambda x, t, c: weights * x + t.reshape(-1, 1, 1, 1))
    z = torch.randn(B, C, H, W)
    result = sample(model, cond(), z.shape, SamplerConfig(steps=1), noise=z)
    assert model.calls == 1 and model.times == [1.0]
    torch.testing.assert_close(result.images, z - (weights * z + 1.0))


@pytest.mark.parametrize("config", [
    SamplerConfig(steps=1), SamplerConfig(steps=4), SamplerConfig(steps=3, order=2),
    SamplerConfig(steps=4, extrapolation=0.7, warp=(1.3, 0.8, 1.1), gap_data=0.05),
])
def test_exact_velocity_of_a_point_mass_lands_on_it_for_any_steps(config):
    x0 = torch.randn(1, C, H, W, dtype=torch.float64)

    def exact(x_t, t, c):
        return (x_t - x0) / t.reshape(-1, 1, 1, 1)

    z = torch.randn(B, C, H, W, dtype=torch.float64)
    result = sample(exact, cond(), z.shape, config, noise=z)
    torch.testing.assert_close(result.images, x0.expand_as(z))


def test_heun_is_more_accurate_than_euler():
    """dx/dt = k x from t = 1 to 0 has x(0) = x(1) exp(-k); order 2 converges faster."""
    k = 1.5
    z = torch.randn(B, C, H, W, dtype=torch.float64)
    exact = z * math.exp(-k)
    errors = {}
    for order in (1, 2):
        for steps in (4, 8):
            out = sample(lambda x, t, c: k * x, cond(), z.shape, SamplerConfig(steps=steps, order=order), noise=z)
            errors[order, steps] = (out.images - exact).abs().max().item()
    assert errors[2, 8] < 0.2 * errors[1, 8]
    # Euler halves its error when the steps double; Heun does better than that.
    assert errors[1, 8] / errors[1, 4] > 0.4
    assert errors[2, 8] / errors[2, 4] < 0.4


def test_determinism_under_a_seed_and_noise_matters():
    model = lambda x, t, c: 0.3 * x + c.embeds.mean() * t.reshape(-1, 1, 1, 1)  # noqa: E731
    c = cond()
    config = SamplerConfig(steps=4, order=2, stochastic_ratio=0.5)
    a = sample(model, c, (B, C, H, W), config, torch.Generator().manual_seed(7)).images
    b = sample(model, c, (B, C, H, W), config, torch.Generator().manual_seed(7)).images
    other = sample(model, c, (B, C, H, W), config, torch.Generator().manual_seed(8)).images
    assert torch.equal(a, b)
    assert not torch.allclose(a, other)


def test_time_grid_runs_from_noise_to_zero_and_warps():
    grid = time_grid(SamplerConfig(steps=5))
    torch.testing.assert_close(grid, torch.linspace(1, 0, 6, dtype=torch.float64))
    warped = time_grid(SamplerConfig(steps=6, warp=(2.0, 1.5, 0.8), gap_data=0.02, gap_noise=0.05))
    assert (warped[:-1] > warped[1:]).all() and warped[-1] == 0
    u = torch.linspace(0.02, 0.95, 7, dtype=torch.float64)
    torch.testing.assert_close(warped[:-1], kumaraswamy(u, 2.0, 1.5, 0.8).flip(0)[:-1])
    assert kumaraswamy(torch.tensor([0.0, 1.0]), 2.0, 3.0, 0.5).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"order": 3}, {"stochastic_ratio": 1.5},
                                    {"extrapolation": -0.1}, {"warp": (1, 0, 1)}, {"gap_noise": 1.0}])
def test_bad_sampler_config(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplerConfig(**kwargs)


# --- EMA -----------------------------------------------------------------------------------


def test_warmup_decay_rises_to_target():
    values = [warmup_decay(0.99, n, 10.0) for n in range(0, 2000, 50)]
    assert values[0] == pytest.approx(0.1)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] == 0.99
    assert warmup_decay(0.9, 0, 0.0) == 0.9


def test_ema_update_is_the_warmed_up_lerp_and_callable():
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, decay=0.9, warmup=10.0)
    assert not any(p.requires_grad for p in ema.parameters())
    expected = model.weight.detach().clone()
    for step in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model)
        if step == 0:  # the first update copies (AveragedModel's convention)
            expected = model.weight.detach().clone()
        else:
            d = warmup_decay(0.9, step, 10.0)
            expected = d * expected + (1 - d) * model.weight.detach()
        torch.testing.assert_close(ema.module.weight, expected)
    x = torch.randn(2, 4)
    torch.testing.assert_close(ema(x), torch.nn.functional.linear(x, expected, ema.module.bias))


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(torch.nn.Linear(2, 2), decay=1.0)


# --- buffer --------------------------------------------------------------------------------


def test_buffer_is_fifo_with_capacity_and_keeps_pairs():
    buffer = FakeSampleBuffer(5)
    for i in range(3):
        samples = torch.full((3, C, H, W), float(i))
        c = Conditioning(torch.full((3, 2 + i, 4), float(i)), torch.ones(3, 2 + i, dtype=torch.long))
        buffer.push(samples, c)
    assert len(buffer) == 5
    x, c = buffer.sample(200, torch.Generator().manual_seed(0))
    assert set(x[:, 0, 0, 0].tolist()) == {1.0, 2.0}  # the oldest (0) were dropped
    # Each drawn sample kept its own conditioning: same value, own length.
    for i in range(200):
        value = x[i, 0, 0, 0].item()
        length = int(c.mask[i].sum())
        assert length == 2 + int(value)
        assert (c.embeds[i, :length] == value).all() and (c.embeds[i, length:] == 0).all()


def test_buffer_trims_padding_and_round_trips_state():
    buffer = FakeSampleBuffer(4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    buffer.push(torch.randn(2, C, H, W), Conditioning(torch.randn(2, 4, 3), mask))
    restored = FakeSampleBuffer(1)
    restored.load_state_dict(buffer.state_dict())
    assert restored.capacity == 4 and len(restored) == 2
    a = buffer.sample(6, torch.Generator().manual_seed(3))
    b = restored.sample(6, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].embeds, b[1].embeds)
    assert {int(m.sum()) for m in a[1].mask} <= {2, 4}


def test_empty_buffer_and_bad_capacity_fail_clearly():
    with pytest.raises(RuntimeError, match="empty"):
        FakeSampleBuffer(3).sample(1)
    with pytest.raises(ValueError, match="capacity"):
        FakeSampleBuffer(0)
