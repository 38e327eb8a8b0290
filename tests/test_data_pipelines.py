"""data_pipelines: raw pairs -> prepared set (Ray Data actor pools), rejects and the count identity,
the image-folder input, a VAE round trip through the actor pool, and the fake-sample buffer."""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from apex_ray.common.images import images_to_tensor
from apex_ray.config import ConfigError
from apex_ray.engine.prepared import (
    load_empty_prompt,
    load_fake_buffer,
    load_prepared_arrays,
    prepared_dataset,
    read_manifest,
    read_rows,
    to_training_batch,
)
from apex_ray.method.buffer import FakeSampleBuffer
from apex_ray.method.ema import EMA
from apex_ray.method.objective import APEXConfig, APEXObjective
from apex_ray.models import build_backbone, build_text_encoder, load_backbone
from apex_ray.models.codecs import load_codec
from apex_ray.shapeeval import generate_pairs, write_pairs
from apex_ray.shapeeval.dataset import decode_png, encode_png
from data_pipelines.actors import encode_usable_rows
from data_pipelines.config import FakeBufferConfig, load_prepare_config
from data_pipelines.decode import (
    EMPTY_CAPTION,
    MISSING_CAPTION,
    TEXT_ENCODING_FAILED,
    TOO_SMALL,
    UNDECODABLE_IMAGE,
)
from data_pipelines.fake_buffer import FakeSampler, make_fake_buffer
from data_pipelines.output import OutputError, StagedOutput, content_hash
from data_pipelines.prepare_latents import main as prepare_main
from data_pipelines.prepare_latents import prepare
from data_pipelines.readers import InputError

SIZE = 32
FAST = ["codec.batch_size=8", "text.batch_size=8", "storage.rows_per_shard=8"]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def config_for(input_path, output, *overrides, **settings):
    settings = {"input.path": str(input_path), "output": str(output), **settings}
    return load_prepare_config(None, [*FAST, *overrides], settings)


