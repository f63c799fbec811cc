"""Checkpointing that always keeps the newest weights in `last.ckpt`."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class LastAndBestCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` with `save_last` meaning what users read it as: `last.ckpt` holds the weights
    of the newest save point (every validation, and the end of training) whether or not the monitored metric
    improved there.

    Lightning 2.6 writes `last.ckpt` only beside a new top-k checkpoint: a run whose final validation does not beat
    an earlier one ends with `last.ckpt` holding that earlier step, while the test and the next pipeline stage see
    the final weights, and a resume after a crash repeats every step since the best one.
    """

    _last_saved_step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        """Write `last.ckpt` for this step unless it already holds it (or this is not a real training step)."""
        if (
            not self.save_last
            or self._last_saved_step == trainer.global_step
            or trainer.sanity_checking
            or trainer.fast_dev_run
            or trainer.state.fn != TrainerFn.FITTING
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
