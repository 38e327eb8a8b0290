"""Raw rows -> fixed-size RGB pixels, or a reject with its reason.

Each image is decoded, turned upright (EXIF orientation), converted to RGB (grayscale is
expanded, transparency is composited on white), resized so that its shorter side equals
``size`` and centre-cropped to ``size x size``. A row that cannot be used keeps its place with a
reason code instead of pixels, so the sink counts and writes it as a reject: nothing is
dropped silently.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps

MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
MISSING_CAPTION = "missing_caption"
UNDECODABLE_CAPTION = "undecodable_caption"
EMPTY_CAPTION = "empty_caption"
IMAGE_ENCODING_FAILED = "image_encoding_failed"
TEXT_ENCODING_FAILED = "text_encoding_failed"
DUPLICATE_ID = "duplicate_id"
"""The row's id is an earlier row's (``data_pipelines.readers`` marks it); the first row keeps it."""
REJECT_REASONS = (
    MISSING_IMAGE, UNDECODABLE_IMAGE, TOO_SMALL, TOO_LARGE, MISSING_CAPTION, UNDECODABLE_CAPTION, EMPTY_CAPTION,
    IMAGE_ENCODING_FAILED, TEXT_ENCODING_FAILED, DUPLICATE_ID,
)
"""Reason codes in ``rejects.parquet``; ``detail`` holds the specific message."""


class Rejected(Exception):
    """A row that cannot be prepared: ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


DEFAULT_MAX_PIXELS = 64_000_000
"""Images above this many pixels are rejected before they are decoded (a 144-megapixel PNG
decodes to 2 GB of RGB, more than a decode task should hold)."""


def load_rgb(data: bytes | None, size: int, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 ``[size, size, 3]`` from encoded image bytes; raises :class:`Rejected`."""
    if not data:
        raise Rejected(MISSING_IMAGE, "no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise Rejected(TOO_LARGE, f"{width}x{height} = {width * height / 1e6:.0f} megapixels, above "
                                          f"image.max_pixels={max_pixels}")
            # JPEG decodes at 1/2, 1/4 or 1/8 scale when the result still covers the crop.
            keep = max(size, min_side) / min(width, height)
            if keep < 1:
                image.draft("RGB", (math.ceil(width * keep), math.ceil(height * keep)))
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except Rejected:
        raise
    except Exception as error:  # PIL raises many types for corrupt or truncated files
        raise Rejected(UNDECODABLE_IMAGE, f"{type(error).__name__}: {error}") from None
    if min(rgb.size) < min_side:
        raise Rejected(TOO_SMALL, f"{rgb.width}x{rgb.height}, shorter side below {min_side}")
    return np.asarray(ImageOps.fit(rgb, (size, size), method=Image.Resampling.BICUBIC))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale: scale by bit depth. Pillow's own convert("RGB")
        # clips at 255, saturating every value above 1/257 of the range.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "I" or values.max(initial=0) <= 65535 else float(values.max())
        gray = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        raise ValueError("32-bit float images have no defined range; convert them to 8 or 16 bits")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def check_caption(caption: str | None) -> str:
    """The caption without surrounding whitespace; raises :class:`Rejected` if missing or empty."""
    if caption is None:
        raise Rejected(MISSING_CAPTION, "no caption")
    caption = caption.strip()
    if not caption:
        raise Rejected(EMPTY_CAPTION, "caption is empty or whitespace")
    return caption


def decode_rows(batch: dict[str, np.ndarray], size: int, min_side: int,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """Ray task: ``{id, source, image_bytes, caption[, caption_error, duplicate_of]}`` ->
    ``{id, source, caption, pixels, reason, detail}``.

    ``pixels`` is uint8 ``[B, size, size, 3]`` (zeros for rejects); ``reason`` is ``""`` for a
    usable row.
    """
    n = len(batch["id"])
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    captions, reasons, details = [], [], []
    for i in range(n):
        caption, reason, detail = batch["caption"][i], "", ""
        caption_error = batch["caption_error"][i] if "caption_error" in batch else None
        duplicate_of = batch["duplicate_of"][i] if "duplicate_of" in batch else None
        try:
            if duplicate_of:  # first: a repeated row is not decoded at all
                raise Rejected(DUPLICATE_ID, f"id {batch['id'][i]!r} is already the id of {duplicate_of}")
            if caption_error:
                raise Rejected(UNDECODABLE_CAPTION, caption_error)
            caption = check_caption(caption)
            pixels[i] = load_rgb(batch["image_bytes"][i], size, min_side, max_pixels)
        except Rejected as rejected:
            reason, detail = rejected.reason, rejected.detail
        captions.append(caption if isinstance(caption, str) else "")
        reasons.append(reason)
        details.append(detail)
    return {
        "id": batch["id"],
        "source": batch["source"],
        "caption": np.array(captions, dtype=object),
        "pixels": pixels,
        "reason": np.array(reasons, dtype=object),
        "detail": np.array(details, dtype=object),
    }
