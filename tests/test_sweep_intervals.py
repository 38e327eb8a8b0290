"""ShapeEval intervals (apex_ray.shapeeval.intervals) and the sweeps' seeds, offline scores and
interval tables (sweeps/tuning.py). Fast: no Ray, no training, no model."""
from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest

from apex_ray.shapeeval import EVAL_PROMPTS, TASKS, evaluation_set
from apex_ray.shapeeval import intervals as iv
from apex_ray.shapeeval import scorer
from sweeps import condition_shift, loss_weights
from sweeps.tuning import (
    SweepError,
    TrialOutcome,
    build_trial_config,
    find_export,
    grid_table,
    grid_trial_params,
    per_task_table,
    render,
    score_outcomes,
    slug,
    summarize,
    trials_csv,
)

PROMPT_TASKS = [p.task for p in EVAL_PROMPTS]
INTERVAL = re.compile(r"^(\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\]")


def random_correct(rng, seeds: int, images: int, p=None) -> np.ndarray:
    """Bernoulli correctness [seeds, 54 prompts, images], prompt p drawn per prompt unless given."""
    rate = rng.uniform(0.1, 0.9, size=(1, len(EVAL_PROMPTS), 1)) if p is None else p
    return rng.random((seeds, len(EVAL_PROMPTS), images)) < rate


def test_overall_matches_score_images_per_seed(monkeypatch):
    assert len(EVAL_PROMPTS) == 54 and set(PROMPT_TASKS) == set(TASKS)
    rng = np.random.default_rng(1)
    images = 4
    correct = random_correct(rng, 3, images)
    prompts, _ = evaluation_set(images)
    per_seed = []
    for s in range(3):
        flat = correct[s].reshape(-1)  # evaluation_set: each prompt's images in a row, prompt by prompt
        monkeypatch.setattr(scorer, "score_each", lambda imgs, ps, flat=flat: flat)
        per_seed.append(scorer.score_images(np.zeros((len(prompts), 1, 1, 3), np.uint8), prompts))
        ours = iv.scores_from_correct(correct[s], PROMPT_TASKS)
        for task in (*TASKS, "overall"):
            assert ours[task] == pytest.approx(per_seed[-1][task], abs=1e-12), task
    assert iv.overall_from_correct(correct, PROMPT_TASKS) == pytest.approx(
        np.mean([r["overall"] for r in per_seed]), abs=1e-12)


def test_bootstrap_contains_the_mean_and_is_deterministic():
    rng = np.random.default_rng(2)
    correct = random_correct(rng, 3, 4)
    mean, lo, hi = iv.bootstrap_interval(correct, PROMPT_TASKS, n_boot=500, seed=3)
    assert lo < mean < hi
    assert mean == pytest.approx(iv.overall_from_correct(correct, PROMPT_TASKS))
    assert iv.bootstrap_interval(correct, PROMPT_TASKS, n_boot=500, seed=3) == (mean, lo, hi)
    assert iv.bootstrap_interval(correct, PROMPT_TASKS, n_boot=500, seed=4) != (mean, lo, hi)
    per_task = iv.bootstrap_intervals(correct, PROMPT_TASKS, n_boot=500, seed=3)
    assert set(per_task) == {*TASKS, "overall"} and per_task["overall"] == (mean, lo, hi)
    for task in TASKS:
        m, low, high = per_task[task]
        assert low <= m <= high


def test_interval_shrinks_as_seeds_and_images_grow():
    rng = np.random.default_rng(5)
    widths = []
    for seeds, images in ((1, 1), (2, 4), (8, 16)):
        _, lo, hi = iv.bootstrap_interval(random_correct(rng, seeds, images, p=0.5), PROMPT_TASKS, n_boot=400)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0, widths


def test_interval_is_degenerate_when_every_image_is_correct():
    ones = np.ones((3, len(EVAL_PROMPTS), 4), dtype=bool)
    assert iv.bootstrap_interval(ones, PROMPT_TASKS, n_boot=200) == (1.0, 1.0, 1.0)
    zeros = np.zeros((2, len(EVAL_PROMPTS), 4))
    assert iv.bootstrap_interval(zeros, PROMPT_TASKS, n_boot=200) == (0.0, 0.0, 0.0)


