"""`python sample.py task=caption ckpt=PATH images=DIR`: image -> text with a trained joint-stage checkpoint.

Every PNG/JPEG/BMP/WebP file in `images` (a folder, or one file) is read as evaluation reads images (EXIF
orientation, transparency on white, shorter side resized to the stage's image size, center crop) and captioned with
`decoding=greedy|beam|nucleus` (beams re-scored by the matcher and the generator: `caption_match_weight`,
`caption_generator_weight`; a setting not given is the checkpoint's, `model.caption_decoding`); `captions.jsonl`
(file, caption, decoding) goes to `out_dir`. A file that cannot be read is skipped, and the skips are counted and
named at the end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from imagen.checkpoints import CheckpointError, read_checkpoint
from imagen.cli.sample import check_trained, prepare_out_dir, resolve_device
from imagen.data.bad_samples import BadSample
from imagen.data.preprocess import open_image, resize_crop, to_tensor
from imagen.progress import progress_bar

log = logging.getLogger("imagen")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# command-line key -> `CaptionDecoding` field; null: the checkpoint's own (`model.caption_decoding`)
DECODING_KEYS = {"decoding": "method", "beam_size": "beam_size", "caption_top_p": "top_p",
                 "caption_temperature": "temperature", "caption_match_weight": "match_weight",
                 "caption_generator_weight": "generator_weight"}  # fmt: skip


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
    """An image file -> (3, size, size) float in [-1, 1], as the data's evaluation split reads it; `BadSample` if it
    cannot be read."""
    return to_tensor(
        resize_crop(open_image(path.read_bytes(), str(path), max_pixels=None), size, random_crop=False)
    )


@torch.no_grad()
def sample_caption(cfg: DictConfig) -> dict:
    from imagen.stages.joint import JointStage

    files = image_files(cfg.images)
    checkpoint = read_checkpoint(cfg.ckpt, cfg.trust_checkpoint)  # read once: it fills the stage
    try:
        stage = JointStage.from_checkpoint(cfg.ckpt, trust=cfg.trust_checkpoint, checkpoint=checkpoint)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {cfg.ckpt} is not a compatible joint checkpoint: {e}") from None
    check_trained(stage, checkpoint, "caption", "captioner", cfg.ckpt)
    device = resolve_device(cfg.device)
    stage.to(device)
    given = {field: cfg[key] for key, field in DECODING_KEYS.items() if cfg[key] is not None}
    decoding = replace(stage.caption_decoding, **given)
    stage.check_caption_decoding(decoding, "caption_{}")
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    size = stage.hparams.image_size
    out_dir = prepare_out_dir(cfg, ("captions.jsonl",))
    manifest = out_dir / "captions.jsonl"
    skipped: list[str] = []
    with open(manifest, "w") as f, progress_bar() as progress:
        task = progress.add_task(f"captioning {len(files)} images", total=len(files))
        for start in range(0, len(files), cfg.batch_size):
            batch, chunk, images = files[start : start + cfg.batch_size], [], []
            for path in batch:
                try:
                    images.append(read_image(path, size))
                    chunk.append(path)
                except BadSample as e:
                    log.warning(f"skipped {e}")
                    skipped.append(str(path))
            if chunk:
                captions = stage.caption_images(torch.stack(images), decoding, generator)
                for path, caption in zip(chunk, captions, strict=True):
                    f.write(
                        json.dumps({"file": str(path), "caption": caption, "decoding": decoding.method})
                        + "\n"
                    )
            progress.update(task, advance=len(batch))
    captioned = len(files) - len(skipped)
    log.info(f"captioned {captioned} images: {manifest}")
    if skipped:
        log.warning(
            f"{len(skipped)} of {len(files)} images could not be read and were skipped: {skipped[:10]}"
        )
    return {"captions": captioned, "skipped": skipped, "manifest": str(manifest)}
