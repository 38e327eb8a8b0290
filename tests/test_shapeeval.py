"""ShapeEval: scenes, captions, the fixed evaluation set, the weight-free scorer and the parquet pairs."""
from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from apex_ray.common.images import images_to_tensor, tensor_to_images
from apex_ray.shapeeval import (
    COLORS,
    EVAL_PROMPTS,
    EVAL_PROMPTS_VERSION,
    RELATIONS,
    SHAPES,
    TASKS,
    Prompt,
    Scene,
    SceneObject,
    dataset,
    detect,
    detect_batch,
    evaluation_set,
    generate_pairs,
    load_pairs,
    render,
    render_ground_truth,
    sample_prompt,
    sample_scene,
    scenes,
    score_each,
    score_image,
    score_images,
    write_pairs,
)
from apex_ray.shapeeval.scenes import BACKGROUND, PALETTE, layout

CANVASES = (32, 64)
SHAPE = "(circle|square|triangle)"
COLOR = "(red|green|blue|yellow|magenta|cyan)"
TEMPLATES = {
    "single_object": rf"a photo of a {SHAPE}",
    "two_object": rf"a photo of a {SHAPE} and a {SHAPE}",
    "counting": rf"a photo of (two|three|four) {SHAPE}s",
    "colors": rf"a photo of a {COLOR} {SHAPE}",
    "position": rf"a photo of a {SHAPE} (left of|right of|above|below) a {SHAPE}",
    "color_attr": rf"a photo of a {COLOR} {SHAPE} and a {COLOR} {SHAPE}",
}


def fresh_seed() -> int:
    return int(np.random.default_rng().integers(2**31))


def fresh_eval_items(seed: int, images_per_prompt: int = 4) -> tuple[list[Prompt], list[int]]:
    """The evaluation prompts with fresh ground-truth seeds."""
    prompts, _ = evaluation_set(images_per_prompt)
    return prompts, [int(s) for s in np.random.default_rng(seed).integers(2**31, size=len(prompts))]


# --- prompts and captions ---------------------------------------------------------------------


def test_eval_prompts_are_fixed_balanced_and_cover_every_task():
    assert EVAL_PROMPTS_VERSION == "v1"
    assert 50 <= len(EVAL_PROMPTS) <= 100
    assert {p.task for p in EVAL_PROMPTS} == set(TASKS)
    assert len({p.caption for p in EVAL_PROMPTS}) == len(EVAL_PROMPTS)
    for task in ("colors", "position", "color_attr"):
        prompts = [p for p in EVAL_PROMPTS if p.task == task]
        assert len(prompts) >= 8
        shape_counts = [sum(p.shapes.count(s) for p in prompts) for s in SHAPES]
        assert len(set(shape_counts)) == 1, (task, shape_counts)
    prompts, seeds = evaluation_set(3)
    assert (prompts, seeds) == evaluation_set(3)
    assert len(prompts) == len(seeds) == 3 * len(EVAL_PROMPTS) and len(set(seeds)) == len(seeds)
    more_seeds = np.array(evaluation_set(5)[1]).reshape(len(EVAL_PROMPTS), 5)
    assert np.array_equal(more_seeds[:, :3], np.array(seeds).reshape(len(EVAL_PROMPTS), 3))


def test_eval_and_training_captions_match_templates():
    rng = np.random.default_rng(fresh_seed())
    prompts = list(EVAL_PROMPTS) + [sample_prompt(t, rng) for t in TASKS for _ in range(50)]
    for prompt in prompts:
        assert re.fullmatch(TEMPLATES[prompt.task], prompt.caption), prompt
    assert Prompt("counting", ("square",), count=3).caption == "a photo of three squares"
    assert Prompt("position", ("square", "triangle"), relation="left of").caption == (
        "a photo of a square left of a triangle"
    )
    assert Prompt("color_attr", ("square", "circle"), ("red", "green")).caption == (
        "a photo of a red square and a green circle"
    )


