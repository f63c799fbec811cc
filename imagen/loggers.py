"""Loggers that continue the same run after a resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps it and appends (its header is read so
    that later columns are merged in)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose `metrics.csv` survives a resume: a rerun of the same run directory appends to it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def retire_metrics(self) -> Path | None:
        """A fresh start in a used run directory (`ckpt_path=null`): the earlier run's metrics.csv moves aside to
        `metrics.previous<N>.csv`, so that this run's steps, from 0 again, do not follow the old ones in one file.
        Returns where it went (None: there was none)."""
        path = Path(self.log_dir) / "metrics.csv"
        if not path.is_file():
            return None
        n = 1
        while (target := path.with_name(f"metrics.previous{n}.csv")).exists():
            n += 1
        os.replace(path, target)
        return target


def retire_tensorboard_events(log_dir: str | Path) -> Path | None:
    """A fresh start in a used run directory: the earlier run's TensorBoard files (`events.out.tfevents.*`,
    `hparams.yaml`) move to `previous<N>/` beside them, which TensorBoard shows as a run of its own, instead of two
    runs' steps from 0 drawn as one curve. Returns where they went (None: there were none)."""
    log_dir = Path(log_dir)
    files = (
        [*log_dir.glob("events.out.tfevents.*"), *log_dir.glob("hparams.yaml")] if log_dir.is_dir() else []
    )
    if not files:
        return None
    n = 1
    while (target := log_dir / f"previous{n}").exists():
        n += 1
    target.mkdir()
    for path in files:
        os.replace(path, target / path.name)
    return target
