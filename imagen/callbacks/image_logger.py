"""One image-logging callback for every stage and logger (taming-transformers' pattern).

A stage exposes `log_images(batch) -> dict[name, images or (images, captions)]` with images (B, 3, H, W) in
[-1, 1]. After the first validation (and test) batch this callback turns each entry into a grid and sends it to
every configured logger that shows images (W&B image panels, TensorBoard), and always writes it as a PNG under
`<run dir>/images/<split>/<name>/step_XXXXXX.png`, beside the CSV logs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from imagen.images import captioned_grid, make_grid, save_png
from imagen.inference import eval_mode

log = logging.getLogger(__name__)


def _head(batch, n: int):
    """The first `n` samples of a collated batch (dict of tensors and lists)."""
    if isinstance(batch, dict):
        return {k: _head(v, n) for k, v in batch.items()}
    if isinstance(batch, (torch.Tensor, list, tuple)):
        return batch[:n]
    return batch


class ImageLogger(pl.Callback):
    def __init__(self, max_images: int = 16, nrow: int = 8, log_on_test: bool = True):
        self.max_images = max_images
        self.nrow = nrow
        self.log_on_test = log_on_test

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self.log_batch(trainer, pl_module, batch, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self.log_on_test:
            self.log_batch(trainer, pl_module, batch, "test")

    def log_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, split: str) -> None:
        if not trainer.is_global_zero or not hasattr(pl_module, "log_images"):
            return
        with eval_mode(pl_module), torch.no_grad():
            entries = pl_module.log_images(_head(batch, self.max_images))
        step = trainer.global_step
        for name, value in entries.items():
            images, captions = value if isinstance(value, tuple) else (value, None)
            if captions is not None:
                grid = captioned_grid(images, captions, nrow=self.nrow)
            else:
                grid = make_grid(images, nrow=self.nrow, scale=max(1, 128 // images.shape[-1]))
            path = save_png(
                grid, Path(trainer.default_root_dir) / "images" / split / name / f"step_{step:06d}.png"
            )
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"{split}/{name}", images=[grid], step=step)
                elif isinstance(logger, TensorBoardLogger):
                    import numpy as np

                    logger.experiment.add_image(f"{split}/{name}", np.asarray(grid), step, dataformats="HWC")
            log.debug(f"wrote {path}")
