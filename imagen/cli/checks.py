"""Config checks that run before any data is read or model is built; each failure names the key and the fix."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import logging
import math
import textwrap
import types
import typing
from collections.abc import Collection
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("imagen")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def config_errors_in_one_line(main: typing.Callable) -> typing.Callable:
    """Under `hydra.main`, between it and the entry point: a `ConfigError` of a single run ends it with one line
    (the key and the fix) and exit code 1, not a traceback. In a multirun it is raised as usual, so that a sweeper
    counts it as the trial's failure and goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    @functools.wraps(main)
    def wrapped(cfg: DictConfig):
        try:
            return main(cfg)
        except ConfigError as e:
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
                run = HydraConfig.get().runtime.output_dir
                raise SystemExit(f"config error: {e} (run directory: {run})") from None
            raise

    return wrapped


def _target(node) -> str:
    return str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""


def autoencoder_config_from_node(node: DictConfig):
    """The `AutoencoderConfig` a `model.net` node would build, without building the network."""
    from imagen.models.autoencoder import AUTOENCODER_SIZES, AutoencoderConfig

    overrides = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    size = overrides.pop("size", "shapes")
    if size not in AUTOENCODER_SIZES:
        raise ConfigError(f"model.net.size={size!r} is unknown; choose from {sorted(AUTOENCODER_SIZES)}")
    fields = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"model.net.{unknown[0]} is not an autoencoder setting; valid keys: {sorted(fields)}"
        )
    try:
        return dataclasses.replace(AUTOENCODER_SIZES[size], **overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def expect_number(
    cfg: DictConfig, key: str, kind: type, minimum: float, fix: str, maximum: float | None = None
) -> None:
    """`key` (dotted) must be a `kind` in [`minimum`, `maximum`] when it is set."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise ConfigError(f"{key}={value!r} must be {'an integer' if kind is int else 'a number'}; {fix}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number; {fix}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{key}={value} must be {bounds}; {fix}")


def expect_bool(cfg: DictConfig, key: str, required: bool = False) -> None:
    """`key` (dotted) must be true or false when it is set (or always, if `required`): a string such as `no` would
    read as true."""
    value = OmegaConf.select(cfg, key)
    if (value is not None or required) and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")


# (key, kind, minimum, maximum, fix) of the numbers a run's config may set; each is checked where it is set
NUMBERS = (
    ("seed", int, 0, None, "e.g. seed=7"),
    ("data.seed", int, 0, None, "e.g. data.seed=7"),
    ("data.image_size", int, 1, None, "e.g. data.image_size=256"),
    ("data.batch_size", int, 1, None, "e.g. data.batch_size=64"),
    ("data.eval_batch_size", int, 1, None, "e.g. data.eval_batch_size=64"),
    ("data.num_workers", int, 0, None, "e.g. data.num_workers=4"),
    ("data.max_bad_fraction", float, 0, 1, "the share of bad samples read that stops the run, e.g. 0.1"),
    ("data.bad_check_after", int, 0, None, "the samples read before that share is judged, e.g. 100"),
    ("data.samples_per_epoch", int, 1, None, "the samples of a resampled stream's epoch, e.g. 100000"),
    ("data.eval_samples", int, 1, None, "the samples per rank and worker an evaluation reads, or null for all"),
    ("data.shuffle_buffer", int, 0, None, "0: no shuffle buffer, e.g. 1000"),
    ("data.tokenizer_captions", int, 1, None, "the captions a caption tokenizer learns from, e.g. 100000"),
    ("model.eval_batch_size", int, 1, None, "e.g. model.eval_batch_size=64"),
    ("model.optimizer.lr", float, 0, None, "e.g. model.optimizer.lr=3e-4"),
    ("model.optimizer.weight_decay", float, 0, None, "0 for none"),
    ("model.weight_decay", float, 0, None, "0 for none"),
    ("model.grad_clip", float, 0, None, "the largest gradient norm, e.g. 1.0; 0 or null: no clipping"),
    ("model.cond_drop_prob", float, 0, 1, "the share of captions dropped, e.g. 0.1"),
    ("model.scheduler.warmup_steps", int, 0, None, "e.g. model.scheduler.warmup_steps=100"),
    ("model.scheduler.min_lr_ratio", float, 0, 1, "the final LR over the base LR, e.g. 0.1"),
    ("model.net.vq_decay", float, 0, 1, "the codebook's EMA decay, e.g. 0.99"),
    ("model.dropout", float, 0, 1, "e.g. 0.1"),
    *((f"model.{name}", float, 0, None, "0 turns the term off") for name in (
        "l1_weight", "l2_weight", "gradient_weight", "perceptual_weight", "adversarial_weight")),
    ("trainer.accumulate_grad_batches", int, 1, None, "1: a step per batch"),
    ("trainer.num_nodes", int, 1, None, "the machines to train on, e.g. trainer.num_nodes=2"),
    ("callbacks.model_checkpoint.every_n_train_steps", int, 1, None, "or null to save by time"),
    ("callbacks.nonfinite_guard.max_consecutive", int, 1, None, "e.g. 5"),
    ("callbacks.ema.update_starting_at_step", int, 0, None, "or null to average from the first step"),
    ("callbacks.image_logger.max_images", int, 1, None, "the images in each logged grid, e.g. 16"),
    ("callbacks.image_logger.nrow", int, 1, None, "the images per grid row, e.g. 8"),
    ("callbacks.early_stopping.patience", int, 0, None, "the validations without improvement it waits, e.g. 5"),
    ("callbacks.model_checkpoint.save_top_k", int, -1, None, "-1 keeps every checkpoint, 0 none, e.g. 1"),
)  # fmt: skip


# the value types an argument annotation is judged by; an annotation that allows any other type is not judged
SIMPLE_TYPES = (bool, int, float, str, type(None))


def _simple_types(annotation) -> tuple | None:
    """The types `annotation` allows, when they are all `SIMPLE_TYPES`; else None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    allowed = typing.get_args(annotation) if union else (annotation,)
    return allowed if all(t in SIMPLE_TYPES for t in allowed) else None


@functools.cache
def _target_arguments(target: str) -> tuple[dict, frozenset | None]:
    """The annotated argument types of a `_target_` (a function, or a class's `__init__` and, where that takes
    **kwargs, its bases'; a `Net.from_size`: the fields of its config dataclass), and the names of every argument it
    takes: None where that is not known, for a target that takes **kwargs (they may go anywhere: `DDPStrategy` hands
    them to torch's `DistributedDataParallel`, not to its base) or whose signature cannot be read."""
    try:
        found = hydra.utils.get_object(target)
    except Exception:  # an unknown target is Hydra's error to report, at instantiation
        return {}, None
    # a size registry's builder (`Net.from_size`): `size` and the fields of the net's config dataclass
    owner = getattr(found, "__self__", None)
    if target.endswith(".from_size") and isinstance(owner, type):
        try:
            config = typing.get_type_hints(owner.__init__).get("config")
        except Exception:  # an annotation that does not resolve: not judged
            config = None
        if dataclasses.is_dataclass(config):
            fields = {"size", *(f.name for f in dataclasses.fields(config))}
            return typing.get_type_hints(config), frozenset(fields)
    functions = (
        [c.__init__ for c in found.__mro__ if "__init__" in vars(c)] if isinstance(found, type) else [found]
    )
    hints: dict = {}
    names: set = set()
    for function in functions:
        try:
            for name, annotation in typing.get_type_hints(function).items():
                hints.setdefault(name, annotation)
            parameters = inspect.signature(function).parameters.values()
        except Exception:  # an annotation that does not resolve, a builtin without a signature: not judged
            return hints, None
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        keywords = next((p.name for p in parameters if p.kind is p.VAR_KEYWORD), None)
        if keywords is None:
            return hints, frozenset(names)
        if not _passes_keywords_to_base(function, keywords):
            return hints, None
    return hints, None


def _passes_keywords_to_base(function, keywords: str) -> bool:
    """Whether `function` (an `__init__`) hands its **`keywords` whole to `super().__init__`, and reads them nowhere
    else, as a subclass adding a few arguments does; `DDPStrategy` keeps them for torch's `DistributedDataParallel`,
    and a subclass may pop some of them for itself."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return False
    handed = [
        keyword.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "__init__"
        and isinstance(node.func.value, ast.Call)
        and getattr(node.func.value.func, "id", None) == "super"
        for keyword in node.keywords
        if keyword.arg is None and isinstance(keyword.value, ast.Name) and keyword.value.id == keywords
    ]
    reads = [node for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id == keywords]
    return len(handed) == 1 and len(reads) == 1


def _fits(value, allowed: tuple) -> bool:
    if value is None or isinstance(value, bool):
        return type(value) in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    return isinstance(value, float | str) and type(value) in allowed


def _describe(allowed: tuple) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    kinds = [names[t] for t in allowed if t in names and not (t is int and float in allowed)]
    return " or ".join(kinds) + (", or null" if type(None) in allowed else "")


def check_argument_types(node, key: str) -> None:
    """Every key of a `_target_` node (and of the nodes nested in it) must name an argument its target takes (a key
    left by a group option swapped for another would fail at instantiation, after the data is read), and its value
    must have a type the target's annotation allows, where that annotation is simple (`SIMPLE_TYPES`):
    `data.resampled=no` would otherwise read as true, and `data.holdout_fraction=ten` fail deep inside a
    comparison."""
    if not isinstance(node, DictConfig):
        return
    hints, accepted = _target_arguments(_target(node)) if _target(node) else ({}, None)
    for name in node:
        if str(name).startswith("_"):
            continue
        if accepted is not None and name not in accepted:
            raise ConfigError(
                f"{key}.{name}: {_target(node)} takes no argument {name!r}; it takes {sorted(accepted - {'self'})}"
            )
        # resolving may act (a run id's file): judged at its source
        if OmegaConf.is_interpolation(node, name):
            continue
        try:
            value = node[name]
        except Exception:  # missing: reported where it is read
            continue
        if isinstance(value, DictConfig):
            check_argument_types(value, f"{key}.{name}")
            continue
        allowed = _simple_types(hints[name]) if name in hints else None
        if allowed is not None and (OmegaConf.is_list(value) or not _fits(value, allowed)):
            shown = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
            raise ConfigError(f"{key}.{name}={shown!r} must be {_describe(allowed)}")


def _check_types(cfg: DictConfig) -> None:
    for key, kind, minimum, maximum, fix in NUMBERS:
        expect_number(cfg, key, kind, minimum, fix, maximum)
    for key in ("train", "test", "test_before_fit", "trust_checkpoint"):
        expect_bool(cfg, key)
    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)):
        raise ConfigError(f"trainer.max_steps={max_steps!r} must be an integer; e.g. trainer.max_steps=2000")
    # a duration (a string or a mapping) is Lightning's to judge
    interval = OmegaConf.select(cfg, "trainer.val_check_interval")
    if (
        isinstance(interval, bool)
        or (isinstance(interval, int) and interval < 1)
        or (isinstance(interval, float) and not 0 < interval <= 1)
    ):
        raise ConfigError(
            f"trainer.val_check_interval={interval!r} must be a number of training batches (an integer >= 1) or a "
            "fraction of an epoch in (0, 1]; e.g. trainer.val_check_interval=250"
        )
    betas = OmegaConf.select(cfg, "model.optimizer.betas")
    if betas is not None and not (
        OmegaConf.is_list(betas)
        and len(betas) == 2
        and all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(
            f"model.optimizer.betas={betas!r} must be two numbers in [0, 1); e.g. 'model.optimizer.betas=[0.9,0.99]'"
        )
    warmup = OmegaConf.select(cfg, "model.warmup")  # NER: a fraction of the steps, or a number of steps
    if warmup is not None and (
        isinstance(warmup, bool)
        or not isinstance(warmup, int | float)
        or warmup < 0
        or (warmup >= 1 and warmup % 1)
    ):
        raise ConfigError(
            f"model.warmup={warmup!r} must be a fraction of the training steps in [0, 1) or a whole number of steps; "
            "e.g. model.warmup=0.1"
        )
    if cfg.get("train", True) and OmegaConf.select(cfg, "trainer.limit_train_batches") == 0:
        raise ConfigError(
            "trainer.limit_train_batches=0 trains nothing; evaluate a checkpoint with train=false ckpt_path=PATH"
        )


def _check_checkpointing(cfg: DictConfig) -> None:
    ckpt = OmegaConf.select(cfg, "callbacks.model_checkpoint")
    if isinstance(ckpt, DictConfig) and ckpt.get("every_n_train_steps") and ckpt.get("train_time_interval"):
        raise ConfigError(
            "callbacks.model_checkpoint.every_n_train_steps and .train_time_interval are both set; checkpoint by "
            "steps or by time: set the other to null"
        )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path not in (None, "auto") and not Path(ckpt_path).is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path}: no such file; use ckpt_path=auto to resume this run directory"
        )
    stage = STAGES.get(_target(cfg.model).rsplit(".", 1)[-1])
    if ckpt_path not in (None, "auto") and stage:
        _check_stage_checkpoint(cfg, "ckpt_path", ckpt_path, stage)
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches")
    interval = OmegaConf.select(cfg, "trainer.val_check_interval")
    if (
        isinstance(accumulate, int) and accumulate > 1
        and isinstance(interval, int) and not isinstance(interval, bool) and interval % accumulate
    ):  # fmt: skip
        raise ConfigError(
            f"trainer.val_check_interval={interval} (training batches) is not a multiple of "
            f"trainer.accumulate_grad_batches={accumulate}: validation, and the checkpoint it writes, would fall in the "
            f"middle of an optimizer step, which a resume cannot continue exactly; use a multiple, e.g. "
            f"trainer.val_check_interval={interval + accumulate - interval % accumulate}"
        )
    if not cfg.get("train", True) and not cfg.get("test", True):
        raise ConfigError("train=false test=false: nothing to run; set train=true, test=true or both")
    if not cfg.get("train", True) and cfg.get("test", True) and ckpt_path is None:
        raise ConfigError(
            "train=false test=true needs ckpt_path=PATH (the checkpoint to evaluate) or ckpt_path=auto"
        )
    _warn_monitor_without_validation(cfg)


def _warn_monitor_without_validation(cfg: DictConfig) -> None:
    """A checkpoint or early-stopping monitor in a run that never validates does nothing: say so."""
    trainer = cfg.trainer
    if not cfg.get("train", True) or trainer.get("fast_dev_run"):  # a fast dev run validates, saves nothing
        return
    interval, max_steps = trainer.get("val_check_interval"), trainer.get("max_steps")
    steps_only = trainer.get("check_val_every_n_epoch") is None and isinstance(interval, int)
    batches = max_steps * (trainer.get("accumulate_grad_batches") or 1) if isinstance(max_steps, int) else 0
    if trainer.get("limit_val_batches") == 0:
        why = "trainer.limit_val_batches=0"
    elif steps_only and 0 < batches < interval:  # the interval counts batches, max_steps optimizer steps
        why = f"trainer.val_check_interval={interval} batches, past trainer.max_steps={max_steps}"
    else:
        return
    for name in ("model_checkpoint", "early_stopping"):
        node = OmegaConf.select(cfg, f"callbacks.{name}")
        if _target(node) and node.get("monitor"):
            log.warning(f"callbacks.{name}.monitor={node.monitor} never sees a value: the run does not validate "
                        f"({why}); only last.ckpt is written and nothing stops early")  # fmt: skip


def _check_stage_checkpoint(cfg: DictConfig, key: str, path: str | None, stage: str) -> None:
    """The checkpoint `key` names must exist and be one (or an exported folder) of `stage`; reads only its
    description."""
    from imagen.checkpoints import CheckpointError, read_checkpoint, stage_info

    if not path:
        return
    if not Path(path).exists():
        raise ConfigError(
            f"{key}={path}: no such file; point it at a checkpoint (.ckpt) of the {stage} stage"
        )
    try:
        stage_info(read_checkpoint(path, bool(cfg.get("trust_checkpoint")), mmap=True), path, stage)
    except CheckpointError as e:
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def _several_devices_per_node(trainer: DictConfig, auto_counts: bool = False) -> bool:
    """`trainer.devices` names more than one device: a count, a list, "0,1"; -1 (all) too. With `auto_counts`, "auto"
    counts where this machine has several GPUs."""
    devices = trainer.get("devices", 1)
    if OmegaConf.is_list(devices):
        return len(devices) > 1
    text = str(devices).strip()
    if text == "auto":
        import torch

        return auto_counts and torch.cuda.device_count() > 1
    if "," in text:
        return len([d for d in text.split(",") if d.strip()]) > 1
    return text.lstrip("-").isdigit() and (int(text) > 1 or int(text) == -1)


def _check_ddp_in_local_multirun(cfg: DictConfig) -> None:
    """Lightning starts the other ranks of DDP on one node by running this command line again, `-m` and the sweep
    included: under Hydra's local launcher every rank would run the whole sweep, in other directories."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    strategy = cfg.trainer.get("strategy")
    name = _target(strategy) if isinstance(strategy, DictConfig) else str(strategy)
    if isinstance(strategy, DictConfig):
        name += f"_{strategy.get('start_method', '')}"
    # Lightning's launcher for these on one node re-runs the command line (spawn, fork: it does not)
    relaunching = (
        "DDPStrategy",
        "FSDPStrategy",
        "DeepSpeedStrategy",
        "ddp",
        "fsdp",
        "deepspeed",
        "None",
        "auto",
    )
    subprocesses = any(name.split(".")[-1].startswith(kind) for kind in relaunching)
    if any(kind in name for kind in ("spawn", "fork", "notebook")):
        subprocesses = False
    subprocesses = subprocesses and _several_devices_per_node(cfg.trainer, auto_counts=True)
    if subprocesses and "submitit" not in _target(HydraConfig.get().launcher).lower():
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices} with DDP in a local multirun (-m): Lightning starts the other "
            "ranks by running this command line again, sweep included, so each rank would run every job. Sweep "
            "with hydra/launcher=slurm (SLURM starts the ranks), or run each job alone"
        )


