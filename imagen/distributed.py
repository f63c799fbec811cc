"""What every process of a DDP run shares: which one launched the command, and sums over the ranks."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.utilities import rank_zero_only


def launching_process() -> bool:
    """Whether this is the process that started the command (global rank 0 of node 0): the one that records a run's
    settings and, in a pipeline, moves, deletes or writes in the stages' directories."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


def sum_over_ranks(trainer, counts: list[int]) -> list[int]:
    """`counts` summed element-wise over the ranks (as they are on a single process), the same on every rank; every
    rank must call it at the same point."""
    strategy = trainer.strategy
    total = torch.tensor(counts, dtype=torch.long, device=strategy.root_device)
    return strategy.reduce(total, reduce_op="sum").tolist()
