"""Decoder-only Transformer that writes image tokens in raster order, conditioned on text.

Conditioning is cross-attention to the text states (default) or the text states as a prefix of the sequence.
Positions are 2D-aware: the input at sequence position i gets the learned row and column embedding of the grid
cell it predicts (absolute: "top left" in a caption names a place) and, with `rope`, self-attention rotates
queries and keys by that cell's row and column (2D RoPE: "the token above" is the same relative offset
everywhere). Attention runs through `scaled_dot_product_attention`, but for training on CPU, where plain matmuls
are faster (`attention`).

Sequence layout (N = h * w image tokens, L = text length):
  cross:  [BOS, t0, ..., t(N-2)]                      -> predicts t0 .. t(N-1)
  prefix: [text(0..L-1), BOS, t0, ..., t(N-2)]        -> predictions read at positions L .. L+N-1

A KV cache is never stored on the model: the sampler allocates one (`imagen.sampling.ar.KVCache`) and passes it
to `prefill` and `decode_step`, so a model that sampled during validation trains on unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from imagen.models.sizes import config_from_size


@dataclass
class ARConfig:
    vocab_size: int = 1000  # image codebook size (the autoencoder's)
    grid_size: tuple[int, int] = (8, 8)  # (h, w) of the token grid
    dim: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    text_dim: int = 128  # width of the text encoder's states
    conditioning: str = "cross"  # cross | prefix
    max_text_length: int = 64  # prefix mode: positions reserved for the text
    # 2D rotary positions in self-attention (half of each head's channels turn with the row, half with the column).
    # False here so that checkpoints written before it existed load as they were trained; the sizes turn it on.
    rope: bool = False
    rope_base: float = 100.0
    # Width of the autoencoder's code vectors (its decoder's input for each token id), added through a projection to
    # the learned embedding of each input token: what a code looks like, known from the first step. 0: off (as in
    # checkpoints written before it existed); the generator stage sets it from its autoencoder (`model.code_vectors`).
    code_dim: int = 0
    # Training recomputes each block's activations in the backward pass instead of keeping them (less memory for large
    # sizes and batches, a second forward pass through each block); sampling and evaluation are unaffected.
    activation_checkpointing: bool = False
    # fields that act only while training: a checkpoint loads whatever this run sets (`check_config`)
    training_only: ClassVar[tuple[str, ...]] = ("dropout", "activation_checkpointing")

    def __post_init__(self) -> None:
        self.grid_size = tuple(self.grid_size)
        if self.conditioning not in ("cross", "prefix"):
            raise ValueError(f"model.net.conditioning must be cross or prefix; got {self.conditioning!r}")
        if self.dim % self.heads:
            raise ValueError(f"model.net.dim={self.dim} must be divisible by model.net.heads={self.heads}")
        if self.rope and (self.dim // self.heads) % 4:
            raise ValueError(
                f"model.net.rope needs a head width (dim / heads = {self.dim // self.heads}) divisible by 4"
            )

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


# Named sizes. Parameters with a 16384-code vocabulary, 16x16 tokens and 768-wide text states, with cross-attention
# / with a text prefix: B 139M / 111M, L 370M / 286M, XL 777M / 594M. `ARTransformer.from_size(name, **overrides)`.
AR_SIZES: dict[str, ARConfig] = {
    "tiny": ARConfig(dim=64, layers=2, heads=2, rope=True),
    "shapes": ARConfig(dim=256, layers=4, heads=4, rope=True),
    "B": ARConfig(dim=768, layers=12, heads=12, rope=True),
    "L": ARConfig(dim=1024, layers=20, heads=16, rope=True),
    "XL": ARConfig(dim=1280, layers=28, heads=20, rope=True),
}


def rope_angles(grid_size: tuple[int, int], head_dim: int, base: float, prefix: int = 0) -> torch.Tensor:
    """(prefix + h * w, head_dim / 2) rotation angles: sequence position i >= prefix is the grid cell i - prefix
    (row-major); its first head_dim / 4 angles follow the row, the rest the column. Prefix positions get 0."""
    h, w = grid_size
    freqs = base ** (-torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 4))
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # (N,)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (N, head_dim / 2)
    return F.pad(angles, (0, 0, prefix, 0)).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (j, j + head_dim / 2) of x (B, H, T, head_dim) by angles with cos, sin (T, head_dim / 2)."""
    x_float, half = x.float(), x.shape[-1] // 2
    # slices, not chunk(): inductor's CPU backward of chunk -> cat under bf16 autocast returns NaN (torch 2.13)
    a, b = x_float[..., :half], x_float[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)


