"""Cross-modal retrieval: Recall@K from a similarity matrix and a relevance matrix."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def recall_at_k(
    similarity: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Fraction of queries with a relevant item among their K most similar.

    similarity (Q, D) query-by-item scores; relevant (Q, D) bool. K larger than D counts all items.
    """
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and relevant {tuple(relevant.shape)} differ")
    order = similarity.argsort(dim=1, descending=True)  # (Q, D)
    hits = relevant.gather(1, order.to(relevant.device))  # (Q, D): relevance in rank order
    first_hit = torch.where(
        hits.any(1), hits.float().argmax(1), torch.full_like(hits[:, 0], -1, dtype=torch.long)
    )
    return {k: ((first_hit >= 0) & (first_hit < k)).float().mean().item() for k in ks}


def retrieval_metrics(
    text_emb: torch.Tensor, image_emb: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Text->image and image->text Recall@K for embeddings (N, E) of N captions and N images.

    relevant (N, N): caption i describes image j. Keys: `recall_at_{k}_t2i`, `recall_at_{k}_i2t`.
    """
    similarity = text_emb.float() @ image_emb.float().t()  # (texts, images)
    t2i = recall_at_k(similarity, relevant, ks)
    i2t = recall_at_k(similarity.t(), relevant.t(), ks)
    return {
        **{f"recall_at_{k}_t2i": v for k, v in t2i.items()},
        **{f"recall_at_{k}_i2t": v for k, v in i2t.items()},
    }


def gather_rows(
    tensors: Sequence[torch.Tensor], all_gather: Callable[[torch.Tensor], torch.Tensor], world_size: int
) -> list[torch.Tensor]:
    """Each process's rows (N_rank, ...) of every tensor, concatenated over the processes in rank order; every
    process gets the same result. `all_gather(t)` returns (world_size, *t.shape) (`LightningModule.all_gather`).
    Processes may hold different N: the rows are padded to the longest for the exchange and cut back after."""
    if world_size == 1:
        return list(tensors)
    counts = all_gather(torch.tensor([len(tensors[0])], device=tensors[0].device)).flatten().tolist()
    longest = max(counts)
    gathered = []
    for t in tensors:
        padded = torch.cat([t, t.new_zeros(longest - len(t), *t.shape[1:])])
        rows = all_gather(padded)  # (world_size, longest, ...)
        gathered.append(torch.cat([rows[rank, :n] for rank, n in enumerate(counts)]))
    return gathered
