"""Inference on a module whatever mode it is in: a stage's sampling and scoring methods run in eval mode and without
gradients, and leave each submodule's mode as they found it (after `trainer.fit` a module is left training, and a
notebook that samples from it next must not sample with dropout on)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode inside the block; afterwards every submodule back in its own mode, frozen parts
    included."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def inference(method: Callable) -> Callable:
    """A module's method run under `eval_mode(self)` and `torch.no_grad()`."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with eval_mode(self), torch.no_grad():
            return method(self, *args, **kwargs)

    return run
