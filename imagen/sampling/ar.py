"""Sampling image tokens from an `ARTransformer`: prefill -> decode_one_token -> decode_n_tokens.

The sampler owns a preallocated static KV cache (`KVCache`); the model only reads and writes the buffers it is
handed, so sampling leaves the model exactly as it was. Classifier-free guidance runs as one doubled batch
(conditional rows, then unconditional rows). Token choice avoids host syncs: top-k through `torch.topk` (no sort
of the vocabulary) and the exponential race `argmax(p / E), E ~ Exp(1)` instead of `multinomial`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from imagen.models.ar_transformer import ARTransformer


@dataclass
class KVCache:
    """Static buffers for one sampling call: per layer (B, H, S, hd) self-attention keys/values, cross-attention
    keys/values over the text, and masks. Allocated once; every address stays fixed during decoding."""

    self_k: list[torch.Tensor]
    self_v: list[torch.Tensor]
    key_valid: torch.Tensor  # (B, S) bool: sequence positions written so far
    cross_k: list[torch.Tensor]
    cross_v: list[torch.Tensor]
    text_mask: torch.Tensor  # (B, 1, 1, L) bool

    @classmethod
    def allocate(
        cls, model: ARTransformer, batch: int, text_length: int, device, dtype=torch.float32
    ) -> KVCache:
        """Zeroed buffers for `batch` rows (the doubled batch under guidance) and `text_length` text positions."""
        c = model.config
        hd = c.dim // c.heads
        seq = model.sequence_length

        def buffers(length: int) -> list[torch.Tensor]:
            return [
                torch.zeros(batch, c.heads, length, hd, device=device, dtype=dtype) for _ in range(c.layers)
            ]

        cross = c.conditioning == "cross"
        cache = cls(
            self_k=buffers(seq),
            self_v=buffers(seq),
            key_valid=torch.zeros(batch, seq, dtype=torch.bool, device=device),
            cross_k=buffers(text_length) if cross else [],
            cross_v=buffers(text_length) if cross else [],
            text_mask=torch.zeros(batch, 1, 1, text_length if cross else 1, dtype=torch.bool, device=device),
        )
        if torch.device(device).type == "cuda":
            # fixed addresses: a compiled decode step may mutate them in place and still replay as a CUDA graph
            for buffer in cache.tensors():
                torch._dynamo.mark_static_address(buffer)
        return cache

    def tensors(self) -> list[torch.Tensor]:
        return [*self.self_k, *self.self_v, self.key_valid, *self.cross_k, *self.cross_v, self.text_mask]

    def fits(self, batch: int, text_length: int, device, dtype) -> bool:
        """Whether this cache can serve a call with these shapes (reuse keeps CUDA-graph addresses valid)."""
        k = self.self_k[0]
        return (
            k.shape[0] == batch
            and self.text_mask.shape[-1] in (1, text_length)
            and (not self.cross_k or self.cross_k[0].shape[2] == text_length)
            and k.device == torch.device(device)
            and k.dtype == dtype
        )


@dataclass
class SamplingSettings:
    cfg_scale: float = 1.5  # 1: conditional only, 0: unconditional only (1.5: best measured on shapes)
    cfg_schedule: str = "constant"  # constant | linear (1 at the first token -> cfg_scale at the last)
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule must be constant or linear; got {self.cfg_schedule!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or null; got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or null; got {self.top_p}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def scale_at(self, step: int, num_steps: int) -> float:
        if self.cfg_schedule == "linear" and num_steps > 1:
            return 1.0 + (self.cfg_scale - 1.0) * step / (num_steps - 1)
        return self.cfg_scale


def guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Doubled-batch logits (2B, V) -> guided (B, V): uncond + scale * (cond - uncond)."""
    cond, uncond = logits.float().chunk(2)
    return uncond + scale * (cond - uncond)


def sample_token(
    logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, with temperature, top-k and top-p; greedy at temperature 0 or top_k 1."""
    if settings.temperature == 0 or settings.top_k == 1:
        return logits.argmax(-1)
    logits = logits.float() / settings.temperature
    if settings.top_k is not None and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p is not None and settings.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > settings.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


def with_unconditional(model: ARTransformer, states: torch.Tensor, mask: torch.Tensor):
    """(B, L, D) text -> (2B, L, D): the conditional rows, then the null caption."""
    null_states, null_mask = model.null_condition(states.shape[0], states.shape[1], states.device)
    return torch.cat([states, null_states.to(states.dtype)]), torch.cat([mask, null_mask])


def prefill(model: ARTransformer, states: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
    return model.prefill(states, mask, cache)


def decode_one_token(
    model: ARTransformer, token: torch.Tensor, position: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    """Feed `token` (rows of the doubled batch) at image `position`; logits for the next one."""
    return model.decode_step(token, position, cache)


def compiled_decode_step() -> Callable:
    """`decode_one_token` compiled for GPU decoding: fused kernels replayed as CUDA graphs (one graph per batch
    shape; after a second batch size the kernels are compiled once for any batch). The KV cache's buffers have
    static addresses (`KVCache.allocate`), so the in-place cache writes stay inside the graph."""
    return torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)


@torch.no_grad()
def generate(
    model: ARTransformer,
    states: torch.Tensor,
    mask: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    decode_step: Callable | None = None,
    cache: KVCache | None = None,
) -> torch.Tensor:
    """Sample image tokens (B, N) for text states (B, L, text_dim) with the static KV cache.

    `decode_step` replaces `decode_one_token`, e.g. `compiled_decode_step()` (CUDA graphs on GPU). A `cache` from
    an earlier call with the same shapes is reused (a compiled step then replays its graphs); otherwise one is
    allocated. The loop has no host syncs: positions are device tensors and tokens never leave the device.
    """
    batch, n = states.shape[0], model.config.num_image_tokens
    if settings.guided:
        states, mask = with_unconditional(model, states, mask)
    rows, length, device = states.shape[0], states.shape[1], states.device
    if cache is None or not cache.fits(rows, length, device, states.dtype):
        cache = KVCache.allocate(model, rows, length, device, states.dtype)
    step = decode_step or decode_one_token
    positions = torch.arange(n, device=device)
    tokens = torch.empty(batch, n, dtype=torch.long, device=device)
    logits = prefill(model, states, mask, cache)
    for i in range(n):
        guided = guide(logits, settings.scale_at(i, n)) if settings.guided else logits
        token = sample_token(guided, settings, generator)
        tokens[:, i] = token
        if i + 1 < n:
            fed = torch.cat([token, token]) if settings.guided else token
            logits = step(model, fed, positions[i], cache)
    return tokens


@torch.no_grad()
def generate_recompute(
    model: ARTransformer,
    states: torch.Tensor,
    mask: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The same sampling without a cache: a full forward over the prefix at every step (the baseline)."""
    batch, n = states.shape[0], model.config.num_image_tokens
    if settings.guided:
        states, mask = with_unconditional(model, states, mask)
    tokens = torch.zeros(batch, n, dtype=torch.long, device=states.device)
    for i in range(n):
        fed = torch.cat([tokens, tokens]) if settings.guided else tokens
        logits = model(fed[:, : i + 1], states, mask)[0][:, i]
        guided = guide(logits, settings.scale_at(i, n)) if settings.guided else logits
        tokens[:, i] = sample_token(guided, settings, generator)
    return tokens
