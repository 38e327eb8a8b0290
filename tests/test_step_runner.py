"""The step at its limits: no host synchronisation on steps that do not log, non-finite steps
skipped on the device, the fake-sample buffer as device tensors whose checkpoint holds only the
entries' bytes, checkpoints written while training goes on."""
from __future__ import annotations

import io
import random

import pytest
import torch

from apex_ray.config import load_config
from apex_ray.engine.build import build_training
from apex_ray.engine.checkpointing import AsyncCheckpointer, load_checkpoint
from apex_ray.engine.step import NonFiniteLossError
from apex_ray.method.batch import Batch
from apex_ray.method.buffer import FakeSampleBuffer
from apex_ray.method.conditioning import Conditioning

HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
"""Every way a tensor's value reaches Python (each waits for the device on a GPU)."""


def _training(**overrides):
    config = load_config(None, ["model.pretrained=null", "distributed.strategy=single", "distributed.num_workers=1",
                                "train.max_nonfinite_steps=3", *[f"{k}={v}" for k, v in overrides.items()]])
    return build_training(config, "cpu", text_embed_dim=16, distributed=False)


def _batch(n: int = 8, seed: int = 0, lengths: list[int] | None = None) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths or [12] * n
    mask = (torch.arange(16)[None, :] < torch.tensor(lengths)[:, None]).long()
    return Batch(torch.randn(n, 3, 32, 32, generator=gen), Conditioning(torch.randn(n, 16, 16, generator=gen), mask))


