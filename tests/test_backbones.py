"""Backbones and text encoders: the velocity interface, APEX's shifted conditions, save/load,
real configs sized on the meta device, and the frozen encoders (tiny models built offline)."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
)

from apex_ray.method.conditioning import Conditioning, shift_condition
from apex_ray.models import (
    BACKBONE_PRESETS,
    TEXT_ENCODER_PRESETS,
    QwenImageVelocityModel,
    SanaVelocityModel,
    build_backbone,
    build_text_encoder,
    load_backbone,
)
from apex_ray.models.text_encoders import QWEN_IMAGE_PROMPT_TEMPLATE

TINY = ["sana-tiny", "qwen-image-tiny"]
B, C, S, L, D = 4, 3, 32, 7, 384


def random_cond(batch: int = B, length: int = L, lengths: list[int] | None = None) -> Conditioning:
    """Random token embeddings; row i keeps ``lengths[i]`` tokens (the rest are padding)."""
    lengths = lengths or [length] * batch
    mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    return Conditioning(torch.randn(batch, length, D), mask)


@pytest.fixture(scope="module", params=TINY)
def tiny(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(request.param, **{BACKBONE_PRESETS[request.param].text_embed_key: D})


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


def inputs(batch: int = B):
    return torch.randn(batch, C, S, S), torch.rand(batch), random_cond(batch, lengths=[L, 3, 5, 1][:batch])


# --- tiny backbones -------------------------------------------------------------------------


def test_forward_shape_and_attributes(tiny):
    x, t, cond = inputs()
    out = tiny(x, t, cond)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (tiny.latent_channels, tiny.sample_size, tiny.text_embed_dim) == (C, S, D)
    assert 1e6 < sum(p.numel() for p in tiny.parameters()) < 5e6


def _text_output_only(model, name: str) -> bool:
    """Qwen-Image's last block computes a text-stream output that nothing reads: no gradient."""
    last = f"transformer.transformer_blocks.{len(model.blocks()) - 1}."
    return isinstance(model, QwenImageVelocityModel) and name.startswith(
        (last + "txt_mlp.", last + "attn.to_add_out.")
    )


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_backward_gives_finite_grads_for_every_parameter(tiny, shifted):
    x, t, cond = inputs()
    if shifted:
        cond, t = shift_condition(cond, t, a=-1.0, b=10.0, target="both")
    tiny.zero_grad(set_to_none=True)
    tiny(x, t, cond).square().mean().backward()
    for name, param in tiny.named_parameters():
        if _text_output_only(tiny, name):
            assert param.grad is None, name
            continue
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    tiny.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "a, b, target",
    [(-1.0, 0.0, "time"), (1.0, 0.5, "time"), (-1.0, 10.0, "time"), (-1.0, 10.0, "text"), (-1.0, 0.0, "text"),
     (-1.0, 10.0, "both")],
)
def test_shifted_conditions_are_finite_and_change_the_output(tiny, a, b, target):
    """APEX evaluates the network at t' = a t + b (negative or > 1) and c' = a c + b."""
    x, t, cond = inputs()
    shifted_cond, shifted_t = shift_condition(cond, t, a, b, target)
    with torch.no_grad():
        plain, shifted = tiny(x, t, cond), tiny(x, shifted_t, shifted_cond)
    assert torch.isfinite(shifted).all()
    assert not torch.allclose(plain, shifted, atol=1e-4)


def test_qwen_image_ignores_positive_text_scaling():
    """Qwen-Image RMS-normalises the text first, so a text shift with a > 0 and b = 0 is a no-op:
    APEX's text-shift grid needs b != 0 or a < 0 on this backbone (SANA projects before norming)."""
    torch.manual_seed(0)
    model = build_backbone("qwen-image-tiny")
    x, t, cond = inputs()
    scaled, _ = shift_condition(cond, t, a=3.0, b=0.0, target="text")
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, scaled), model(x, t, cond), atol=1e-5, rtol=1e-4)


def test_extreme_times_are_finite(tiny):
    x, _, cond = inputs()
    with torch.no_grad():
        for value in (-1.0, -0.3, 0.0, 1.0, 1.7, 2.0):
            assert torch.isfinite(tiny(x, torch.full((B,), value), cond)).all()