@pytest.mark.parametrize(
    "bad",
    [
        dict(task="single_object", shapes=("circle", "square")),
        dict(task="counting", shapes=("circle",), count=5),
        dict(task="colors", shapes=("circle",)),
        dict(task="two_object", shapes=("circle", "circle")),
        dict(task="position", shapes=("circle", "square"), relation="behind"),
        dict(task="single_object", shapes=("hexagon",)),
        dict(task="geneval", shapes=("circle",)),
    ],
)
def test_invalid_prompts_are_rejected(bad):
    with pytest.raises(ValueError):
        Prompt(**bad)


# --- scenes and rendering ---------------------------------------------------------------------


@pytest.mark.parametrize("canvas", CANVASES)
def test_scenes_satisfy_prompt_fit_canvas_and_do_not_overlap(canvas):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    size_lo, size_hi, gap, border = layout(canvas)
    for task in TASKS:
        for _ in range(40):
            prompt = sample_prompt(task, rng)
            scene = sample_scene(prompt, rng, canvas)
            objects = scene.objects
            assert len(objects) == len(prompt.shapes) * prompt.count, (seed, prompt)
            assert sorted(o.shape for o in objects) == sorted(prompt.shapes * prompt.count), (seed, prompt)
            for want, obj in zip(prompt.colors * prompt.count, objects):
                assert want in (None, obj.color), (seed, prompt, scene)
            for i, obj in enumerate(objects):
                assert size_lo <= obj.size <= size_hi and abs(obj.size / canvas - 1 / 3) < 0.1, (seed, obj)
                assert border <= obj.x and obj.x + obj.size <= canvas - border, (seed, obj)
                assert border <= obj.y and obj.y + obj.size <= canvas - border, (seed, obj)
                assert all(obj.separated_from(other, gap) for other in objects[i + 1 :]), (seed, scene)
            image = render(scene)
            foreground = (image != BACKGROUND).any(axis=-1)
            assert sum(foreground[o.y : o.y + o.size, o.x : o.x + o.size].sum() for o in objects) == foreground.sum()


def test_placement_failures_are_reported(monkeypatch):
    with pytest.raises(ValueError, match="at least 32"):
        sample_scene(Prompt("single_object", ("circle",)), np.random.default_rng(0), canvas=16)
    monkeypatch.setattr(scenes, "_PLACEMENT_RESTARTS", 0)
    with pytest.raises(RuntimeError, match="could not place 4 objects for 'a photo of four circles'"):
        sample_scene(Prompt("counting", ("circle",), count=4), np.random.default_rng(0))


def test_render_is_deterministic_and_exact():
    scene = Scene((SceneObject("square", "red", 3, 4, 10), SceneObject("circle", "cyan", 18, 18, 11)), 32)
    copy = Scene(tuple(SceneObject(o.shape, o.color, o.x, o.y, o.size) for o in scene.objects), 32)
    first = render(scene)
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
    assert first.tobytes() == render(scene).tobytes() == render(copy).tobytes()
    assert (first[4:14, 3:13] == PALETTE[COLORS.index("red")]).all()
    outside = np.ones((32, 32), dtype=bool)
    outside[4:14, 3:13] = outside[18:29, 18:29] = False
    assert (first[outside] == BACKGROUND).all()
    moved = Scene((SceneObject("square", "red", 4, 4, 10),), 32)
    assert render(moved).tobytes() != render(Scene(scene.objects[:1], 32)).tobytes()


@pytest.mark.parametrize("canvas", CANVASES)
def test_training_pairs_are_reproducible_per_seed(canvas):
    seed = fresh_seed()
    first = list(generate_pairs(24, seed, canvas))
    again = list(generate_pairs(24, seed, canvas))
    tail = list(generate_pairs(4, seed, canvas, start=20))
    other = list(generate_pairs(24, seed + 1, canvas))
    for a, b in zip(first, again):
        assert (a.id, a.task, a.caption) == (b.id, b.task, b.caption) and np.array_equal(a.image, b.image), seed
    assert [p.id for p in tail] == [p.id for p in first[20:]]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(tail, first[20:])), seed
    assert len({p.id for p in first}) == 24
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(first, other)), seed
    assert all(p.image.shape == (canvas, canvas, 3) and re.fullmatch(TEMPLATES[p.task], p.caption) for p in first)


def test_training_pairs_draw_from_all_six_tasks():
    tasks = [p.task for p in generate_pairs(600, fresh_seed())]
    assert all(tasks.count(t) > 50 for t in TASKS), {t: tasks.count(t) for t in TASKS}


