"""The rows of an evaluation batch that its metrics count: each sample once.

Two things repeat a sample in an evaluation pass. Lightning gives every rank ceil(N / world) validation and test
samples, so when `world` does not divide N it repeats the first ones at the end of some ranks' shares; and under
`data.bad_samples=skip` a bad sample's place holds a stand-in, a good sample that is read at its own index too. A
mean over every row would count both twice.
"""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler

from imagen.distributed import sum_over_ranks


def rows_to_evaluate(trainer, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict | None:
    """`batch` less the rows that repeat a sample: those of another rank (`without_sampler_repeats`) and the stand-ins
    for bad samples (`batch["stand_in"]`); None when no row is left."""
    batch = without_sampler_repeats(trainer, batch, batch_idx, dataloader_idx)
    if batch is None or "stand_in" not in batch or not batch["stand_in"].any():
        return batch
    keep = ~batch["stand_in"]
    if not keep.any():
        return None
    return {key: _rows(value, keep) for key, value in batch.items()}


def _rows(value, keep: torch.Tensor):
    """The rows of a per-row tensor or list where `keep` (B,) is True; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and len(value) == len(keep):
        return value[keep.to(value.device)]
    if isinstance(value, list | tuple) and len(value) == len(keep):
        return [v for v, k in zip(value, keep.tolist(), strict=True) if k]
    return value


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
    owned_rows = torch.arange(rows) < keep
    return {key: _rows(value, owned_rows) for key, value in batch.items()}


def updates_over_ranks(trainer, metrics) -> list[int]:
    """Each of `metrics`' update counts summed over the ranks. A metric's compute() synchronises its states across the
    ranks, so whether to compute it must be decided on these, not on a rank's own count: a rank whose evaluation rows
    were all dropped (`rows_to_evaluate`) updated nothing, yet must take part when another rank computes."""
    return sum_over_ranks(trainer, [metric.update_count for metric in metrics])
