"""Evaluation extras: an eval.prompts file (checked at config load, its grids at every grid NFE),
captioned sample grids, and the at-start evaluation switch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_ray.config import ConfigError, load_config
from apex_ray.engine.evaluation import GRID_BACKGROUND, EvalPrompts, evaluate_during_training, image_grid
from apex_ray.method.conditioning import Conditioning


def test_prompt_file_is_checked_at_config_load(tmp_path):
    assert load_config(None, []).eval.prompts is None and load_config(None, []).eval.at_start is True
    with pytest.raises(ConfigError, match="eval.prompts: prompt file .* does not exist"):
        load_config(None, [f"eval.prompts={tmp_path / 'missing.txt'}"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(ConfigError, match="eval.prompts: prompt file .* has no prompts"):
        load_config(None, [f"eval.prompts={empty}"])
    with pytest.raises(ConfigError, match="eval.prompts"):  # a folder is not a prompt file
        load_config(None, [f"eval.prompts={tmp_path}"])
    good = tmp_path / "prompts.txt"
    good.write_text("a red circle\n\n  two blue squares  \n")
    assert load_config(None, [f"eval.prompts={good}", "eval.at_start=false"]).eval.at_start is False
    # A relative path is made absolute (the workers may start elsewhere); a run copy skips the check.
    config = load_config(None, ["eval.prompts=prompts.txt"], check_files=False)
    assert config.eval.prompts.endswith("/prompts.txt") and config.eval.prompts.startswith("/")


def test_caption_strip_is_drawn_under_each_tile():
    images = torch.zeros(2, 3, 8, 8)  # mid grey tiles
    plain = image_grid(images, columns=2, scale=4)
    assert plain.size == ((2 * 9 + 1) * 4, (9 + 1) * 4)  # the uncaptioned grid (sample.py's call) is unchanged
    grid = image_grid(images, columns=2, scale=4, captions=["a red circle above a blue square", "x"])
    pixels = np.asarray(grid)
    assert grid.width == plain.width and grid.height > plain.height
    tile_w, pad = 32, 4
    for column in range(2):
        left = pad + column * (tile_w + pad)
        strip = pixels[pad + 32:, left:left + tile_w]  # under the tile
        assert (strip != np.array(GRID_BACKGROUND, dtype=np.uint8)).any(axis=-1).any(), column
    # Long captions wrap and are cut, so the strip stays a few lines high.
    long = image_grid(images, columns=2, scale=4, captions=["word " * 200, "y"])
    assert long.height < 4 * grid.height
    with pytest.raises(ValueError, match="captions"):
        image_grid(images, captions=["only one"])


def _encode(captions: list[str]) -> Conditioning:
    embeds = torch.stack([torch.full((4, 8), float(len(c))) for c in captions])
    return Conditioning(embeds, torch.ones(len(captions), 4, dtype=torch.long))


def test_prompt_grids_at_every_grid_nfe_beside_shapeeval(tmp_path):
    logged, listed = [], {}
    custom = EvalPrompts(_encode, 2, captions=["a cat", "a dog", "a red circle"])
    assert len(custom.captions) == 6 and custom.prompts is None and len(set(custom.seeds)) == 6
    # Fixed seeds: the same prompts give the same noise at every evaluation and in every run.
    assert EvalPrompts(_encode, 2, captions=["a cat", "a dog", "a red circle"]).seeds == custom.seeds
    shapes = EvalPrompts(_encode, 1)
    metrics = evaluate_during_training(lambda x, t, cond: torch.zeros_like(x), shapes, [1], [1, 2], 4, (3, 8, 8),
                                       "cpu", lambda latents: latents,
                                       lambda image, key, step: logged.append((key, step, image.size)), 0,
                                       custom=custom,
                                       log_captions=lambda key, captions, columns: listed.update({key: (captions, columns)}))
    assert "shapeeval_nfe1/overall" in metrics
    assert [(key, step) for key, step, _ in logged] == [("samples/nfe1", 0), ("samples/nfe2", 0),
                                                        ("prompts/nfe1", 0), ("prompts/nfe2", 0)]
    # The captions listed beside each grid, in grid order: the user's prompts, each image of a
    # prompt side by side (2 per prompt: 2 columns for 3 prompts), and the 4 ShapeEval picks.
    assert listed["prompts/nfe1"] == (["a cat", "a cat", "a dog", "a dog", "a red circle", "a red circle"], 2)
    picks = torch.linspace(0, len(shapes.captions) - 1, 4).long().tolist()
    assert listed["samples/nfe2"] == ([shapes.captions[i] for i in picks], 2)
    sizes = {key: size for key, _, size in logged}
    assert sizes["prompts/nfe1"][0] == 2 * 8 * 4 + 3 * 4  # 2 columns of 8 px tiles upscaled 4x, 4 px borders
    # Every rank takes the same number of items (one forward schedule for FSDP).
    shares = [EvalPrompts(_encode, 2, rank, 4, captions=["a", "b", "c"]).items for rank in range(4)]
    assert len({len(s) for s in shares}) == 1 and sorted({i for s in shares for i in s}) == list(range(6))


def test_prompt_rows_keep_a_prompts_images_together():
    from apex_ray.engine.evaluation import prompt_columns

    assert prompt_columns(16, 1) == 4  # one image each: the usual near-square grid
    assert prompt_columns(20, 4) == 8  # 2 prompts a row, 10 rows
    assert prompt_columns(1, 4) == 4 and prompt_columns(3, 2) == 2
    assert all(prompt_columns(p, k) % k == 0 for p in range(1, 30) for k in range(1, 6))


def test_a_prompt_file_gone_by_the_time_a_worker_reads_it_is_not_retried(tmp_path):
    from apex_ray.common.errors import InputError
    from apex_ray.orchestration.worker import _user_prompts

    (tmp_path / "p.txt").write_text("a red circle\n\n three blue squares \n")
    assert _user_prompts(str(tmp_path / "p.txt")) == ["a red circle", "three blue squares"]
    with pytest.raises(InputError, match="eval.prompts: prompt file .* does not exist.*shared mount"):
        _user_prompts(str(tmp_path / "gone.txt"))
