"""`python sample.py task=caption ckpt=PATH images=DIR`: image -> text with a trained joint-stage checkpoint.

Every PNG/JPEG/BMP/WebP file in `images` (a folder, or one file) is read as evaluation reads images (EXIF
orientation, transparency on white, shorter side resized to the stage's image size, center crop) and captioned with
`decoding=greedy|beam|nucleus` (beams re-scored by the matcher and the generator: `caption_match_weight`,
`caption_generator_weight`); `captions.jsonl` (file, caption, decoding) goes to `out_dir`. A file that cannot be
read is skipped, and the skips are counted and named at the end.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from imagen.checkpoints import CheckpointError
from imagen.cli.sample_generate import resolve_device
from imagen.data.bad_samples import BadSample
from imagen.data.preprocess import open_image, resize_crop, to_tensor
from imagen.progress import progress_bar
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
    """An image file -> (3, size, size) float in [-1, 1], as the data's evaluation split reads it; `BadSample` if it
    cannot be read."""
    return to_tensor(
        resize_crop(open_image(path.read_bytes(), str(path), max_pixels=None), size, random_crop=False)
    )


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
