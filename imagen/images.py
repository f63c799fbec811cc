"""Image grids for logging and sampling: tensors in [-1, 1] -> uint8 arrays and PNG files."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1) -> np.ndarray:
    """Tile (B, 3, H, W) images in [-1, 1] into one (H', W', 3) uint8 array, `nrow` images per row."""
    tiles = to_uint8(images)
    b, h, w, _ = tiles.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y : y + h, x : x + w] = tile
    if scale > 1:
        grid = np.asarray(
            Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
        )
    return grid


def captioned_grid(
    images: torch.Tensor, captions: list[str], nrow: int | None = None, tile: int = 128
) -> Image.Image:
    """A grid with each image enlarged to `tile` pixels (nearest neighbour) and its caption printed under it."""
    tiles = to_uint8(images)
    nrow = nrow or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / nrow)
    font = ImageFont.load_default()
    chars_per_line = max(8, tile // 6)
    wrapped = [textwrap.wrap(c, chars_per_line)[:4] for c in captions]
    line_h = 11
    text_h = line_h * max((len(w) for w in wrapped), default=1) + 4
    cell_w, cell_h = tile + 4, tile + text_h + 4
    canvas = Image.new("RGB", (nrow * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (pixels, lines) in enumerate(zip(tiles, wrapped, strict=True)):
        r, c = divmod(i, nrow)
        x, y = c * cell_w + 2, r * cell_h + 2
        canvas.paste(Image.fromarray(pixels).resize((tile, tile), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + tile + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def save_png(image: np.ndarray | Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
    return path
