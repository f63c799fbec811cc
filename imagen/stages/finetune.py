"""Fine-tuning settings shared by every stage: freezing named submodules (`model.freeze`) and LoRA adapters
(`model.lora`), applied once when the trainer configures the model, before the optimizer is built."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, fields

import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_only

from imagen.models.lora import LoraSettings, add_lora, merge_lora

log = logging.getLogger(__name__)


def named_submodule(root: nn.Module, name: str, key: str) -> nn.Module:
    """`root.get_submodule(name)`; a name that is not a submodule is an error naming `key` and the valid
    top-level names."""
    try:
        module = root.get_submodule(name) if name else None
    except AttributeError:
        module = None
    if not isinstance(module, nn.Module):
        valid = [n for n, m in root.named_children() if next(m.parameters(), None) is not None]
        raise ValueError(
            f"{key}: {type(root).__name__} has no submodule {name!r}; valid top-level names: {', '.join(valid)} "
            f"(deeper ones as in named_modules(), e.g. {valid[0] if valid else 'net'}.<child>)"
        )
    return module


def lora_settings(lora: dict | LoraSettings | None) -> LoraSettings | None:
    """`model.lora` as `LoraSettings` (None or an empty mapping: off); an unknown key is an error naming it."""
    if not lora:
        return None
    if isinstance(lora, LoraSettings):
        return lora
    known = [f.name for f in fields(LoraSettings)]
    unknown = sorted(set(lora) - set(known))
    if unknown:
        raise ValueError(f"model.lora.{unknown[0]} is not a LoRA setting; valid keys: {', '.join(known)}")
    return LoraSettings(**lora)


def is_within(name: str, part: str) -> bool:
    """Whether the module called `name` (as in `named_modules()`) is `part` or lies inside it."""
    return name == part or name.startswith(part + ".")


def frozen_parts(root: nn.Module) -> list[str]:
    """Names of the largest submodules of `root` that hold parameters, none of which requires a gradient."""
    parts: list[str] = []
    for name, module in root.named_modules():
        if not name or any(is_within(name, part) for part in parts):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            parts.append(name)
    return parts


# the filter `silence_eval_mode_warning` added, until `end_eval_mode_silence` takes it out
_eval_mode_filters: list[tuple] = []


def silence_eval_mode_warning(count: int) -> None:
    """Leave out Lightning's "Found `count` module(s) in eval mode at the start of training" warning."""
    warnings.filterwarnings(
        "ignore", message=rf"Found {count} module\(s\) in eval mode at the start of training"
    )
    _eval_mode_filters.append(warnings.filters[0])


def end_eval_mode_silence() -> None:
    """Take out the filter of `silence_eval_mode_warning`, and that one only (others added since stay)."""
    while _eval_mode_filters:
        entry = _eval_mode_filters.pop()
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    # what `warnings.filterwarnings` does after a change: warnings cached as already shown are looked at again
    getattr(warnings, "_filters_mutated", lambda: None)()


def check_freeze(freeze) -> list[str]:
    """`model.freeze` as a list of names."""
    if freeze is None:
        return []
    if isinstance(freeze, str) or not all(isinstance(n, str) for n in freeze):
        raise ValueError(
            f"model.freeze must be a list of submodule names, e.g. [text_encoder]; got {freeze!r}"
        )
    return list(freeze)


