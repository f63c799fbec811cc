"""`python sample.py task=caption ckpt=PATH images=DIR`: image -> text with a trained joint-stage checkpoint.

Every file with an image extension (`imagen.data.preprocess.IMAGE_EXTENSIONS`, as training reads) in `images` (a
folder and its subfolders, in path order; or one file) is read by the data's evaluation preprocessing (JPEG draft
decoding, EXIF orientation, transparency on white, shorter side resized to the stage's image size, center crop) and
captioned with `decoding=greedy|beam|nucleus` (beams re-scored by the matcher and the generator:
`caption_match_weight`, `caption_generator_weight`; a setting not given is the checkpoint's,
`model.caption_decoding`); `captions.jsonl` (file, relative_path: the file's path inside `images`, caption,
decoding) goes to `out_dir`. Other files are left out with a warning that counts and names them; a file that cannot
be read is skipped, and the skips are counted and named at the end.
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
from imagen.data.bad_samples import BadSample, read_sample_file
from imagen.data.image_text import Preprocess
from imagen.data.preprocess import IMAGE_EXTENSIONS
from imagen.progress import progress_bar

log = logging.getLogger("imagen")

# command-line key -> `CaptionDecoding` field; null: the checkpoint's own (`model.caption_decoding`)
DECODING_KEYS = {"decoding": "method", "beam_size": "beam_size", "caption_top_p": "top_p",
                 "caption_temperature": "temperature", "caption_match_weight": "match_weight",
                 "caption_generator_weight": "generator_weight"}  # fmt: skip


def image_files(images: str | None) -> tuple[Path, list[Path]]:
    """The folder (or file) `images` names, and its image files: by extension, subfolders included, in path order (as
    training indexes a folder). The other files of a folder are left out with a warning naming the first few."""
    if not images:
        raise ValueError("task=caption needs images=DIR (a folder of images) or images=FILE")
    path = Path(images)
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"images={path}: no such file or folder")
    found = sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(
            f"images={path}: no image files ({', '.join(IMAGE_EXTENSIONS)}), subfolders included"
        )
    others = [p.relative_to(path).as_posix() for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        log.warning(
            f"images={path}: {len(others)} files are not images by extension ({', '.join(IMAGE_EXTENSIONS)}) and "
            f"are left out: {others[:5]}{' ...' if len(others) > 5 else ''}"
        )
    return path, files


def read_image(path: Path, size: int) -> torch.Tensor:
    """An image file -> (3, size, size) float in [-1, 1], read by the data's evaluation preprocessing (`Preprocess`:
    JPEG draft decoding, center crop; no pixel limit); `BadSample` if it cannot be read."""
    preprocess = Preprocess(image_size=size, random_crop=False, max_pixels=None)
    # the preprocessing of a sample reads its captions first: a placeholder, since only the image is used
    return preprocess(read_sample_file(path), ["-"], str(path))["image"]


@torch.no_grad()
def sample_caption(cfg: DictConfig) -> dict:
    from imagen.stages.joint import JointStage

    root, files = image_files(cfg.images)
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
                    row = {"file": str(path), "relative_path": path.relative_to(root).as_posix(), "caption": caption,
                           "decoding": decoding.method}  # fmt: skip
                    f.write(json.dumps(row) + "\n")
            progress.update(task, advance=len(batch))
    captioned = len(files) - len(skipped)
    log.info(f"captioned {captioned} images: {manifest}")
    if skipped:
        log.warning(
            f"{len(skipped)} of {len(files)} images could not be read and were skipped: {skipped[:10]}"
        )
    return {"captions": captioned, "skipped": skipped, "manifest": str(manifest)}