def rgba_image() -> Image.Image:
    """Left half fully transparent (blue underneath), right half opaque red."""
    pixels = np.zeros((SIZE, SIZE, 4), np.uint8)
    pixels[:, : SIZE // 2] = (0, 0, 255, 0)
    pixels[:, SIZE // 2:] = (255, 0, 0, 255)
    return Image.fromarray(pixels, "RGBA")


PLANTED_REJECTS = {
    "bad-corrupt": UNDECODABLE_IMAGE,
    "bad-truncated": UNDECODABLE_IMAGE,
    "bad-empty-caption": EMPTY_CAPTION,
    "bad-no-caption": MISSING_CAPTION,
    "bad-1x1": TOO_SMALL,
}


@pytest.fixture(scope="module")
def raw_shapeeval(tmp_path_factory) -> Path:
    """ShapeEval raw parquet: 24 good pairs plus planted rows (5 bad, a grayscale and an RGBA image),
    in row groups of 16."""
    folder = tmp_path_factory.mktemp("raw")
    good = pq.read_table(write_pairs(folder / "pairs.parquet", 24, seed=0)).to_pylist()
    valid = good[0]["image_bytes"]
    planted = [
        ("bad-corrupt", b"\x89PNG\r\n\x1a\n definitely not an image", "a photo of a red circle"),
        ("bad-truncated", valid[: len(valid) // 2], "a photo of a blue square"),
        ("bad-empty-caption", valid, "   "),
        ("bad-no-caption", valid, None),
        ("bad-1x1", png(Image.new("RGB", (1, 1), (255, 0, 0))), "a photo of a red dot"),
        ("gray", png(Image.fromarray(np.tile(np.arange(0, 240, 6, dtype=np.uint8), (40, 1)), "L")), "a gray ramp"),
        ("rgba", png(rgba_image()), "a red half"),
    ]
    rows = good + [{"id": i, "image_bytes": b, "text": t, "task": "planted"} for i, b, t in planted]
    path = folder / "raw.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(folder / "pairs.parquet")), path, row_group_size=16)
    return path


@pytest.fixture(scope="module")
def prepared(raw_shapeeval, tmp_path_factory, ray_cluster) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("prepared") / "set"
    return output, prepare(config_for(raw_shapeeval, output))


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


# --- prepare: ShapeEval raw parquet with planted bad rows -------------------------------------


def test_bad_rows_are_rejected_with_reasons_and_counts_add_up(prepared, raw_shapeeval):
    output, manifest = prepared
    assert manifest == read_manifest(output)
    assert (manifest["rows_in"], manifest["rows_written"], manifest["rows_rejected"]) == (31, 26, 5)
    assert manifest["rows_in"] == manifest["rows_written"] + manifest["rows_rejected"]
    assert manifest["rejects_by_reason"] == {UNDECODABLE_IMAGE: 2, EMPTY_CAPTION: 1, MISSING_CAPTION: 1, TOO_SMALL: 1}
    rejects = pq.read_table(output / "rejects.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in rejects} == PLANTED_REJECTS
    for reject in rejects:
        assert reject["source"].startswith(f"{raw_shapeeval}#row=") and reject["detail"]
    assert sum(shard["rows"] for shard in manifest["shards"]) == 26 and len(manifest["shards"]) >= 2
    assert all((output / shard["file"]).is_file() for shard in manifest["shards"])
    assert not [p for p in output.iterdir() if p.name.startswith(".")], "staging and temp files are gone"
    assert manifest["latent_shape"] == [3, SIZE, SIZE] and manifest["latent_dtype"] == "float32"
    assert manifest["text_shape"] == [32, 384] and manifest["text_dtype"] == "float16"
    assert manifest["codec"]["name"] == "pixel" and manifest["text_encoder"]["preset"] == "minilm"
    assert len(manifest["config_hash"]) == 16
    # Each shard's digest is of its bytes as committed; the set's content hash is made of them.
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((output / shard["file"]).read_bytes()).hexdigest()
    assert manifest["content_hash"] == content_hash(manifest["shards"]) and len(manifest["content_hash"]) == 64
    assert content_hash(list(reversed(manifest["shards"]))) == manifest["content_hash"]
    assert content_hash([*manifest["shards"][:-1], {**manifest["shards"][-1], "sha256": "0" * 64}]) != manifest["content_hash"]


def test_shards_hold_the_right_pixels_and_text_embeddings(prepared, raw_shapeeval, minilm):
    output, _ = prepared
    rows = read_rows(output, ["id", "caption", "latent", "text_embeds", "text_mask", "pooled"])
    raw = {r["id"]: r for r in pq.read_table(raw_shapeeval).to_pylist()}
    assert sorted(rows["id"]) == sorted(set(raw) - set(PLANTED_REJECTS))
    position = {row_id: i for i, row_id in enumerate(rows["id"])}
    for row_id in ("shapeeval-s0-00000000", "shapeeval-s0-00000023"):  # the pixel codec is exact
        expected = images_to_tensor(decode_png(raw[row_id]["image_bytes"])).numpy()
        np.testing.assert_array_equal(rows["latent"][position[row_id]], expected)
    gray = rows["latent"][position["gray"]]
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2]) and gray.std() > 0.1
    rgba = rows["latent"][position["rgba"]]
    np.testing.assert_allclose(rgba[:, :, : SIZE // 2 - 1], 1.0)  # transparent -> white
    np.testing.assert_allclose(rgba[:, :, SIZE // 2 + 1:].mean(axis=(1, 2)), [1.0, -1.0, -1.0])  # opaque red

    picked = [position[i] for i in ("gray", "rgba", "shapeeval-s0-00000005")]
    cond = minilm.encode([rows["caption"][i] for i in picked])
    np.testing.assert_allclose(rows["text_embeds"][picked], cond.embeds.numpy(), atol=2e-2, rtol=1e-2)
    np.testing.assert_array_equal(rows["text_mask"][picked], cond.mask.numpy())
    np.testing.assert_allclose(rows["pooled"][picked], cond.pooled.numpy(), atol=2e-3)
    empty = load_empty_prompt(output)
    reference = minilm.encode([""])
    torch.testing.assert_close(empty.embeds, reference.embeds, atol=2e-2, rtol=1e-2)  # stored as float16
    assert torch.equal(empty.mask, reference.mask)


def test_readers_serve_training_batches_with_and_without_ray(prepared):
    output, _ = prepared
    latents, cond, captions = load_prepared_arrays(output)
    assert latents.shape == (26, 3, SIZE, SIZE) and latents.dtype == torch.float32
    assert cond.embeds.shape == (26, 32, 384) and cond.embeds.dtype == torch.float32
    assert cond.mask.dtype == torch.int64 and cond.pooled.shape == (26, 384) and len(captions) == 26
    batches = [to_training_batch(b) for b in prepared_dataset(output).iter_torch_batches(batch_size=8)]
    assert sum(b.latents.shape[0] for b in batches) == 26
    batch = batches[0]
    assert batch.latents.shape == (8, 3, SIZE, SIZE) and batch.latents.dtype == torch.float32
    assert batch.cond.embeds.shape == (8, 32, 384) and batch.cond.embeds.dtype == torch.float32
    assert batch.cond.pooled.shape == (8, 384)
    streamed = torch.cat([b.latents for b in batches])
    assert torch.equal(streamed[streamed.flatten(1).sum(1).argsort()], latents[latents.flatten(1).sum(1).argsort()])


def test_rerun_on_a_complete_output_is_refused(prepared, raw_shapeeval):
    output, manifest = prepared
    with pytest.raises(OutputError, match="already holds a complete prepared set.*--overwrite"):
        prepare(config_for(raw_shapeeval, output))
    assert read_manifest(output) == manifest


# --- prepare: image folder, a VAE in the actor pool ------------------------------------------


def test_image_folder_input(tmp_path, ray_cluster):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for pair in generate_pairs(4, seed=3):
        Image.fromarray(pair.image).save(folder / f"{pair.id}.png")
        (folder / f"{pair.id}.txt").write_text(pair.caption + "\n")
    wide = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)  # blue | green (middle half) | blue
    wide[:, : SIZE // 2] = wide[:, -SIZE // 2:] = (0, 0, 255)
    wide[:, SIZE // 2: -SIZE // 2] = (0, 255, 0)
    Image.fromarray(wide).save(folder / "sub" / "wide.jpg", quality=95)
    (folder / "sub" / "wide.txt").write_text("a green field")
    Image.fromarray(wide).save(folder / "sub" / "uncaptioned.png")
    Image.fromarray(wide).save(folder / "blank.webp")
    (folder / "blank.txt").write_text("\n")
    (folder / "notes.md").write_text("not an image")

    output = tmp_path / "prepared"
    manifest = prepare(config_for(folder, output))
    assert (manifest["rows_in"], manifest["rows_written"], manifest["rows_rejected"]) == (7, 5, 2)
    rejects = {r["id"]: r for r in pq.read_table(output / "rejects.parquet").to_pylist()}
    reasons = {row_id: reject["reason"] for row_id, reject in rejects.items()}
    assert reasons == {"sub/uncaptioned.png": MISSING_CAPTION, "blank.webp": EMPTY_CAPTION}
    assert rejects["blank.webp"]["source"] == str(folder / "blank.webp")
    rows = read_rows(output, ["id", "caption", "latent"])
    by_id = dict(zip(rows["id"], zip(rows["caption"], rows["latent"])))
    assert set(by_id) == {f"{p.id}.png" for p in generate_pairs(4, seed=3)} | {"sub/wide.jpg"}
    caption, latent = by_id["sub/wide.jpg"]
    assert caption == "a green field" and latent.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(latent.mean(axis=(1, 2)), [-1.0, 1.0, -1.0], atol=0.1)  # the centre crop


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A tiny AutoencoderKL fitted to 16 ShapeEval images (seconds on one CPU thread), saved locally."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    images = images_to_tensor(np.stack([p.image for p in generate_pairs(16, seed=1)]))
    vae = AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=SIZE,
    )
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)  # denormals make this tiny CPU fit several times slower
    torch.set_num_threads(1)
    try:
        for _ in range(400):
            loss = torch.nn.functional.mse_loss(vae.decode(vae.encode(images).latent_dist.mode()).sample, images)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 0.05 * images.var().item():
                break
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    path = tmp_path_factory.mktemp("vae") / "tiny-kl"
    vae.save_pretrained(path)
    return path, images


@pytest.mark.slow
def test_autoencoder_kl_latents_from_the_actor_pool_decode_back_to_the_inputs(tiny_vae, tmp_path, ray_cluster):
    vae_path, images = tiny_vae
    # A generic parquet: other column names, no id column (ids are "<file>:<row>").
    raw = tmp_path / "raw.parquet"
    pairs = list(generate_pairs(16, seed=1))
    pq.write_table(pa.table({"png": [encode_png(p.image) for p in pairs], "prompt": [p.caption for p in pairs]}), raw)
    output = tmp_path / "prepared"
    manifest = prepare(config_for(
        raw, output, "codec.name=autoencoder-kl",
        **{"codec.path": str(vae_path), "input.image_column": "png", "input.caption_column": "prompt"},
    ))
    assert manifest["rows_written"] == 16 and manifest["latent_shape"] == [4, SIZE // 2, SIZE // 2]
    rows = read_rows(output, ["id", "latent"])
    order = np.argsort([int(row_id.split(":")[1]) for row_id in rows["id"]])
    assert rows["id"][order[0]] == "raw.parquet:0"
    latents = torch.from_numpy(rows["latent"][order])

    codec = load_codec("autoencoder-kl", vae_path)
    torch.testing.assert_close(latents, codec.encode(images), atol=1e-4, rtol=1e-4)  # same scaling as in-process
    round_trip = codec.decode(latents)
    mse = ((round_trip - images) ** 2).mean().item()
    shuffled = ((round_trip - images.roll(1, dims=0)) ** 2).mean().item()
    assert mse < 0.1 * images.var().item(), (mse, images.var().item())
    assert mse < 0.2 * shuffled, (mse, shuffled)


# --- codecs, encoders, output folder: no Ray ------------------------------------------------


def test_vae_codecs_apply_the_pipelines_scaling(tmp_path):
    from diffusers import AutoencoderDC, AutoencoderKLQwenImage

    torch.manual_seed(0)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    dc = AutoencoderDC(
        in_channels=3, latent_channels=8, attention_head_dim=8, encoder_block_types=("ResBlock", "ResBlock"),
        decoder_block_types=("ResBlock", "ResBlock"), encoder_block_out_channels=(16, 32),
        decoder_block_out_channels=(16, 32), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), upsample_block_type="interpolate",
        downsample_block_type="conv", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41,
    )
    dc.save_pretrained(tmp_path / "pipeline" / "vae")  # found inside a pipeline folder
    codec = load_codec("autoencoder-dc", tmp_path / "pipeline")
    with torch.no_grad():
        torch.testing.assert_close(codec.encode(x), dc.encode(x).latent * 0.41)
        expected = dc.decode(dc.encode(x).latent).sample
        torch.testing.assert_close(codec.decode(codec.encode(x)), expected, atol=1e-5, rtol=1e-4)

    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 2.0, 0.5, 1.0]
    qwen = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                  temperal_downsample=[False], latents_mean=mean, latents_std=std)
    qwen.save_pretrained(tmp_path / "qwen")
    codec = load_codec("autoencoder-kl-qwenimage", tmp_path / "qwen")
    with torch.no_grad():
        raw = qwen.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
        expected = (raw - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
        torch.testing.assert_close(codec.encode(x), expected)
        assert codec.decode(codec.encode(x)).shape == x.shape
    assert torch.equal(load_codec("pixel").encode(x), x)


def test_encoding_failures_reject_only_the_failing_rows():
    def encode(captions):
        if "boom" in captions:
            raise RuntimeError("tokenizer exploded")
        return {"value": np.array([[np.nan if c == "nan" else len(c)] for c in captions], np.float32)}

    batch = {"caption": np.array(["ab", "boom", "nan", "abcd", "x"], dtype=object),
             "reason": np.array(["", "", "", "", EMPTY_CAPTION]), "detail": np.array(["", "", "", "", "empty"])}
    out = encode_usable_rows(batch, list(batch["caption"]), encode, {"value": np.zeros((1, 1), np.float32)},
                             TEXT_ENCODING_FAILED)
    assert list(out["reason"]) == ["", TEXT_ENCODING_FAILED, TEXT_ENCODING_FAILED, "", EMPTY_CAPTION]
    assert "tokenizer exploded" in out["detail"][1] and "non-finite" in out["detail"][2]
    assert out["value"][:, 0].tolist() == [2.0, 0.0, 0.0, 4.0, 0.0]


def test_missing_or_empty_input_and_unwritable_output_fail_clearly(tmp_path, capsys):
    output = tmp_path / "out"
    with pytest.raises(InputError, match="does not exist"):
        prepare(config_for(tmp_path / "nope.parquet", output))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no parquet files and no images"):
        prepare(config_for(tmp_path / "empty", output))
    pq.write_table(pa.table({"image_bytes": pa.array([], pa.binary()), "text": pa.array([], pa.string())}),
                   tmp_path / "zero.parquet")
    with pytest.raises(InputError, match="has no rows"):
        prepare(config_for(tmp_path / "zero.parquet", output))
    pq.write_table(pa.table({"jpg": [b"x"], "text": ["a"]}), tmp_path / "cols.parquet")
    with pytest.raises(InputError, match=r"no column image_column='image_bytes'.*\['jpg', 'text'\]"):
        prepare(config_for(tmp_path / "cols.parquet", output))
    (tmp_path / "a-file").write_text("")
    pq.write_table(pa.table({"image_bytes": [b"x"], "text": ["a"]}), tmp_path / "ok.parquet")
    with pytest.raises(OutputError, match="cannot create output folder"):
        prepare(config_for(tmp_path / "ok.parquet", tmp_path / "a-file" / "out"))
    assert not output.exists()

    assert prepare_main(["--input", str(tmp_path / "nope"), "--output", str(output)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert prepare_main(["--input", str(tmp_path / "ok.parquet"), "--output", str(output), "codec.name=jpeg"]) == 2
    assert "codec.name" in capsys.readouterr().err


def test_output_folder_states(tmp_path, caplog):
    folder = tmp_path / "out"
    dead = StagedOutput(folder, overwrite=False, job="prepared set")  # a run that died mid-write:
    (dead.staging / "parts").mkdir()  # its staging folder (with our marker) stays, its lock goes with it
    (dead.staging / "parts" / "half.parquet").write_bytes(b"half")
    dead._lock.release()
    with caplog.at_level(logging.WARNING), StagedOutput(folder, overwrite=False, job="prepared set") as out:
        out.finish({"rows": 0})  # an interrupted run's leftovers (marked as ours) are removed first
    assert "staging folder of an interrupted prepared set" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]
    with pytest.raises(OutputError, match="already holds a complete"):
        StagedOutput(folder, overwrite=False, job="prepared set")
    with pytest.raises(RuntimeError, match="job failed"), StagedOutput(folder, overwrite=True, job="prepared set"):
        raise RuntimeError("job failed")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"], "a failed run leaves the set as it was"
    (folder / "mine.txt").write_text("user data")
    with pytest.raises(OutputError, match="did not write.*mine.txt"):
        StagedOutput(folder, overwrite=True, job="prepared set")
    assert (folder / "mine.txt").read_text() == "user data"


# --- fake-sample buffer -----------------------------------------------------------------------


def test_fake_buffer_job_writes_samples_the_trainer_loads(prepared, tmp_path):
    output, source = prepared
    torch.manual_seed(0)
    build_backbone("sana-tiny", caption_channels=384).save_pretrained(tmp_path / "ckpt")
    config = FakeBufferConfig(checkpoint=str(tmp_path / "ckpt"), latents=str(output), output=str(tmp_path / "fake"),
                              limit=12, steps=2, seed=3, sampler={"batch_size": 5})
    manifest = make_fake_buffer(config)
    assert manifest == read_manifest(tmp_path / "fake")
    assert manifest["rows"] == 12 and manifest["sample_shape"] == [3, SIZE, SIZE] and manifest["steps"] == 2
    assert manifest["source"]["config_hash"] == source["config_hash"]

    # Each sample is the sampler's output for that row's noise and prepared conditioning.
    rows = read_rows(tmp_path / "fake", ["id", "sample", "text_embeds", "text_mask", "pooled"])
    prepared_rows = read_rows(output, ["id", "text_embeds"])
    by_id = dict(zip(prepared_rows["id"], prepared_rows["text_embeds"]))
    np.testing.assert_array_equal(rows["text_embeds"][0], by_id[rows["id"][0]])
    sampler = FakeSampler(str(tmp_path / "ckpt"), 2, 3, [3, SIZE, SIZE], 384)
    picked = {key: value[:2] for key, value in rows.items()}
    expected = sampler(picked)["sample"]
    np.testing.assert_allclose(rows["sample"][:2], expected, atol=1e-4, rtol=1e-4)

    # The trainer seeds its FIFO from it: L_adv runs on the very first step.
    buffer = FakeSampleBuffer(capacity=8)
    assert load_fake_buffer(tmp_path / "fake", buffer) == 12 and len(buffer) == 8
    model = load_backbone(tmp_path / "ckpt")
    objective = APEXObjective(APEXConfig(adv_frac=0.5), buffer)
    batch = to_training_batch(read_rows(output, ["latent", "text_embeds", "text_mask", "pooled"], limit=4))
    parts = objective(model, EMA(model, 0.99), batch.latents, batch.cond, torch.Generator().manual_seed(0),
                      torch.Generator().manual_seed(0)).parts
    assert parts["n_adv"] > 0 and parts["loss_adv"] > 0
    assert load_fake_buffer(tmp_path / "fake", FakeSampleBuffer(64), limit=5) == 5
    with pytest.raises(ValueError, match="not a fake-sample buffer"):
        load_fake_buffer(output, buffer)


def test_fake_buffer_job_takes_a_config_file_overrides_and_flags(tmp_path):
    """The same way in as every CLI: --config FILE, then key.sub=value, then the named flags."""
    from data_pipelines.config import load_fake_buffer_config

    job = tmp_path / "job.yaml"
    job.write_text("checkpoint: ckpt\nlatents: prepared\noutput: buffer\nsteps: 2\nsampler: {concurrency: 3}\n")
    config = load_fake_buffer_config(job, ["sampler.batch_size=8", "steps=4"], {"output": "elsewhere"})
    assert (config.checkpoint, config.output, config.steps) == ("ckpt", "elsewhere", 4)
    assert (config.sampler.concurrency, config.sampler.batch_size) == (3, 8)
    with pytest.raises(ConfigError, match="sampler.concurrency"):
        load_fake_buffer_config(job, ["sampler.concurrency=0"])


# --- decoding odd images: no Ray ----------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")  # uint16 [H, W] is saved as a 16-bit grayscale PNG
    return buffer.getvalue()


def test_16_bit_grayscale_is_scaled_by_bit_depth_not_saturated():
    from data_pipelines.decode import load_rgb

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    rgb = load_rgb(_png(ramp), 64, 8)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    assert abs(float(rgb.mean()) - 127.5) < 3  # Pillow's plain convert gives ~251 (saturated)
    assert rgb[:, 0].max() <= 2 and rgb[:, -1].min() >= 253 and np.all(rgb[..., 0] == rgb[..., 2])
    eight_bit = load_rgb(_png((ramp >> 8).astype(np.uint8)), 64, 8)
    assert np.abs(rgb.astype(int) - eight_bit.astype(int)).max() <= 2


def test_images_above_the_pixel_cap_are_rejected_before_decoding():
    from data_pipelines.decode import TOO_LARGE, Rejected, load_rgb

    big = _png(np.zeros((300, 400, 3), dtype=np.uint8))
    with pytest.raises(Rejected) as rejected:
        load_rgb(big, 32, 16, max_pixels=100_000)
    assert rejected.value.reason == TOO_LARGE and "400x300" in rejected.value.detail
    assert load_rgb(big, 32, 16, max_pixels=120_000).shape == (32, 32, 3)


def test_large_jpegs_decode_at_reduced_scale_and_still_fill_the_crop():
    from data_pipelines.decode import load_rgb

    gradient = np.dstack([np.tile(np.linspace(0, 255, 1024).astype(np.uint8), (768, 1))] * 3)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, "JPEG", quality=95)
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    opened.draft("RGB", (86, 64))
    assert opened.size[1] < 768  # the codec offers a reduced-scale decode
    rgb = load_rgb(buffer.getvalue(), 32, 16)
    assert rgb.shape == (32, 32, 3) and rgb[:, 0].mean() < rgb[:, -1].mean()


def test_caption_bytes_are_decoded_and_bad_ones_rejected_with_the_real_reason(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipelines.config import InputConfig
    from data_pipelines.decode import decode_rows
    from data_pipelines.readers import plan_input, read_units

    png = _png(np.full((32, 32), 30000, dtype=np.uint16))
    file = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"image_bytes": [png, png, png], "text": [b"a red circle", b"\xff\xfe bad", None]},
                            schema=pa.schema([("image_bytes", pa.binary()), ("text", pa.binary())])), file)
    plan = plan_input(InputConfig(path=str(file), format="parquet"))
    table = pa.concat_tables(read_units(plan, plan.units))
    decoded = decode_rows({k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}, 32, 16)
    assert list(decoded["caption"][:1]) == ["a red circle"] and decoded["reason"][0] == ""
    assert decoded["reason"][1] == "undecodable_caption" and "not UTF-8" in decoded["detail"][1]
    assert decoded["reason"][2] == "missing_caption"


def test_wrong_column_types_are_a_start_up_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipelines.config import InputConfig
    from data_pipelines.readers import InputError, plan_input

    file = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"image_bytes": [1, 2], "text": ["a", "b"]}), file)
    with pytest.raises(InputError, match="image column 'image_bytes' is int64, not encoded image bytes"):
        plan_input(InputConfig(path=str(file), format="parquet"))
    pq.write_table(pa.table({"image_bytes": [b"x", b"y"], "text": [1.0, 2.0]}), file)
    with pytest.raises(InputError, match="caption column 'text' is double, not text"):
        plan_input(InputConfig(path=str(file), format="parquet"))


