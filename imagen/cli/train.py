"""`python train.py`: compose the config, build data, model, callbacks, loggers and trainer, fit, test.

The run directory (printed at start and end) receives `checkpoints/`, `metrics.json`, image grids, logs and
the saved config.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torchmetrics import Metric

from imagen.callbacks.fault import Preemption
from imagen.checkpoints import find_resume_checkpoint, read_checkpoint
from imagen.cli.checks import ConfigError, check_train_config, config_errors_in_one_line
from imagen.cli.pipeline import is_pipeline, run_pipeline
from imagen.cli.utils import (
    apply_extras,
    check_resume_settings,
    instantiate_callbacks,
    instantiate_loggers,
    metric_for_sweeper,
    record_run_settings,
    retire_run_id,
    task_wrapper,
    tensor_metrics,
    write_metrics,
)
from imagen.distributed import launching_process
from imagen.loggers import ResumableCSVLogger, retire_tensorboard_events

log = logging.getLogger("imagen")

CONFIG_PATH = "pkg://imagen.conf"


def resolve_ckpt_path(cfg: DictConfig) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from (or test) and its contents, memory-mapped ((None, None): none).
    `ckpt_path=auto` (the default): the newest readable checkpoint of this run directory, if any (a corrupt one is
    reported and skipped); a path: that file, which must be readable."""
    if cfg.ckpt_path == "auto":
        found = find_resume_checkpoint(cfg.paths.output_dir, trust=cfg.trust_checkpoint)
        if found is None:
            return None, None
        path, checkpoint = found
    elif cfg.ckpt_path:
        path, checkpoint = cfg.ckpt_path, read_checkpoint(cfg.ckpt_path, cfg.trust_checkpoint, mmap=True)
    else:
        return None, None
    if pl.utilities.rank_zero_only.rank == 0:
        log.info(
            f"{'resuming from' if cfg.train else 'testing'} {path} at step {checkpoint.get('global_step')}"
        )
    return str(path), checkpoint


def check_checkpoint_data(datamodule: pl.LightningDataModule, path: str, checkpoint: dict) -> None:
    """Refuse, before any setup, a checkpoint whose data state the datamodule would refuse when Lightning restores it
    (`check_checkpoint_state`: a folder's val and test held out by another rule), naming the checkpoint."""
    state = checkpoint.get(type(datamodule).__qualname__)
    if isinstance(state, dict) and hasattr(datamodule, "check_checkpoint_state"):
        try:
            datamodule.check_checkpoint_state(state)
        except ValueError as e:
            raise ConfigError(f"ckpt_path={path}: {e}") from None


def test_before_fit(trainer: pl.Trainer, model: pl.LightningModule, datamodule) -> dict[str, float]:
    """Test the weights a run starts from (`model.init_from`) before fitting: their metrics as `before/test/...`
    (a fine-tune's baseline, measured on the same prompts as its final test)."""
    trainer.test(model=model, datamodule=datamodule)
    before = tensor_metrics(trainer.callback_metrics)
    for metric in model.modules():  # states reset under inference mode cannot be updated by fit's validation
        if isinstance(metric, Metric):
            metric.reset()
    return {f"before/{k}": v for k, v in before.items() if k.startswith("test/")}


