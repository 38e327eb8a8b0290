"""ShapeEval: a GenEval stand-in on procedurally drawn scenes, scored without learned weights.

See ``shared/design/shapes-benchmark.md``. ``scenes`` draws and renders scenes and captions,
``prompts`` holds the fixed evaluation prompts, ``scorer`` detects objects and applies the
six GenEval task rules, ``dataset`` writes and reads training pairs as parquet.
"""
from apex_ray.shapeeval.dataset import decode_images, load_pairs, write_pairs
from apex_ray.shapeeval.intervals import (
    bootstrap_interval,
    bootstrap_intervals,
    overall_from_correct,
    scores_from_correct,
)
from apex_ray.shapeeval.prompts import (
    EVAL_PROMPTS,
    EVAL_PROMPTS_VERSION,
    evaluation_set,
    render_ground_truth,
)
from apex_ray.shapeeval.scenes import (
    COLORS,
    DEFAULT_CANVAS,
    RELATIONS,
    SHAPES,
    TASKS,
    Prompt,
    Scene,
    SceneObject,
    TrainingPair,
    generate_pairs,
    render,
    sample_prompt,
    sample_scene,
)
from apex_ray.shapeeval.scorer import (
    Detection,
    detect,
    detect_batch,
    score_each,
    score_image,
    score_images,
)

__all__ = [
    "COLORS", "DEFAULT_CANVAS", "EVAL_PROMPTS", "EVAL_PROMPTS_VERSION", "RELATIONS", "SHAPES", "TASKS",
    "Detection", "Prompt", "Scene", "SceneObject", "TrainingPair",
    "bootstrap_interval", "bootstrap_intervals", "decode_images", "detect", "detect_batch", "evaluation_set",
    "generate_pairs", "load_pairs", "overall_from_correct",
    "render", "render_ground_truth", "sample_prompt", "sample_scene", "score_each", "score_image", "score_images",
    "scores_from_correct", "write_pairs",
]
