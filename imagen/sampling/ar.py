"""Sampling image tokens from an `ARTransformer`: prefill, then one `decode_and_sample` step per token.

The sampler owns a preallocated static KV cache (`KVCache`); the model only reads and writes the buffers it is
handed, so sampling leaves the model exactly as it was. Classifier-free guidance runs as one doubled batch
(conditional rows, then unconditional rows), for every token or the first `cfg_until` of them. Token choice avoids
host syncs: top-k through `torch.topk` (no sort of the vocabulary) and the exponential race `argmax(p / E),
E ~ Exp(1)` instead of `multinomial`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from imagen.models.ar_transformer import ARTransformer, lowbias32
from imagen.values import is_finite, is_int

# images sampled with seeds `seed + k * IMAGE_SEED_STRIDE` share no draws: sample.py's sample k of a prompt (so the runs
# of seeds 0, 1, ... share no image), and evaluation's prompt k
IMAGE_SEED_STRIDE = 2**32


@dataclass
class KVCache:
    """Static buffers for one sampling call: per layer (B, H, S, hd) self-attention keys/values, cross-attention
    keys/values over the text, and masks. Allocated once; every address stays fixed during decoding."""

    self_k: list[torch.Tensor]
    self_v: list[torch.Tensor]
    key_valid: torch.Tensor  # (B, S) bool: sequence positions written so far (S: sequence length + 1)
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
        # one spare position, never written: no attended length (`attended_length`) equals the buffers' length, which
        # would make a compiled step specialise on that equality and compile a second time
        seq = model.sequence_length + 1

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
        return cache.static()

    def tensors(self) -> list[torch.Tensor]:
        return [*self.self_k, *self.self_v, self.key_valid, *self.cross_k, *self.cross_v, self.text_mask]

    def static(self) -> KVCache:
        """Marks the buffers' addresses as fixed (on a GPU), so that a compiled decode step may mutate them in place
        and still replay as a CUDA graph (an ordinary input mutated in place keeps a step out of CUDA graphs)."""
        if self.key_valid.device.type == "cuda":
            for buffer in self.tensors():
                torch._dynamo.mark_static_address(buffer)
        return self

    def first_rows(self, rows: int) -> KVCache:
        """The first `rows` rows of every buffer, as views of the same memory: the conditional half of a guided
        batch, decoded alone once guidance stops (`SamplingSettings.cfg_until`)."""
        return KVCache(
            self_k=[k[:rows] for k in self.self_k],
            self_v=[v[:rows] for v in self.self_v],
            key_valid=self.key_valid[:rows],
            cross_k=[k[:rows] for k in self.cross_k],
            cross_v=[v[:rows] for v in self.cross_v],
            text_mask=self.text_mask[:rows],
        ).static()

    def fits(self, model: ARTransformer, batch: int, text_length: int, device, dtype) -> bool:
        """Whether this cache can serve a call of `model` with these shapes (reuse keeps CUDA-graph addresses valid):
        allocated for the model's geometry (layers, heads, head width, sequence length, conditioning), as many rows,
        and room for the text (a shorter one leaves the rest of the text positions masked out)."""
        c, k = model.config, self.self_k[0]
        return (
            len(self.self_k) == c.layers
            and k.shape[1:] == (c.heads, model.sequence_length + 1, c.dim // c.heads)
            and bool(self.cross_k) == (c.conditioning == "cross")
            and k.shape[0] == batch
            and (not self.cross_k or self.cross_k[0].shape[2] >= text_length)
            and k.device == torch.device(device)
            and k.dtype == dtype
        )


def reusable_cache(
    caches: dict[int, KVCache], model: ARTransformer, states: torch.Tensor, settings: SamplingSettings
) -> KVCache:
    """The cache for a `generate` call on these text states, kept in `caches` (one per number of rows) for later
    calls: a compiled step then replays the CUDA graphs it recorded on these buffers, where a new cache at new
    addresses would record new ones, in a list that only grows. A text longer than any before gets a larger one."""
    rows = states.shape[0] * (2 if settings.guided else 1)
    cache = caches.get(rows)
    if cache is None or not cache.fits(model, rows, states.shape[1], states.device, model.dtype):
        length = max(states.shape[1], 0 if cache is None else cache.text_mask.shape[-1])
        cache = caches[rows] = KVCache.allocate(model, rows, length, states.device, model.dtype)
    return cache


@dataclass
class SamplingSettings:
    # guided logits = unconditional + cfg_scale x (conditional - unconditional): 0 samples unconditionally (the caption
    # is ignored), 1 conditionally without guidance (no unconditional rows), above 1 with guidance (1.5: best measured
    # on shapes); below 0 would steer away from the caption
    cfg_scale: float = 1.5
    cfg_schedule: str = "constant"  # constant | linear (1 at the first token -> cfg_scale at the last)
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None
    # the fraction of each image's tokens chosen with guidance (a linear schedule ramps over those); the rest are
    # conditional only, and the unconditional rows leave the batch (half the rows per step from there on)
    cfg_until: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "cfg_scale",
            "temperature",
            "cfg_until",
            *(("top_p",) if self.top_p is not None else ()),
        ):
            if not is_finite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number; got {getattr(self, name)!r}")
        if self.top_k is not None and not is_int(self.top_k):
            raise ValueError(f"top_k must be an integer or null; got {self.top_k!r}")
        if self.cfg_scale < 0:
            raise ValueError(
                f"cfg_scale must be >= 0 (0: unconditional, 1: conditional without guidance); got {self.cfg_scale}"
            )
        if self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule must be constant or linear; got {self.cfg_schedule!r}")
        if not 0 < self.cfg_until <= 1:
            raise ValueError(f"cfg_until must be in (0, 1]; got {self.cfg_until}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or null; got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or null; got {self.top_p}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def guided_tokens(self, num_tokens: int) -> int:
        """How many of an image's `num_tokens` tokens are chosen with guidance (at least the first; 0 unguided)."""
        # rounded first: 0.55 * 100 is 55.000000000000007 in floating point
        return max(1, math.ceil(round(self.cfg_until * num_tokens, 9))) if self.guided else 0

    def scale_at(self, step: int, num_steps: int) -> float:
        if self.cfg_schedule == "linear" and num_steps > 1:
            return 1.0 + (self.cfg_scale - 1.0) * step / (num_steps - 1)
        return self.cfg_scale


