"""Properties of the APEX objective (design page, section 6) on fresh random inputs."""
from __future__ import annotations

import math

import pytest
import torch

from apex_ray.method.buffer import FakeSampleBuffer
from apex_ray.method.conditioning import Conditioning, shift_condition
from apex_ray.method.objective import (
    APEXConfig,
    APEXObjective,
    FlowMatchingObjective,
    adaptive_l2,
    multiscale_adaptive_l2,
    path_target,
    path_weight,
    shift_loss,
    stochastic_count,
)
from apex_ray.method.transport import f_x, f_z, interpolate

B, C, H, W, L, D = 6, 3, 8, 8, 5, 4


def random_cond(batch: int = B, low: float = -1.0, high: float = 1.0, dtype=torch.float32) -> Conditioning:
    embeds = torch.empty(batch, L, D, dtype=dtype).uniform_(low, high)
    mask = torch.ones(batch, L, dtype=torch.long)
    return Conditioning(embeds, mask)


def cond_feature(cond: Conditioning, like: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar from the text, broadcast to image shape (so networks depend on c)."""
    feat = (cond.embeds * cond.mask[..., None]).sum(dim=(1, 2)) / cond.mask.sum(dim=1)
    return feat.reshape(-1, 1, 1, 1).to(like.dtype).expand_as(like)


class LinearVelocity(torch.nn.Module):
    """``F(x_t, t, c) = A * x_t + B * t + G * feat(c)`` with per-pixel learnable A, B, G."""

    def __init__(self, dtype=torch.float32) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(C, H, W, dtype=dtype) * 0.3)
        self.B = torch.nn.Parameter(torch.randn(C, H, W, dtype=dtype) * 0.3)
        self.G = torch.nn.Parameter(torch.randn(C, H, W, dtype=dtype) * 0.3)

    def forward(self, x_t, t, cond):
        t4 = t.reshape(-1, 1, 1, 1).to(x_t.dtype)
        return self.A * x_t + self.B * t4 + self.G * cond_feature(cond, x_t)


def test_endpoint_estimates_recover_data_and_noise():
    x, z = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    t = torch.rand(B)
    x_t, v = interpolate(x, z, t), z - x
    torch.testing.assert_close(f_x(v, x_t, t), x)
    torch.testing.assert_close(f_z(v, x_t, t), z)


@pytest.mark.parametrize("clip", [None, 1.0, 0.3])
def test_path_target_matches_hand_computation_for_linear_network(clip):
    net = LinearVelocity(torch.float64)
    x, z = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    cond = random_cond(dtype=torch.float64)
    t = torch.rand(B, dtype=torch.float64) * 0.9 + 0.1
    s = torch.rand(B, dtype=torch.float64) * t
    x_t, x_s = interpolate(x, z, t), interpolate(x, z, s)
    with torch.no_grad():
        got = path_target(net(x_t, t, cond), net(x_s, s, cond), x_t, x_s, t, s, clip=clip)

        # By hand, element by element: F = A x + B t + G g.
        A, Bp, G, g = net.A, net.B, net.G, cond_feature(cond, x)
        tt, ss = t.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)
        F_t = A * x_t + Bp * tt + G * g
        F_s = A * x_s + Bp * ss + G * g
        x_hat_t = x_t - tt * F_t
        x_hat_s = x_s - ss * F_s
        ratio = (x_hat_t - x_hat_s) / (-(tt - ss))
        if clip is not None:
            ratio = torch.clamp(ratio, -clip, clip)
        expected = F_t - 2 * ratio
    torch.testing.assert_close(got, expected)


def test_lambda_zero_target_gives_twice_the_flow_matching_gradient():
    x, z = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    t = torch.rand(B, dtype=torch.float64) * 0.9 + 0.1
    s = torch.zeros(B, dtype=torch.float64)  # lambda = 0: x_s = x
    x_t, x_s = interpolate(x, z, t), interpolate(x, z, s)
    torch.testing.assert_close(x_s, x)
    f_ema_t = torch.randn(B, C, H, W, dtype=torch.float64)
    f_ema_s = torch.randn(B, C, H, W, dtype=torch.float64)  # f_x at s = 0 ignores the network
    target = path_target(f_ema_t, f_ema_s, x_t, x_s, t, s, clip=None)
    torch.testing.assert_close(target, 2 * (z - x) - f_ema_t)

    f_theta = f_ema_t.clone().requires_grad_(True)  # F_theta == F_ema
    (grad_path,) = torch.autograd.grad((f_theta - target.detach()).pow(2).sum(), f_theta)
    f_theta2 = f_ema_t.clone().requires_grad_(True)
    (grad_fm,) = torch.autograd.grad((f_theta2 - (z - x)).pow(2).sum(), f_theta2)
    torch.testing.assert_close(grad_path, 2 * grad_fm)


def test_path_weight_values():
    t, s = torch.rand(B), torch.rand(B) * 0.5
    torch.testing.assert_close(path_weight(t, s, "tan"), torch.tan((1 - (t - s)) * math.pi / 2.5) + 1)
    assert torch.equal(path_weight(t, s, "uniform"), torch.ones(B))
    with pytest.raises(ValueError, match="path weight"):
        path_weight(t, s, "cosine")


def test_multiscale_norm_equals_single_scale_for_constant_error():
    value = torch.randn(B, C, 1, 1)
    error = value.expand(B, C, H, W).contiguous()
    torch.testing.assert_close(multiscale_adaptive_l2(error), adaptive_l2(error))


def test_multiscale_norm_coarse_scales_vanish_for_checkerboard_error():
    signs = (torch.arange(H)[:, None] + torch.arange(W)[None, :]) % 2 * 2 - 1
    amplitude = torch.rand(B, C, 1, 1) + 0.5
    error = amplitude * signs.float()
    assert torch.allclose(torch.nn.functional.avg_pool2d(error, 2), torch.zeros(()))
    # Pooled to 0 at 2x and 4x: the two coarse terms are 0, so the mean is a third of the fine one.
    torch.testing.assert_close(multiscale_adaptive_l2(error), adaptive_l2(error) / 3)


def test_multiscale_norm_skips_scales_smaller_than_one_pixel():
    error = torch.randn(B, C, 2, 2)
    expected = (adaptive_l2(error) + adaptive_l2(torch.nn.functional.avg_pool2d(error, 2))) / 2
    torch.testing.assert_close(multiscale_adaptive_l2(error), expected)


def test_adaptive_weight_is_detached():
    error = torch.randn(B, C, H, W, requires_grad=True)
    (grad,) = torch.autograd.grad(adaptive_l2(error).sum(), error)
    m = error.detach().pow(2).flatten(1).mean(1)
    expected = (m + 1e-3).pow(-0.5).reshape(-1, 1, 1, 1) * 2 * error.detach() / (C * H * W)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("multi_scale", [False, True])
def test_shift_loss_step_moves_generation_along_delta_d(multi_scale):
    z = torch.randn(B, C, H, W)
    f_a = torch.nn.Parameter(torch.randn(B, C, H, W))  # the anchors' one-step velocity F_A
    delta_d = torch.randn(B, C, H, W)
    x_hat_before = (z - f_a).detach()
    optimizer = torch.optim.SGD([f_a], lr=0.1)
    if multi_scale:
        loss = shift_loss(-f_a, delta_d).mean()
    else:
        loss = adaptive_l2(-f_a - (-f_a + delta_d).detach()).mean()
    loss.backward()
    optimizer.step()
    moved = (z - f_a).detach() - x_hat_before
    cosine = torch.nn.functional.cosine_similarity(moved.flatten(1), delta_d.flatten(1))
    assert (cosine > 0.3).all(), cosine
    if not multi_scale:  # single scale: exactly a positive multiple of delta_d per sample
        torch.testing.assert_close(cosine, torch.ones(B))


def test_shift_residual_is_paired_with_its_own_anchor():
    config = APEXConfig(shift_a=-1.0, shift_b=0.5)
    objective = APEXObjective(config, FakeSampleBuffer(8))
    net = LinearVelocity()
    net.A.data.zero_()
    net.B.data.zero_()  # output depends on the text only, so the random y and t do not matter
    cond = random_cond()
    x_hat = torch.randn(B, C, H, W)
    delta_d, calls = objective._shift_residual(net, net, x_hat, cond, torch.Generator().manual_seed(0))
    assert calls == 1
    for i in range(B):
        c_i = cond.index(slice(i, i + 1))
        c_shift, _ = shift_condition(c_i, torch.zeros(1), -1.0, 0.5, "text")
        expected = net(x_hat[i : i + 1], torch.zeros(1), c_shift) - net(x_hat[i : i + 1], torch.zeros(1), c_i)
        torch.testing.assert_close(delta_d[i : i + 1], expected.detach())


def test_adv_loss_is_zero_when_shifted_branch_returns_fake_velocity():
    x_fake = torch.randn(1, C, H, W, dtype=torch.float64)

    def net(x_t, t, cond):
        shifted = cond.embeds.mean(dim=(1, 2)) < 0  # real text is positive, a = -1 makes it negative
        fake_velocity = (x_t - x_fake) / t.reshape(-1, 1, 1, 1)  # = z_fake - x_fake on the fake path
        return torch.where(shifted.reshape(-1, 1, 1, 1), fake_velocity, x_t * 0.5)

    buffer = FakeSampleBuffer(16)
    buffer.push(x_fake.expand(4, -1, -1, -1), random_cond(4, 0.5, 1.0, torch.float64))
    config = APEXConfig(shift_a=-1.0, shift_b=0.0, adv_frac=1.0)
    objective = APEXObjective(config, buffer)
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    out = objective(net, net, x, random_cond(B, 0.5, 1.0, torch.float64), torch.Generator().manual_seed(1))
    assert out.parts["n_adv"] == B
    assert out.parts["loss_adv"] < 1e-12
    # Control: a branch that ignores the shift does not get zero.
    out = objective(lambda x_t, t, c: x_t * 0.5, net, x, random_cond(B, 0.5, 1.0, torch.float64))
    assert out.parts["loss_adv"] > 1e-3


def test_objective_path_loss_uses_ema_at_both_points():
    """L_path inside the objective equals the formula on the points the EMA was called with."""
    net, ema_net = LinearVelocity(), LinearVelocity()
    seen = {}

    def ema(x_in, t_in, cond):
        seen.update(x=x_in.clone(), t=t_in.clone())
        return ema_net(x_in, t_in, cond)

    def model(x_in, t_in, cond):
        seen.setdefault("main", (x_in.clone(), t_in.clone()))
        return net(x_in, t_in, cond)

    config = APEXConfig(lambda_endpoint=0.0, path_weight="uniform")
    cond = random_cond()
    out = APEXObjective(config, FakeSampleBuffer(4))(model, ema, torch.randn(B, C, H, W), cond)
    x_t, x_s = seen["x"][:B], seen["x"][B:]
    t, s = seen["t"][:B], seen["t"][B:]
    assert torch.equal(seen["main"][0], x_t) and torch.equal(seen["main"][1], t)
    assert ((t - s) >= config.min_interval * 0.999).all() and (s >= 0).all()
    with torch.no_grad():
        target = path_target(ema_net(x_t, t, cond), ema_net(x_s, s, cond), x_t, x_s, t, s, 1.0)
        expected = multiscale_adaptive_l2(net(x_t, t, cond) - target).mean()
    assert out.parts["loss_path"] == pytest.approx(expected.item(), rel=1e-5)
    assert out.forward_calls == 2 and out.forward_rows == 3 * B


def test_objective_counts_forward_passes_and_fills_buffer():
    net = LinearVelocity()
    buffer = FakeSampleBuffer(64)
    objective = APEXObjective(APEXConfig(anchor_frac=0.5, adv_frac=0.5), buffer)
    x, cond = torch.randn(8, C, H, W), random_cond(8)
    first = objective(net, net, x, cond, torch.Generator().manual_seed(0))
    assert first.parts["n_adv"] == 0  # empty buffer on the first step
    assert first.forward_calls == 3  # main, EMA (x_t and x_s together), delta_d (shifted and ref together)
    assert first.forward_rows == 8 + 16 + 2 * 4
    assert len(buffer) == 4
    second = objective(net, net, x, cond, torch.Generator().manual_seed(1))
    assert second.parts["n_adv"] == 4
    assert second.forward_calls == 3 and second.forward_rows == (8 + 4) + 16 + 2 * 4
    assert len(buffer) == 8


def test_ema_reference_adds_a_call():
    net = LinearVelocity()
    objective = APEXObjective(APEXConfig(anchor_frac=0.5, shift_reference="ema"), FakeSampleBuffer(8))
    out = objective(net, net, torch.randn(4, C, H, W), random_cond(4))
    assert out.forward_calls == 4


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (1.0, 0.5)])
def test_total_loss_is_weighted_sum_and_either_weight_may_be_zero(weights):
    lp, le = weights
    net = LinearVelocity()
    buffer = FakeSampleBuffer(16)
    buffer.push(torch.randn(4, C, H, W), random_cond(4))
    out = APEXObjective(APEXConfig(lambda_path=lp, lambda_endpoint=le), buffer)(
        net, net, torch.randn(B, C, H, W), random_cond()
    )
    expected = lp * out.parts.get("loss_path", 0.0) + le * out.parts.get("loss_endpoint", 0.0)
    assert out.parts["loss"] == pytest.approx(expected, rel=1e-6)
    assert ("loss_path" in out.parts) == (lp > 0)
    assert ("loss_adv" in out.parts) == (le > 0)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_stochastic_count_is_right_on_average_and_works_at_batch_one():
    gen = torch.Generator().manual_seed(0)
    counts = [stochastic_count(0.25 * 1, gen) for _ in range(4000)]
    assert set(counts) == {0, 1}
    assert abs(sum(counts) / len(counts) - 0.25) < 0.03
    assert stochastic_count(2.0, gen) == 2


def test_objective_runs_at_micro_batch_one():
    net = LinearVelocity()
    objective = APEXObjective(APEXConfig(), FakeSampleBuffer(8))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = objective(net, net, torch.randn(1, C, H, W), random_cond(1), gen)
        assert torch.isfinite(out.loss)
    assert len(objective.buffer) > 0


def test_shift_condition_targets():
    cond, t = random_cond(), torch.rand(B)
    c_text, t_text = shift_condition(cond, t, -0.5, 0.1, "text")
    torch.testing.assert_close(c_text.embeds, -0.5 * cond.embeds + 0.1)
    assert torch.equal(t_text, t) and torch.equal(c_text.mask, cond.mask)
    c_time, t_time = shift_condition(cond, t, -1.0, 0.0, "time")
    assert torch.equal(c_time.embeds, cond.embeds)
    torch.testing.assert_close(t_time, -t)
    c_both, t_both = shift_condition(cond, t, 2.0, 1.0, "both")
    torch.testing.assert_close(c_both.embeds, 2 * cond.embeds + 1)
    torch.testing.assert_close(t_both, 2 * t + 1)
    with pytest.raises(ValueError, match="shift target"):
        shift_condition(cond, t, 1.0, 0.0, "pooled")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lambda_path": -1}, "lambda_path"),
        ({"lambda_path": 0, "lambda_endpoint": 0}, "both be 0"),
        ({"anchor_frac": 1.0}, "anchor_frac"),
        ({"shift_target": "pixels"}, "shift_target"),
        ({"time_beta": (1, 1, 2)}, "time_beta"),
        ({"shift_reference": "teacher"}, "shift_reference"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        APEXConfig(**kwargs)


def test_flow_matching_loss_is_zero_for_the_exact_velocity_of_a_point_mass():
    x0 = torch.randn(1, C, H, W, dtype=torch.float64)
    x = x0.expand(B, -1, -1, -1)

    def exact(x_t, t, cond):  # the true velocity field when all data is x0
        return (x_t - x0) / t.reshape(-1, 1, 1, 1)

    out = FlowMatchingObjective()(exact, None, x, random_cond(dtype=torch.float64))
    assert out.loss.item() < 1e-20
    wrong = FlowMatchingObjective()(lambda x_t, t, c: x_t, None, x, random_cond(dtype=torch.float64))
    assert wrong.loss.item() > 0.1


def test_objective_step_on_shift_loss_moves_anchor_generations_along_delta_d(monkeypatch):
    """Through the whole objective: one SGD step on L_shift moves x_hat = z - F(z, 1, c) by +delta_d."""
    net = LinearVelocity()
    net.A.requires_grad_(False).zero_()  # the output at t = 1 then does not depend on z
    objective = APEXObjective(APEXConfig(lambda_path=0.0, anchor_frac=0.99), FakeSampleBuffer(8))
    recorded = {}
    original = objective._shift_residual

    def recording(*args):
        delta_d, calls = original(*args)
        recorded["delta_d"] = delta_d
        return delta_d, calls

    monkeypatch.setattr(objective, "_shift_residual", recording)
    x, cond = torch.randn(B, C, H, W), random_cond()
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    out = objective(net, net, x, cond, gen)
    n = int(out.parts["n_anchor"])
    assert out.parts["n_adv"] == 0 and n >= B - 1
    z = torch.randn(n, C, H, W)
    ones = torch.ones(n)
    before = (z - net(z, ones, cond.index(slice(0, n)))).detach()
    out.loss.backward()
    torch.optim.SGD(net.parameters(), lr=1e-2).step()
    after = (z - net(z, ones, cond.index(slice(0, n)))).detach()
    # The move is lr * J J^T delta_d (PSD), so its inner product with delta_d is positive.
    assert ((after - before) * recorded["delta_d"]).sum() > 0