def test_tensor_conversion_round_trips():
    images = np.random.default_rng(fresh_seed()).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    tensor = images_to_tensor(images)
    assert tensor.shape == (5, 3, 32, 32) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(tensor_to_images(tensor), images)
    assert np.array_equal(tensor_to_images(images_to_tensor(images[0])), images[0])


# --- scorer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("canvas", CANVASES)
def test_detect_finds_every_rendered_object(canvas):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for _ in range(100):
        scene = sample_scene(sample_prompt(str(rng.choice(TASKS)), rng), rng, canvas)
        found = detect(render(scene))
        assert sorted((d.shape, d.color) for d in found) == sorted((o.shape, o.color) for o in scene.objects), (
            seed, scene, found,
        )
        for obj in scene.objects:
            if obj.shape != "triangle":
                match = [d for d in found if d.box == (obj.x, obj.y, obj.x + obj.size, obj.y + obj.size)]
                assert len(match) == 1 and np.allclose(match[0].centroid, obj.center), (seed, obj, found)


@pytest.mark.parametrize("canvas", CANVASES)
def test_clean_ground_truth_of_the_eval_set_scores_perfectly(canvas):
    prompts, seeds = evaluation_set(4)
    scores = score_images(render_ground_truth(prompts, seeds, canvas), prompts)
    assert scores["overall"] >= 0.99, scores
    assert set(scores) == set(TASKS) | {"overall"}


def test_clean_ground_truth_with_fresh_seeds_scores_perfectly():
    seed = fresh_seed()
    prompts, seeds = fresh_eval_items(seed, images_per_prompt=8)
    scores = score_images(render_ground_truth(prompts, seeds), prompts)
    assert scores["overall"] >= 0.99, (seed, scores)


@pytest.mark.parametrize("canvas", CANVASES)
def test_mild_pixel_noise_keeps_scores_high(canvas):
    seed = fresh_seed()
    prompts, seeds = fresh_eval_items(seed)
    clean = images_to_tensor(render_ground_truth(prompts, seeds, canvas))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    scores = score_images((clean + 0.05 * noise).clamp(-1, 1), prompts)
    assert scores["overall"] >= 0.95, (seed, scores)


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
@pytest.mark.parametrize("canvas", CANVASES)
def test_pure_noise_images_score_near_zero(kind, canvas):
    seed = fresh_seed()
    prompts, _ = evaluation_set(4)
    generator = torch.Generator().manual_seed(seed)
    shape = (len(prompts), 3, canvas, canvas)
    if kind == "uniform":
        noise = torch.rand(shape, generator=generator) * 2 - 1
    else:
        noise = torch.randn(shape, generator=generator)
    scores = score_images(noise.clamp(-1, 1), prompts)
    assert scores["overall"] <= 0.05, (seed, scores)


@pytest.mark.parametrize("fill", [BACKGROUND, np.zeros(3), np.full(3, 128), np.full(3, 255), PALETTE[0]])
def test_blank_images_score_zero(fill):
    prompts, _ = evaluation_set(2)
    images = np.broadcast_to(np.asarray(fill, dtype=np.uint8), (len(prompts), 32, 32, 3)).copy()
    assert score_images(images, prompts)["overall"] <= 0.05
    assert detect_batch(images[:3]) == [[], [], []]


def test_images_scored_against_prompts_for_absent_shapes_score_zero():
    seed = fresh_seed()
    prompts, seeds = fresh_eval_items(seed)
    images = render_ground_truth(prompts, seeds)
    rng = np.random.default_rng(seed)
    wrong = []
    for prompt in prompts:
        candidates = [p for p in EVAL_PROMPTS if p.task != prompt.task and not set(p.shapes) & set(prompt.shapes)]
        wrong.append(candidates[rng.integers(len(candidates))])
    scores = score_images(images, wrong)
    assert scores["overall"] <= 0.05, (seed, scores)


def test_shuffled_image_prompt_pairing_scores_low():
    seed = fresh_seed()
    prompts, seeds = fresh_eval_items(seed)
    images = render_ground_truth(prompts, seeds)
    shuffled = [prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))]
    assert score_images(images, prompts)["overall"] >= 0.99
    scores = score_images(images, shuffled)
    assert scores["overall"] <= 0.4, (seed, scores)


