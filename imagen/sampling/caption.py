"""Caption decoding for an `ImageTextNet`: greedy, beam search and nucleus sampling (pure functions).

Captions are short (tens of tokens), so every step recomputes the decoder over the prefix; no cache is kept.
All functions return token ids (B, T) starting with [BOS]; [EOS] ends a caption and [PAD] follows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imagen.models.image_text import ImageTextNet
from imagen.models.text_encoder import PAD_ID, CaptionTokenizer
from imagen.sampling.ar import SamplingSettings, sample_token

METHODS = ("greedy", "beam", "nucleus")


@dataclass
class CaptionDecoding:
    method: str = "greedy"  # greedy | beam | nucleus
    beam_size: int = 4
    length_penalty: float = 1.0  # beam scores are divided by length ** length_penalty
    top_p: float = 0.9  # nucleus
    temperature: float = 1.0  # nucleus
    max_length: int | None = None  # tokens incl. [BOS]/[EOS]; None: the net's max_caption_length

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"caption decoding method must be one of {METHODS}; got {self.method!r}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1; got {self.beam_size}")


def special_ids(tokenizer: CaptionTokenizer) -> tuple[int, int, list[int]]:
    """([BOS] id, [EOS] id, ids never to emit: [PAD], [UNK], [BOS])."""
    tok = tokenizer.tokenizer
    bos, eos = tok.token_to_id("[BOS]"), tok.token_to_id("[EOS]")
    return bos, eos, [PAD_ID, tok.token_to_id("[UNK]"), bos]


def _next_logits(
    net: ImageTextNet, features: torch.Tensor, ids: torch.Tensor, banned: list[int]
) -> torch.Tensor:
    logits = net.caption_logits(features, ids)[:, -1].float()  # (B, V)
    logits[:, banned] = float("-inf")
    return logits


@torch.no_grad()
def sample_captions(
    net: ImageTextNet,
    features: torch.Tensor,
    tokenizer: CaptionTokenizer,
    decoding: CaptionDecoding,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy (argmax) or nucleus decoding of captions for image features (B, N, dim) -> ids (B, T)."""
    bos, eos, banned = special_ids(tokenizer)
    max_length = decoding.max_length or net.config.max_caption_length
    settings = SamplingSettings(cfg_scale=1.0, temperature=0.0 if decoding.method == "greedy" else decoding.temperature,
                                top_p=decoding.top_p)  # fmt: skip
    ids = torch.full((features.shape[0], 1), bos, dtype=torch.long, device=features.device)
    done = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    for _ in range(max_length - 1):
        token = sample_token(_next_logits(net, features, ids, banned), settings, generator)
        token = torch.where(done, PAD_ID, token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= token == eos
        if done.all():
            break
    return ids


@torch.no_grad()
def beam_search(
    net: ImageTextNet, features: torch.Tensor, tokenizer: CaptionTokenizer, decoding: CaptionDecoding
) -> torch.Tensor:
    """The highest-scoring caption ids (B, T) among `beam_size` beams (sum of log-probabilities / length^penalty)."""
    bos, eos, banned = special_ids(tokenizer)
    max_length = decoding.max_length or net.config.max_caption_length
    b, k = features.shape[0], decoding.beam_size
    features = features.repeat_interleave(k, dim=0)  # (B * K, N, dim), beams of one image adjacent
    ids = torch.full((b * k, 1), bos, dtype=torch.long, device=features.device)
    scores = torch.zeros(b, k, device=features.device)
    scores[:, 1:] = float("-inf")  # all beams start equal: keep one so the first expansion is not duplicated
    done = torch.zeros(b * k, dtype=torch.bool, device=features.device)
    for _ in range(max_length - 1):
        logp = _next_logits(net, features, ids, banned).log_softmax(-1)  # (B * K, V)
        # a finished beam only grows by [PAD], at no cost
        logp[done] = float("-inf")
        logp[done, PAD_ID] = 0.0
        vocab = logp.shape[-1]
        candidates = (scores.view(-1, 1) + logp).view(b, k * vocab)
        scores, index = candidates.topk(k, dim=-1)  # (B, K)
        source = (torch.arange(b, device=ids.device)[:, None] * k + index // vocab).view(-1)  # rows of ids
        token = (index % vocab).view(-1)
        ids = torch.cat([ids[source], token[:, None]], dim=1)
        done = done[source] | (token == eos)
        if done.all():
            break
    lengths = (ids[:, 1:] != PAD_ID).sum(1).view(b, k).clamp(min=1).float()
    best = (scores / lengths**decoding.length_penalty).argmax(-1)  # (B,)
    return ids.view(b, k, -1)[torch.arange(b, device=ids.device), best]


def decode_captions(
    net: ImageTextNet,
    features: torch.Tensor,
    tokenizer: CaptionTokenizer,
    decoding: CaptionDecoding,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Captions (strings) for image features (B, N, dim) with the configured method."""
    if decoding.method == "beam":
        ids = beam_search(net, features, tokenizer, decoding)
    else:
        ids = sample_captions(net, features, tokenizer, decoding, generator)
    return ids_to_text(ids, tokenizer)


def ids_to_text(ids: torch.Tensor, tokenizer: CaptionTokenizer) -> list[str]:
    """Caption ids (B, T) -> strings, stopping at [EOS] and dropping special tokens."""
    _, eos, _ = special_ids(tokenizer)
    out = []
    for row in ids.tolist():
        row = row[1 : row.index(eos, 1)] if eos in row[1:] else row[1:]
        out.append(tokenizer.tokenizer.decode(row, skip_special_tokens=True))
    return out
