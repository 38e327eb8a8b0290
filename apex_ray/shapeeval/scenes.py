"""Scene specs, prompts with their GenEval-style captions, a seeded scene generator and a
deterministic renderer for ShapeEval.

A scene is a list of objects (shape, colour, top-left corner, size) on a square canvas with a
plain dark background. Objects are axis-aligned: a square fills its box, a circle is inscribed
in it and a triangle stands upright with its apex at the top-centre of the box and its base
on the box's bottom edge. Rendering samples pixel centres, so it is exact and reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
PALETTE = np.array(
    [[230, 50, 50], [50, 200, 70], [60, 90, 235], [235, 215, 50], [215, 60, 215], [50, 210, 220]],
    dtype=np.uint8,
)
BACKGROUND = np.array([24, 24, 32], dtype=np.uint8)
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
DEFAULT_CANVAS = 32
MIN_CANVAS = 32

_SHAPES_PER_TASK = {
    "single_object": 1, "two_object": 2, "counting": 1, "colors": 1, "position": 2, "color_attr": 2,
}
_PLACEMENT_TRIES = 50
_PLACEMENT_RESTARTS = 200


@dataclass(frozen=True)
class Prompt:
    """What a caption asks for: the named shapes (caption order) and, per shape, a colour or None.

    ``count`` is the exact number asked for (counting only, 2 to 4); ``relation`` says where
    ``shapes[0]`` lies relative to ``shapes[1]`` (position only).
    """

    task: str
    shapes: tuple[str, ...]
    colors: tuple[str | None, ...] = ()
    count: int = 1
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if not self.colors:
            object.__setattr__(self, "colors", (None,) * len(self.shapes))
        if len(self.shapes) != _SHAPES_PER_TASK[self.task] or len(self.colors) != len(self.shapes):
            raise ValueError(f"{self.task} needs {_SHAPES_PER_TASK[self.task]} shape(s), one colour slot each: {self}")
        if any(s not in SHAPES for s in self.shapes) or any(c not in COLORS + (None,) for c in self.colors):
            raise ValueError(f"unknown shape or colour in {self}")
        needs_colors = self.task in ("colors", "color_attr")
        if any((c is not None) != needs_colors for c in self.colors):
            raise ValueError(f"{self.task} prompts {'need' if needs_colors else 'take no'} colours: {self}")
        if (self.task == "counting") != (self.count in COUNT_WORDS) or (self.task != "counting" and self.count != 1):
            raise ValueError(f"count must be 2..4 for counting and 1 otherwise: {self}")
        if (self.relation is not None) != (self.task == "position") or self.relation not in RELATIONS + (None,):
            raise ValueError(f"relation must be one of {RELATIONS} for position prompts only: {self}")
        if len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"two-object prompts name two different shapes: {self}")

    @property
    def caption(self) -> str:
        """The GenEval template caption, e.g. ``a photo of a red square and a green circle``."""
        named = [f"{c} {s}" if c else s for s, c in zip(self.shapes, self.colors)]
        if self.task == "counting":
            return f"a photo of {COUNT_WORDS[self.count]} {self.shapes[0]}s"
        if self.task == "position":
            return f"a photo of a {named[0]} {self.relation} a {named[1]}"
        return "a photo of " + " and ".join(f"a {n}" for n in named)


@dataclass(frozen=True)
class SceneObject:
    """One object: ``shape``, ``color`` and its square box ``[x, x + size) x [y, y + size)`` in pixels."""

    shape: str
    color: str
    x: int
    y: int
    size: int

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the object's box, (x, y) in pixel coordinates."""
        return (self.x + self.size / 2, self.y + self.size / 2)

    def separated_from(self, other: "SceneObject", gap: int) -> bool:
        """True if the two boxes are at least ``gap`` pixels apart along x or along y."""
        return (
            self.x + self.size + gap <= other.x
            or other.x + other.size + gap <= self.x
            or self.y + self.size + gap <= other.y
            or other.y + other.size + gap <= self.y
        )


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image: its objects on a ``canvas`` x ``canvas`` background."""

    objects: tuple[SceneObject, ...]
    canvas: int = DEFAULT_CANVAS


@dataclass(frozen=True)
class TrainingPair:
    """One generated image-caption pair; ``id`` is stable for a given (seed, index)."""

    id: str
    task: str
    caption: str
    image: np.ndarray = field(repr=False)


def layout(canvas: int) -> tuple[int, int, int, int]:
    """(min size, max size, gap between objects, border) in pixels for a canvas side."""
    if canvas < MIN_CANVAS:
        raise ValueError(f"canvas must be at least {MIN_CANVAS} pixels, got {canvas}")
    return round(0.28 * canvas), round(0.34 * canvas), max(1, canvas // 16), max(1, canvas // 32)


def sample_prompt(task: str, rng: np.random.Generator) -> Prompt:
    """A random prompt of ``task`` over the whole vocabulary (training captions)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    shapes = tuple(str(s) for s in rng.choice(SHAPES, size=_SHAPES_PER_TASK[task], replace=False))
    if task == "counting":
        return Prompt(task, shapes, count=int(rng.integers(2, 5)))
    if task == "position":
        return Prompt(task, shapes, relation=str(rng.choice(RELATIONS)))
    if task in ("colors", "color_attr"):
        return Prompt(task, shapes, tuple(str(c) for c in rng.choice(COLORS, size=len(shapes), replace=False)))
    return Prompt(task, shapes)


