"""ShapeEval means and 95% bootstrap intervals over prompts and training seeds (numpy only).

The input is per-image correctness ``correct[seed, prompt, image]`` (bool or 0/1 floats): for each
training seed (one trained model per seed), each of the fixed evaluation prompts and each of its
images (the images of a prompt are its fixed sampler seeds, see
:func:`apex_ray.shapeeval.prompts.evaluation_set`). ``tasks[prompt]`` names the prompt's task.

The statistic is ShapeEval's Overall as :func:`apex_ray.shapeeval.scorer.score_images` defines it
for one model: per task the accuracy over that task's images (every prompt has the same number of
images, so it is the mean over the task's prompts of the per-prompt accuracy), and Overall the
mean over the tasks present; over several seeds, the mean of the per-seed values.

:func:`bootstrap_intervals` resamples two things in every replicate, independently: the training
seeds (``n_seeds`` draws with replacement from the seeds) and the prompts, stratified by task
(within each task, as many draws with replacement from that task's prompts as it has, so every
task keeps its count and its weight in Overall). A prompt's images are never split: a drawn prompt
brings all its images (its per-prompt accuracy). The interval is the percentile interval of the
replicates, widened if need be to hold the point estimate (float round-off, tiny samples). With one seed the seed draw is trivial: the interval is over prompts only and says
nothing about seed-to-seed variation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Interval = tuple[float, float, float]  # (mean, lo, hi)


def _as_correct(correct) -> np.ndarray:
    """``correct`` as float ``[seeds, prompts, images]``; a ``[prompts, images]`` array is one seed."""
    array = np.asarray(correct, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"expected correctness [seeds, prompts, images_per_prompt], got shape {array.shape}")
    return array


def task_groups(tasks: Sequence[str], n_prompts: int | None = None) -> dict[str, np.ndarray]:
    """The prompt indices of each task, in first-seen task order."""
    names = np.asarray(list(tasks))
    if n_prompts is not None and len(names) != n_prompts:
        raise ValueError(f"{n_prompts} prompts but {len(names)} task names")
    return {str(t): np.flatnonzero(names == t) for t in dict.fromkeys(names.tolist())}


def _task_means(accuracy: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per task, the mean over seeds (axis -2) and the task's prompt positions (axis -1)."""
    return {t: accuracy[..., idx].mean(axis=(-2, -1)) for t, idx in groups.items()}


def _scores(accuracy: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    per_task = _task_means(accuracy, groups)
    per_task["overall"] = np.mean(np.stack(list(per_task.values())), axis=0)
    return per_task


def scores_from_correct(correct, tasks: Sequence[str]) -> dict[str, float]:
    """Accuracy per task and ``overall`` (mean over tasks), averaged over seeds: per seed what
    :func:`~apex_ray.shapeeval.scorer.score_images` gives (for the tasks present)."""
    array = _as_correct(correct)
    scores = _scores(array.mean(axis=2), task_groups(tasks, array.shape[1]))
    return {t: float(v) for t, v in scores.items()}


def overall_from_correct(correct, tasks: Sequence[str]) -> float:
    """ShapeEval Overall: the mean over tasks of the task's mean per-prompt accuracy, averaged over seeds."""
    return scores_from_correct(correct, tasks)["overall"]


def resample_indices(rng: np.random.Generator, n_seeds: int, groups: dict[str, np.ndarray],
                     n_boot: int) -> tuple[np.ndarray, np.ndarray]:
    """One bootstrap draw per replicate: seed indices ``[n_boot, n_seeds]`` (with replacement) and
    prompt indices ``[n_boot, n_prompts]`` where position ``j`` holds a prompt drawn with replacement
    from the task of prompt ``j`` (stratified: every task keeps its count)."""
    n_prompts = sum(len(idx) for idx in groups.values())
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    prompts = np.empty((n_boot, n_prompts), dtype=np.int64)
    for idx in groups.values():
        prompts[:, idx] = idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))]
    return seeds, prompts


def bootstrap_intervals(correct, tasks: Sequence[str], n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> dict[str, Interval]:
    """``(mean, lo, hi)`` per task and for ``overall``: the point estimate
    (:func:`scores_from_correct`) and the ``level`` percentile interval of ``n_boot`` replicates,
    each resampling the seeds and, independently, the prompts within each task (module docstring).
    Deterministic for a given ``seed``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    array = _as_correct(correct)
    groups = task_groups(tasks, array.shape[1])
    accuracy = array.mean(axis=2)  # [seeds, prompts]: a prompt's images stay together
    point = _scores(accuracy, groups)
    rng = np.random.default_rng(seed)
    out: dict[str, Interval] = {}
    chunk = max(1, 2_000_000 // max(1, accuracy.size))  # bound the [chunk, seeds, prompts] replicate array
    replicates: dict[str, list[np.ndarray]] = {t: [] for t in point}
    for start in range(0, n_boot, chunk):
        seeds, prompts = resample_indices(rng, accuracy.shape[0], groups, min(chunk, n_boot - start))
        drawn = accuracy[seeds[:, :, None], prompts[:, None, :]]  # [chunk, seeds, prompts]
        for t, values in _scores(drawn, groups).items():
            replicates[t].append(values)
    tail = (1 - level) / 2
    for t, values in replicates.items():
        lo, hi = np.quantile(np.concatenate(values), [tail, 1 - tail])
        mean = float(point[t])
        out[t] = (mean, min(float(lo), mean), max(float(hi), mean))
    return out


def bootstrap_interval(correct, tasks: Sequence[str], n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> Interval:
    """``(mean, lo, hi)`` of Overall: see :func:`bootstrap_intervals`."""
    return bootstrap_intervals(correct, tasks, n_boot, seed, level)["overall"]
