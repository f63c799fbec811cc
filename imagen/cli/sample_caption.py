"""`python sample.py task=caption ckpt=PATH images=DIR`: image -> text with a trained joint-stage checkpoint.

Every PNG/JPEG/BMP/WebP file in `images` (a folder, or one file) is resized to the stage's image size and
captioned with `decoding=greedy|beam|nucleus` (beams re-scored by the matcher and the generator:
`caption_match_weight`, `caption_generator_weight`);
`captions.jsonl` (file, caption, decoding) goes to `out_dir`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from imagen.checkpoints import CheckpointError
from imagen.cli.sample_generate import resolve_device
from imagen.sampling.caption import CaptionDecoding

log = logging.getLogger("imagen")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(images: str | None) -> list[Path]:
    """The image files named by `images` (a folder: its image files in name order; or one file)."""
    if not images:
        raise ValueError("task=caption needs images=DIR (a folder of images) or images=FILE")
    path = Path(images)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"images={path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"images={path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_image(path: Path, size: int) -> torch.Tensor:
    """An image file -> (3, size, size) float in [-1, 1] (RGB, resized with a box filter)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BOX), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


@torch.no_grad()
def sample_caption(cfg: DictConfig) -> dict:
    from imagen.stages.joint import JointStage

    files = image_files(cfg.images)
    try:
        stage = JointStage.from_checkpoint(cfg.ckpt, trust=cfg.trust_checkpoint)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {cfg.ckpt} is not a compatible joint checkpoint: {e}") from None
    if not stage.weights.caption:
        log.warning(f"{cfg.ckpt} was trained with model.loss_weights.caption=0: its captioner is untrained")
    device = resolve_device(cfg.device)
    stage.to(device)
    weights = {  # null: the checkpoint's own setting
        name: getattr(stage.caption_decoding, name)
        if cfg[f"caption_{name}"] is None
        else cfg[f"caption_{name}"]
        for name in ("match_weight", "generator_weight")
    }
    decoding = CaptionDecoding(method=cfg.decoding, beam_size=cfg.beam_size, top_p=cfg.caption_top_p,
                               temperature=cfg.caption_temperature, **weights)  # fmt: skip
    stage.check_caption_rescoring(decoding, "caption_{}")
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    size = stage.hparams.image_size
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "captions.jsonl"
    with open(manifest, "w") as f:
        for start in range(0, len(files), cfg.batch_size):
            chunk = files[start : start + cfg.batch_size]
            images = torch.stack([read_image(p, size) for p in chunk])
            for path, caption in zip(chunk, stage.caption_images(images, decoding, generator), strict=True):
                f.write(
                    json.dumps({"file": str(path), "caption": caption, "decoding": decoding.method}) + "\n"
                )
    log.info(f"captioned {len(files)} images: {manifest}")
    return {"captions": len(files), "manifest": str(manifest)}
