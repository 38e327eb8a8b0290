"""The sampling CLI: output layouts (plain, GenEval, DPG-Bench), NFE, seeds, latent decoding, benchmark."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC
from PIL import Image

import apex_ray.sample as sample_cli
from apex_ray.models import build_backbone
from apex_ray.sample import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An exported tiny SANA (random weights), as a run's export/ema folder would hold."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "ema"
    build_backbone("sana-tiny").save_pretrained(path)
    return str(path)


@pytest.fixture
def calls(monkeypatch):
    """Counts the network calls of the model the CLI loads."""
    counter = {"calls": 0}
    load = sample_cli.load_model

    def counting_load(*args, **kwargs):
        model = load(*args, **kwargs)
        model.transformer.register_forward_hook(lambda *_: counter.__setitem__("calls", counter["calls"] + 1))
        return model

    monkeypatch.setattr(sample_cli, "load_model", counting_load)
    return counter


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_geneval_layout(checkpoint, tmp_path):
    lines = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
             {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}],
              "prompt": "a photo of a red dog"}]
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "geneval"
    assert main(["--checkpoint", checkpoint, "--geneval-metadata", str(metadata), "--images-per-prompt", "2",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
    for index, line in enumerate(lines):
        folder = out / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == line
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert pixels(folder / "samples" / "0000.png").shape == (32, 32, 3)
        assert (folder / "grid.png").is_file()


def test_nfe_is_the_number_of_network_calls(checkpoint, tmp_path, calls):
    for nfe, order in ((1, 1), (3, 1), (3, 2)):
        calls["calls"] = 0
        assert main(["--checkpoint", checkpoint, "--prompts", "a red circle", "--nfe", str(nfe), "--order", str(order),
                     "--images-per-prompt", "3", "--out", str(tmp_path / f"nfe{nfe}-{order}")]) == 0
        assert calls["calls"] == nfe  # one batch of three images
    assert main(["--checkpoint", checkpoint, "--prompts", "x", "--nfe", "2", "--order", "2"]) == 2


def test_images_are_deterministic_per_seed(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert main(["--checkpoint", checkpoint, "--prompts", str(prompts), "--seed", str(seed), "--nfe", "2",
                     "--stochastic-ratio", "0.5", "--out", str(tmp_path / name)]) == 0
        runs[name] = [pixels(tmp_path / name / f) for f in ("00000_00.png", "00001_00.png")]
        assert (tmp_path / name / "grid.png").is_file()
    assert all(np.array_equal(x, y) for x, y in zip(runs["a"], runs["b"]))
    assert not np.array_equal(runs["a"][0], runs["c"][0])
    assert not np.array_equal(runs["a"][0], runs["a"][1])  # each image has its own noise


def test_dpg_layout_tiles_the_images_of_a_prompt(checkpoint, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "partiprompts12.txt").write_text("a red circle above a blue square")
    (prompts / "coco3.txt").write_text("two green triangles")
    out = tmp_path / "dpg"
    assert main(["--checkpoint", checkpoint, "--dpg-prompts", str(prompts), "--images-per-prompt", "4",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["coco3.png", "partiprompts12.png"]
    grid = pixels(out / "coco3.png")
    assert grid.shape == (64, 64, 3)  # 2 x 2 tiles of 32 x 32, no borders
    assert main(["--checkpoint", checkpoint, "--geneval-metadata", str(prompts / "coco3.txt")]) != 0


def test_latent_models_are_decoded_with_the_vae(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "latent"
    build_backbone("sana-tiny", in_channels=4, out_channels=4, sample_size=16).save_pretrained(checkpoint)
    assert main(["--checkpoint", str(checkpoint), "--prompts", "a cat", "--out", str(tmp_path / "x")]) == 2
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types=("ResBlock", "ResBlock"),
        decoder_block_types=("ResBlock", "ResBlock"), encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), upsample_block_type="interpolate",
        downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.5,
    )
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "decoded"
    assert main(["--checkpoint", str(checkpoint), "--prompts", "a cat", "--vae", str(tmp_path / "vae"),
                 "--out", str(out)]) == 0
    assert pixels(out / "00000_00.png").shape == (32, 32, 3)  # DC-AE f2 in this tiny config


def test_benchmark_prints_a_table1_row(checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", checkpoint, "--prompts", "a red circle", "--benchmark", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Throughput (samples/s)" in out and "Latency (s)" in out
    row = out.splitlines()[-2].split()
    assert row[0] == "ema" and row[1] == "1" and float(row[2]) > 0 and float(row[3]) > 0
    assert row[4] == "1.8M" and "Params (B)" not in out  # the tiny SANA, not "0.00" billions


def test_parameter_counts_read_like_table1():
    assert [sample_cli.parameter_count(n) for n in (1_812_345, 592_000_000, 1_604_000_000, 20_400_000_000, 950)] \
        == ["1.8M", "0.6B", "1.6B", "20.4B", "950"]


def test_a_missing_checkpoint_is_named_with_what_to_pass(tmp_path, capsys):
    assert main(["--checkpoint", "/nonexistent/export/ema", "--prompts", "a cat"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint /nonexistent/export/ema does not exist" in err and "export/ema" in err
    assert "bundled:shapes-teacher" in err and "--backbone" in err


def test_a_folder_without_an_export_asks_for_the_backbone(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path), "--prompts", "a cat"]) == 2
    assert "--backbone" in capsys.readouterr().err


def test_lora_adapter_on_top_matches_its_merged_export(checkpoint, tmp_path):
    from apex_ray.models.lora import LoRAConfig
    from apex_ray.models import load_backbone
    from apex_ray.models.lora import apply_lora, merge_adapter, save_adapter

    model = load_backbone(checkpoint)
    apply_lora(model, LoRAConfig(rank=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    save_adapter(model, tmp_path / "adapter")
    merge_adapter(model).save_pretrained(tmp_path / "merged")
    common = ["--prompts", "a red circle", "--nfe", "1"]
    assert main(["--checkpoint", checkpoint, "--lora", str(tmp_path / "adapter"), *common,
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["--checkpoint", str(tmp_path / "merged"), *common, "--out", str(tmp_path / "m")]) == 0
    assert main(["--checkpoint", checkpoint, *common, "--out", str(tmp_path / "base")]) == 0
    with_adapter, merged, base = (pixels(tmp_path / d / "00000_00.png").astype(int) for d in ("a", "m", "base"))
    assert np.abs(with_adapter - merged).max() <= 1  # 8-bit rounding of float differences ~1e-6
    assert np.abs(with_adapter - base).max() > 8
