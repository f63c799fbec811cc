"""A shuffling training DataLoader that resumes at the same batch of the same epoch after a restart.

Lightning saves the `state_dict()` of every training loader that has one in its checkpoints and hands it back to
`load_state_dict()` on resume, before the first batch is drawn. The order of an epoch depends only on
(`seed`, epoch), never on the global RNG, so that neither the shuffle nor the data's own randomness perturbs (or
is perturbed by) the model's random draws.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger(__name__)


class EpochShuffleSampler(DistributedSampler):
    """A permutation of `range(num_items)` per epoch from (`seed`, epoch), shared out between processes; skips the
    first `start` items of this process's share once.

    Under DDP (`num_replicas` processes; by default those of the initialised process group, which then all take rank
    0's `seed`: an unseeded run draws one per process) the process of rank r takes the permutation's items r,
    r + num_replicas, ...; so that every process has as many, `drop_last` leaves the last `num_items % num_replicas`
    out of the epoch, else the permutation's first items are taken again to fill the last round (as
    `DistributedSampler`). A `DistributedSampler`, so that Lightning keeps it instead of wrapping it in one of its
    own, whose position it could not resume.

    With `item_seeds=True` it yields `(index, item_seed)` pairs: a dataset with per-item randomness (a random
    caption paraphrase) draws from `item_seed` instead of the global RNG.
    """

    def __init__(
        self,
        num_items: int,
        seed: int,
        item_seeds: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = True,
    ):  # not DistributedSampler.__init__, which wants a dataset: the attributes it sets are set here
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if num_replicas is None and distributed:
            num_replicas, rank = dist.get_world_size(), dist.get_rank()
            shared = [int(seed)]
            dist.broadcast_object_list(shared, src=0)
            seed = shared[0]
        self.num_replicas = num_replicas or 1
        self.rank = rank or 0
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} of {self.num_replicas} processes")
        self.num_items = num_items
        self.drop_last = drop_last
        # this process's share of an epoch
        self.num_samples = num_items // self.num_replicas if drop_last else -(-num_items // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.seed = int(seed)
        self.item_seeds = item_seeds
        self.shuffle = True
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        if epoch != self.epoch:
            self.start = 0  # a position saved in another epoch does not apply
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator:
        # any int seed (torch.initial_seed() of an unseeded run is up to 2**64 - 1) maps into the generator's range
        generator = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**63)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        seeds = torch.randint(2**62, (self.num_items,), generator=generator).tolist()
        start, self.start = self.start, 0
        for position in range(self.rank + start * self.num_replicas, self.total_size, self.num_replicas):
            position %= self.num_items  # past the end (no drop_last): the permutation's first items again
            yield (order[position], seeds[position]) if self.item_seeds else order[position]


class ResumableLoader(DataLoader):
    """A shuffling, batch-dropping `DataLoader` whose position within the epoch is checkpointed. A process's share of
    the epoch must hold one full batch (`ValueError` naming `data.batch_size`).

    The position is counted in batches that left the loader (Lightning fetches no batch ahead from a loader with a
    length, so these are the batches trained on when a checkpoint is written).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        item_seeds: bool = False,
        sampler: Sampler | None = None,
        drop_last: bool = True,
        generator: torch.Generator | None = None,
        **kwargs,
    ):
        self.epoch_sampler = EpochShuffleSampler(len(dataset), seed, item_seeds, drop_last=drop_last)
        share, world = self.epoch_sampler.num_samples, self.epoch_sampler.num_replicas
        if drop_last and sampler is None and share < batch_size:  # nothing would train
            raise ValueError(
                f"data.batch_size={batch_size}: the training split has {len(dataset)} samples ({share} per process "
                f"on {world}), too few for one batch (a last partial batch is dropped); lower data.batch_size"
            )
        super().__init__(
            dataset,
            batch_size=batch_size,
            # Lightning passes its own sampler when it rebuilds the loader (overfit_batches; not for DDP, as the
            # sampler is a DistributedSampler): the position is then not tracked
            sampler=self.epoch_sampler if sampler is None else sampler,
            drop_last=drop_last,
            # the base seed of worker processes: from this generator, not from the global RNG
            generator=generator if generator is not None else torch.Generator().manual_seed(int(seed)),
            **kwargs,
        )
        self._yielded = 0

    def __iter__(self) -> Iterator:
        self._yielded = self.epoch_sampler.start // self.batch_size
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        if self.sampler is not self.epoch_sampler:
            return {}
        return {"epoch": self.epoch_sampler.epoch, "batches": self._yielded,
                "num_replicas": self.epoch_sampler.num_replicas}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if not state or self.sampler is not self.epoch_sampler:
            return
        epoch, batches = int(state["epoch"]), int(state["batches"])
        saved_replicas, replicas = int(state.get("num_replicas", 1)), self.epoch_sampler.num_replicas
        if saved_replicas != replicas:
            log.warning(
                f"resuming on {replicas} processes from a checkpoint of {saved_replicas}: each goes on at batch "
                f"{batches} of its share of the epoch, where Lightning counts it, so some of the epoch's items are "
                "skipped or seen twice"
            )
        start = batches * self.batch_size  # this process's items taken
        if batches >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            epoch, start = epoch + 1, 0
        self.epoch_sampler.epoch = epoch
        self.epoch_sampler.start = start
