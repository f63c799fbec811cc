"""Caption decoding for an `ImageTextNet`: greedy, beam search and nucleus sampling (pure functions).

Each step runs the decoder on the newest token only: the image features' cross-attention keys and values are
computed once, and the self-attention keys and values of the prefix are kept in a `CaptionCache` (beams reorder it).
Token ids (B, T) start with [BOS]; [EOS] ends a caption and [PAD] follows it. Beam search can keep the final beam
that other models score highest with the image (`CaptionDecoding.match_weight`, `generator_weight`: the joint
stage's matcher and generator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from imagen.models.image_text import ImageTextNet
from imagen.models.text_encoder import PAD_ID, CaptionTokenizer
from imagen.sampling.ar import SamplingSettings, sample_token
from imagen.values import is_finite, is_int

METHODS = ("greedy", "beam", "nucleus")


@dataclass
class CaptionDecoding:
    method: str = "greedy"  # greedy | beam | nucleus
    beam_size: int = 4
    length_penalty: float = 1.0  # beam scores are divided by length ** length_penalty
    top_p: float = 0.9  # nucleus
    temperature: float = 1.0  # nucleus
    max_length: int | None = None  # tokens incl. [BOS]/[EOS]; None: the net's max_caption_length
    # beam: keep the final beam with the highest score + match_weight x the matcher's logit for it and the image
    # + generator_weight x the generator's mean log p(image tokens | caption) (both 0: the score alone). The captioner
    # gives attributes to the wrong object more often than the other two tell them apart.
    match_weight: float = 0.0
    generator_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"caption decoding method must be one of {METHODS}; got {self.method!r}")
        for name in ("length_penalty", "top_p", "temperature", "match_weight", "generator_weight"):
            if not is_finite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number; got {getattr(self, name)!r}")
        for name in ("beam_size", *(("max_length",) if self.max_length is not None else ())):
            if not is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an integer; got {getattr(self, name)!r}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1; got {self.beam_size}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.match_weight < 0 or self.generator_weight < 0:
            raise ValueError(
                f"match_weight and generator_weight must be >= 0; got {self.match_weight}, {self.generator_weight}"
            )

    @property
    def rescored(self) -> bool:
        """Whether beam search adds other models' scores to its own."""
        return self.method == "beam" and bool(self.match_weight or self.generator_weight)


def special_ids(tokenizer: CaptionTokenizer) -> tuple[int, int, list[int]]:
    """([BOS] id, [EOS] id, ids never to emit: [PAD], [UNK], [BOS])."""
    tok = tokenizer.tokenizer
    bos, eos = tok.token_to_id("[BOS]"), tok.token_to_id("[EOS]")
    return bos, eos, [PAD_ID, tok.token_to_id("[UNK]"), bos]