def test_each_rule_rejects_a_near_miss():
    """The right shapes are there but the count, colour or relation is wrong: every task fails."""
    seed = fresh_seed()
    prompts, seeds = fresh_eval_items(seed)
    images = render_ground_truth(prompts, seeds)
    opposite = dict(zip(RELATIONS, ("right of", "left of", "below", "above")))
    checked = {task: 0 for task in ("counting", "colors", "position", "color_attr")}
    for image, prompt in zip(images, prompts):
        if prompt.task == "counting":
            near_misses = [Prompt("counting", prompt.shapes, count=n) for n in (2, 3, 4) if n != prompt.count]
        elif prompt.task == "colors":
            near_misses = [Prompt("colors", prompt.shapes, (c,)) for c in COLORS if c != prompt.colors[0]]
        elif prompt.task == "position":
            near_misses = [
                Prompt("position", prompt.shapes, relation=opposite[prompt.relation]),
                Prompt("position", prompt.shapes[::-1], relation=prompt.relation),
            ]
        elif prompt.task == "color_attr":
            near_misses = [Prompt("color_attr", prompt.shapes, prompt.colors[::-1])]
        else:
            continue
        assert score_image(image, prompt), (seed, prompt)
        for miss in near_misses:
            assert not score_image(image, miss), (seed, prompt, miss)
        checked[prompt.task] += 1
    assert all(checked.values())


def test_tensor_and_uint8_inputs_score_alike():
    prompts, seeds = fresh_eval_items(fresh_seed(), images_per_prompt=1)
    images = render_ground_truth(prompts, seeds)
    tensor = images_to_tensor(images)
    assert np.array_equal(score_each(images, prompts), score_each(tensor, prompts))
    assert detect(images[0]) == detect(tensor[0])
    with pytest.raises(ValueError):
        score_images(images[:2], prompts[:3])
    with pytest.raises(ValueError):
        score_images(images.astype(np.float32), prompts)


def test_scores_cover_present_tasks_only():
    prompt = Prompt("single_object", ("circle",))
    image = render(Scene((SceneObject("circle", "blue", 5, 5, 10),), 32))
    scores = score_images(image[None], [prompt])
    assert scores["single_object"] == scores["overall"] == 1.0
    assert all(np.isnan(scores[t]) for t in TASKS if t != "single_object")


# --- parquet pairs ----------------------------------------------------------------------------


@pytest.mark.parametrize("canvas", CANVASES)
def test_parquet_pairs_round_trip(tmp_path, canvas):
    seed = fresh_seed()
    path = write_pairs(tmp_path / "pairs.parquet", 37, seed=seed, canvas=canvas, rows_per_group=10)
    expected = list(generate_pairs(37, seed, canvas))
    table = pq.read_table(path)
    assert table.column_names == ["id", "image_bytes", "text", "task"]
    assert table.column("id").to_pylist() == [p.id for p in expected]
    assert table.column("text").to_pylist() == [p.caption for p in expected]
    assert table.column("task").to_pylist() == [p.task for p in expected]
    images, captions = load_pairs(path)
    assert images.shape == (37, 3, canvas, canvas) and images.dtype == torch.float32
    assert captions == [p.caption for p in expected]
    assert np.array_equal(tensor_to_images(images), np.stack([p.image for p in expected])), seed
    assert sorted(q.name for q in tmp_path.iterdir()) == ["pairs.parquet"]


def test_parquet_writer_leaves_no_partial_file_on_error(tmp_path, monkeypatch):
    path = tmp_path / "pairs.parquet"
    write_pairs(path, 5, seed=1)
    before = path.read_bytes()
    encode = dataset.encode_png
    calls = []

    def failing_encode(image):
        calls.append(1)
        if len(calls) > 25:
            raise RuntimeError("disk on fire")
        return encode(image)

    monkeypatch.setattr(dataset, "encode_png", failing_encode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_pairs(path, 100, seed=2, rows_per_group=10)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_pairs(tmp_path / "new.parquet", 100, seed=2, rows_per_group=10)
    assert path.read_bytes() == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["pairs.parquet"]
