"""Exponential moving average of the weights: Lightning's callback with an exact, fused update."""

import contextlib
import copy
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


def frozen_submodules(root: nn.Module) -> list[nn.Module]:
    """The largest submodules of `root` that hold parameters and train none of them."""
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if module is root or any(name.startswith(f"{outer}.") for outer in found):
            continue
        parameters = list(module.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            found[name] = module
    return list(found.values())


@contextlib.contextmanager
def frozen_shared_by_deepcopy(root: nn.Module) -> Iterator[None]:
    """Within the block, `copy.deepcopy(root)` shares the frozen submodules of `root` as they are at the time of the
    copy (`frozen_submodules`), and their tensors wherever the copy meets them, instead of copying them."""

    def deepcopy_sharing(memo: dict) -> nn.Module:
        object.__delattr__(root, "__deepcopy__")  # once: later copies, of either module, are plain
        memo.update({id(x): x for m in frozen_submodules(root) for x in (m, *m.parameters(), *m.buffers())})
        return copy.deepcopy(root, memo)

    object.__setattr__(root, "__deepcopy__", deepcopy_sharing)
    try:
        yield
    finally:
        vars(root).pop("__deepcopy__", None)


def ema_update_skipping_shared(decay: float):
    """`get_ema_multi_avg_fn(decay)` over the averaged tensors that are not the live ones: those of the frozen
    modules the average shares are left alone, in time and in value. Integer and bool tensors (FSQ's levels, step
    counts) are copied, not averaged: an average would round them down. The current weights are cast to the
    average's dtype (an fp32 average of a bf16 module)."""
    update = get_ema_multi_avg_fn(decay)

    def update_unshared(averaged: list, current: list, n_averaged) -> None:
        pairs = [(a, c) for a, c in zip(averaged, current, strict=True) if a.data_ptr() != c.data_ptr()]
        for a, c in [(a, c) for a, c in pairs if not (a.is_floating_point() or a.is_complex())]:
            a.copy_(c)
        # the average keeps its own dtype: fp32 under `precision=bf16-true`, where the module is cast to bf16
        pairs = [(a, c.to(a.dtype)) for a, c in pairs if a.is_floating_point() or a.is_complex()]
        if pairs:
            update(*map(list, zip(*pairs, strict=True)), n_averaged)

    return update_unshared


def unshared_pairs(average: nn.Module, module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The tensors of `average` (parameters, then buffers) each beside its counterpart in `module`, but for those
    the two share (`frozen_shared_by_deepcopy`)."""
    pairs = zip(
        itertools.chain(average.parameters(), average.buffers()),
        itertools.chain(module.parameters(), module.buffers()),
        strict=True,
    )
    return [(a, m) for a, m in pairs if a.data_ptr() != m.data_ptr()]


class EMAWeights(EMAWeightAveraging):
    """`EMAWeightAveraging` whose update is one `torch._foreach_lerp_` per device and dtype.

    Lightning's own update computes `decay * average + (1 - decay) * weight`, which moves a weight that never changes
    (a frozen text encoder, the frozen autoencoder) by rounding at every step; `lerp` leaves it bit-identical, so
    frozen modules are saved exactly as they were loaded. Frozen modules are not copied at all: the average shares
    them with the module (the largest submodules whose parameters are all frozen, unless `device` puts the average
    elsewhere), and its update passes over them.

    Validation, test and checkpoints use the averaged weights, once there are any (`update_starting_at_step`: until
    the first update they are the raw ones). The module's `on_validation_epoch_end` sees them too (the raw weights
    are put back at `on_validation_end`, before the checkpoint callbacks save); at the end of training they stay in
    the module, and a checkpoint written then still records the raw weights in `current_model_state`. A finished run
    run again (the fit has nothing left to train) gets the average back at the end of the fit, for its test.

    The average keeps its own dtype, whatever the module's: under `precision=bf16-true` it stays fp32. It is copied
    into the module, never swapped with it, so the module's bf16 never rounds it; while the module holds it, the
    module's own weights wait in a copy (one model's worth of memory, in the module's dtype).
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1], got {decay}")
        super().__init__(decay=decay, **kwargs)
        # the AveragedModel's arguments: the fused lerp in place of the per-tensor `avg_fn` the parent sets
        self._kwargs = {**{k: v for k, v in self._kwargs.items() if k != "avg_fn"},
                        "multi_avg_fn": ema_update_skipping_shared(decay)}  # fmt: skip
        # then the module holds the average, and `_raw_weights` its own
        self._average_in_module_at_train_end = False
        self._average_in_module_for_validation = False
        # while the module holds the average: each of its unshared tensors beside a copy of its own (raw) values
        self._raw_weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _averaged(self) -> bool:
        """Whether the average has had an update (before one, it is a copy of the initial weights)."""
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    @torch.no_grad()
    def _load_average(self, pl_module: pl.LightningModule) -> None:
        """Copy the average into the module (cast to its dtype), keeping the module's own weights aside; the
        average is left as it is."""
        assert self._average_model is not None and self._raw_weights is None
        pairs = unshared_pairs(self._average_model.module, pl_module)
        self._raw_weights = [(current, current.detach().clone()) for _, current in pairs]
        for average, current in pairs:
            current.copy_(average)

    @torch.no_grad()
    def _restore_raw_weights(self) -> None:
        """Put back the module's own weights that `_load_average` kept aside."""
        assert self._raw_weights is not None
        for current, raw in self._raw_weights:
            current.copy_(raw)
        self._raw_weights = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the parent calls `configure_model` before copying the module and warns that sharded layers would not be
        # averaged; the imagen stages' `configure_model` loads weights, adds adapters, freezes and compiles, and
        # shards nothing
        if stage == "fit":  # a validate or test after fit finds the average in the module still
            self._average_in_module_at_train_end = self._average_in_module_for_validation = False
            self._raw_weights = None
        sharing = frozen_shared_by_deepcopy(pl_module) if self._device is None else contextlib.nullcontext()
        with warnings.catch_warnings(), sharing:
            warnings.filterwarnings(
                "ignore", message=".*WeightAveraging doesn't support sharding model layers"
            )
            super().setup(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after training the module holds the average already
        if not self._average_in_module_at_train_end and self._averaged():
            self._load_average(pl_module)
            self._average_in_module_for_validation = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Callbacks' hooks run before the module's: its `on_validation_epoch_end` still needs the average."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_in_module_for_validation:
            self._restore_raw_weights()
            self._average_in_module_for_validation = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the raw weights are kept aside: `last.ckpt`, written after this, records them (`on_save_checkpoint`)
        if self._averaged():
            self._load_average(pl_module)
            self._average_in_module_at_train_end = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run with nothing left to train skips `on_train_end`: the module holds the raw weights
        if not self._average_in_module_at_train_end:
            self.on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # the parent saves the average as `state_dict` and the module's weights as `current_model_state`
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is None:
            return
        if not self._averaged():  # no average yet: the weights to evaluate and share are the raw ones
            checkpoint["state_dict"] = checkpoint["current_model_state"]
        elif self._raw_weights is not None:  # the module holds the average; its own weights are kept aside
            raw = {current.data_ptr(): copy for current, copy in self._raw_weights}
            checkpoint["current_model_state"] = {
                name: raw.get(value.data_ptr(), value) if isinstance(value, torch.Tensor) else value
                for name, value in checkpoint["current_model_state"].items()
            }
