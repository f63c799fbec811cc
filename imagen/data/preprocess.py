"""Image and caption preprocessing for real corpora: bytes -> RGB -> resized, cropped tensor; text -> caption.

Every failure raises `BadSample` with a reason from `imagen.data.bad_samples.REASONS`.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from imagen.data.bad_samples import BadSample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WHITE = (255, 255, 255)


def open_image(data: bytes, name: str, max_pixels: int | None, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB image with its EXIF orientation applied.

    `max_pixels` (None: no limit) is Pillow's decompression-bomb limit while the image is read: checked from the
    header, before decoding. `draft_size` lets the JPEG decoder downscale by a power of two while keeping both
    sides >= `draft_size` (much faster decoding).
    """
    if not data:
        raise BadSample("empty_file", name)
    default_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels or None
    try:
        with warnings.catch_warnings():  # refuse over the limit, not only over twice it
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except UnidentifiedImageError:
        raise BadSample("not_an_image", name) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("too_many_pixels", name, f"over data.max_pixels={max_pixels}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSample("corrupt_image", name, str(e)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = default_limit


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency (an alpha channel or a PNG `tRNS` color) is composited on white,
    integer grayscale (`I;16*`, and `I`, which Pillow uses for 16-bit PGM) is divided by 257 and float grayscale
    (`F`, taken as [0, 1]) multiplied by 255, values outside clipped; CMYK / palette / YCbCr / 1-bit are
    converted."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # a fixed scale per mode, never one read off the content: a brighter input never comes out darker
        scale = 255.0 if image.mode == "F" else 1 / 257.0  # 65535 -> 255
        values = np.asarray(image, dtype=np.float32)
        gray = Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), "L")
        key = image.info.get("transparency")  # a 16-bit tRNS key: matched before the values are scaled down
        if isinstance(key, int) and image.mode != "F":
            alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
            gray = Image.merge("LA", (gray, alpha))
        image = gray
    if "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def resize_crop(
    image: Image.Image, size: int, random_crop: bool, rng: np.random.Generator | None = None
) -> Image.Image:
    """Resize so that the shorter side is `size`, then crop a `size` x `size` square (random or centered). A random
    crop draws from `rng` when given, else from the torch RNG.

    Only the cropped region is resampled (its box in source coordinates), so a thin strip never becomes a huge
    intermediate image: the output is all that is allocated.
    """
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if random_crop and rng is not None:
        left, top = (int(rng.integers(n - size + 1)) for n in (new_w, new_h))
    elif random_crop:
        left = int(torch.randint(new_w - size + 1, ()))
        top = int(torch.randint(new_h - size + 1, ()))
    else:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) == (width, height):
        return image.crop((left, top, left + size, top + size))
    to_x, to_y = width / new_w, height / new_h  # resized -> source coordinates
    box = (left * to_x, top * to_y, (left + size) * to_x, (top + size) * to_y)
    return image.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) float in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def split_lines(text: str) -> list[str]:
    """The lines of `text`, split at \\n, \\r\\n and \\r only (`str.splitlines` also splits at U+2028, \\x85, form feeds
    and other separators that may sit inside a caption or a JSON string)."""
    lines = re.split(r"\r\n|\r|\n", text)
    return lines[:-1] if lines[-1] == "" else lines


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 bytes (a BOM is allowed) -> str, or `BadSample("undecodable_text")`."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadSample("undecodable_text", name, str(e)) from None


def clean_caption(text: str) -> str:
    """Strip and collapse whitespace (newlines and tabs included)."""
    return " ".join(text.split())


def clean_captions(captions: list[str] | None, name: str) -> list[str]:
    """The non-empty cleaned captions of a sample; `BadSample` when there are none, or when one is not a string
    (a JSON null, number or object in the metadata)."""
    if captions is None:
        raise BadSample("missing_caption", name)
    for number, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise BadSample("undecodable_text", name, f"caption {number} is {caption!r}, not text")
    cleaned = [c for c in (clean_caption(c) for c in captions) if c]
    if not cleaned:
        raise BadSample("empty_caption", name)
    return cleaned


def truncate_caption(caption: str, max_chars: int | None) -> tuple[str, bool]:
    """Cut a caption to at most `max_chars` characters at a word boundary; returns (caption, was_truncated)."""
    if not max_chars or len(caption) <= max_chars:
        return caption, False
    cut = caption[: max_chars + 1].rsplit(" ", 1)[0] if " " in caption[:max_chars] else caption[:max_chars]
    return cut[:max_chars].rstrip(), True