class FineTuningMixin:
    """LightningModule mixin: `freeze` (names as in `named_modules()`) and `lora` (`LoraSettings` fields, or None)
    hyperparameters.

    `apply_finetuning()` (from `configure_model`, after any `init_from` weights are loaded) injects the LoRA
    adapters, then sets `requires_grad`: with LoRA on, only the adapters and `lora.trainable` train; `freeze` then
    stops the modules it names, which also stay in eval mode (no dropout, running statistics or codebook updates).
    Frozen parameters get no gradient, so `build_optimizer` leaves them out (no weight decay drift either). A stage
    sets `LORA_MODULES` / `LORA_TARGETS` (and `lora_trainable_default`) as its LoRA defaults.
    """

    LORA_MODULES: tuple[str, ...] = ()
    LORA_TARGETS: tuple[str, ...] = ()

    def lora_trainable_default(self) -> list[str]:
        """Submodules trained in full beside the adapters unless `lora.trainable` says otherwise."""
        return []

    def lora_settings(self) -> LoraSettings | None:
        """`model.lora` with this stage's defaults filled in (what the checkpoint records), or None when off."""
        settings = lora_settings(self.hparams.get("lora"))
        if settings is None:
            return None
        if settings.modules is None:
            settings.modules = list(self.LORA_MODULES)
        if settings.target_modules is None:
            settings.target_modules = list(self.LORA_TARGETS)
        if settings.trainable is None:
            settings.trainable = self.lora_trainable_default()
        if not settings.modules:
            raise ValueError(f"model.lora.modules: {type(self).__name__} has no default; name the submodules")
        return settings

    def add_lora_adapters(self) -> LoraSettings | None:
        """Inject the configured adapters (once); None when LoRA is off. `from_checkpoint` calls it before loading
        a checkpoint that holds adapters."""
        if getattr(self, "_lora", None) is None:
            settings = self.lora_settings()
            if settings is None:
                return None
            for name in settings.modules:
                add_lora(named_submodule(self, name, "model.lora.modules"), settings)
            self._lora = settings
        return self._lora

    def apply_finetuning(self) -> None:
        """Add the adapters, freeze what is configured, and log how many parameters train (once)."""
        if getattr(self, "_finetuning_applied", False):
            return
        lora = self.add_lora_adapters()
        if lora is not None:
            self.requires_grad_(False)
            for name, p in self.named_parameters():
                if ".lora_" in name:
                    p.requires_grad_(True)
            for name in lora.trainable:
                named_submodule(self, name, "model.lora.trainable").requires_grad_(True)
        self._frozen = check_freeze(self.hparams.get("freeze"))
        for name in self._frozen:
            named_submodule(self, name, "model.freeze").requires_grad_(False).eval()
        # a pretrained text encoder that `freeze` runs without gradients cannot be trained
        for name, module in self.named_modules():
            if getattr(module, "freeze", False) is True and any(p.requires_grad for p in module.parameters()):
                raise ValueError(
                    f"model.lora sets {name} to train, but model.{name}.freeze=true runs it without gradients (from "
                    f"its output cache), so it would never learn; set model.{name}.freeze=false"
                )
        self._finetuning_applied = True
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        notes = [f"model.freeze={self._frozen}"] if self._frozen else []
        if lora is not None:
            notes.append(
                f"LoRA r={lora.r} on {lora.target_modules} of {lora.modules}, trainable {lora.trainable}"
            )
        if rank_zero_only.rank == 0:
            log.info(f"{type(self).__name__}: {trainable:,} trainable parameters, {total - trainable:,} frozen"
                     + (f" ({'; '.join(notes)})" if notes else ""))  # fmt: skip

    def configure_model(self) -> None:
        self.apply_finetuning()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in getattr(self, "_frozen", ()):
            self.get_submodule(name).eval()
        return self

    def on_fit_start(self) -> None:
        """Frozen parts (the generator's autoencoder, a frozen text encoder, `model.freeze`) stay in eval mode by
        design: said once here, and Lightning's generic "modules in eval mode" warning is left out for exactly
        that many modules until training starts. A module in eval mode outside a frozen part keeps the warning."""
        super().on_fit_start()
        end_eval_mode_silence()  # one a fit that failed before training left
        frozen = frozen_parts(self)
        in_eval = [name for name, module in self.named_modules() if not module.training]
        if not in_eval or not all(any(is_within(name, part) for part in frozen) for name in in_eval):
            return
        if rank_zero_only.rank == 0:
            # the outermost modules in eval mode: a frozen part, or the frozen model inside a wrapper that trains
            outermost = [name for name in in_eval if not any(is_within(name, other) for other in in_eval
                                                                if other != name)]  # fmt: skip
            log.info(
                f"frozen, so kept in eval mode while training: {', '.join(outermost)} ({len(in_eval)} modules)"
            )
        silence_eval_mode_warning(len(in_eval))

    def on_train_start(self) -> None:
        super().on_train_start()
        end_eval_mode_silence()  # Lightning checks the modules' modes between on_fit_start and here

    def on_fit_end(self) -> None:
        super().on_fit_end()
        end_eval_mode_silence()  # a fit with nothing left to train ends without on_train_start

    def merge_lora(self) -> None:
        """Fold the adapters into the weights (sampling, export): the stage becomes a plain one."""
        if getattr(self, "_lora", None) is not None:
            merge_lora(self)
            self._lora = None
            self.hparams["lora"] = None

    def finetuning_info(self) -> dict:
        """What `checkpoint["imagen"]` records to rebuild the stage: the LoRA settings (None: no adapters)."""
        lora = getattr(self, "_lora", None)
        return {"lora": asdict(lora) if lora is not None else None}