def test_resampling_keeps_each_tasks_prompt_count(monkeypatch):
    groups = iv.task_groups(PROMPT_TASKS)
    seeds, prompts = iv.resample_indices(np.random.default_rng(0), 3, groups, 300)
    names = np.array(PROMPT_TASKS)
    assert seeds.shape == (300, 3) and seeds.min() >= 0 and seeds.max() == 2
    assert prompts.shape == (300, 54)
    assert (names[prompts] == names[None, :]).all()  # position j holds a prompt of j's task
    assert len({tuple(row) for row in prompts}) > 1  # and it does resample
    # The bootstrap uses exactly these draws (a spy on the resampler it calls).
    calls = []
    real = iv.resample_indices

    def spy(rng, n_seeds, groups, n_boot):
        calls.append(real(rng, n_seeds, groups, n_boot))
        return calls[-1]

    monkeypatch.setattr(iv, "resample_indices", spy)
    iv.bootstrap_interval(random_correct(np.random.default_rng(1), 2, 2), PROMPT_TASKS, n_boot=100)
    assert calls and all((names[p] == names[None, :]).all() and s.shape[1] == 2 for s, p in calls)
    assert sum(len(s) for s, _ in calls) == 100


def test_one_seed_interval_is_over_prompts_only():
    rng = np.random.default_rng(7)
    one = random_correct(rng, 1, 4)
    mean, lo, hi = iv.bootstrap_interval(one[0], PROMPT_TASKS, n_boot=300)  # [prompts, images] is one seed
    assert (mean, lo, hi) == iv.bootstrap_interval(one, PROMPT_TASKS, n_boot=300)
    assert lo < mean < hi
    with pytest.raises(ValueError, match="task names"):
        iv.bootstrap_interval(one[:, :10], PROMPT_TASKS)


def sweep_of(tmp_path, *argv):
    return condition_shift.build(condition_shift.arguments().parse_args(["--output-dir", str(tmp_path), *argv]))


def test_seeds_give_one_trial_per_cell_and_seed(tmp_path):
    sweep = sweep_of(tmp_path, "--a=-1,0.5", "--b=0.1", "--seeds", "0,1,2")
    assert sweep.seeds == [0, 1, 2] and sweep.images_per_prompt == 4 and sweep.trial_count == 6
    params = grid_trial_params(sweep)
    assert [p["label"] for p in params[:3]] == ["a=-1.0 b=0.1 seed=0", "a=-1.0 b=0.1 seed=1", "a=-1.0 b=0.1 seed=2"]
    assert len({p["label"] for p in params}) == 6
    by_cell = {}
    for p in params:
        config = build_trial_config(sweep, p["label"], p["overrides"], "sqlite:///x.db", None)
        by_cell.setdefault(p["cell_label"], []).append(config.train.seed)
        assert config.objective.apex.shift_a == p["overrides"]["objective.apex.shift_a"]
        assert config.output_dir.endswith(f"trials/{slug(p['label'])}")
    assert by_cell == {"a=-1.0 b=0.1": [0, 1, 2], "a=0.5 b=0.1": [0, 1, 2]}
    # Without --seeds: one trial per cell under the cell's own label, at the config's seed.
    single = sweep_of(tmp_path, "--a=-1", "--b=0.1", "train.seed=7")
    assert single.seeds == [7]
    assert [(p["label"], p["overrides"]["train.seed"]) for p in grid_trial_params(single)] == [("a=-1.0 b=0.1", 7)]


def test_bad_seed_options_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        condition_shift.arguments().parse_args(["--seeds", "0,0"])
    with pytest.raises(SystemExit):
        condition_shift.arguments().parse_args(["--seeds", "a"])
    code = condition_shift.main(["--output-dir", str(tmp_path), "--search", "optuna", "--trials", "2",
                                 "--seeds", "0,1"])
    assert code == 2 and "--search grid" in capsys.readouterr().err
    assert loss_weights.main(["--output-dir", str(tmp_path), "--images-per-prompt", "0"]) == 2
    assert "--images-per-prompt" in capsys.readouterr().err
    from sweeps.tuning import validate

    sweep = sweep_of(tmp_path, "--a=-1", "--b=0.1")
    sweep.seeds = [1, 1]
    with pytest.raises(SweepError, match="distinct seeds"):
        validate(sweep)


def outcomes_for(sweep, failed: set[str] = frozenset()) -> list[TrialOutcome]:
    rng = np.random.default_rng(11)
    out = []
    for label, cell, seed in sweep.grid_trials():
        status = "failed" if label in failed else "ok"
        o = TrialOutcome(label, cell.row, cell.column, {**cell.overrides, "train.seed": seed}, status,
                         {"overall": 0.4} if status == "ok" else {}, cell=cell.label, seed=seed)
        if status == "ok":
            o.correct = {(role, 1): random_correct(rng, 1, sweep.images_per_prompt)[0] for role in ("ema", "student")}
        out.append(o)
    return out


