"""Helpers behind the entry points: building callbacks and loggers, printing the config, run bookkeeping."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from imagen.callbacks.fault import Preemption
from imagen.cli.checks import ConfigError
from imagen.files import write_text_atomic
from imagen.precision import auto_precision

log = logging.getLogger("imagen")


def run_id(output_dir: str | None) -> str:
    """A logger run id kept in the run directory (`.run_id`): every start of one directory (a resume, every DDP rank)
    gets the same id and continues the logger's run; a new directory gets a new one, even at a path used before (the
    quickstart moves a stage's earlier run aside before it trains the stage again), and so does a fresh start in a
    used one (train.py retires its id first: `retire_run_id`). None (no run directory: `--cfg job --resolve`): ""."""
    if output_dir is None:
        return ""
    path = Path(output_dir) / ".run_id"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = hashlib.sha1(f"{path.resolve()}|{time.time_ns()}|{os.getpid()}".encode()).hexdigest()[:16]
        # a draft per process (nodes may share the file system); of processes started together, the first to link
        # its draft names the run
        draft = path.with_name(f".run_id.{socket.gethostname()}.{os.getpid()}")
        draft.write_text(fresh)
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
        draft.unlink()
    return path.read_text().strip()


def retire_run_id(output_dir: str | Path) -> None:
    """Move the run directory's `.run_id` aside (`.run_id.<id>`), so that the next `run_id` names a new run."""
    path = Path(output_dir) / ".run_id"
    if path.is_file():
        os.replace(path, path.with_name(f".run_id.{path.read_text().strip()}"))


RUN_SETTINGS = "run_settings.json"
# settings a resumed run may change: how fast it goes and how it evaluates, not what it trains (a key or its subtree);
# the autoencoder a generator resumes with is checked against its checkpoint's by the stage itself
RESUMABLE_CHANGES = ("data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor",
                     "data.eval_batch_size", "model.compile", "model.compile_options",
                     "model.net.activation_checkpointing", "model.eval_batch_size", "model.eval_prompts",
                     "model.test_prompts", "model.eval_seed", "model.compute_fid", "model.sampling",
                     "model.caption_decoding", "model.autoencoder_ckpt")  # fmt: skip


# the trainer and callback settings that change what a run trains (beside its model, data and seed)
TRAINING_KEYS = ("trainer.precision", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm",
                 "trainer.accumulate_grad_batches", "callbacks.ema")  # fmt: skip


def run_settings(cfg: DictConfig) -> dict:
    """What a run is, flattened to dotted keys: its model, data, seed and `TRAINING_KEYS`. Interpolations are left
    as written: a run extended by `trainer.max_steps` (its LR schedule's length follows) or moved to another
    machine (`paths`) is the same run."""

    def flatten(value, key: str) -> dict:
        if isinstance(value, dict) and value:
            return {k: v for name, item in value.items() for k, v in flatten(item, f"{key}.{name}").items()}
        return {key: value}

    def unresolved(key: str):  # the value at a dotted key as written; None where there is none
        node = whole
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    whole = OmegaConf.to_container(cfg, resolve=False)
    settings = {"seed": cfg.get("seed")}
    for key in ("model", "data", *TRAINING_KEYS):
        settings.update(flatten(unresolved(key), key))
    return settings


def trained_settings(settings: dict) -> dict:
    """`run_settings` less what a resume may change (`RESUMABLE_CHANGES`)."""
    return {
        k: v
        for k, v in settings.items()
        if not any(k == c or k.startswith(f"{c}.") for c in RESUMABLE_CHANGES)
    }


def record_run_settings(cfg: DictConfig, output_dir: str | Path) -> None:
    """Keep what a run trains (`run_settings`: at a fresh start or a chosen resume) in its run directory, for
    `check_resume_settings`."""
    path = Path(output_dir) / RUN_SETTINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(run_settings(cfg), indent=1, sort_keys=True, default=str))


