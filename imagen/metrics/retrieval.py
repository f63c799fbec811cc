"""Cross-modal retrieval: Recall@K from a similarity matrix and a relevance matrix."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from imagen.data.preprocess import clean_caption


def recall_at_k(
    similarity: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Fraction of queries with a relevant item among their K most similar.

    similarity (Q, D) query-by-item scores; relevant (Q, D) bool. K larger than D counts all items. Ties count
    against the query: its best relevant item ranks behind every irrelevant one scoring as high (or NaN), and a
    NaN score of its own is a miss.
    """
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and relevant {tuple(relevant.shape)} differ")
    if relevant.dtype != torch.bool:
        raise TypeError(f"relevant is a boolean matrix (True: a relevant item), not {relevant.dtype}")
    relevant = relevant.to(similarity.device)
    # (Q,): the best relevant item's score
    best = similarity.masked_fill(~relevant, float("-inf")).max(1).values
    ahead = (((similarity >= best[:, None]) | similarity.isnan()) & ~relevant).sum(1)  # (Q,) irrelevant items
    found = relevant.any(1) & ~best.isnan()
    return {k: (found & (ahead < k)).float().mean().item() for k in ks}


def retrieval_metrics(
    t2i: torch.Tensor, i2t: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Text->image and image->text Recall@K from similarities t2i (N texts, N images) and i2t (N images, N texts)
    (embedding cosine: each the other's transpose).

    relevant (N, N): caption i describes image j. Keys: `recall_at_{k}_t2i`, `recall_at_{k}_i2t`.
    """
    return {
        **{f"recall_at_{k}_t2i": v for k, v in recall_at_k(t2i.float(), relevant, ks).items()},
        **{f"recall_at_{k}_i2t": v for k, v in recall_at_k(i2t.float(), relevant.t(), ks).items()},
    }


def caption_keys(captions: Sequence[str]) -> torch.Tensor:
    """(B,) int64 per caption, equal for captions equal but for case and spacing: the first 8 bytes of the sha256
    of the normalised caption (a tensor, so that it can be gathered across processes; collisions are negligible)."""
    digests = (hashlib.sha256(clean_caption(c.lower()).encode()).digest()[:8] for c in captions)
    return torch.tensor([int.from_bytes(d, "big", signed=True) for d in digests], dtype=torch.int64)


def same_caption_relevance(keys: torch.Tensor) -> torch.Tensor:
    """(N, N) bool, [text i, image j]: text i is image j's own caption (the pair's own included), from the pairs'
    `caption_keys` (N,)."""
    return keys[:, None] == keys[None, :]


def rerank_top_k(
    similarity: torch.Tensor, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], k: int
) -> torch.Tensor:
    """similarity (Q, D) with each row's k most similar items re-ordered by `score(queries (M,), items (M,)) -> (M,)`
    (a second, costlier scorer): they stay ahead of the other items, which keep their order."""
    similarity = similarity.float()
    k = min(k, similarity.shape[1])
    top = similarity.topk(k, dim=1).indices  # (Q, k)
    queries = torch.arange(similarity.shape[0]).repeat_interleave(k)
    new = score(queries, top.flatten()).float().view(-1, k)  # (Q, k)
    new, order = new.sort(dim=1, descending=True)
    ranked = top.gather(1, order)  # (Q, k): best new score first
    # values above every similarity, so that the re-ordered items stay ahead of the row's others; equal new scores
    # get equal values (a tie stays a tie for `recall_at_k`)
    first_of_tie = torch.cat(
        [torch.ones_like(new[:, :1], dtype=torch.bool), new[:, 1:] != new[:, :-1]], dim=1
    )
    place = first_of_tie.cumsum(1) - 1  # (Q, k): 0 for the best score, 1 for the next distinct one, ...
    above = similarity.max() + (k - place).to(similarity.dtype)
    return similarity.scatter(1, ranked, above)


def gather_rows(
    tensors: Sequence[torch.Tensor] | None,
    all_gather: Callable[[torch.Tensor], torch.Tensor],
    world_size: int,
    broadcast: Callable[[object, int], object] | None = None,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor] | None:
    """Each process's rows (N_rank, ...) of every tensor, concatenated over the processes in rank order; every
    process gets the same result. `all_gather(t)` returns (world_size, *t.shape) (`LightningModule.all_gather`).
    Processes may hold different N: the rows are padded to the longest for the exchange and cut back after.

    A process with no rows passes None and still takes part: `broadcast(obj, src)` (`strategy.broadcast`) gives it
    the row shapes and dtypes of the first process with rows. None everywhere when no process has rows. `device`:
    where the exchanged tensors live (NCCL needs CUDA tensors)."""
    if world_size == 1:
        return None if tensors is None else list(tensors)
    held = 0 if tensors is None else len(tensors[0])
    counts = all_gather(torch.tensor([held], device=device)).flatten().tolist()
    if not any(counts):
        return None
    source = next(rank for rank, n in enumerate(counts) if n)
    if min(counts) == 0:  # every process takes part in the exchange, so an empty one needs the layout
        if broadcast is None:
            raise ValueError(f"gather_rows: a process holds no rows ({counts}) and no broadcast was given")
        layout = [(t.shape[1:], t.dtype) for t in tensors] if held else None
        layout = broadcast(layout, source)
        if tensors is None:
            tensors = [torch.empty(0, *shape, dtype=dtype, device=device) for shape, dtype in layout]
    longest = max(counts)
    gathered = []
    for t in tensors:
        t = t.to(device)
        padded = torch.cat([t, t.new_zeros(longest - len(t), *t.shape[1:])])
        rows = all_gather(padded)  # (world_size, longest, ...)
        gathered.append(torch.cat([rows[rank, :n] for rank, n in enumerate(counts)]))
    return gathered