def _check_unused_parameters(cfg: DictConfig) -> None:
    """DDP without `find_unused_parameters` fails at the first step in which a parameter gets no gradient."""
    strategy = cfg.trainer.get("strategy")
    several = (cfg.trainer.get("num_nodes") or 1) > 1 or _several_devices_per_node(cfg.trainer)
    if isinstance(strategy, DictConfig):
        finds = not _target(strategy).endswith("DDPStrategy") or bool(strategy.get("find_unused_parameters"))
    elif strategy in (None, "auto"):
        finds = not several  # Lightning picks DDP, without find_unused_parameters, for several devices
    else:
        finds = not str(strategy).startswith("ddp") or "find_unused_parameters_true" in str(strategy)
    model = cfg.model
    unused = [f"model.loss_weights.{k}=0" for k, v in (model.get("loss_weights") or {}).items() if v == 0]
    if model.get("discriminator") is not None:
        unused.append(
            "model.discriminator (no gradient before model.adversarial_start_step, nor in its own step)"
        )
    if unused and not finds:
        raise ConfigError(
            f"trainer.strategy: DDP without find_unused_parameters stops at the first step that leaves parameters "
            f"without a gradient, as {', '.join(unused)} does; set trainer.strategy.find_unused_parameters=true "
            "(or trainer.strategy=ddp_find_unused_parameters_true)"
        )