def guide(logits: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Doubled-batch logits (2B, V) -> guided (B, V): uncond + scale * (cond - uncond) (`scale`: a number or a
    0-dim tensor)."""
    cond, uncond = logits.float().chunk(2)
    return uncond + scale * (cond - uncond)


def sample_token(
    logits: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, with temperature, top-k and top-p; greedy at temperature 0 or top_k 1.
    `noise`: the (B, V) Exp(1) draws of the exponential race (drawn here with `generator` when None)."""
    if settings.greedy:
        return logits.argmax(-1)
    logits = logits.float()
    # shifted so the largest is 0: at a tiny temperature the quotient is then 0 and -inf, not inf (NaN after softmax)
    logits = (logits - logits.amax(-1, keepdim=True)) / settings.temperature
    if settings.top_k is not None and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p is not None and settings.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > settings.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probs = logits.softmax(-1)
    if noise is None:
        noise = race_noise(probs.shape, probs.device, generator)
    return (probs / noise).argmax(-1)


def race_noise(
    shape,
    device,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
    step: int = 0,
) -> torch.Tensor:
    """(B, V) Exp(1) draws (float32) for `sample_token`'s exponential race: from `generator`, or, given per-image
    `seeds` (B,) int64, a counter-based function of (seed, image token `step`, token id) alone, so that an image's
    draws depend neither on the batch it is sampled in nor on the device. 24 random bits per draw either way."""
    if seeds is None:
        return torch.empty(shape, device=device).exponential_(1.0, generator=generator)
    if tuple(seeds.shape) != tuple(shape[:1]):
        raise ValueError(
            f"seeds of shape {tuple(seeds.shape)} for draws of shape {tuple(shape)}: one per row"
        )
    seeds = seeds.to(device=device, dtype=torch.long)
    low, high = (_as_int32(seeds & 0xFFFFFFFF), _as_int32((seeds >> 32) & 0xFFFFFFFF))
    # (B, 1) twice: the image's two 32-bit keys at this step, one per half of its seed (one key of both halves
    # would let two seeds of 2^64 share draws at 2^-32 odds)
    low_key = lowbias32(lowbias32(low) + step)[:, None]
    high_key = lowbias32(lowbias32(high ^ 0x2545F491) + step)[:, None]
    token_ids = torch.arange(shape[1], dtype=torch.int32, device=device)
    bits = lowbias32(lowbias32(token_ids ^ low_key) + high_key) & 0xFFFFFF  # (B, V), uniform in [0, 2^24)
    return -torch.log((bits.float() + 0.5) * 2**-24)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 2^32) -> the int32 with the same 32 bits."""
    return (words - ((words >> 31) << 32)).to(torch.int32)


def candidate_seeds(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) per-image seeds -> (B * n,) seeds for `n` candidates each, prompt-major: candidate 0 keeps the image's
    seed (so it is the sample drawn without reranking), candidate c > 0 has the low 31 bits of `lowbias32(c)` xor-ed
    into bits 32 to 62 of the seed (it stays a positive int64)."""
    offsets = torch.arange(n, dtype=torch.int32, device=seeds.device)
    offsets = (lowbias32(offsets).long() & 0x7FFFFFFF) << 32  # (n,), 0 for candidate 0
    return (seeds.long()[:, None] ^ offsets).reshape(-1)


