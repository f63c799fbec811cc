"""Reranking: draw several candidates per request and keep the one a scorer likes best."""

from __future__ import annotations

import torch


def best_of(
    candidates: torch.Tensor, scores: torch.Tensor, per_group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the highest-scoring candidate of each group of `per_group` consecutive candidates.

    candidates (G * per_group, ...), scores (G * per_group,) -> (best candidates (G, ...), their indices (G,) into
    `candidates`). Always returns exactly G items; a length that is not a multiple of `per_group` is an error.
    """
    if per_group < 1 or len(candidates) % per_group or len(scores) != len(candidates):
        raise ValueError(
            f"best_of: {len(candidates)} candidates and {len(scores)} scores do not form groups of {per_group}"
        )
    groups = len(candidates) // per_group
    best = scores.view(groups, per_group).argmax(-1)  # (G,)
    index = torch.arange(groups, device=scores.device) * per_group + best
    return candidates[index.to(candidates.device)], index
