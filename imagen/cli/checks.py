"""Config checks that run before any data is read or model is built; each failure names the key and the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


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


def check_train_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` for a config that cannot train; cheap, touches no data."""
    for group in ("data", "model", "trainer"):
        if not _target(cfg.get(group)):
            raise ConfigError(f"{group}: no _target_; pick a config group option, e.g. {group}=<name>")

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

    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "auto") and not Path(ckpt).is_file():
        raise ConfigError(f"ckpt_path={ckpt}: no such file")
    for key in ("autoencoder_ckpt", "init_from"):
        path = model.get(key)
        if path and not Path(path).is_file():
            raise ConfigError(
                f"model.{key}={path}: no such file; point it at a checkpoint (.ckpt) of that stage"
            )

    max_steps = cfg.trainer.get("max_steps", -1)
    if (max_steps is None or max_steps <= 0) and model.get("scheduler") is not None:
        raise ConfigError("trainer.max_steps must be > 0: the LR schedule is defined over training steps")