def recorded_metrics(output_dir: Path, prefixes: tuple[str, ...]) -> dict[str, float]:
    """The metrics under `prefixes` an earlier attempt of this run wrote to its metrics.json ({} if none)."""
    path = output_dir / "metrics.json"
    if not path.is_file():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if k.startswith(prefixes)}


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    """Fit and/or test one stage as configured (or each stage of a pipeline); returns (metrics, objects)."""
    if is_pipeline(cfg):
        return run_pipeline(cfg)
    check_train_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if pl.utilities.rank_zero_only.rank == 0:
        log.info(f"run directory: {output_dir}")
    apply_extras(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    # _convert_="all": plain dicts and lists reach the constructors, so hyperparameters saved in checkpoints
    # stay loadable with torch.load(weights_only=True)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    ckpt_path, checkpoint = resolve_ckpt_path(cfg) if cfg.train or cfg.test else (None, None)
    restored_step = None
    if checkpoint is not None:  # refused now, before the datamodule indexes the corpus
        check_checkpoint_data(datamodule, ckpt_path, checkpoint)
        restored_step = checkpoint.get("global_step")
        del checkpoint
    if cfg.train and cfg.test and hasattr(datamodule, "check_split"):
        # a missing or unreadable test split stops the run now, not after training
        datamodule.check_split("test")
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    test_ckpt_path = ckpt_path  # train=false: the checkpoint tested; otherwise the one resumed
    if not cfg.train:
        ckpt_path = restored_step = None
    if ckpt_path is not None and cfg.ckpt_path == "auto":
        check_resume_settings(cfg, output_dir, ckpt_path, restored_step)
    # a fresh start in a used directory logs a new W&B run; the launching process decides, before any rank reads it
    launcher = launching_process()
    fresh_start = cfg.train and ckpt_path is None and launcher
    if fresh_start:
        retire_run_id(output_dir)
    if (
        launcher and cfg.train and (ckpt_path is None or cfg.ckpt_path != "auto")
    ):  # a start, or a chosen resume
        record_run_settings(cfg, output_dir)
    loggers = instantiate_loggers(cfg.get("logger"))
    for logger in loggers if fresh_start else []:  # a fresh start's CSV and TensorBoard logs start anew too
        if isinstance(logger, ResumableCSVLogger) and (moved := logger.retire_metrics()):
            log.info(f"a fresh start in a used run directory: the earlier metrics.csv is now {moved}")
        if isinstance(logger, pl.loggers.TensorBoardLogger) and (
            moved := retire_tensorboard_events(logger.log_dir)
        ):
            log.info(
                f"a fresh start in a used run directory: the earlier TensorBoard files are now in {moved}"
            )
    monitors = [c for c in callbacks if isinstance(c, pl.callbacks.LearningRateMonitor)]
    # Lightning refuses the monitor without a logger (`logger=null`, the debug modes)
    if monitors and not loggers:
        log.info("no logger: callbacks.learning_rate_monitor is left out (it writes to a logger)")
        callbacks = [c for c in callbacks if c not in monitors]
    # the checkpoint writer joins whatever plugins the trainer config lists (the SLURM environment)
    plugins = [
        *(hydra.utils.instantiate(cfg.trainer.get("plugins")) or []),
        hydra.utils.instantiate(cfg.checkpoint_io),
    ]
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=plugins
    )
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}

    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)

    metrics: dict[str, float] = {}
    timings: dict[str, float] = {}
    weights_only = not cfg.trust_checkpoint
    if cfg.train:
        if cfg.get("test_before_fit"):
            # a resumed run keeps what its first attempt measured: the starting weights are tested once
            before = recorded_metrics(output_dir, ("before/",)) if ckpt_path else {}
            if before:
                if pl.utilities.rank_zero_only.rank == 0:
                    log.info(f"test_before_fit skipped: resuming, the {len(before)} before/... metrics of the "
                             f"run's first attempt are kept ({output_dir / 'metrics.json'})")  # fmt: skip
            else:
                start = time.time()
                before = test_before_fit(trainer, model, datamodule)
                timings["time/test_before_fit_seconds"] = time.time() - start
                write_metrics(before, output_dir / "metrics.json")  # so that a resume of this run finds them
            metrics.update(before)
        start = time.time()
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only)
        timings["time/fit_seconds"] = time.time() - start
        # a finished run run again (nothing left to train) keeps what its training measured, and how long it took
        if ckpt_path and trainer.global_step == restored_step:
            recorded = recorded_metrics(output_dir, ("train/", "val/", "time/fit_seconds"))
            metrics.update({k: v for k, v in recorded.items() if not k.startswith("time/")})
            timings.update({k: v for k, v in recorded.items() if k.startswith("time/")})
        metrics.update(tensor_metrics(trainer.callback_metrics))
        preemption = next((c for c in callbacks if isinstance(c, Preemption)), None)
        # a signal after the last training batch (in the last validation) stopped nothing: training is over, and the
        # run is tested; `main` honours the signal once its metrics are written. Decided jointly: a signal may reach
        # some ranks only, and every rank must go the same way
        late_signal = (
            preemption is not None
            and preemption.stopped_at_step is None
            and trainer.strategy.reduce_boolean_decision(preemption.received is not None, all=False)
        )
        if late_signal:
            objects["signalled"] = True
            log.info("received a signal after the last training step: the run is finished, and tested now")
        elif preemption is not None and preemption.stopped_at_step is not None:
            objects["preempted"] = True
            objects["requeued"] = preemption.requeued
            log.info(
                f"stopped by a signal at step {preemption.stopped_at_step}; checkpoint: {preemption.checkpoint} "
                f"(run directory {output_dir})"
            )
            return metrics, objects
        # so that a run stopped in its test keeps, when run again, what its training measured
        write_metrics({**metrics, **timings}, output_dir / "metrics.json")
    if cfg.test:
        start = time.time()
        if cfg.train:
            trainer.test(model=model, datamodule=datamodule)  # the trained weights (averaged, with EMA)
        else:
            if not test_ckpt_path:
                raise ValueError("train=false test=true needs ckpt_path=PATH (the checkpoint to evaluate)")
            trainer.test(
                model=model, datamodule=datamodule, ckpt_path=test_ckpt_path, weights_only=weights_only
            )
        timings["time/test_seconds"] = time.time() - start
        metrics.update(tensor_metrics(trainer.callback_metrics))
    metrics.update(timings)
    write_metrics(metrics, output_dir / "metrics.json")
    if pl.utilities.rank_zero_only.rank == 0:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("test/"))
        log.info(f"test metrics: {summary or '(none)'}")
        written = [name for name in ("metrics.json", "checkpoints", "images") if (output_dir / name).exists()]
        log.info(f"run directory: {output_dir}" + (f" ({', '.join(written)})" if written else ""))
    return metrics, objects


