"""Exponential moving average of the weights: Lightning's callback with an exact, fused update."""

import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMAWeights(EMAWeightAveraging):
    """`EMAWeightAveraging` whose update is one `torch._foreach_lerp_` per device and dtype.

    Lightning's own update computes `decay * average + (1 - decay) * weight`, which moves a weight that never changes
    (a frozen text encoder, the frozen autoencoder) by rounding at every step; `lerp` leaves it bit-identical, so
    frozen modules are saved exactly as they were loaded. Validation, test and checkpoints use the averaged weights.
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1], got {decay}")
        super().__init__(decay=decay, **kwargs)
        # the AveragedModel's arguments: the fused lerp in place of the per-tensor `avg_fn` the parent sets
        self._kwargs = {**{k: v for k, v in self._kwargs.items() if k != "avg_fn"},
                        "multi_avg_fn": get_ema_multi_avg_fn(decay)}  # fmt: skip

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the parent calls `configure_model` before copying the module and warns that sharded layers would not be
        # averaged; the imagen stages' `configure_model` loads weights, adds adapters and compiles, and shards nothing
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*WeightAveraging doesn't support sharding model layers"
            )
            super().setup(trainer, pl_module, stage)