def _check_finetuning(model: DictConfig) -> None:
    """`model.freeze` is a list of names; `model.lora` is null or LoRA settings."""
    from imagen.stages.finetune import check_freeze, lora_settings

    def plain(key: str):
        value = model.get(key)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    lora = plain("lora")
    if lora not in (None, {}) and not isinstance(lora, dict):
        raise ConfigError(f"model.lora must be null or a mapping such as {{r: 8, alpha: 16}}; got {lora!r}")
    try:
        check_freeze(plain("freeze"))
        lora_settings(lora)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


STAGES = {
    "AutoencoderStage": "autoencoder",
    "ARGeneratorStage": "ar_generator",
    "JointStage": "joint",
    "NerStage": "ner",
}


def check_input_checkpoints(cfg: DictConfig, pending: Collection[str] = ()) -> None:
    """The checkpoints a stage starts from (`model.autoencoder_ckpt`, `model.init_from`) exist and are of the right
    stage, but for the `pending` ones, which an earlier stage of a pipeline has yet to write."""
    model = cfg.model
    stage = STAGES.get(_target(model).rsplit(".", 1)[-1])
    for key, wanted in (("autoencoder_ckpt", "autoencoder"), ("init_from", stage)):
        path = model.get(key)
        if wanted and path and str(path) not in pending:
            _check_stage_checkpoint(cfg, f"model.{key}", path, wanted)


