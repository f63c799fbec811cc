"""Progress bars: for long work outside the Lightning loop (judge training, sampling, encoding), and the
Trainer's."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(transient: bool = False) -> Progress:
    """A rich progress bar: `with progress_bar() as p: task = p.add_task("what", total=n); p.update(task, advance=1)`."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
    )


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, whose training line reads `Epoch N` when the run is bounded by steps (it
    read `Epoch N/-2` under max_epochs=-1) and `Epoch N/M` when by epochs."""

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}" + (
            f"/{epochs - 1}" if epochs is not None and epochs > 0 else ""
        )
        return f"{description:{len(self.validation_description)}}"  # as long as "Validation": no flicker
