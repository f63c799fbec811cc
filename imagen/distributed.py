"""What every process of a DDP run shares: which one launched the command, and sums over the ranks."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.utilities import rank_zero_only


def launching_process() -> bool:
    """Whether this is the process that started the command (global rank 0 of node 0): the one that records a run's
    settings and, in a pipeline, moves, deletes or writes in the stages' directories."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


# SLURM's step ids above this are its special steps (batch script, extern, interactive), not an srun job step
SLURM_SPECIAL_STEPS = 0xFFFFFFF0


def in_srun_step() -> bool:
    """Whether this process is a task of a job step launched by `srun`, where `SLURM_PROCID` is its task's rank. In
    the batch script itself SLURM also sets `SLURM_PROCID=0` and `SLURM_NTASKS` (the job's tasks), but no step id."""
    step = os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID", ""))
    return step.isdigit() and int(step) < SLURM_SPECIAL_STEPS and "SLURM_PROCID" in os.environ


def srun_tasks() -> int:
    """The number of tasks of this `srun` step (1 outside one)."""
    if not in_srun_step():
        return 1
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))


def sum_over_ranks(trainer, counts: list[int]) -> list[int]:
    """`counts` summed element-wise over the ranks (as they are on a single process), the same on every rank; every
    rank must call it at the same point."""
    strategy = trainer.strategy
    total = torch.tensor(counts, dtype=torch.long, device=strategy.root_device)
    return strategy.reduce(total, reduce_op="sum").tolist()