def relation_holds_clearly(a: SceneObject, b: SceneObject, relation: str, gap: int) -> bool:
    """Ground-truth placement rule: ``a`` is ``relation`` ``b`` with a wide margin.

    The boxes are at least ``gap`` apart along the relation's axis and the centres' offset
    across that axis is at most half their offset along it, so a detector-based check with a
    margin (see ``scorer``) holds for any shape.
    """
    (ax, ay), (bx, by) = a.center, b.center
    along, across = {"left of": (bx - ax, ay - by), "right of": (ax - bx, ay - by),
                     "above": (by - ay, ax - bx), "below": (ay - by, ax - bx)}[relation]
    return along >= (a.size + b.size) / 2 + gap and abs(across) <= along / 2


def sample_scene(prompt: Prompt, rng: np.random.Generator, canvas: int = DEFAULT_CANVAS) -> Scene:
    """A random scene that satisfies ``prompt``: objects of random size (about a third of the
    canvas side) at random, non-overlapping positions; unnamed colours are random.

    Placement is rejection sampling with a bounded number of tries; ``RuntimeError`` if it fails.
    """
    size_lo, size_hi, gap, border = layout(canvas)
    shapes = prompt.shapes * prompt.count
    colors = [c if c is not None else str(rng.choice(COLORS)) for c in prompt.colors * prompt.count]
    for _ in range(_PLACEMENT_RESTARTS):
        objects: list[SceneObject] = []
        for shape, color in zip(shapes, colors):
            size = int(rng.integers(size_lo, size_hi + 1))
            for _ in range(_PLACEMENT_TRIES):
                x, y = (int(v) for v in rng.integers(border, canvas - border - size + 1, size=2))
                candidate = SceneObject(shape, color, x, y, size)
                if all(candidate.separated_from(o, gap) for o in objects):
                    objects.append(candidate)
                    break
            else:
                break
        placed = len(objects) == len(shapes)
        if placed and (prompt.relation is None or relation_holds_clearly(*objects, prompt.relation, gap)):
            return Scene(tuple(objects), canvas)
    raise RuntimeError(
        f"could not place {len(shapes)} objects for {prompt.caption!r} on a {canvas}x{canvas} canvas "
        f"after {_PLACEMENT_RESTARTS} restarts of {_PLACEMENT_TRIES} tries per object"
    )


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of a shape in its box, sampled at pixel centres."""
    px = np.arange(size) + 0.5
    dx, dy = px[None, :] - size / 2, px[:, None]
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return dx**2 + (dy - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "triangle":
        return np.abs(dx) <= dy / 2
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 ``[H, W, 3]`` image; deterministic given the spec."""
    image = np.empty((scene.canvas, scene.canvas, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        box = image[obj.y : obj.y + obj.size, obj.x : obj.x + obj.size]
        box[shape_mask(obj.shape, obj.size)] = PALETTE[COLORS.index(obj.color)]
    return image


def pair_id(seed: int, index: int) -> str:
    """Stable id of training pair ``index`` of generator ``seed``."""
    return f"shapeeval-s{seed}-{index:08d}"


def generate_pair(seed: int, index: int, canvas: int = DEFAULT_CANVAS) -> TrainingPair:
    """Training pair ``index`` of generator ``seed``: a uniformly drawn task, a random prompt of
    it and a rendered scene. Depends only on (seed, index, canvas)."""
    rng = np.random.default_rng([seed, index])
    task = str(rng.choice(TASKS))
    prompt = sample_prompt(task, rng)
    return TrainingPair(pair_id(seed, index), task, prompt.caption, render(sample_scene(prompt, rng, canvas)))


def generate_pairs(n: int, seed: int = 0, canvas: int = DEFAULT_CANVAS, start: int = 0) -> Iterator[TrainingPair]:
    """Pairs ``start .. start + n - 1`` of generator ``seed`` (a prefix never changes with ``n``)."""
    for index in range(start, start + n):
        yield generate_pair(seed, index, canvas)
