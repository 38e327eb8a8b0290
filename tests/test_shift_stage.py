"""Issue 15 item 2: APEX's text shift before (``shift_stage=input``) or after (``projected``) the
backbone's caption projection; ``Conditioning.feature_shift`` and the backbones' temporary hook."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from apex_ray.config import load_config
from apex_ray.method.buffer import FakeSampleBuffer
from apex_ray.method.conditioning import Conditioning, shift_condition
from apex_ray.method.objective import APEXConfig, APEXObjective
from apex_ray.models import BACKBONE_PRESETS, build_backbone
from apex_ray.models.base import shifted_features

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["sana-tiny", "qwen-image-tiny"]
B, C, S, L, D = 3, 3, 32, 6, 384
A_SHIFT, B_SHIFT = -0.5, 1.0


def random_cond(batch: int = B, length: int = L, lengths: list[int] | None = None, seed: int = 0,
                pooled: bool = False) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [length] * batch
    mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    return Conditioning(torch.randn(batch, length, D, generator=g), mask,
                        torch.randn(batch, 8, generator=g) if pooled else None)


def inputs(batch: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cond = random_cond(batch, lengths=[L, 3, 5, 2][:batch], seed=seed)
    return torch.randn(batch, C, S, S, generator=g), torch.rand(batch, generator=g), cond


def feature_module(model: torch.nn.Module) -> torch.nn.Module:
    """Restated independently of the wrappers: where each diffusers model's projected text comes out."""
    if "caption_norm" in dict(model.transformer.named_children()):
        return model.transformer.caption_norm  # SANA: caption_norm(caption_projection(c))
    return model.transformer.txt_in  # Qwen-Image: txt_in(txt_norm(c))


@pytest.fixture(scope="module", params=TINY)
def tiny(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(request.param, **{BACKBONE_PRESETS[request.param].text_embed_key: D}).eval()


def with_shift(cond: Conditioning, rows: list[tuple[float, float]]) -> Conditioning:
    return Conditioning(cond.embeds, cond.mask, cond.pooled, torch.tensor(rows))


# ---------------------------------------------------------------------------------------------
# shift_condition and Conditioning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["text", "time", "both"])
def test_input_stage_is_the_old_shift(target):
    cond, t = random_cond(pooled=True), torch.rand(B)
    default, t_default = shift_condition(cond, t, A_SHIFT, B_SHIFT, target)
    staged, t_staged = shift_condition(cond, t, A_SHIFT, B_SHIFT, target, "input")
    for got in (default, staged):
        assert got.feature_shift is None
    assert torch.equal(staged.embeds, default.embeds) and torch.equal(staged.pooled, default.pooled)
    assert torch.equal(t_staged, t_default)
    # The old formula, restated.
    text = target in ("text", "both")
    assert torch.equal(staged.embeds, A_SHIFT * cond.embeds + B_SHIFT if text else cond.embeds)
    assert torch.equal(staged.pooled, A_SHIFT * cond.pooled + B_SHIFT if text else cond.pooled)
    assert torch.equal(t_staged, A_SHIFT * t + B_SHIFT if target != "text" else t)
    assert torch.equal(staged.mask, cond.mask)


@pytest.mark.parametrize("target", ["text", "time", "both"])
def test_projected_stage_leaves_the_embeddings_and_sets_the_feature_shift(target):
    cond, t = random_cond(pooled=True), torch.rand(B)
    shifted, t_in = shift_condition(cond, t, A_SHIFT, B_SHIFT, target, "projected")
    assert shifted.embeds is cond.embeds and shifted.pooled is cond.pooled and shifted.mask is cond.mask
    if target == "time":
        assert shifted.feature_shift is None
    else:
        assert torch.equal(shifted.feature_shift, torch.tensor([[A_SHIFT, B_SHIFT]] * B))
    assert torch.equal(t_in, A_SHIFT * t + B_SHIFT if target != "text" else t)


def test_projected_shifts_compose():
    cond = random_cond()
    once, _ = shift_condition(cond, torch.zeros(B), 2.0, 1.0, "text", "projected")
    twice, _ = shift_condition(once, torch.zeros(B), -0.5, 3.0, "text", "projected")
    # -0.5 (2 h + 1) + 3 = -h + 2.5
    assert torch.equal(twice.feature_shift, torch.tensor([[-1.0, 2.5]] * B))


def test_bad_stage_is_refused():
    with pytest.raises(ValueError, match="shift stage"):
        shift_condition(random_cond(), torch.zeros(B), 1.0, 0.0, "text", "output")
    with pytest.raises(ValueError, match="feature_shift"):
        Conditioning(torch.zeros(2, 3, 4), torch.ones(2, 3), feature_shift=torch.zeros(3, 2))


def test_cat_and_index_keep_feature_shift_aligned_with_rows():
    plain_a = random_cond(2, length=4, seed=1)
    shifted, _ = shift_condition(random_cond(3, length=6, seed=2), torch.zeros(3), -0.5, 1.0, "text", "projected")
    shifted = Conditioning(shifted.embeds, shifted.mask, None, torch.tensor([[-0.5, 1.0], [2.0, 0.0], [1.0, 3.0]]))
    plain_b = random_cond(1, length=5, seed=3)
    joined = Conditioning.cat([plain_a, shifted, plain_b])
    expected = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-0.5, 1.0], [2.0, 0.0], [1.0, 3.0], [1.0, 0.0]])
    assert torch.equal(joined.feature_shift, expected)
    assert torch.equal(joined.index(slice(2, 5)).feature_shift, shifted.feature_shift)
    assert torch.equal(joined.index(torch.tensor([5, 3, 0])).feature_shift, expected[[5, 3, 0]])
    assert torch.equal(joined.index(torch.tensor([5, 3, 0])).embeds, joined.embeds[[5, 3, 0]])
    assert joined.to(dtype=torch.float64).feature_shift.dtype == torch.float64
    assert torch.equal(joined.detach().feature_shift, expected)
    # No part with a feature_shift: none after cat either; index / to / detach keep None.
    none = Conditioning.cat([plain_a, plain_b])
    assert none.feature_shift is None
    assert none.index(slice(0, 1)).feature_shift is None and none.to("cpu").detach().feature_shift is None


