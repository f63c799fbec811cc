"""Checkpointing that always keeps the newest weights in `last.ckpt`."""

from __future__ import annotations

import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


def mid_accumulation(trainer: pl.Trainer) -> bool:
    """Whether the batch now ending only accumulates gradients (`accumulate_grad_batches` > 1): the optimizer steps
    with a later one. A checkpoint written now would hold neither the accumulated gradients nor a way to redo them
    (its loop counts the micro-batches done), so a resume from it would not continue the run exactly."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


class LastAndBestCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` with `save_last` meaning what users read it as: `last.ckpt` holds the weights
    of the newest save point (every validation, and the end of training) whether or not the monitored metric
    improved there.

    Lightning 2.6 writes `last.ckpt` only beside a new top-k checkpoint: a run whose final validation does not beat
    an earlier one ends with `last.ckpt` holding that earlier step, while the test and the next pipeline stage see
    the final weights, and a resume after a crash repeats every step since the best one.

    Saves on a schedule (`every_n_train_steps`, `train_time_interval`) write `last.ckpt`, under automatic and manual
    optimization alike; with a monitor, the top-k checkpoints are chosen at every validation, on fresh metrics.
    Lightning 2.6 put scheduled saves off until the first validation when a monitor is set (a run validating every
    5000 steps kept nothing before), ignored `train_time_interval` under manual optimization, and a scheduled save
    at a validation's step kept that validation from choosing its top-k checkpoint.

    With gradient accumulation a scheduled save falls at the end of an optimizer step: a `train_time_interval` save
    that falls due in the middle of one waits for its last micro-batch (Lightning's saved there).
    """

    _last_saved_step: int | None = None

    def __init__(self, *args, enable_version_counter: bool = False, **kwargs) -> None:
        # a file of the same name is overwritten: with Lightning's default, a `last.ckpt` this callback did not write
        # (a fresh run in a used run directory) makes it save `last-v1.ckpt` from then on, and leave `last.ckpt` stale
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)
        if self.save_last == "link":  # a link to the newest top-k file: not the newest weights here
            raise ValueError(
                "callbacks.model_checkpoint.save_last='link' is not supported; use true (a file)"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_saved_step = trainer.global_step  # a resumed run's checkpoint holds this step already

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        # the same on every rank: a save that falls due waits for the step's last micro-batch
        if mid_accumulation(trainer):
            return
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if self._train_time_interval is not None:
            now = time.monotonic()
            interval = self._train_time_interval.total_seconds()
            elapsed = self._last_time_checked is not None and now - self._last_time_checked >= interval
            if trainer.strategy.broadcast(elapsed):  # rank 0's clock decides for every rank
                self._last_time_checked, due = now, True
        # once per step (accumulated batches share one), and not again after a validation's save at this step
        if (
            not due
            or self._last_saved_step == trainer.global_step
            or self._should_skip_saving_checkpoint(trainer)
        ):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None:  # the newest weights are the top-k ones
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
            return
        chosen = self._last_global_step_saved
        self._save_last_checkpoint(trainer, candidates)
        self._last_global_step_saved = chosen  # a validation at this step still chooses its top-k checkpoint

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_monitor(trainer)
        # with a monitor, every validation chooses the best (Lightning's only after a scheduled save)
        if self.monitor is not None:
            self._defer_save_until_validation = True
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skips(trainer):  # Lightning's own end-of-training `last.ckpt` does not skip a fast_dev_run
            return
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    def _check_monitor(self, trainer: pl.Trainer) -> None:
        """A monitored metric the run does not log (e.g. `val/judge_acc` of a joint model trained without its
        generation loss) stops the run at its first validation with the key to set and the metrics it could name;
        `last.ckpt` is written first, so the steps taken are kept."""
        if self.monitor is None or self._skips(trainer) or self.monitor in self._monitor_candidates(trainer):
            return
        self._refresh_last(trainer)
        logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
        kept = f" The weights so far are in {self.dirpath}/{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}."
        raise ValueError(
            f"callbacks.model_checkpoint.monitor={self.monitor}: this run logs no such metric at validation. It "
            f"logs {logged}; set callbacks.model_checkpoint.monitor to one of them (and "
            f"callbacks.model_checkpoint.mode to max or min).{kept if self.save_last else ''}"
        )

    @staticmethod
    def _skips(trainer: pl.Trainer) -> bool:
        """Not a real training step: nothing is saved."""
        return trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        """Write `last.ckpt` for this step unless it already holds it (or this is not a real training step)."""
        if not self.save_last or self._last_saved_step == trainer.global_step or self._skips(trainer):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