class CaptionCache:
    """The decoder's state while captions (B rows) are written: each layer's cross-attention keys and values of the
    image features, and its self-attention key/value buffers (B, H, max_length, hd) of the tokens so far."""

    def __init__(self, net: ImageTextNet, features: torch.Tensor, max_length: int, beams: int = 1):
        self.net = net
        # (B * beams, H, N, hd) per layer: the beams of one image adjacent
        self.cross_kv = [
            (k.repeat_interleave(beams, 0), v.repeat_interleave(beams, 0))
            for k, v in net.caption_cross_kv(features)
        ]
        k = self.cross_kv[0][0]
        rows, heads, _, head_dim = k.shape
        self.self_kv = [
            tuple(k.new_zeros(rows, heads, max_length, head_dim) for _ in range(2)) for _ in self.cross_kv
        ]
        self.length = 0

    def next_logits(self, token: torch.Tensor, banned: list[int]) -> torch.Tensor:
        """Float logits (B, V) of the token after `token` (B,), written at the next position; `banned` ids at -inf."""
        logits = self.net.caption_step(token[:, None], self.length, self.cross_kv, self.self_kv)
        logits = logits[:, -1].float()
        self.length += 1
        logits[:, banned] = float("-inf")
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues from row rows[i] (beam search keeps the best continuations)."""
        self.self_kv = [(k[rows], v[rows]) for k, v in self.self_kv]


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
    nucleus = decoding.method == "nucleus"
    settings = SamplingSettings(cfg_scale=1.0, temperature=decoding.temperature if nucleus else 0.0,
                                top_p=decoding.top_p if nucleus else None)  # fmt: skip
    cache = CaptionCache(net, features, max_length)
    ids = torch.full((features.shape[0], 1), bos, dtype=torch.long, device=features.device)
    done = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    for _ in range(max_length - 1):
        token = sample_token(cache.next_logits(ids[:, -1], banned), settings, generator)
        token = torch.where(done, PAD_ID, token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= token == eos
        if done.all():
            break
    return ids


@torch.no_grad()
def beam_search(
    net: ImageTextNet, features: torch.Tensor, tokenizer: CaptionTokenizer, decoding: CaptionDecoding
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every final beam: caption ids (B, K, T) and scores (B, K) (sum of log-probabilities / length^penalty)."""
    bos, eos, banned = special_ids(tokenizer)
    max_length = decoding.max_length or net.config.max_caption_length
    b, k = features.shape[0], decoding.beam_size
    cache = CaptionCache(net, features, max_length, beams=k)  # rows (B * K): the beams of one image adjacent
    ids = torch.full((b * k, 1), bos, dtype=torch.long, device=features.device)
    scores = torch.zeros(b, k, device=features.device)
    scores[:, 1:] = float("-inf")  # all beams start equal: keep one so the first expansion is not duplicated
    done = torch.zeros(b * k, dtype=torch.bool, device=features.device)
    for _ in range(max_length - 1):
        logp = cache.next_logits(ids[:, -1], banned).log_softmax(-1)  # (B * K, V)
        # a finished beam only grows by [PAD], at no cost
        logp[done] = float("-inf")
        logp[done, PAD_ID] = 0.0
        vocab = logp.shape[-1]
        candidates = (scores.view(-1, 1) + logp).view(b, k * vocab)
        scores, index = candidates.topk(k, dim=-1)  # (B, K)
        source = (torch.arange(b, device=ids.device)[:, None] * k + index // vocab).view(-1)  # rows of ids
        token = (index % vocab).view(-1)
        ids = torch.cat([ids[source], token[:, None]], dim=1)
        cache.reorder(source)
        done = done[source] | (token == eos)
        if done.all():
            break
    lengths = (ids[:, 1:] != PAD_ID).sum(1).view(b, k).clamp(min=1).float()
    return ids.view(b, k, -1), scores / lengths**decoding.length_penalty


def decode_captions(
    net: ImageTextNet,
    features: torch.Tensor,
    tokenizer: CaptionTokenizer,
    decoding: CaptionDecoding,
    generator: torch.Generator | None = None,
    rescore: Callable[[list[str]], torch.Tensor] | None = None,
) -> list[str]:
    """Captions (strings) for image features (B, N, dim) with the configured method. `rescore(captions)`: what
    `decoding.rescored` adds to the final beams' scores (B * K,), for their captions (B * K strings, the K beams of
    one image adjacent) with their images (`JointStage.decode_captions` builds it from the decoding's weights)."""
    if decoding.method == "beam":
        ids, scores = beam_search(net, features, tokenizer, decoding)  # (B, K, T), (B, K)
        if decoding.rescored:
            if rescore is None:
                raise ValueError("caption decoding with match_weight or generator_weight > 0 needs a joint stage's "
                                 "matcher and generator; set both to 0")  # fmt: skip
            scores = scores + rescore(ids_to_text(ids.flatten(0, 1), tokenizer)).view_as(scores).to(scores)
        ids = ids[torch.arange(len(ids), device=ids.device), scores.argmax(-1)]
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
