"""Evaluation under DDP without the samples Lightning's distributed sampler repeats.

Lightning gives every rank ceil(N / world) validation and test samples, so when `world` does not divide N it repeats
the first ones at the end of some ranks' shares; a mean over all ranks would count those twice.
"""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler


def without_sampler_repeats(trainer, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict | None:
    """`batch` less the rows that repeat a sample of another rank (only a rank's last batch can hold any): its
    tensors and lists cut to the rows this rank owns; None when no row is left. Batches of loaders without a
    distributed sampler are returned as they are."""
    loaders = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
    loader = loaders[dataloader_idx] if isinstance(loaders, list | tuple) else loaders
    sampler, batch_size = getattr(loader, "sampler", None), getattr(loader, "batch_size", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last or batch_size is None:
        return batch
    start = batch_idx * batch_size  # this batch's first position in the rank's share
    rows = min(batch_size, sampler.num_samples - start)
    owned = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # positions past it repeat
    keep = max(0, min(rows, owned - start))
    if keep == rows:
        return batch
    if keep == 0:
        return None
    cut = {}
    for key, value in batch.items():
        sized = isinstance(value, list | tuple) or (isinstance(value, torch.Tensor) and value.ndim > 0)
        cut[key] = value[:keep] if sized and len(value) == rows else value
    return cut