def check_resume_settings(
    cfg: DictConfig, output_dir: str | Path, ckpt_path: str, restored_step: int | None = None
) -> None:
    """`ckpt_path=auto` resumes a run only with the settings it started with, and only up to `trainer.max_steps`: a
    run directory reused with others (a sweep run again in the same `hydra.sweep.dir` with other values) would
    otherwise go on training, or report, what the earlier settings trained. An explicit `ckpt_path` resumes
    whatever it is given."""
    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    if restored_step is not None and max_steps is not None and 0 <= max_steps < restored_step:
        raise ConfigError(
            f"ckpt_path=auto: {ckpt_path} is at step {restored_step}, past trainer.max_steps={max_steps}: the run "
            f"directory {output_dir} holds a longer run. Use another run directory (hydra.run.dir / "
            "hydra.sweep.dir) or start afresh here with ckpt_path=null"
        )
    path = Path(output_dir) / RUN_SETTINGS
    if not path.is_file():  # a run started before the record was kept
        return
    recorded = trained_settings(json.loads(path.read_text()))
    current = trained_settings(json.loads(json.dumps(run_settings(cfg), default=str)))  # the record's types
    if not any(k.startswith("trainer.") for k in recorded):  # recorded before TRAINING_KEYS were
        current = {k: v for k, v in current.items() if not k.startswith(("trainer.", "callbacks."))}
    changed = sorted(
        k for k in recorded.keys() | current.keys() if recorded.get(k, "<unset>") != current.get(k, "<unset>")
    )
    if not changed:
        return
    shown = ", ".join(
        f"{k}={current.get(k, '<unset>')} (was {recorded.get(k, '<unset>')})" for k in changed[:5]
    )
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    raise ConfigError(
        f"ckpt_path=auto: the run directory {output_dir} holds a run trained with other settings: {shown}{more} "
        f"({path}). Use another run directory (hydra.run.dir / hydra.sweep.dir), start afresh here with "
        f"ckpt_path=null, or resume anyway with ckpt_path={ckpt_path} (its optimizer and LR schedule state, learning "
        "rates included, then come from the checkpoint)"
    )


def run_name(output_dir: str | None, log_dir: str) -> str:
    """A logger's name for a run: its directory under the log folder (`shapes_joint/runs/2026-12-06_10-00-00_123456`, or
    `.../multiruns/<time>/<job>` for a job of a sweep), which says where its files are; elsewhere the folder's name;
    "" without a run directory (`--cfg job --resolve`)."""
    if output_dir is None:
        return ""
    output, logs = Path(output_dir).resolve(), Path(log_dir).resolve()
    return output.relative_to(logs).as_posix() if output.is_relative_to(logs) else output.name


def run_group(run_name: str, task_name: str) -> str:
    """A logger's group for a run: its sweep (`<task>/multiruns/<time>`) for a job of one, so that a sweep's jobs are
    compared apart from other runs; else its task."""
    parts = run_name.split("/")
    return "/".join(parts[:3]) if len(parts) >= 4 and parts[1] == "multiruns" else task_name