def lowbias32(h: torch.Tensor) -> torch.Tensor:
    """The integer hash "lowbias32" of int32 `h`, elementwise (int32): counter-based random bits."""
    # int32 products wrap; the masks after the arithmetic shifts make them logical shifts
    h = (h ^ ((h >> 16) & 0xFFFF)) * 0x7FEB352D
    h = (h ^ ((h >> 15) & 0x1FFFF)) * -0x7B935975  # 0x846CA68B as int32
    return h ^ ((h >> 16) & 0xFFFF)


def hashed_keep_mask(shape: torch.Size, p: float, device=None) -> torch.Tensor:
    """A dropout keep mask (True with probability 1 - p, to 2^-24) as a counter-based random function: `lowbias32`
    of each element's index plus one random seed. Inside a compiled graph it fuses into the kernel that applies it
    (0.16 ms for 32 x 64 x 256 on CPU, where inductor's own random draws take 1.5 ms)."""
    seed = torch.randint(-(2**31), 2**31 - 1, (), dtype=torch.int32, device=device)
    h = torch.arange(torch.Size(shape).numel(), dtype=torch.int32, device=device).view(shape) + seed
    return (lowbias32(h) & 0xFFFFFF) >= round(p * 2**24)


def grid_positions(row_emb: torch.Tensor, col_emb: torch.Tensor) -> torch.Tensor:
    """Row embeddings (h, dim) and column embeddings (w, dim) -> (h * w, dim), in raster order: row + column."""
    return (row_emb[:, None, :] + col_emb[None, :, :]).flatten(0, 1)