def optuna_storage(sweep_dir: str) -> str:
    """The Optuna study's database in `sweep_dir`, as a storage URL (conf/hparams_search/*optuna.yaml): a rerun in
    the same sweep directory continues the study. The directory is made here, since the sweeper opens the database
    before its launcher makes it."""
    path = Path(sweep_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'optuna.db'}"


def resume_command(key: str, directory: str | Path) -> str:
    """This process's command line with `key=directory` in place of any value it gave for `key`: the command that
    resumes its run (`hydra.run.dir`) or its sweep (`hydra.sweep.dir`)."""
    args = [arg for arg in sys.argv[1:] if not arg.lstrip("+").startswith(f"{key}=")]
    return shlex.join(["python", sys.argv[0], *args, f"{key}={directory}"])


BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


class StoppedBySignal(RuntimeError):
    """A job of a sweep stopped by a signal before it finished, its checkpoint written: it has no metric to return,
    and the sweeper counts it as failed."""


def end_stopped_run(cfg: DictConfig, objects: dict) -> None:
    """What `main` does with a run that a signal stopped, its checkpoint written:
    - SLURM requeued the job: the process exits (status 0) without returning, so that submitit writes no result for
      this attempt and its launcher collects the requeued attempt's;
    - a job of a multirun under Hydra's basic launcher (the jobs one after another in this process): the sweep ends
      (status 1) instead of going on to its next job, and the command that resumes it in the same sweep directory
      is logged (the same command would start a new one);
    - a job of a multirun that is a process of its own (the submitit launcher): raises `StoppedBySignal`, which
      Hydra records as the job's failure: Optuna marks the trial failed, counted against `max_failure_rate`, and
      Hydra's basic sweeper fails once its jobs ended. (A NaN would end an Optuna 2.x study: the sweeper fails on
      Optuna's refusal of it; a None fails the trial, but escapes `max_failure_rate`.)
    - a single run: returns (exit status 0), the command that resumes it logged.
    """
    rank_zero = pl.utilities.rank_zero_only.rank == 0
    stages = [objects, *objects.get("stages", {}).values()]  # a pipeline's
    if any(stage.get("requeued") for stage in stages):
        if rank_zero:
            log.info("SLURM requeued the job: this attempt ends without a result; the requeued one resumes")
        raise SystemExit(0)
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        if rank_zero:
            log.info(f"to resume: {resume_command('hydra.run.dir', hydra_cfg.runtime.output_dir)}")
        return
    sweep_dir = Path(hydra_cfg.runtime.cwd) / hydra_cfg.sweep.dir
    if hydra_cfg.launcher.get("_target_") == BASIC_LAUNCHER:
        log.error(
            "the sweep ends with this job (its next jobs would run in the time the signal left). To resume it in its "
            f"directory: {resume_command('hydra.sweep.dir', sweep_dir)}"
        )
        raise SystemExit(1)
    # this process's command line is the launcher's
    raise StoppedBySignal(
        f"stopped by a signal before it finished; its checkpoint is in {cfg.paths.output_dir}. To resume it, run the "
        f"sweep's command again with hydra.sweep.dir={sweep_dir}"
    )


def end_signalled_run() -> None:
    """What `main` does with a run that a signal reached after its last training step (in its last validation): it
    is finished, tested and its metrics written, so `main` returns its metric; but a job of a multirun under Hydra's
    basic launcher ends the sweep (status 1), as in `end_stopped_run`: its next jobs would run in the time the signal
    left."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or hydra_cfg.launcher.get("_target_") != BASIC_LAUNCHER:
        return
    sweep_dir = Path(hydra_cfg.runtime.cwd) / hydra_cfg.sweep.dir
    log.error(
        "a signal came in this job's last validation: the job finished, and the sweep ends with it. To resume it in "
        f"its directory: {resume_command('hydra.sweep.dir', sweep_dir)}"
    )
    raise SystemExit(1)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@config_errors_in_one_line
def main(cfg: DictConfig) -> float | None:
    """Train as configured; returns the value of `optimized_metric` to a sweeper (`end_stopped_run`: a run that a
    signal stopped; `end_signalled_run`: one it reached after training). A value that is not finite is an error, the
    trial's failure (a NaN would end an Optuna 2.x study, see `end_stopped_run`)."""
    metrics, objects = train(cfg)
    if objects.get("preempted"):
        return end_stopped_run(cfg, objects)
    value = metric_for_sweeper(metrics, cfg.get("optimized_metric"))
    if value is not None and not math.isfinite(value):
        raise FloatingPointError(
            f"optimized_metric={cfg.optimized_metric} is {value}: training diverged (run directory "
            f"{cfg.paths.output_dir}); lower model.optimizer.lr"
        )
    if any(stage.get("signalled") for stage in [objects, *objects.get("stages", {}).values()]):
        end_signalled_run()
    return value


if __name__ == "__main__":
    main()