def test_tables_show_mean_and_interval_per_cell(tmp_path):
    sweep = sweep_of(tmp_path, "--a=-1", "--b=0.1,1", "--seeds", "0,1")
    outcomes = outcomes_for(sweep, failed={"a=-1.0 b=1.0 seed=1"})
    cells = summarize(outcomes, n_boot=200)
    assert [c.label for c in cells] == ["a=-1.0 b=0.1", "a=-1.0 b=1.0"]
    assert [len(c.ok) for c in cells] == [2, 1]
    table = grid_table(cells, ["-1.0"], ["0.1", "1.0"], "a \\ b").splitlines()
    assert table[0] == "| a \\ b | 0.1 | 1.0 |"
    values = [v.strip() for v in table[2].strip("|").split("|")][1:]
    for value in values:
        mean, lo, hi = (float(x) for x in INTERVAL.match(value).groups())
        assert 0 <= lo <= mean <= hi <= 1
    assert values[1].endswith("(1/2 seeds)")
    expected = iv.bootstrap_interval(np.stack([o.correct[("ema", 1)] for o in outcomes[:2]]), PROMPT_TASKS,
                                     n_boot=200)
    assert values[0] == f"{expected[0]:.3f} [{expected[1]:.3f}, {expected[2]:.3f}]"
    student = grid_table(cells, ["-1.0"], ["0.1", "1.0"], "a \\ b", role="student").splitlines()[2]
    assert student != table[2] and INTERVAL.match(student.split("|")[2].strip())
    tasks = per_task_table(cells).splitlines()
    assert tasks[0].startswith("| trial | status | seeds | single_object |")
    assert tasks[2].startswith("| a=-1.0 b=0.1 | ok | 2/2 | ") and tasks[3].startswith("| a=-1.0 b=1.0 | ok | 1/2 | ")
    text = render(sweep, outcomes)
    assert "54 prompts x 4 images per prompt" in text and "training seeds 0,1" in text
    assert "2000 replicates" in text and "student (export/student)" in text
    assert "| a=-1.0 b=1.0 seed=1 | 1 | failed |" in text  # the per-trial table
    rows = list(csv.DictReader(io.StringIO(trials_csv(outcomes, n_boot=200))))
    assert [r["record"] for r in rows] == ["trial"] * 4 + ["cell"] * 2
    assert rows[0]["seed"] == "0" and rows[0]["ema_nfe1_overall"] and not rows[0]["ema_nfe1_overall_lo"]
    assert rows[4]["seed"] == "0;1" and rows[5]["seeds_ok"] == "1"
    assert float(rows[4]["ema_nfe1_overall_lo"]) <= float(rows[4]["ema_nfe1_overall"]) <= float(
        rows[4]["ema_nfe1_overall_hi"])
    assert float(rows[4]["ema_nfe1_overall"]) == pytest.approx(expected[0], abs=1e-4)


def test_one_seed_says_the_interval_is_over_prompts_only(tmp_path):
    sweep = sweep_of(tmp_path, "--a=-1", "--b=0.1")
    text = render(sweep, outcomes_for(sweep))
    assert "over prompts only" in text and "training seeds 0 " in text
    # Without offline scores: the training-time Overall, as before seeds and intervals.
    plain = [TrialOutcome("a=-1.0 b=0.1", "-1.0", "0.1", {}, "ok", {"overall": 0.5})]
    assert "| -1.0 | 0.500 |" in render(sweep, plain)
    assert "No exported weights were scored" in render(sweep, plain)


def test_exports_are_found_scored_and_cached(tmp_path):
    sweep = sweep_of(tmp_path, "--a=-1", "--b=0.1,1", "--seeds", "0,1", "--also-nfe", "2")
    assert sweep.scored_nfe == [1, 2]
    outcomes = outcomes_for(sweep)
    for o in outcomes:
        o.correct = {}
    export = tmp_path / sweep.name / "trials" / slug(outcomes[0].label) / "ray" / "run" / "step_0000003" / "export"
    (export / "ema").mkdir(parents=True)
    (export / "student").mkdir()
    assert find_export(sweep, outcomes[0].label) == str(export)
    assert find_export(sweep, outcomes[1].label) is None
    outcomes[0].export_path = str(export)
    calls = []

    def fake(folder, images_per_prompt, nfe):
        calls.append((folder.rsplit("/", 1)[-1], nfe))
        return np.ones((54, images_per_prompt), dtype=bool)

    score_outcomes(sweep, outcomes, fake)
    assert sorted(calls) == [("ema", 1), ("ema", 2), ("student", 1), ("student", 2)]
    assert set(outcomes[0].correct) == {("ema", 1), ("ema", 2), ("student", 1), ("student", 2)}
    assert outcomes[0].correct[("ema", 1)].shape == (54, 4) and not outcomes[1].correct
    again = outcomes_for(sweep)
    for o in again:
        o.correct = {}
    again[0].export_path = str(export)
    score_outcomes(sweep, again, lambda *a: pytest.fail("scored twice"))  # the cache answers
    assert again[0].correct[("student", 2)].all()
    # A cell whose seeds are not all scored shows no interval (the training-time mean instead).
    cells = summarize(outcomes)
    assert not cells[0].intervals and cells[0].mean("ema", 1) == pytest.approx(0.4)