def test_text_changes_the_output(tiny):
    x, t, cond = inputs()
    other = Conditioning(torch.randn_like(cond.embeds), cond.mask)
    with torch.no_grad():
        assert not torch.allclose(tiny(x, t, cond), tiny(x, t, other), atol=1e-4)


def test_samples_are_independent_of_their_batch(tiny):
    x, t, cond = inputs()
    with torch.no_grad():
        batched = tiny(x, t, cond)
        for i in range(B):
            alone = tiny(x[i : i + 1], t[i : i + 1], cond.index(slice(i, i + 1)))
            torch.testing.assert_close(batched[i : i + 1], alone, atol=2e-5, rtol=1e-4)


def test_padding_tokens_are_masked(tiny):
    """Extra padded positions, whatever they hold, do not change the output."""
    x, t, cond = inputs()
    pad = 5
    padded = Conditioning(
        torch.cat([cond.embeds, 100 * torch.randn(B, pad, D)], dim=1),
        torch.cat([cond.mask, torch.zeros(B, pad, dtype=cond.mask.dtype)], dim=1),
    )
    garbage = Conditioning(torch.where(cond.mask[..., None].bool(), cond.embeds, torch.randn_like(cond.embeds)), cond.mask)
    with torch.no_grad():
        reference = tiny(x, t, cond)
        torch.testing.assert_close(tiny(x, t, padded), reference, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(tiny(x, t, garbage), reference, atol=2e-5, rtol=1e-4)


def test_blocks_are_the_transformer_blocks(tiny):
    blocks = tiny.blocks()
    assert blocks == list(tiny.transformer.transformer_blocks)
    assert len(blocks) == tiny.transformer.config.num_layers
    assert all(type(block).__name__.endswith("TransformerBlock") for block in blocks)


def test_save_pretrained_round_trip(tiny, tmp_path):
    x, t, cond = inputs()
    tiny.save_pretrained(tmp_path)
    with torch.no_grad():
        reference = tiny(x, t, cond)
        for loaded in (load_backbone(tmp_path), type(tiny).from_pretrained(tmp_path)):
            assert type(loaded) is type(tiny)
            assert (loaded.latent_channels, loaded.sample_size) == (tiny.latent_channels, tiny.sample_size)
            assert torch.equal(loaded(x, t, cond), reference)


def test_build_from_pretrained_folder(tmp_path):
    """``pretrained`` accepts a diffusers pipeline layout (``transformer/`` subfolder)."""
    torch.manual_seed(0)
    model = build_backbone("sana-tiny")
    model.transformer.save_pretrained(tmp_path / "transformer")
    loaded = build_backbone("sana-tiny", pretrained=str(tmp_path))
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), model(x, t, cond))


def test_sample_size_override_reaches_the_wrapper():
    assert build_backbone("qwen-image-tiny", sample_size=64).sample_size == 64
    assert build_backbone("sana-tiny", sample_size=64).transformer.config.sample_size == 64


def test_wrong_family_is_refused(tmp_path):
    build_backbone("sana-tiny").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sana"):
        QwenImageVelocityModel.from_pretrained(tmp_path)


# --- real configs, sized without allocating ----------------------------------------------------


@pytest.mark.parametrize(
    "preset, billions, family",
    [("sana-600m", 0.59, SanaVelocityModel), ("sana-1600m", 1.60, SanaVelocityModel),
     ("qwen-image", 20.4, QwenImageVelocityModel)],
)
def test_real_configs_on_meta_device(preset, billions, family):
    with torch.device("meta"):
        model = build_backbone(preset)
    assert isinstance(model, family)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.02)
    expected = {"sana-600m": (32, 16, 2304), "sana-1600m": (32, 16, 2304), "qwen-image": (16, 128, 3584)}
    assert (model.latent_channels, model.sample_size, model.text_embed_dim) == expected[preset]


def test_bad_preset_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="sana-tiny") as error:
        build_backbone("sana-7b")
    assert all(name in str(error.value) for name in BACKBONE_PRESETS)
    with pytest.raises(ValueError, match="minilm") as error:
        build_text_encoder("t5")
    assert all(name in str(error.value) for name in TEXT_ENCODER_PRESETS)


# --- MiniLM -----------------------------------------------------------------------------------