def with_unconditional(model: ARTransformer, states: torch.Tensor, mask: torch.Tensor):
    """(B, L, D) text -> (2B, L, D): the conditional rows, then the null caption."""
    null_states, null_mask = model.null_condition(states.shape[0], states.shape[1], states.device)
    return torch.cat([states, null_states.to(states.dtype)]), torch.cat([mask, null_mask])


def prefill(model: ARTransformer, states: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
    return model.prefill(states, mask, cache)


def decode_one_token(
    model: ARTransformer,
    token: torch.Tensor,
    position: torch.Tensor,
    cache: KVCache,
    attend: int | None = None,
) -> torch.Tensor:
    """Feed `token` (rows of the doubled batch) at image `position`; logits for the next one. Self-attention reads
    the first `attend` cache positions (None: all)."""
    return model.decode_step(token, position, cache, attend)


def decode_and_sample(
    model: ARTransformer,
    fed: torch.Tensor,
    position: torch.Tensor,
    cache: KVCache,
    scale: torch.Tensor,
    noise: torch.Tensor | None,
    settings: SamplingSettings,
    attend: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of `generate`: feed `fed` (B rows, 2B under guidance) at image `position`, guide the logits with
    `scale` (0-dim tensor) and choose the next tokens with `noise` (B, V) (None when greedy). Returns the tokens
    (B,) and the rows to feed next. `compiled_decode_step` compiles all of it as one graph."""
    logits = decode_one_token(model, fed, position, cache, attend)
    guided = guide(logits, scale) if settings.guided else logits
    token = sample_token(guided, settings, noise=noise)
    return token, torch.cat([token, token]) if settings.guided else token


def compiled_decode_step() -> Callable:
    """`decode_and_sample` compiled for GPU decoding: the decode step, guidance and the token choice fused into one
    graph replayed as a CUDA graph (one recording per batch size and attended length; the shapes are dynamic, so
    one compilation serves every batch size above 1 and every length, and a second the unguided steps after
    `cfg_until`). The KV cache's buffers have static addresses (`KVCache.allocate`), so the in-place cache writes
    stay inside the graph; the random draws come in as an input (`race_noise`), so a seeded generator gives the
    eager sampler's tokens."""
    return torch.compile(decode_and_sample, mode="reduce-overhead", fullgraph=True, dynamic=True)


def attended_length(model: ARTransformer, position: int, block: int | None) -> int | None:
    """Cache positions a decode step that feeds image `position` must read, rounded up to a multiple of `block`
    (a few distinct lengths: few CUDA graphs), or None (all) without `block`."""
    if block is None:
        return None
    if block < 1:
        raise ValueError(f"attend_block must be a positive number of cache positions or None; got {block}")
    needed = model.prefix_length + position + 2  # the prefix, BOS and tokens 0..position
    return min(model.sequence_length, -(-needed // block) * block)


@torch.no_grad()
def generate(
    model: ARTransformer,
    states: torch.Tensor,
    mask: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    decode_step: Callable | None = None,
    cache: KVCache | None = None,
    attend_block: int | None = 64,
    seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample image tokens (B, N) for text states (B, L, text_dim) with the static KV cache, in the model's dtype.

    `decode_step` replaces `decode_and_sample`, e.g. `compiled_decode_step()` (CUDA graphs on GPU). A `cache` from
    an earlier call with the same shapes is reused (a compiled step then replays its graphs); otherwise one is
    allocated. Each step's self-attention reads the cache in blocks of `attend_block` positions, only as far as
    the tokens written so far (None: the whole cache at every step). The loop has no host syncs: positions are
    device tensors, tokens never leave the device, and the random draws are made on the device (after it, one sync
    checks that the first step's logits were finite: `FloatingPointError` if not). The draws come from
    `generator`, or from per-image `seeds` (B,) int64 (`race_noise`): an image then depends on its caption and seed
    alone.
    """
    check_sampling_arguments(generator, seeds, settings)
    batch, n = states.shape[0], model.config.num_image_tokens
    states = states.to(model.dtype)  # the cache's dtype
    if settings.guided:
        states, mask = with_unconditional(model, states, mask)
    rows, length, device = states.shape[0], states.shape[1], states.device
    if cache is None or not cache.fits(model, rows, length, device, states.dtype):
        cache = KVCache.allocate(model, rows, length, device, states.dtype)
    step = decode_step or decode_and_sample
    # the image position of the token fed; counted on the device (a view of arange would tie its length to the
    # attended length in a compiled step's guards)
    position = torch.zeros((), dtype=torch.long, device=device)
    guided_tokens = settings.guided_tokens(n)
    # (N,) guidance at each token (only the first `guided_tokens` are used)
    scales = torch.tensor([settings.scale_at(i, guided_tokens) for i in range(n)])
    scales = scales.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else scales
    mark_varying(cache)

    def noise(step: int) -> torch.Tensor | None:
        if settings.greedy:
            return None
        return varying(race_noise((batch, model.config.vocab_size), device, generator, seeds, step), 0)

    tokens = torch.empty(batch, n, dtype=torch.long, device=device)
    logits = prefill(model, states, mask, cache)
    finite = torch.isfinite(logits).all()  # read once the tokens are written: no sync inside the loop
    token = sample_token(guide(logits, scales[0]) if settings.guided else logits, settings, noise=noise(0))
    tokens[:, 0] = token
    fed = varying(torch.cat([token, token]) if settings.guided else token, 0)
    for i in range(1, n):
        if i == guided_tokens:  # guidance stops: the conditional rows go on alone, on their half of the cache
            settings, cache = replace(settings, cfg_scale=1.0), mark_varying(cache.first_rows(batch))
            fed = varying(fed[:batch].clone(), 0)
        attend = attended_length(model, i - 1, attend_block)
        token, fed = step(model, fed, position, cache, scales[i], noise(i), settings, attend)
        tokens[:, i] = token
        fed = varying(fed.clone(), 0)  # a CUDA graph's output is overwritten by its next replay
        position += 1
    if not finite:  # every token would be 0, silently
        raise FloatingPointError(
            "the generator's logits are NaN or infinite: its weights are not finite (a diverged checkpoint?)"
        )
    return tokens


def varying(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """`tensor`, marked for a compiled step as varying in `dim` from call to call. Otherwise the first compilation
    ties a size that happens to equal one of the model's (64 rows and 64-wide heads) to that value, and the next
    batch size compiles again."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


def mark_varying(cache: KVCache) -> KVCache:
    """`cache`'s batch and text-length dimensions marked as varying (`varying`)."""
    for buffer in cache.tensors():
        varying(buffer, 0)  # the batch
    for buffer in [*cache.cross_k, *cache.cross_v]:
        varying(buffer, 2)  # the text length
    varying(cache.text_mask, 3)
    return cache


@torch.no_grad()
def generate_recompute(
    model: ARTransformer,
    states: torch.Tensor,
    mask: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same sampling without a cache: a full forward over the prefix at every step (the baseline)."""
    check_sampling_arguments(generator, seeds, settings)
    batch, n = states.shape[0], model.config.num_image_tokens
    guided_tokens = settings.guided_tokens(n)
    both = with_unconditional(model, states, mask) if guided_tokens else None
    tokens = torch.zeros(batch, n, dtype=torch.long, device=states.device)
    for i in range(n):
        if i < guided_tokens:
            logits = model(torch.cat([tokens, tokens])[:, : i + 1], *both)[0][:, i]
            logits = guide(logits, settings.scale_at(i, guided_tokens))
        else:
            logits = model(tokens[:, : i + 1], states, mask)[0][:, i]
        draws = (
            None
            if seeds is None or settings.greedy
            else race_noise(logits.shape, logits.device, seeds=seeds, step=i)
        )
        tokens[:, i] = sample_token(logits, settings, generator, noise=draws)
    return tokens


def check_sampling_arguments(
    generator: torch.Generator | None, seeds: torch.Tensor | None, settings: SamplingSettings
) -> None:
    """Refuse sampling arguments of the wrong kind, naming the argument."""
    if not isinstance(settings, SamplingSettings):
        raise TypeError(
            f"settings is a SamplingSettings, not {type(settings).__name__}: e.g. SamplingSettings(**it)"
        )
    if seeds is not None and not (isinstance(seeds, torch.Tensor) and seeds.dtype == torch.long):
        raise TypeError(
            f"seeds are an int64 tensor (B,), one per image, e.g. torch.tensor([1, 2]); got {seeds!r}"[:300]
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator is a torch.Generator, not {type(generator).__name__}")
    if generator is not None and seeds is not None:
        raise ValueError(
            "give a generator or per-image seeds, not both: with seeds, an image's draws are its own"
        )
