"""Issue 15 item 3: discrete consistency distillation (objective.kind=consistency), the one-step
peer of APEX in the same harness: its equations against restatements, where its gradient flows,
its forward count, a tiny training run without Ray, and its configuration."""
from __future__ import annotations

import math

import pytest
import torch

from apex_ray.config import ConfigError, load_config
from apex_ray.engine.build import build_training
from apex_ray.engine.memory_plan import plan
from apex_ray.engine.reference import AdapterOff, FrozenCopy, keeps_frozen_reference
from apex_ray.method.batch import Batch
from apex_ray.method.conditioning import Conditioning
from apex_ray.method.consistency import (
    ConsistencyConfig,
    ConsistencyObjective,
    consistency_distance,
    consistency_function,
    consistency_target,
    consistency_weight,
    teacher_euler_step,
    time_grid,
)
from apex_ray.method.objective import multiscale_adaptive_l2

B, C, H, W, L, D = 8, 3, 8, 8, 5, 4


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cond_of(n: int = B, seed: int = 0, dtype=torch.float64) -> Conditioning:
    return Conditioning(torch.rand(n, L, D, generator=gen(seed), dtype=dtype) * 2 - 1, torch.ones(n, L, dtype=torch.long))


class Linear(torch.nn.Module):
    """``F = A x_t + Bt t + G mean(c)``, per pixel."""

    def __init__(self, seed: int, scale: float = 0.3) -> None:
        super().__init__()
        g = gen(seed)
        self.A, self.Bt, self.G = (torch.nn.Parameter(torch.randn(C, H, W, generator=g, dtype=torch.float64) * scale)
                                   for _ in range(3))

    def forward(self, x_t, t, cond):
        feat = cond.embeds.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).to(x_t.dtype)
        return self.A * x_t + self.Bt * t.reshape(-1, 1, 1, 1).to(x_t.dtype) + self.G * feat