# ---------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------


def test_projected_shift_matches_a_hand_hook_row_by_row(tiny):
    x, t, cond = inputs()
    a, b = -0.5, 1.0
    shifted = with_shift(cond, [(a, b), (1.0, 0.0), (1.0, 0.0)])

    def by_hand(_module, _args, out):  # a h + b on row 0 only
        out = out.clone()
        out[0] = a * out[0] + b
        return out

    with torch.no_grad():
        got = tiny(x, t, shifted)
        handle = feature_module(tiny).register_forward_hook(by_hand)
        try:
            reference = tiny(x, t, cond)
        finally:
            handle.remove()
        plain = tiny(x, t, cond)
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1:], plain[1:], rtol=0, atol=0)  # identity rows: the unshifted forward
    assert (got[0] - plain[0]).abs().max() > 1e-3  # and the shifted row really moved
    assert torch.isfinite(got).all()


def test_identity_feature_shift_is_no_feature_shift(tiny):
    x, t, cond = inputs()
    with torch.no_grad():
        plain = tiny(x, t, cond)
        identity = tiny(x, t, with_shift(cond, [(1.0, 0.0)] * B))
    assert torch.equal(identity, plain)


def test_projected_shift_differs_from_input_shift_and_backpropagates(tiny):
    x, t, cond = inputs()
    projected, _ = shift_condition(cond, t, A_SHIFT, B_SHIFT, "text", "projected")
    at_input, _ = shift_condition(cond, t, A_SHIFT, B_SHIFT, "text", "input")
    tiny.zero_grad(set_to_none=True)
    out = tiny(x, t, projected)
    out.square().mean().backward()
    grads = [p.grad for p in feature_module(tiny).parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    tiny.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert not torch.allclose(out, tiny(x, t, at_input), atol=1e-4)


def test_hook_is_removed_after_the_forward_even_when_it_raises(tiny):
    module = feature_module(tiny)
    before = dict(module._forward_hooks)
    x, t, cond = inputs()
    with torch.no_grad():
        tiny(x, t, with_shift(cond, [(2.0, 1.0)] * B))
    assert dict(module._forward_hooks) == before
    with pytest.raises(Exception), torch.no_grad():
        tiny(x[:, :2], t, with_shift(cond, [(2.0, 1.0)] * B))  # wrong channel count: the forward fails
    assert dict(module._forward_hooks) == before
    with pytest.raises(RuntimeError, match="boom"), shifted_features(module, torch.ones(B, 2)):
        assert len(module._forward_hooks) == len(before) + 1
        raise RuntimeError("boom")
    assert dict(module._forward_hooks) == before


def test_feature_shift_with_the_wrong_row_count_is_refused(tiny):
    x, t, cond = inputs()
    module = feature_module(tiny)
    with pytest.raises(ValueError, match="rows"), torch.no_grad(), shifted_features(module, torch.ones(B + 1, 2)):
        tiny(x, t, cond)
    assert not module._forward_hooks


def test_projected_shift_under_fsdp2(tmp_path):
    """FSDP2 (one CPU rank, gloo): the hook on an inner module of the sharded root still applies."""
    torch.manual_seed(0)
    reference = build_backbone("sana-tiny").eval()
    sharded = build_backbone("sana-tiny").eval()
    sharded.load_state_dict(reference.state_dict())
    x, t, cond = inputs()
    shifted = with_shift(cond, [(-0.5, 1.0), (1.0, 0.0), (2.0, -1.0)])
    with torch.no_grad():
        expected, plain = reference(x, t, shifted), reference(x, t, cond)
    from apex_ray.engine.parallel import apply_fsdp

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp_path, 'store')}", rank=0, world_size=1)
    try:
        apply_fsdp(sharded, sharded.blocks(), None)
        with torch.no_grad():
            got, got_plain = sharded(x, t, shifted), sharded(x, t, cond)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_plain, plain, rtol=1e-5, atol=1e-5)
    assert not sharded.transformer.caption_norm._forward_hooks