def test_a_non_utf8_caption_file_is_rejected_as_undecodable(tmp_path):
    from data_pipelines.readers import read_image_files

    (tmp_path / "cat.png").write_bytes(_png(np.zeros((32, 32), dtype=np.uint16)))
    (tmp_path / "cat.txt").write_bytes("un chat noir".encode("latin-1") + b"\xe9")
    (tmp_path / "dog.png").write_bytes(_png(np.zeros((32, 32), dtype=np.uint16)))
    (tmp_path / "dog.txt").write_text("a dog", encoding="utf-8")
    table = read_image_files([str(tmp_path / "cat.png"), str(tmp_path / "dog.png")], str(tmp_path)).to_pydict()
    assert table["caption"] == [None, "a dog"]
    assert "cat.txt: caption bytes are not UTF-8" in table["caption_error"][0] and table["caption_error"][1] is None


def _flip_a_byte_in_the_data(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # well inside the column pages, away from the footer
    shard.write_bytes(bytes(data))


def test_a_damaged_shard_fails_its_read_instead_of_training_silently(prepared, tmp_path):
    import shutil

    from apex_ray.engine.prepared import CorruptShardError, prepared_dataset, read_rows

    output, _ = prepared
    copy = tmp_path / "set"
    shutil.copytree(output, copy)
    assert read_rows(copy, ["caption"])["caption"]  # intact: reads
    _flip_a_byte_in_the_data(sorted((copy / "shards").glob("*.parquet"))[0])
    with pytest.raises(CorruptShardError, match="is damaged"):
        read_rows(copy, ["caption", "latent", "text_embeds"])
    with pytest.raises(Exception, match="(?i)checksum"):  # the Ray Data path verifies the same pages
        prepared_dataset(copy).take_all()


def test_shards_without_checksums_still_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from apex_ray.engine.prepared import read_shard

    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "old.parquet")  # no page CRCs
    assert read_shard(str(tmp_path / "old.parquet")).num_rows == 10