def dropout_cpu_fast(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout of x with probability p, made cheap on CPU, where `F.dropout`'s Bernoulli draws made the
    shapes generator's training step 1.6-1.9x slower at p = 0.1 (BENCHMARKS.md):
    - eager, the mask keeps the elements whose random byte is at least round(256 p) (so p is rounded to a multiple of
      1/256): 2.2x cheaper than `F.dropout`;
    - inside `torch.compile`, the mask is `hashed_keep_mask`, computed in the fused kernels (compile the blocks with
      inductor's `fallback_random`, as `ARTransformer.compile_blocks` does on CPU, or inductor re-derives its seed in
      every loop iteration).
    Other devices use `F.dropout`."""
    if not training or p == 0:
        return x
    if not 0 < p < 1:
        raise ValueError(f"dropout probability must be in [0, 1); got {p}")
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    if torch.compiler.is_compiling():
        return x * hashed_keep_mask(x.shape, p, x.device) * (1 / (1 - p))
    dropped = min(round(256 * p), 255)
    keep = torch.empty(x.shape, dtype=torch.uint8, device=x.device).random_() >= dropped
    return x * keep * (256 / (256 - dropped))


class Dropout(nn.Dropout):
    """`nn.Dropout` through `dropout_cpu_fast`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout_cpu_fast(x, self.p, self.training)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for q (B, H, T, hd), k, v (B, H, S, hd); `mask` broadcastable to (B, H, T, S),
    True = may attend, or None for causal (T == S). GPUs run `scaled_dot_product_attention` (flash / memory-efficient
    kernels), and so does the CPU where no gradient is wanted (sampling, evaluation: its fused kernel is 1.5-4x faster
    there at batch 256-2048 over 64 tokens, bf16). To train on CPU, at these short sequences, the plain matmuls are
    faster forward and backward than either SDPA backend (measured at 64 tokens, bf16, fwd+bwd: 5.4 ms against 9.8 ms
    for math and 16 ms for the fused kernel)."""
    if mask is not None and mask.dtype != torch.bool:  # SDPA would add a float mask to the scores as a bias
        raise TypeError(
            f"attention masks are boolean (True = may attend), not {mask.dtype}: pass mask.bool()"
        )
    if mask is None and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"attention without a mask is causal self-attention; {q.shape[-2]} queries over {k.shape[-2]} keys need "
            "a mask (cross-attention: all True where a key may be seen)"
        )
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type != "cpu" or not wants_grad:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None
        )
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    seen = mask if mask is not None else torch.ones_like(scores[0, 0], dtype=torch.bool).tril()
    probs = scores.masked_fill(~seen, float("-inf")).float().softmax(dim=-1).to(v.dtype)
    if mask is not None:  # a query that may see no key gets zeros (softmax over no key is NaN), as from SDPA
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return dropout_cpu_fast(probs, dropout) @ v


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention to `context`."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(source).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) attends to k, v (B, H, S, hd); mask broadcastable to (B, H, T, S) with True = may attend,
        or None for causal self-attention (T == S). `rope`: (cos, sin) (T, hd / 2) to rotate the queries by (the
        keys were rotated when written)."""
        q = self.split_heads(self.q(x))
        if rope is not None:
            q = apply_rope(q, *rope)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)
        b, _, t, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, c: ARConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.dim)
        self.attn = Attention(c.dim, c.heads, dropout=c.dropout)
        self.cross = c.conditioning == "cross"
        if self.cross:
            self.norm_cross = nn.LayerNorm(c.dim)
            self.cross_attn = Attention(c.dim, c.heads, context_dim=c.dim, dropout=c.dropout)
        self.norm2 = nn.LayerNorm(c.dim)
        hidden = int(c.mlp_ratio * c.dim)
        self.mlp = nn.Sequential(nn.Linear(c.dim, hidden), nn.GELU(), nn.Linear(hidden, c.dim))
        self.drop = Dropout(c.dropout)

    def forward(
        self, x, self_mask, cross_kv, cross_mask, cache_kv=None, positions=None, rope=None, attend=None
    ) -> torch.Tensor:
        """x (B, T, D). With `cache_kv` = (k, v) buffers (B, H, S, hd), this step's keys and values are written at
        sequence `positions` (T,) and attention runs over the buffer's first `attend` positions (None: all S) under
        `self_mask`. `rope`: (cos, sin) (T, hd / 2) of x's positions, rotating self-attention queries and keys (2D
        RoPE)."""
        h = self.norm1(x)
        k, v = self.attn.keys_values(h)
        if rope is not None:
            k = apply_rope(k, *rope)
        if cache_kv is not None:
            k_buf, v_buf = cache_kv
            k_buf.index_copy_(2, positions, k.to(k_buf.dtype))
            v_buf.index_copy_(2, positions, v.to(v_buf.dtype))
            k, v = k_buf[:, :, :attend], v_buf[:, :, :attend]  # (B, H, attend, hd) views
        x = x + self.drop(self.attn(h, k, v, self_mask, rope))
        if self.cross:
            x = x + self.drop(self.cross_attn(self.norm_cross(x), *cross_kv, cross_mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class CodeVectorInput:
    """For a net that reads the autoencoder's code vector of each token id (`config.code_dim`), from its buffer
    `code_vectors` (rows past `config.vocab_size`, such as [BOS]'s, are its own)."""

    def set_code_vectors(self, vectors: torch.Tensor) -> None:
        """The autoencoder's code vector of every token id, (vocab_size, code_dim)."""
        expected = (self.config.vocab_size, self.config.code_dim)
        if tuple(vectors.shape) != expected:
            raise ValueError(
                f"code vectors of shape {tuple(vectors.shape)}; this {type(self).__name__} needs {expected}"
            )
        self.code_vectors[: self.config.vocab_size].copy_(vectors)


class ARTransformer(CodeVectorInput, nn.Module):
    """`forward(tokens, text_states, text_mask, targets=None) -> (logits (B, N, V), loss)` (nanoGPT-style)."""

    def __init__(self, config: ARConfig):
        super().__init__()
        self.config = c = config
        self.token_emb = nn.Embedding(c.vocab_size + 1, c.dim)  # the last id is BOS
        self.bos_id = c.vocab_size
        h, w = c.grid_size
        self.row_emb = nn.Parameter(torch.zeros(h, c.dim))
        self.col_emb = nn.Parameter(torch.zeros(w, c.dim))
        self.text_proj = nn.Linear(c.text_dim, c.dim)
        if c.code_dim:
            # row `bos_id` stays zero; the rest are set with set_code_vectors and travel in the state dict
            self.register_buffer("code_vectors", torch.zeros(c.vocab_size + 1, c.code_dim))
            self.code_proj = nn.Linear(c.code_dim, c.dim, bias=False)
        # the "empty caption": caption dropout and the unconditional half of guidance use it
        self.null_text = nn.Parameter(torch.zeros(1, 1, c.text_dim))
        if c.conditioning == "prefix":
            self.text_pos_emb = nn.Parameter(torch.zeros(c.max_text_length, c.dim))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.rope:  # derived from the config: not part of the state dict
            angles = rope_angles(c.grid_size, c.dim // c.heads, c.rope_base, self.prefix_length)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        # residual projections at GPT-2's smaller scale; the code vectors' input projection too, a slip that every
        # figure since it was added (BENCHMARKS.md, session 23) was measured with, so it stays
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight", "code_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.layers))
        for p in (self.row_emb, self.col_emb, self.null_text):
            nn.init.normal_(p, std=0.02)
        if c.conditioning == "prefix":
            nn.init.normal_(self.text_pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @classmethod
    def from_size(cls, size: str = "shapes", **overrides) -> ARTransformer:
        """Build from a named size in `AR_SIZES`, with any config field overridden."""
        return cls(config_from_size(AR_SIZES, size, overrides))

    @property
    def prefix_length(self) -> int:
        """Sequence positions before BOS (the text, in prefix mode)."""
        return self.config.max_text_length if self.config.conditioning == "prefix" else 0

    @property
    def sequence_length(self) -> int:
        return self.prefix_length + self.config.num_image_tokens

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        """The weights' floating-point type: text states are cast to it, and a sampler's KV cache is kept in it."""
        return self.head.weight.dtype

    def compile_blocks(self, device_type: str | None = None, **compile_kwargs) -> ARTransformer:
        """`torch.compile` each Transformer block in place (regional compilation): the blocks share one compiled
        graph, so compiling takes seconds rather than minutes and the model stays a plain module. For CPU
        (`device_type`, default: where the weights are) inductor takes its random numbers from eager PyTorch
        (`fallback_random`): its own CPU draws re-seed a Philox generator in every loop iteration, which made the
        step with dropout 0.1 1.6x slower than without, against 1.2x so (BENCHMARKS.md)."""
        inductor = compile_kwargs.get("backend", "inductor") == "inductor"
        if inductor and (device_type or self.head.weight.device.type) == "cpu":
            compile_kwargs["options"] = {"fallback_random": True, **compile_kwargs.get("options", {})}
        for block in self.blocks:
            block.compile(**compile_kwargs)
        return self

    def flops_per_sample(self, text_length: int) -> int:
        """Forward FLOPs for one teacher-forced sample: 2 per multiply-add of every matmul, and attention scores
        and values counted in full (the PaLM convention, no causal discount). Training costs 3x this."""
        c = self.config
        n, d = c.num_image_tokens + self.prefix_length, c.dim
        hidden = int(c.mlp_ratio * d)
        # counted in multiply-adds, doubled at the end
        per_token = 4 * d * d + 2 * d * hidden  # q, k, v, out projections and the MLP
        attention = 2 * n * d  # scores and weighted values over n keys
        if c.conditioning == "cross":
            per_token += 2 * d * d  # cross-attention q and out projections
            attention += 2 * text_length * d
        cross_kv = 2 * d * d * text_length if c.conditioning == "cross" else 0
        head = d * c.vocab_size * c.num_image_tokens
        text_proj = c.text_dim * d * text_length
        code_proj = c.code_dim * d * c.num_image_tokens
        return 2 * (c.layers * (n * (per_token + attention) + cross_kv) + head + text_proj + code_proj)

    # -- conditioning -----------------------------------------------------------------------------------------------

    def condition(
        self,
        states: torch.Tensor,
        mask: torch.Tensor,
        drop_prob: float = 0.0,
        drop: torch.Tensor | None = None,
    ):
        """Text states (B, L, text_dim) -> (B, L, dim) and mask, with rows replaced by the null caption where
        dropped (`drop` (B,) bool, or drawn with `drop_prob`): caption dropout for classifier-free guidance."""
        self.check_text(states, mask)
        states = states.to(self.dtype)
        if drop is None and (drop_prob > 0 or self.training):
            drop = torch.rand(states.shape[0], device=states.device) < drop_prob
        # even when no row is dropped (or none can be): under DDP every parameter must take part in each step
        if drop is not None:
            null_states, null_mask = self.null_condition(states.shape[0], states.shape[1], states.device)
            states = torch.where(drop[:, None, None], null_states.to(states.dtype), states)
            mask = torch.where(drop[:, None], null_mask, mask)
        return self.text_proj(states), mask

    def check_text(self, states: torch.Tensor, mask: torch.Tensor) -> None:
        """Refuse text states that are not (B, L, text_dim) with a boolean mask (B, L) (True = a real position)."""
        if states.ndim != 3 or states.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"text_states of shape {tuple(states.shape)}: this ARTransformer reads (B, L, {self.config.text_dim})"
            )
        if mask.dtype != torch.bool:
            raise TypeError(
                f"text_mask is boolean (True = a real position), not {mask.dtype}: pass mask.bool()"
            )
        if tuple(mask.shape) != tuple(states.shape[:2]):
            raise ValueError(
                f"text_mask of shape {tuple(mask.shape)} for text_states of shape {tuple(states.shape)}: "
                "it must be (B, L), one flag per text position"
            )

    def null_condition(self, batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption as text states (B, length, text_dim) and mask (only position 0 valid)."""
        states = torch.zeros(batch, length, self.config.text_dim, device=device)
        states[:, 0] = self.null_text[0, 0]
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        mask[:, 0] = True
        return states, mask

    def image_positions(self) -> torch.Tensor:
        """(N, dim): the row + column embedding of the grid cell each image position predicts."""
        return grid_positions(self.row_emb, self.col_emb)

    # -- forward ----------------------------------------------------------------------------------------------------

    def embed(self, inputs: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Image-part inputs (B, T) (BOS then tokens) at image positions start..start+T-1 -> (B, T, dim)."""
        t = inputs.shape[1]
        positions = self.image_positions()
        if isinstance(start, torch.Tensor):
            pos = torch.index_select(positions, 0, start + torch.arange(t, device=inputs.device))
        else:
            pos = positions[start : start + t]
        x = self.token_emb(inputs) + pos
        if self.config.code_dim:
            x = x + self.code_proj(self.code_vectors[inputs])
        return x

    def forward(
        self,
        tokens: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        targets: torch.Tensor | None = None,
        cond_drop_prob: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced pass. tokens (B, N) image token ids, or (B, n < N) for the first n predictions only;
        text_states (B, L, text_dim), text_mask (B, L). Returns logits (B, n, V) and the mean cross-entropy
        against `targets` (B, n) when given."""
        b, n = tokens.shape
        if n > self.config.num_image_tokens or text_states.shape[0] != b:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} with text_states of shape {tuple(text_states.shape)}: "
                f"one text row per token row, and at most {self.config.num_image_tokens} tokens (the grid {self.config.grid_size})"
            )
        context, context_mask = self.condition(text_states, text_mask, cond_drop_prob)
        bos = torch.full((b, 1), self.bos_id, dtype=torch.long, device=tokens.device)
        x = self.embed(torch.cat([bos, tokens[:, :-1]], dim=1), 0)  # (B, n, dim)
        if self.config.conditioning == "prefix":
            x, key_valid = self._with_prefix(x, context, context_mask)  # (B, L + n, dim)
            s = x.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            self_mask, cross_mask = causal[None, None] & key_valid[:, None, None, :], None
        else:
            self_mask, cross_mask = None, context_mask[:, None, None, :]  # None: causal
        rope = self.rope_at(torch.arange(x.shape[1], device=x.device))
        recompute = self.config.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            cross_kv = block.cross_attn.keys_values(context) if block.cross else None
            if recompute:  # the recomputation replays the block's dropout masks (the RNG state is restored)
                x = checkpoint(block, x, self_mask, cross_kv, cross_mask, rope=rope, use_reentrant=False)
            else:
                x = block(x, self_mask, cross_kv, cross_mask, rope=rope)
        logits = self.head(self.norm(x[:, self.prefix_length :]))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) (T, head_dim / 2) at sequence `positions` (T,), or None without RoPE."""
        if not self.config.rope:
            return None
        return self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)

    def _with_prefix(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor):
        """Prepend the text (padded/cut to max_text_length) to x; returns (sequence, key_valid (B, S))."""
        length = self.config.max_text_length
        context, context_mask = context[:, :length], context_mask[:, :length]
        pad = length - context.shape[1]
        if pad:
            context = F.pad(context, (0, 0, 0, pad))
            context_mask = F.pad(context_mask, (0, pad), value=False)
        prefix = context + self.text_pos_emb
        key_valid = torch.cat(
            [context_mask, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)], dim=1
        )
        return torch.cat([prefix, x], dim=1), key_valid

    # -- cached decoding (the sampler owns the cache) --------------------------------------------------------------

    def prefill(self, text_states: torch.Tensor, text_mask: torch.Tensor, cache) -> torch.Tensor:
        """Write the conditioning (and BOS) into `cache`; returns logits (B, V) for the first image token."""
        b = text_states.shape[0]
        context, context_mask = self.condition(text_states, text_mask)
        bos = torch.full((b, 1), self.bos_id, dtype=torch.long, device=text_states.device)
        x = self.embed(bos, 0)
        cache.key_valid.zero_()
        if self.config.conditioning == "prefix":
            x, key_valid = self._with_prefix(x, context, context_mask)
            cache.key_valid[:, : x.shape[1]] = key_valid
        else:
            cache.key_valid[:, :1] = True
            # copied into static buffers (fixed addresses for CUDA graphs); padding stays masked out
            length = context.shape[1]
            cache.text_mask.zero_()
            cache.text_mask[:, 0, 0, :length] = context_mask
            for i, block in enumerate(self.blocks):
                k, v = block.cross_attn.keys_values(context)
                cache.cross_k[i][:, :, :length] = k
                cache.cross_v[i][:, :, :length] = v
        return self._cached_step(x, 0, cache)[:, -1]

    def decode_step(
        self, token: torch.Tensor, position: torch.Tensor, cache, attend: int | None = None
    ) -> torch.Tensor:
        """Feed image token (B,) that sits at image position `position` (0-dim long tensor); returns logits (B, V)
        for the next position. Self-attention reads the first `attend` cache positions (None: all of them; they
        must cover `position`'s, which the caller knows without reading the tensor). Shapes depend only on B and
        `attend`, not on the position: CUDA-graph friendly."""
        x = self.embed(token[:, None], position + 1)
        seq_pos = position + 1 + self.prefix_length
        cache.key_valid.index_fill_(1, seq_pos.view(1), True)
        return self._cached_step(x, seq_pos, cache, attend)[:, -1]

    def _cached_step(self, x: torch.Tensor, start, cache, attend: int | None = None) -> torch.Tensor:
        t = x.shape[1]
        length = cache.self_k[0].shape[2] if attend is None else attend
        positions = torch.arange(t, device=x.device) + start  # sequence positions of x
        index = torch.arange(length, device=x.device)
        written = cache.key_valid[:, None, None, :length]
        # (B, 1, T, attend): causal within the cache, and only keys that were written
        self_mask = (index[None, :] <= positions[:, None])[None, None] & written
        rope = self.rope_at(positions)
        for i, block in enumerate(self.blocks):
            cross_kv = (cache.cross_k[i], cache.cross_v[i]) if block.cross else None
            kv = (cache.self_k[i], cache.self_v[i])
            x = block(x, self_mask, cross_kv, cache.text_mask, kv, positions, rope, length)
        return self.head(self.norm(x))