# ---------------------------------------------------------------------------------------------
# The objective and the config
# ---------------------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Records every call's output (detached) of the wrapped model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.outputs, self.conds = model, [], []

    def forward(self, x_t, t, cond):
        out = self.model(x_t, t, cond)
        self.outputs.append(out.detach().clone())
        self.conds.append(cond)
        return out


def _objective_step(stage: str, model: torch.nn.Module):
    batch = 4
    g = torch.Generator().manual_seed(5)
    buffer = FakeSampleBuffer(8)
    buffer.push(torch.randn(4, C, S, S, generator=g), random_cond(4, seed=6))
    x, cond = torch.randn(batch, C, S, S, generator=g), random_cond(batch, seed=7)
    objective = APEXObjective(APEXConfig(shift_stage=stage, anchor_frac=0.5, adv_frac=0.5), buffer)
    recorder = Recorder(model)
    out = objective(recorder, recorder, x, cond, torch.Generator().manual_seed(11))
    return out, recorder


def test_objective_step_with_projected_stage_runs_and_moves_only_the_shifted_rows():
    torch.manual_seed(0)
    model = build_backbone("sana-tiny")
    projected, rec_p = _objective_step("projected", model)
    model.zero_grad(set_to_none=True)
    at_input, rec_i = _objective_step("input", model)
    assert torch.isfinite(projected.loss) and all(torch.isfinite(torch.as_tensor(v)) for v in projected.parts.values())
    projected.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert projected.forward_calls == at_input.forward_calls and projected.parts["n_adv"] == 2.0
    # Call 1: B main rows (unshifted, identical) then the n_adv shifted L_adv rows (different).
    main = 4
    first_p, first_i = rec_p.outputs[0], rec_i.outputs[0]
    assert torch.equal(rec_p.conds[0].feature_shift[:main], torch.tensor([[1.0, 0.0]] * main))
    assert torch.equal(rec_p.conds[0].feature_shift[main:], torch.tensor([[-0.5, 1.0]] * 2))
    assert rec_i.conds[0].feature_shift is None
    torch.testing.assert_close(first_p[:main], first_i[:main], rtol=1e-6, atol=1e-6)
    assert (first_p[main:] - first_i[main:]).abs().max() > 1e-3
    # The delta_d call (shifted rows then the online reference): only the shifted half differs.
    last_p, last_i = rec_p.outputs[-1], rec_i.outputs[-1]
    n = last_p.shape[0] // 2
    torch.testing.assert_close(last_p[n:], last_i[n:], rtol=1e-6, atol=1e-6)
    assert (last_p[:n] - last_i[:n]).abs().max() > 1e-3
    assert float(projected.parts["loss_shift"]) != float(at_input.parts["loss_shift"])


def test_bad_shift_stage_names_the_field():
    with pytest.raises(ValueError, match="shift_stage"):
        APEXConfig(shift_stage="output")
    assert APEXConfig().shift_stage == "input"


def test_config_override_builds():
    config = load_config(None, ["objective.apex.shift_stage=projected"])
    assert config.objective.apex.shift_stage == "projected"
    assert load_config(None, []).objective.apex.shift_stage == "input"
