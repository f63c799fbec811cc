"""`python train.py`: compose the config, build data, model, callbacks, loggers and trainer, fit, test.

The run directory (printed at start and end) receives `checkpoints/`, `metrics.json`, image grids, logs and
the saved config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from imagen.cli.checks import check_train_config
from imagen.cli.pipeline import is_pipeline, run_pipeline
from imagen.cli.utils import (
    apply_extras,
    instantiate_callbacks,
    instantiate_loggers,
    metric_for_sweeper,
    task_wrapper,
    tensor_metrics,
    write_metrics,
)

log = logging.getLogger("imagen")

CONFIG_PATH = "pkg://imagen.conf"


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path=auto` resumes from this run directory's last.ckpt when there is one."""
    if cfg.ckpt_path == "auto":
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    return cfg.ckpt_path


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
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}

    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)

    metrics: dict[str, float] = {}
    timings: dict[str, float] = {}
    if cfg.train:
        start = time.time()
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
        timings["time/fit_seconds"] = time.time() - start
        metrics.update(tensor_metrics(trainer.callback_metrics))
    if cfg.test:
        start = time.time()
        if cfg.train:
            trainer.test(model=model, datamodule=datamodule)  # the trained weights (averaged, with EMA)
        else:
            if not cfg.ckpt_path:
                raise ValueError("train=false test=true needs ckpt_path=PATH (the checkpoint to evaluate)")
            trainer.test(model=model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        timings["time/test_seconds"] = time.time() - start
        metrics.update(tensor_metrics(trainer.callback_metrics))
    metrics.update(timings)
    write_metrics(metrics, output_dir / "metrics.json")
    if pl.utilities.rank_zero_only.rank == 0:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("test/"))
        log.info(f"test metrics: {summary or '(none)'}")
        log.info(f"run directory: {output_dir} (metrics.json, checkpoints/, images/)")
    return metrics, objects


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metric_for_sweeper(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
