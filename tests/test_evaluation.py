"""Evaluation under DDP: the samples Lightning's distributed sampler repeats to even out the ranks count once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from imagen.stages.evaluation import without_sampler_repeats


@pytest.mark.parametrize(
    "size, world, batch_size", [(10, 4, 2), (10, 3, 4), (7, 8, 1), (12, 4, 2), (5, 2, 8)]
)
def test_every_sample_is_evaluated_once_over_all_ranks(size, world, batch_size):
    dataset = [{"image": torch.full((2,), float(i)), "caption": f"c{i}", "index": i} for i in range(size)]
    seen = []
    for rank in range(world):
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
        for testing in (False, True):
            trainer = SimpleNamespace(testing=testing, val_dataloaders=loader, test_dataloaders=[loader])
            for batch_idx, batch in enumerate(loader):
                batch["heldout"] = False  # a value for the whole batch stays as it is
                kept = without_sampler_repeats(trainer, batch, batch_idx)
                if kept is None:
                    continue
                assert (
                    kept["image"][:, 0].tolist()
                    == kept["index"].tolist()
                    == [int(c[1:]) for c in kept["caption"]]
                )
                assert kept["heldout"] is False
                if testing:
                    seen += kept["index"].tolist()
    assert sorted(seen) == list(range(size))  # the sampler alone gives world * ceil(size / world)


def test_batches_of_a_loader_without_a_distributed_sampler_are_kept_whole():
    loader = DataLoader(list(range(5)), batch_size=2)
    trainer = SimpleNamespace(testing=False, val_dataloaders=loader)
    batch = {"index": torch.tensor([4])}
    assert without_sampler_repeats(trainer, batch, 2) is batch
