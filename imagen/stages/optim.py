"""Optimizer and schedule helpers shared by the stages."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on parameters with two or more dimensions, none on biases, norms and gains (1-D). Embedding
    tables and position tables are 2-D and decayed (nanoGPT's rule; the quickstart's figures were measured so), and
    so is the generator's learned empty caption `null_text` (1, 1, D)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    optimizer: Callable[..., torch.optim.Optimizer],
    module: nn.Module,
    weight_decay: float | None = None,
    lrs: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """Complete a partial optimizer (from config) over `module`'s trainable parameters.

    With `weight_decay` set, decay applies to >= 2-D parameters only. `lrs` gives the parameters under a submodule
    (`{"image_text": 1e-3}`) their own learning rate; schedules scale every group alike. AdamW is fused on GPUs and
    CPUs (one kernel per step instead of one per tensor: on a 2-core CPU, 3 ms instead of 16 ms per step for the
    shapes generator) unless the partial sets `fused` or `foreach` itself.
    """
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters; is everything frozen?")
    own = getattr(optimizer, "keywords", {}).get("weight_decay")
    if weight_decay is not None and own is not None:
        raise ValueError(
            f"model.optimizer.weight_decay={own} would be overridden by model.weight_decay={weight_decay} (which "
            "decays >= 2-D parameters only); set model.weight_decay and remove model.optimizer.weight_decay"
        )

    def groups_of(named: list[tuple[str, nn.Parameter]]) -> list[dict]:
        if weight_decay is None:
            return [{"params": [p for _, p in named]}]
        return param_groups(named, weight_decay)

    lrs = lrs or {}
    names = [n for n, _ in module.named_parameters()]
    groups = groups_of([(n, p) for n, p in params if not any(n.startswith(f"{k}.") for k in lrs)])
    for prefix, lr in lrs.items():
        if not any(n.startswith(f"{prefix}.") for n in names):
            raise ValueError(
                f"a learning rate is set for {prefix!r}, which {type(module).__name__} does not hold"
            )
        named = [(n, p) for n, p in params if n.startswith(f"{prefix}.")]  # none when it is frozen
        groups += [{**group, "lr": lr} for group in groups_of(named)]
    groups = [g for g in groups if g["params"]]
    kwargs = {}
    target, chosen = getattr(optimizer, "func", optimizer), getattr(optimizer, "keywords", {}).keys()
    # fused unless the config chose (model.optimizer.fused=false, e.g. to clip under fp16, or foreach)
    if (
        target is torch.optim.AdamW
        and params[0][1].device.type in ("cuda", "cpu")
        and not {"fused", "foreach"} & chosen
    ):
        kwargs["fused"] = True
    return optimizer(groups, **kwargs)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base LR over `warmup_steps`, then cosine decay to `min_lr_ratio` x base at `total_steps`."""
    if total_steps <= 0:
        raise ValueError(f"the LR schedule needs total_steps > 0 (trainer.max_steps), got {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_linear(
    optimizer: torch.optim.Optimizer, warmup_steps: int | float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base LR, then linear decay to zero at `total_steps` (the BERT fine-tuning recipe).

    `warmup_steps` below 1 is a fraction of `total_steps`.
    """
    if total_steps <= 0:
        raise ValueError(f"the LR schedule needs total_steps > 0, got {total_steps}")
    warmup = int(warmup_steps * total_steps) if warmup_steps < 1 else int(warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FusedOptimizerClipping:
    """LightningModule mixin: gradient clipping that also works with fused AdamW under bf16 mixed precision, and
    that can clip groups of parameters apart (`gradient_clip_groups`).

    Lightning refuses to clip for optimizers that unscale gradients inside `step` (fused AdamW) under any mixed
    precision, since with fp16 loss scaling the gradients are still scaled at that point. bf16 has no loss scaling:
    the gradients are the true ones, so they are clipped directly. fp16 keeps Lightning's refusal.
    """

    def gradient_clip_groups(self) -> list[list[torch.nn.Parameter]] | None:
        """Parameter groups whose gradients are clipped each to `gradient_clip_val` on its own; None: all together."""
        return None

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer -> torch optimizer
        fused = getattr(inner, "_step_supports_amp_scaling", False)
        precision = str(self.trainer.precision)
        still_scaled = fused and precision.startswith("16")  # fp16 loss scaling, undone only inside step
        groups = None if not gradient_clip_val or still_scaled else self.gradient_clip_groups()
        if groups is None and not (gradient_clip_val and fused and precision.startswith("bf16")):
            return super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if groups is None:
            groups = [[p for group in inner.param_groups for p in group["params"]]]
        for params in groups:
            params = [p for p in params if p.grad is not None]
            if gradient_clip_algorithm in (None, "norm"):
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
