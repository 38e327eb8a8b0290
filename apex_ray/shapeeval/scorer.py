"""Weight-free ShapeEval scorer: segment by palette, find objects, apply GenEval's task rules.

1. Segment: every pixel takes the nearest palette colour if that is nearer than the
   background and within ``COLOR_TOLERANCE``, else it is background (a lookup table on
   5-bit-quantised RGB, so the whole batch is one indexing operation).
2. Objects: 8-connected components of each colour (one ``scipy.ndimage.label`` call for the
   whole batch); specks below ``MIN_AREA_FRACTION`` of the canvas and boxes far from the
   benchmark's object size are dropped.
3. Shape from the component's geometry: fill ratio of its bounding box (square 1, circle
   ~0.8, triangle ~0.5) and how low its centroid sits in the box (an upright triangle's
   centroid is at ~2/3 of its height, a circle's and a square's at 1/2).
4. Task rules as GenEval's (see ``satisfies``); accuracy per task and Overall = their mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from apex_ray.common.images import tensor_to_images
from apex_ray.shapeeval.scenes import (
    BACKGROUND,
    COLORS,
    PALETTE,
    SHAPES,
    TASKS,
    Prompt,
)

COLOR_TOLERANCE = 80.0
MIN_AREA_FRACTION = 12 / 1024
BOX_SIDE_RANGE = (0.15, 0.6)
MAX_ASPECT = 1.5
POSITION_MARGIN = 0.1

_QUANT_BITS = 5
_QUANT_SHIFT = 8 - _QUANT_BITS
_PLANAR_8_CONNECTIVITY = np.zeros((3, 3, 3, 3), dtype=bool)
_PLANAR_8_CONNECTIVITY[1, 1] = True
_PIXELS_PER_CHUNK = 1 << 20


@dataclass(frozen=True)
class Detection:
    """One object found in an image: ``centroid`` (x, y) and ``box`` (x0, y0, x1, y1), exclusive end, in pixels."""

    shape: str
    color: str
    centroid: tuple[float, float]
    area: int
    box: tuple[int, int, int, int]


def _palette_lookup_table() -> np.ndarray:
    """Colour index + 1 (0 = background) for every 5-bit-quantised RGB value, flattened."""
    levels = (np.arange(1 << _QUANT_BITS) << _QUANT_SHIFT) + (1 << _QUANT_SHIFT) / 2
    rgb = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    references = np.concatenate([BACKGROUND[None], PALETTE]).astype(np.float64)
    distances = np.linalg.norm(rgb[:, None, :] - references[None, :, :], axis=-1)
    nearest = distances.argmin(axis=1)
    nearest[distances.min(axis=1) > COLOR_TOLERANCE] = 0
    return nearest.astype(np.uint8)


_PALETTE_LUT = _palette_lookup_table()


def as_uint8_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` from uint8 ``[N, H, W, 3]`` numpy or a float ``[N, 3, H, W]`` tensor in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"expected a float [N, 3, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
        return tensor_to_images(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
    return images


def segment(images: np.ndarray) -> np.ndarray:
    """Per-pixel colour index + 1 (0 = background), uint8 ``[N, H, W]``, for uint8 ``[N, H, W, 3]`` images."""
    q = (images >> _QUANT_SHIFT).astype(np.intp)
    return _PALETTE_LUT[(q[..., 0] << (2 * _QUANT_BITS)) | (q[..., 1] << _QUANT_BITS) | q[..., 2]]


def _classify(fill: np.ndarray, centroid_depth: np.ndarray) -> np.ndarray:
    """Shape index per component (-1 = none) from bounding-box fill ratio and relative centroid depth."""
    shape = np.full(fill.shape, -1, dtype=np.int64)
    level = np.abs(centroid_depth - 0.5) <= 0.045
    shape[level & (fill >= 0.9)] = SHAPES.index("square")
    shape[level & (fill >= 0.6) & (fill < 0.9)] = SHAPES.index("circle")
    low = (centroid_depth >= 0.555) & (centroid_depth <= 0.75)
    shape[low & (fill >= 0.35) & (fill < 0.82)] = SHAPES.index("triangle")
    return shape


def detect_batch(images: np.ndarray | torch.Tensor) -> list[list[Detection]]:
    """The objects found in each image of a batch (see the module docstring)."""
    images = as_uint8_images(images)
    chunk = max(1, _PIXELS_PER_CHUNK // (images.shape[1] * images.shape[2]))
    return [d for start in range(0, len(images), chunk) for d in _detect_chunk(images[start : start + chunk])]


def _detect_chunk(images: np.ndarray) -> list[list[Detection]]:
    """``detect_batch`` on one chunk of images (chunks bound the memory of the component labels)."""
    n, height, width, _ = images.shape
    labels = segment(images)
    planes = labels[:, None] == np.arange(1, len(COLORS) + 1, dtype=np.uint8)[None, :, None, None]
    components, count = ndimage.label(planes, structure=_PLANAR_8_CONNECTIVITY)
    detections: list[list[Detection]] = [[] for _ in range(n)]
    if count == 0:
        return detections
    flat = components.ravel()
    pixels = np.flatnonzero(flat)
    component = flat[pixels] - 1
    order = np.argsort(component, kind="stable")
    pixels, component = pixels[order], component[order]
    area = np.bincount(component, minlength=count)
    starts = np.concatenate([[0], np.cumsum(area)[:-1]])
    x = pixels % width
    y = (pixels // width) % height
    plane = pixels[starts] // (height * width)
    x0, x1 = np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts) + 1
    y0, y1 = np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts) + 1
    box_w, box_h = x1 - x0, y1 - y0
    cx = np.bincount(component, weights=x, minlength=count) / area + 0.5
    cy = np.bincount(component, weights=y, minlength=count) / area + 0.5
    shape = _classify(area / (box_w * box_h), (cy - y0) / box_h)
    side_lo, side_hi = BOX_SIDE_RANGE[0] * min(height, width), BOX_SIDE_RANGE[1] * max(height, width)
    keep = (
        (shape >= 0)
        & (area >= MIN_AREA_FRACTION * height * width)
        & (np.minimum(box_w, box_h) >= side_lo)
        & (np.maximum(box_w, box_h) <= side_hi)
        & (np.maximum(box_w, box_h) <= MAX_ASPECT * np.minimum(box_w, box_h))
    )
    for i in np.flatnonzero(keep):
        image_index, color_index = divmod(int(plane[i]), len(COLORS))
        detections[image_index].append(
            Detection(
                SHAPES[shape[i]], COLORS[color_index], (float(cx[i]), float(cy[i])), int(area[i]),
                (int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i])),
            )
        )
    return detections


def detect(image: np.ndarray | torch.Tensor) -> list[Detection]:
    """The objects found in one uint8 ``[H, W, 3]`` image or float ``[3, H, W]`` tensor in [-1, 1]."""
    return detect_batch(image[None])[0]


def relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    """GenEval's relative-position test of ``a`` ``relation`` ``b`` on centroids, plus dominance.

    The centroid offset is shrunk towards 0 by ``POSITION_MARGIN`` times the summed box sizes
    per axis; the shrunk component along the relation's axis must have the right sign, exceed
    half the offset's length (GenEval) and exceed the shrunk component across the axis.
    """
    offset = np.subtract(a.centroid, b.centroid)
    sizes = np.add(np.subtract(a.box[2:], a.box[:2]), np.subtract(b.box[2:], b.box[:2]))
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - POSITION_MARGIN * sizes, 0.0)
    axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]
    along, across = sign * shrunk[axis], abs(shrunk[1 - axis])
    return bool(along > 0.5 * np.linalg.norm(offset) and along > across)


def satisfies(detections: list[Detection], prompt: Prompt) -> bool:
    """GenEval's rule for ``prompt.task`` on one image's detections.

    single_object / two_object: every named shape is present; counting: exactly ``count`` of
    the shape; colors / color_attr: for every named shape, an object of that shape has the
    named colour; position: both shapes present and the largest object of the first is
    ``relation`` the largest of the second (GenEval uses its most confident detections).
    """
    def found(shape: str, color: str | None) -> list[Detection]:
        return [d for d in detections if d.shape == shape and color in (None, d.color)]

    if prompt.task == "counting":
        return len(found(prompt.shapes[0], None)) == prompt.count
    matches = [found(s, c) for s, c in zip(prompt.shapes, prompt.colors)]
    if not all(matches):
        return False
    if prompt.task == "position":
        a, b = (max(m, key=lambda d: d.area) for m in matches)
        return relation_holds(a, b, prompt.relation)
    return True


def score_each(images: np.ndarray | torch.Tensor, prompts: list[Prompt]) -> np.ndarray:
    """Whether each image satisfies its prompt, bool ``[N]``."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return np.array([satisfies(d, p) for d, p in zip(detect_batch(images), prompts)], dtype=bool)


def score_image(image: np.ndarray | torch.Tensor, prompt: Prompt) -> bool:
    """Whether one image (uint8 ``[H, W, 3]`` or float ``[3, H, W]`` in [-1, 1]) satisfies ``prompt``."""
    return bool(score_each(image[None], [prompt])[0])


def score_images(images: np.ndarray | torch.Tensor, prompts: list[Prompt]) -> dict[str, float]:
    """Accuracy per task and ``overall`` = mean over the tasks present; absent tasks are NaN.

    ``images``: uint8 ``[N, H, W, 3]`` or a float ``[N, 3, H, W]`` tensor in [-1, 1]; one prompt per image.
    """
    correct = score_each(images, prompts)
    tasks = np.array([p.task for p in prompts])
    scores = {t: float(correct[tasks == t].mean()) if (tasks == t).any() else float("nan") for t in TASKS}
    present = [scores[t] for t in TASKS if (tasks == t).any()]
    scores["overall"] = float(np.mean(present)) if present else float("nan")
    return scores
