"""Codebook usage and perplexity of discrete tokens, accumulated over an evaluation split (DDP-safe)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class CodebookUsage(Metric):
    """Counts token ids; `compute()` returns {"usage": fraction of codes used, "perplexity": exp(entropy)}."""

    full_state_update = False

    def __init__(self, vocab_size: int, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.add_state("counts", default=torch.zeros(vocab_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, tokens: torch.Tensor) -> None:
        low, high = torch.stack(torch.aminmax(tokens)).tolist()
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token ids from {low} to {high}, outside the codebook's [0, {self.vocab_size})")
        self.counts += torch.bincount(tokens.flatten(), minlength=self.vocab_size)

    def compute(self) -> dict[str, torch.Tensor]:
        p = self.counts.float() / self.counts.sum().clamp(min=1)
        entropy = -(p * p.clamp(min=1e-12).log()).sum()
        return {"usage": (self.counts > 0).float().mean(), "perplexity": entropy.exp()}