class Counted:
    """A velocity function that records each call's rows and whether grad was enabled."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t.shape[0], torch.is_grad_enabled()))
        return self.fn(x_t, t, cond)


# ---------------------------------------------------------------------------------------------
# Equations against independent restatements
# ---------------------------------------------------------------------------------------------


def test_time_grids_by_hand():
    uniform = time_grid(18, 0.002, "uniform")
    expected = torch.tensor([0.002 + (1 - 0.002) * i / 18 for i in range(19)])
    torch.testing.assert_close(uniform, expected)
    karras = time_grid(10, 0.002, "karras", rho=7.0)
    lo = 0.002 ** (1 / 7)
    torch.testing.assert_close(karras, torch.tensor([(lo + i / 10 * (1 - lo)) ** 7 for i in range(11)]))
    for grid in (uniform, karras):
        assert grid[0].item() == pytest.approx(0.002) and grid[-1].item() == 1.0
        assert (grid[1:] > grid[:-1]).all()
    assert (karras[1:] - karras[:-1])[0] < (karras[1:] - karras[:-1])[-1]  # denser near the data


def test_teacher_euler_step_and_target_by_hand():
    g = gen(1)
    x_next, v_teacher, v_ema = (torch.randn(B, C, H, W, generator=g, dtype=torch.float64) for _ in range(3))
    t_next = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.1
    t_cur = t_next * torch.rand(B, generator=g, dtype=torch.float64)
    x_cur = teacher_euler_step(v_teacher, x_next, t_next, t_cur)
    for i in range(B):  # Euler on dx/dt = v from t_{n+1} down to t_n, one sample at a time
        torch.testing.assert_close(x_cur[i], x_next[i] + (t_cur[i] - t_next[i]) * v_teacher[i])
    target = consistency_target(v_ema.requires_grad_(), x_cur, t_cur)
    assert not target.requires_grad
    for i in range(B):  # f(x, t) = x - t F
        torch.testing.assert_close(target[i], x_cur[i] - t_cur[i] * v_ema[i].detach())


def test_boundary_condition_holds_for_any_velocity():
    g = gen(2)
    x, v = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g) * 100
    torch.testing.assert_close(consistency_function(v, x, torch.zeros(B)), x)
    # and at t = 1 it is the NFE-1 sample z - F(z, 1)
    torch.testing.assert_close(consistency_function(v, x, torch.ones(B)), x - v)


def test_distances_and_weights_by_hand():
    g = gen(3)
    error = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    torch.testing.assert_close(consistency_distance(error, "l2"), (error ** 2).mean(dim=(1, 2, 3)))
    c = 0.00054 * math.sqrt(C * H * W)
    torch.testing.assert_close(consistency_distance(error, "pseudo_huber"),
                               torch.sqrt((error ** 2).sum(dim=(1, 2, 3)) + c ** 2) - c)
    torch.testing.assert_close(consistency_distance(error, "adaptive"), multiscale_adaptive_l2(error))
    t_cur, t_next = torch.tensor([0.1, 0.5]), torch.tensor([0.2, 0.75])
    torch.testing.assert_close(consistency_weight(t_cur, t_next, "uniform"), torch.ones(2))
    torch.testing.assert_close(consistency_weight(t_cur, t_next, "inverse_step"), torch.tensor([10.0, 4.0]))


@pytest.mark.parametrize("options", [{}, {"time_grid": "karras", "distance": "pseudo_huber", "weighting": "inverse_step"}])
def test_objective_is_the_cd_loss_restated_by_hand(options):
    config = ConsistencyConfig(num_steps=6, **options)
    student, teacher, ema = Linear(0), Linear(1), Linear(2)
    x, cond = torch.randn(B, C, H, W, generator=gen(4), dtype=torch.float64), cond_of()
    out = ConsistencyObjective(config, teacher=teacher)(student, ema, x, cond, gen(5))

    g = gen(5)  # the same draws, by hand: n, then z
    n = torch.randint(0, 6, (B,), generator=g)
    z = torch.randn(x.shape, generator=g, dtype=x.dtype)
    grid = time_grid(6, config.t_min, config.time_grid, config.rho).double()
    expected = []
    with torch.no_grad():
        for i in range(B):
            tn, tn1 = grid[n[i]], grid[n[i] + 1]
            xi, ci = x[i:i + 1], cond.index(slice(i, i + 1))
            x_next = tn1 * z[i:i + 1] + (1 - tn1) * xi
            x_hat = x_next - (tn1 - tn) * teacher(x_next, tn1.reshape(1), ci)
            target = x_hat - tn * ema(x_hat, tn.reshape(1), ci)
            f_student = x_next - tn1 * student(x_next, tn1.reshape(1), ci)
            lam = 1.0 if config.weighting == "uniform" else 1.0 / (tn1 - tn)
            expected.append(lam * consistency_distance(f_student - target, config.distance))
    torch.testing.assert_close(out.loss, torch.cat(expected).mean(), rtol=1e-5, atol=1e-7)
    assert out.parts["loss"].dim() == 0 and not out.parts["loss"].requires_grad


# ---------------------------------------------------------------------------------------------
# Gradient, forward count
# ---------------------------------------------------------------------------------------------


def test_gradient_flows_only_through_the_student_and_three_calls_are_counted():
    student, teacher, ema = Linear(0), Linear(1), Linear(2)
    s, t, e = Counted(student), Counted(teacher), Counted(ema)
    x, cond = torch.randn(B, C, H, W, generator=gen(6), dtype=torch.float64), cond_of()
    out = ConsistencyObjective(ConsistencyConfig(), teacher=t)(s, e, x, cond, gen(7))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in (*teacher.parameters(), *ema.parameters()))
    assert s.calls == [(B, True)] and t.calls == [(B, False)] and e.calls == [(B, False)]
    assert (out.forward_calls, out.forward_rows) == (3, 3 * B)


def test_a_consistency_objective_without_a_teacher_is_refused():
    with pytest.raises(ValueError, match="teacher"):
        ConsistencyObjective(ConsistencyConfig(), teacher=None)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"num_steps": 0}, "num_steps"),
    ({"time_grid": "cosine"}, "time_grid"),
    ({"t_min": 1.0}, "t_min"),
    ({"t_min": 0.0, "time_grid": "karras"}, "t_min"),
    ({"rho": 0.0}, "rho"),
    ({"distance": "lpips"}, "distance"),
    ({"huber_c": -1.0}, "huber_c"),
    ({"weighting": "snr"}, "weighting"),
])
def test_bad_option_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ConsistencyConfig(**kwargs)


def test_kind_consistency_loads_keeps_the_teacher_and_the_memory_plan_counts_it():
    config = load_config(None, ["objective.kind=consistency", "objective.consistency.num_steps=40"])
    assert config.objective.kind == "consistency" and config.objective.consistency.num_steps == 40
    assert keeps_frozen_reference(config)
    frozen_row = lambda c: dict(plan(c).rows).get("frozen starting model (fp32)", 0)  # noqa: E731
    assert frozen_row(config) > 0
    assert frozen_row(load_config(None, ["objective.kind=flow_matching"])) == 0


@pytest.mark.parametrize("override, field", [
    ("objective.kind=cd", "objective.kind"),
    ("objective.consistency.num_steps=0", "num_steps"),
    ("objective.consistency.distance=lpips", "distance"),
])
def test_bad_values_fail_before_any_cluster_work(override, field, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=field):
        load_config(None, ["objective.kind=consistency", override])
    import apex_ray.train as train

    def no_cluster(*args, **kwargs):
        raise AssertionError("the launcher ran")

    monkeypatch.setattr(train, "run", no_cluster)
    assert train.main(["objective.kind=consistency", override]) == 2
    assert field.split(".")[-1] in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Tiny training run on the tiny SANA (StepRunner, no Ray)
# ---------------------------------------------------------------------------------------------


def _training(*overrides: str):
    config = load_config(None, ["model.pretrained=null", "distributed.strategy=single", "distributed.num_workers=1",
                                "train.global_batch=4", "model.backbone_overrides={num_layers: 1}",
                                "objective.kind=consistency", *overrides])
    return build_training(config, "cpu", text_embed_dim=16, distributed=False)


def _batch(n: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 32, 32, generator=g),
                 Conditioning(torch.randn(n, 16, 16, generator=g), torch.ones(n, 16, dtype=torch.long)))


def _probe_loss(training, batch: Batch, seeds=range(16)) -> float:
    """The CD loss on fixed draws (grid indices and noise), no grad, against the current EMA."""
    runner = training.runner
    with torch.no_grad():
        return sum(float(runner.objective(runner.model, training.ema, batch.latents, batch.cond, gen(s)).loss)
                   for s in seeds) / len(seeds)


def test_the_step_runner_builds_cd_with_the_frozen_teacher_and_counts_three_calls(one_thread):
    training = _training()
    assert isinstance(training.runner.objective, ConsistencyObjective)
    assert isinstance(training.frozen, FrozenCopy) and training.runner.objective.teacher is training.frozen
    assert training.runner.buffer is None  # no fake-sample buffer
    metrics = training.runner.train_step([_batch()])
    assert math.isfinite(metrics["loss"]) and (metrics["forward_calls"], metrics["forward_rows"]) == (3, 12)


def test_lora_cd_uses_the_base_with_the_adapter_off_as_teacher(one_thread):
    training = _training("model.lora.enabled=true", "model.lora.rank=4")
    assert isinstance(training.frozen, AdapterOff) and training.runner.objective.teacher is training.frozen
    assert math.isfinite(training.runner.train_step([_batch()])["loss"])


@pytest.mark.parametrize("seed", [0, 1])
def test_thirty_cd_steps_on_a_fixed_batch_lower_the_consistency_loss(seed, one_thread):
    """30 CD steps from the (random, tiny) starting model: the CD loss on fixed draws, against the EMA
    target, falls (measured 0.44-0.58x of its start over train.seed 0-3; asserted < 0.75x), and the
    teacher does not move."""
    training = _training("optim.lr=3e-4", f"train.seed={seed}")
    batch = _batch(seed=seed + 1)
    probe_t = torch.full((4,), 0.5)
    teacher_before = training.frozen(batch.latents, probe_t, batch.cond)
    before = _probe_loss(training, batch)
    losses = [training.runner.train_step([batch])["loss"] for _ in range(30)]
    after = _probe_loss(training, batch)
    assert all(math.isfinite(v) for v in losses)
    assert after < 0.75 * before, (before, after)
    torch.testing.assert_close(training.frozen(batch.latents, probe_t, batch.cond), teacher_before)