class HostReadCounter:
    """Counts calls of :data:`HOST_READS` on any tensor while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_a_step_that_does_not_log_never_reads_the_device(monkeypatch):
    runner = _training().runner
    for seed in range(2):  # the buffer fills, so the next step draws fakes for L_adv
        runner.train_step([_batch(seed=seed)])
    assert len(runner.buffer) > 0
    counter = HostReadCounter(monkeypatch)
    assert runner.train_step([_batch(seed=2)], read_metrics=False) is None
    assert counter.calls == [], f"a non-log step read tensors on the host: {counter.calls}"
    metrics = runner.train_step([_batch(seed=3)])  # a log step reads, once
    assert counter.calls, "the counter sees host reads"
    assert metrics["n_adv"] > 0 and metrics["loss_adv"] > 0  # the counted step ran the whole objective
    assert metrics["skipped_steps"] == 0


def _nan_batch(seed: int) -> Batch:
    batch = _batch(seed=seed)
    batch.latents[0, 0, 0, 0] = float("nan")
    return batch


def test_non_finite_steps_are_skipped_on_the_device_and_counted_at_the_next_read():
    training = _training()
    runner = training.runner
    runner.train_step([_batch(seed=0)])
    weights = {n: p.detach().clone() for n, p in training.model.named_parameters()}
    ema = {n: p.detach().clone() for n, p in training.ema.module.named_parameters()}
    adam_steps = [float(s["step"]) for s in training.optimizer.state.values()]
    runner.train_step([_nan_batch(1)], read_metrics=False)
    assert all(torch.equal(p, weights[n]) for n, p in training.model.named_parameters())
    assert all(torch.equal(p, ema[n]) for n, p in training.ema.module.named_parameters())
    assert [float(s["step"]) for s in training.optimizer.state.values()] == adam_steps  # AdamW did not count it
    metrics = runner.train_step([_batch(seed=2)])
    assert metrics["skipped_steps"] == 1
    assert not all(torch.equal(p, weights[n]) for n, p in training.model.named_parameters())  # good steps apply


def test_a_run_of_non_finite_steps_between_logs_aborts_at_the_next_read():
    runner = _training().runner
    runner.train_step([_batch(seed=0)])
    for seed in range(3):  # train.max_nonfinite_steps=3 in a row, none of them read
        runner.train_step([_nan_batch(seed)], read_metrics=False)
    runner.train_step([_batch(seed=5)], read_metrics=False)  # a good step ends the run, but it happened
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        runner.train_step([_batch(seed=6)])


def test_the_step_skips_nothing_on_finite_losses():
    runner = _training().runner
    history = [runner.train_step([_batch(seed=s)], read_metrics=s % 2 == 1) for s in range(4)]
    assert [m is None for m in history] == [True, False, True, False]
    assert history[-1]["skipped_steps"] == 0 and history[-1]["step_time"] > 0


# --- the fake-sample buffer ------------------------------------------------------------------


def _entry_bytes(buffer_state_lengths: list[int], sample_shape, dim: int, sample_dtype, text_dtype) -> int:
    sample = torch.tensor([], dtype=sample_dtype).element_size() * int(torch.tensor(sample_shape).prod())
    token = torch.tensor([], dtype=text_dtype).element_size() * dim
    return sum(sample + token * n for n in buffer_state_lengths)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)])
def test_the_buffer_checkpoint_holds_just_the_bytes_its_entries_need(dtypes):
    sample_dtype, text_dtype = dtypes
    buffer = FakeSampleBuffer(48, sample_dtype=sample_dtype, text_dtype=text_dtype)
    rng = random.Random(0)
    lengths = []
    for step in range(10):  # views of whole batches, as the objective pushes them (anchors of a batch)
        big = _batch(32, seed=step, lengths=[rng.randint(1, 16) for _ in range(32)])
        anchors = slice(0, 8)
        buffer.push(big.latents[anchors], big.cond.index(anchors))
        lengths += big.cond.mask[anchors].sum(dim=1).tolist()
    kept = lengths[-48:]
    file = io.BytesIO()
    torch.save(buffer.state_dict(), file)
    need = _entry_bytes(kept, (3, 32, 32), 16, sample_dtype, text_dtype)
    ratio = file.tell() / need
    assert ratio <= 1.2, f"{file.tell()} bytes saved for entries that need {need} ({ratio:.2f}x)"
    state = torch.load(io.BytesIO(file.getvalue()), weights_only=True)
    assert state["samples"].dtype == sample_dtype and state["tokens"].dtype == text_dtype
    assert sorted(state["lengths"].tolist()) == sorted(kept)


def test_the_buffer_is_a_fifo_that_restores_exactly():
    buffer = FakeSampleBuffer(5)
    batches = [_batch(3, seed=s, lengths=[4 + s, 2, 16]) for s in range(3)]
    for b in batches:
        buffer.push(b.latents, b.cond)
    assert len(buffer) == 5
    restored = FakeSampleBuffer(1)
    restored.load_state_dict(buffer.state_dict())
    assert len(restored) == 5
    draws = []
    for source in (buffer, restored):
        samples, cond = source.sample(64, torch.Generator().manual_seed(7))
        draws.append((samples, cond))
        held = {tuple(s.flatten()[:4].tolist()) for s in samples}
        newest = {tuple(s.flatten()[:4].tolist()) for b in batches[1:] for s in b.latents}
        newest -= {tuple(batches[1].latents[0].flatten()[:4].tolist())}  # the oldest of the five dropped
        assert held <= newest and len(held) == 5  # only the newest five, every one of them drawn
    (a, ca), (b, cb) = draws
    assert torch.equal(a, b) and torch.equal(ca.embeds, cb.embeds) and torch.equal(ca.mask, cb.mask)
    assert (ca.mask.sum(dim=1) <= 16).all() and set(ca.mask.sum(dim=1).tolist()) <= {4 + 1, 4 + 2, 2, 16}


def test_a_batch_larger_than_the_buffer_keeps_its_newest_rows():
    buffer = FakeSampleBuffer(4)
    big = _batch(10, seed=1)
    buffer.push(big.latents, big.cond)
    samples, _ = buffer.sample(200, torch.Generator().manual_seed(0))
    assert {float(s[0, 0, 0]) for s in samples} == {float(s[0, 0, 0]) for s in big.latents[-4:]}


# --- checkpoints written in the background ---------------------------------------------------


def test_an_async_checkpoint_holds_the_state_of_its_step_not_of_later_ones(tmp_path):
    training = _training()
    runner = training.runner
    runner.train_step([_batch(seed=0)])
    at_save = {n: p.detach().clone() for n, p in training.model.named_parameters()}
    checkpointer = AsyncCheckpointer()
    written = checkpointer.save(tmp_path / "ckpt", training.state, {"runner": runner.extra_state()})
    for seed in range(1, 3):  # training goes on while the shards are written
        runner.train_step([_batch(seed=seed)])
    written.result()
    checkpointer.wait()
    moved = {n: p.detach().clone() for n, p in training.model.named_parameters()}
    assert any(not torch.equal(moved[n], at_save[n]) for n in at_save)
    fresh = _training()
    extra = load_checkpoint(tmp_path / "ckpt", fresh.state)
    assert extra["runner"]["step"] == 1
    assert all(torch.equal(p, at_save[n]) for n, p in fresh.model.named_parameters())


def test_non_finite_generations_are_held_but_never_drawn():
    buffer = FakeSampleBuffer(8)
    good, bad = _batch(4, seed=1), _batch(4, seed=2)
    bad.latents[1:, 0, 0, 0] = float("nan")  # three of four diverged
    buffer.push(good.latents, good.cond)
    buffer.push(bad.latents, bad.cond)
    samples, _ = buffer.sample(400, torch.Generator().manual_seed(0))
    assert torch.isfinite(samples).all()
    assert {float(s[0, 0, 0]) for s in samples} == {float(s[0, 0, 0]) for s in [*good.latents, bad.latents[0]]}
    restored = FakeSampleBuffer(8)
    restored.load_state_dict(buffer.state_dict())
    assert torch.isfinite(restored.sample(400, torch.Generator().manual_seed(0))[0]).all()