def test_minilm_embeddings(minilm):
    captions = ["a red circle", "a blue square", "a photo of a square left of a triangle"]
    cond = minilm.encode(captions)
    assert minilm.embed_dim == D and minilm.max_length == 32
    assert cond.embeds.shape == (3, 32, D) and cond.mask.shape == (3, 32) and cond.pooled.shape == (3, D)
    assert cond.embeds.dtype == torch.float32 and not cond.embeds.requires_grad
    lengths = cond.mask.sum(1).tolist()
    assert lengths == [len(minilm.tokenizer(c)["input_ids"]) for c in captions]
    assert lengths[0] < lengths[2]
    assert not torch.allclose(cond.embeds[0], cond.embeds[1], atol=1e-3)
    torch.testing.assert_close(cond.pooled.norm(dim=-1), torch.ones(3))
    assert (cond.pooled[0] @ cond.pooled[1]) < 0.99
    again = minilm.encode(captions)
    assert torch.equal(again.embeds, cond.embeds) and torch.equal(again.mask, cond.mask)


def test_minilm_is_frozen(minilm):
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())


def test_minilm_drives_the_tiny_sana(minilm):
    model = build_backbone("sana-tiny", caption_channels=minilm.embed_dim)
    cond = minilm.encode(["a red circle", "a photo of a blue square and a green triangle"])
    x = torch.randn(2, C, S, S)
    out = model(x, torch.tensor([1.0, 0.4]), cond)
    out.square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(out).all()


# --- Gemma-2 and Qwen2.5-VL from tiny local checkpoints -------------------------------------


def _gemma_folder(path):
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({ch: len(vocab) + i for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz▁:")})
    GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True).save_pretrained(path)
    config = Gemma2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(path)
    return path


def test_gemma_encoder_from_a_local_checkpoint(tmp_path):
    encoder = build_text_encoder("gemma", path=_gemma_folder(tmp_path), max_length=40)
    assert encoder.embed_dim == 32 and encoder.model.dtype == torch.bfloat16
    captions = ["a red circle", "a blue square and a green triangle"]
    cond = encoder.encode(captions)
    assert cond.embeds.shape == (2, 40, 32) and cond.embeds.dtype == torch.float32 and cond.pooled is None
    assert cond.mask.sum(1).tolist() == [len(encoder.tokenizer(c)["input_ids"]) for c in captions]
    assert cond.mask[:, 0].all() and not cond.mask[:, -1].any()  # right padding, BOS first
    assert not torch.allclose(cond.embeds[0, 3], cond.embeds[1, 3])  # "a r..." vs "a b..."
    assert torch.equal(encoder.encode(captions).embeds, cond.embeds)

    instructed = build_text_encoder("gemma", path=tmp_path, max_length=40, instruction="describe:")
    with_instruction = instructed.encode(captions)
    assert with_instruction.embeds.shape == (2, 40, 32)
    assert with_instruction.mask[:, 0].all()
    assert not torch.allclose(with_instruction.embeds, cond.embeds)


def _qwen_vl_folder(path):
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(path / "tokenizer")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, bos_token_id=None, eos_token_id=None,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32),
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path / "text_encoder")
    return path


def test_qwen_vl_encoder_drops_the_template_prefix(tmp_path):
    """Loaded from a diffusers pipeline layout (``text_encoder/``, ``tokenizer/``)."""
    encoder = build_text_encoder("qwen2.5-vl", path=_qwen_vl_folder(tmp_path), dtype=torch.float32)
    captions = ["a red circle", "a photo of a blue square left of a green triangle"]
    cond = encoder.encode(captions)
    templated = [len(encoder.tokenizer(QWEN_IMAGE_PROMPT_TEMPLATE.format(c))["input_ids"]) for c in captions]
    kept = [n - encoder.prefix_tokens for n in templated]
    assert cond.mask.sum(1).tolist() == kept and cond.embeds.shape == (2, max(kept), 32)
    assert not cond.embeds[0, kept[0]:].any()  # padding rows are zero
    first = encoder.encode(captions[:1])
    torch.testing.assert_close(first.embeds[0], cond.embeds[0, : kept[0]])  # independent of batch padding
    assert not any(p.requires_grad for p in encoder.model.parameters())