# a stage's settings groups (model.<key>: a dict) -> the dataclass the stage builds from it
STAGE_SETTINGS = {
    "sampling": "imagen.sampling.ar.SamplingSettings",
    "caption_decoding": "imagen.sampling.caption.CaptionDecoding",
    "rerank": "imagen.stages.joint.RerankSettings",
    "loss_weights": "imagen.stages.joint.LossWeights",
}


def _check_stage_settings(model: DictConfig) -> None:
    """Each settings group of the stage (`STAGE_SETTINGS`) built as the stage will build it, so that a wrong value is
    refused here, naming its key, not in the stage's constructor (a traceback)."""
    if not _target(model).endswith(("ARGeneratorStage", "JointStage")):
        return
    for key, target in STAGE_SETTINGS.items():
        node = model.get(key)
        if not isinstance(node, DictConfig):
            continue
        settings = hydra.utils.get_class(target)
        fields = {f.name for f in dataclasses.fields(settings)}
        values = OmegaConf.to_container(node, resolve=True)
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"model.{key}.{unknown[0]} is not a setting; valid keys: {sorted(fields)}")
        try:
            settings(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e) if str(e).startswith(f"model.{key}") else f"model.{key}: {e}") from None


def check_train_config(cfg: DictConfig, pending: Collection[str] = ()) -> None:
    """Raise `ConfigError` for a config that cannot train; cheap, touches no data and builds no model. `pending`:
    checkpoints an earlier stage of a pipeline has yet to write (`check_input_checkpoints`)."""
    for group in ("data", "model", "trainer"):
        if not _target(cfg.get(group)):
            raise ConfigError(f"{group}: no _target_; pick a config group option, e.g. {group}=<name>")
    _check_types(cfg)
    _check_checkpointing(cfg)
    _check_unused_parameters(cfg)
    _check_ddp_in_local_multirun(cfg)
    preemption = OmegaConf.select(cfg, "callbacks.preemption")
    if _target(preemption).endswith("Preemption") and "signals" in preemption:
        from imagen.callbacks.fault import signal_numbers

        signals = preemption.signals
        try:
            signal_numbers(OmegaConf.to_container(signals) if OmegaConf.is_list(signals) else signals)
        except ValueError as e:
            raise ConfigError(f"callbacks.preemption.signals: {e}") from None
    stopping = OmegaConf.select(cfg, "callbacks.early_stopping")
    if _target(stopping) and stopping.get("monitor") is None:
        raise ConfigError(
            "callbacks.early_stopping.monitor is null: it follows callbacks.model_checkpoint.monitor, which this "
            "config leaves unset; name the metric to watch, e.g. callbacks.early_stopping.monitor=val/loss"
        )

    model = cfg.model
    net = model.get("net")
    if _target(net).endswith("Autoencoder.from_size"):
        ae = autoencoder_config_from_node(net)
        image_size = cfg.data.get("image_size")
        if image_size is not None and image_size % ae.downsample_factor:
            raise ConfigError(
                f"data.image_size={image_size} is not divisible by the autoencoder's downsampling factor "
                f"{ae.downsample_factor} (model.net.channel_mult={list(ae.channel_mult)}); use a multiple of "
                f"{ae.downsample_factor}"
            )
    if _target(model).endswith("AutoencoderStage") and str(cfg.trainer.get("precision")).startswith("16"):
        from imagen.stages.autoencoder import fp16_unsupported

        why = fp16_unsupported(model.get("discriminator") is not None, model.get("grad_clip"))
        if why:
            raise ConfigError(f"trainer.precision={cfg.trainer.precision} {why}")
    if isinstance(net, DictConfig) and _target(model).endswith(("ARGeneratorStage", "JointStage")):
        for derived in ("vocab_size", "grid_size", "text_dim"):
            if derived in net:
                raise ConfigError(
                    f"model.net.{derived} is derived from the autoencoder's codebook and the text encoder; remove it"
                )
    batch_size, num_train = cfg.data.get("batch_size"), cfg.data.get("num_train")
    counted = f"data.num_train={num_train}"
    repeats, replay = cfg.data.get("new_repeats"), cfg.data.get("num_replay")
    if (
        isinstance(num_train, int) and isinstance(repeats, int) and isinstance(replay, int)
    ):  # a new concept's data
        num_train, counted = num_train * repeats + replay, f"{counted} x data.new_repeats + data.num_replay"
    if isinstance(batch_size, int) and isinstance(num_train, int) and num_train < batch_size:
        raise ConfigError(
            f"{counted} is smaller than data.batch_size={batch_size}: no full training batch; lower data.batch_size"
        )
    if _target(model).endswith("AutoencoderStage") and cfg.trainer.get("gradient_clip_val") is not None:
        raise ConfigError(
            "trainer.gradient_clip_val must be null for the autoencoder stage (it steps its own optimizers); "
            "set model.grad_clip instead"
        )

    if cfg.data.get("heldout_in_train") and not _target(model).endswith("AutoencoderStage"):
        raise ConfigError(
            "data.heldout_in_train=true would show the held-out compositions to a captioned stage "
            f"({_target(model)}) and void its held-out metrics; it is for the autoencoder only"
        )

    _check_stage_settings(model)
    _check_finetuning(model)
    if model.get("lora") and _target(model).endswith("AutoencoderStage"):
        raise ConfigError(
            "model.lora: the autoencoder stage has no LoRA adapters; use model.freeze to fine-tune part"
        )
    if cfg.get("test_before_fit") and not (model.get("init_from") and cfg.get("train")):
        raise ConfigError(
            "test_before_fit=true tests the starting weights of a fine-tune: it needs model.init_from and train=true"
        )
    check_input_checkpoints(cfg, pending)

    max_steps = cfg.trainer.get("max_steps", -1)
    if (max_steps is None or max_steps <= 0) and model.get("scheduler") is not None:
        raise ConfigError("trainer.max_steps must be > 0: the LR schedule is defined over training steps")
    # last, every other argument's type, against its target's annotations (the checks above give finer messages)
    for group in ("data", "model", "trainer"):
        check_argument_types(cfg.get(group), group)
    for group in ("callbacks", "logger"):
        entries = cfg.get(group)
        for name in entries if isinstance(entries, DictConfig) else ():
            check_argument_types(entries[name], f"{group}.{name}")
    warmup = OmegaConf.select(cfg, "model.scheduler.warmup_steps")
    if (
        cfg.get("train", True)
        and isinstance(warmup, int)
        and isinstance(max_steps, int)
        and warmup > max_steps > 0
    ):
        log.warning(f"model.scheduler.warmup_steps={warmup} is past trainer.max_steps={max_steps}: the learning "
                    "rate never reaches model.optimizer.lr")  # fmt: skip
    ema_start = OmegaConf.select(cfg, "callbacks.ema.update_starting_at_step")
    if (
        cfg.get("train", True)
        and isinstance(ema_start, int)
        and isinstance(max_steps, int)
        and ema_start >= max_steps > 0
    ):
        log.warning(f"callbacks.ema.update_starting_at_step={ema_start} is not before trainer.max_steps={max_steps}: "
                    "no weights are averaged, and the run is evaluated and saved with its raw weights")  # fmt: skip