def launch_dir() -> str:
    """Where the command was started: Hydra's `runtime.cwd` inside a job (right even under `hydra.job.chdir=true`),
    else the working directory, as when a multirun's sweeper resolves its directory before any job is set up (where
    ${hydra:runtime.cwd} cannot resolve)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def register_resolvers() -> None:
    """OmegaConf resolvers used in conf/ (idempotent)."""
    if not OmegaConf.has_resolver("imagen.auto_precision"):
        OmegaConf.register_new_resolver("imagen.auto_precision", auto_precision)
    if not OmegaConf.has_resolver("imagen.run_id"):
        OmegaConf.register_new_resolver("imagen.run_id", run_id)
    if not OmegaConf.has_resolver("imagen.run_name"):
        OmegaConf.register_new_resolver("imagen.run_name", run_name)
    if not OmegaConf.has_resolver("imagen.run_group"):
        OmegaConf.register_new_resolver("imagen.run_group", run_group)
    if not OmegaConf.has_resolver("imagen.launch_dir"):
        OmegaConf.register_new_resolver("imagen.launch_dir", launch_dir)


register_resolvers()


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Build every entry of the `callbacks` dict that has a `_target_` (entries set to null are skipped).

    An entry that is only settings (an experiment tuning `callbacks.model_checkpoint` after `callbacks=none`
    removed the callback itself) is skipped with a warning that names it. `Preemption` goes last (Lightning puts
    the checkpoint callbacks after it): the checkpoint it writes at the end of a batch holds what every other
    callback did in that batch (an EMA update).
    """
    callbacks: list[Callback] = []
    for name, entry in (cfg or {}).items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            callbacks.append(hydra.utils.instantiate(entry))
        elif isinstance(entry, DictConfig):
            log.warning(
                f"callbacks.{name} has settings {OmegaConf.to_container(entry)} but no _target_ "
                "(its callback config is not selected); skipped"
            )
        elif entry is not None:
            raise ValueError(f"callbacks.{name}: expected a config with _target_, got {entry!r}")
    # a stable sort: the others keep their order
    return sorted(callbacks, key=lambda callback: isinstance(callback, Preemption))


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    loggers: list[Logger] = []
    for name, entry in (cfg or {}).items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            loggers.append(hydra.utils.instantiate(entry))
        elif entry is not None:
            raise ValueError(f"logger.{name}: expected a config with _target_, got {entry!r}")
    return loggers


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to: str | Path | None = None) -> None:
    """Print the composed config as a rich tree (main groups first) and save it as config_tree.log."""
    import rich.syntax
    import rich.tree
    from rich.console import Console

    order = ["data", "model", "callbacks", "logger", "trainer", "paths", "extras"]
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    for key in order + [k for k in cfg if k not in order]:
        if key not in cfg:
            continue
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=False) if isinstance(value, DictConfig) else str(value)
        tree.add(str(key), style="bold").add(rich.syntax.Syntax(text, "yaml"))
    Console().print(tree)
    if save_to is not None:
        with open(Path(save_to) / "config_tree.log", "w") as f:
            Console(file=f).print(tree)


class LightningTipFilter(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing litlogger / litmodels") from a run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


LIGHTNING_TIPS = LightningTipFilter()


def apply_extras(cfg: DictConfig) -> None:
    # Lightning 2.6's pytree helper builds torch's LeafSpec, which torch 2.13 deprecates (a FutureWarning in every
    # stage's log); nothing a user of imagen can act on
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )  # fmt: skip
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(LIGHTNING_TIPS)
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config_tree(cfg, save_to=cfg.paths.output_dir)


def finish_loggers(exit_code: int = 0) -> None:
    """Close the W&B run (if any) so that the next job of a multirun starts a new one; a failed run is marked as
    such (`exit_code` 1: "Failed" in W&B, not "Finished")."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


FILE_ONLY = {"file_only": True}  # `log.error(..., extra=FILE_ONLY)`: a record for the run's log file alone


class ConsoleFilter(logging.Filter):
    """The filter on Hydra's console handler (conf/hydra/default.yaml): drops the records logged with
    `extra=FILE_ONLY`, which the run's log file keeps."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def task_wrapper(task: Callable) -> Callable:
    """Run a task so that loggers are finished and the run directory is reported even when it raises."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig):
        try:
            result = task(cfg)
        except BaseException as e:  # also a KeyboardInterrupt: the run did not finish
            # a config error names the key and the fix: no traceback; the console shows its exit line instead
            if isinstance(e, ConfigError):
                log.error(f"run refused: {e} (its directory: {cfg.paths.output_dir})", extra=FILE_ONLY)
            elif isinstance(e, Exception):
                log.exception(f"run failed; its directory: {cfg.paths.output_dir}")
            finish_loggers(exit_code=1)
            raise
        finish_loggers()
        return result

    return wrapped


def tensor_metrics(metrics: dict) -> dict[str, float]:
    """Scalar metrics with `split/name` keys as plain floats."""
    out = {}
    for key, value in metrics.items():
        if "/" not in key:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        out[key] = float(value)
    return out


@rank_zero_only
def write_metrics(metrics: dict[str, float], path: str | Path) -> None:
    """Write metrics.json atomically (temp file, then rename)."""
    write_text_atomic(path, json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")


def metric_for_sweeper(metrics: dict[str, float], name: str | None) -> float | None:
    """The value of `optimized_metric` for hyperparameter sweeps; a missing metric is an error."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}")
    return metrics[name]
