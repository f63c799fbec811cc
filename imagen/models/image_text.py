"""Image -> text networks of the joint stage: an image-token encoder shared by a caption decoder and a matcher.

- `encode_image(tokens (B, N)) -> features (B, N, dim)`: the autoencoder's token ids, embedded with 2D positions
  and mixed by bidirectional Transformer blocks;
- caption decoder: causal blocks over caption token ids that cross-attend to the image features
  (`caption_loss`, `caption_logits`, `caption_logprob`; `caption_step` for cached decoding, which lives in
  `imagen.sampling.caption`);
- matcher: pooled image features, and the text encoder's states mixed by the matcher's own blocks and pooled, projected
  to one normalized space (`image_embedding`, `text_embedding`), trained with a symmetric contrastive loss
  (`contrastive_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from imagen.models.ar_transformer import ARConfig, ARTransformer, Block, CodeVectorInput, grid_positions
from imagen.models.autoencoder import ResBlock
from imagen.models.sizes import config_from_size
from imagen.models.text_encoder import PAD_ID, CaptionTokenizer, EncoderBlock, TokenizerInStateDict


@dataclass
class ImageTextConfig:
    vocab_size: int = 1000  # image codebook size (the autoencoder's)
    grid_size: tuple[int, int] = (8, 8)  # (h, w) of the token grid
    caption_vocab_size: int = 512  # caption tokenizer's embedding rows
    max_caption_length: int = 32  # caption tokens incl. [BOS]/[EOS]
    text_dim: int = 128  # width of the text encoder's states (matching)
    dim: int = 192
    # residual 3x3 conv blocks over the (h, w) grid of token embeddings, before the Transformer encoder: each
    # feature sees its neighbours' codes from the first step (shapes span several tokens)
    conv_layers: int = 0
    encoder_layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    embed_dim: int = 128  # the shared matching space
    # the matcher's own bidirectional Transformer blocks over the text encoder's states, before they are pooled: the
    # joint stage's matching loss reads those states without training the shared encoder, and a linear map of their
    # mean cannot tell "a red circle left of a blue square" from the same words bound the other way
    text_layers: int = 0
    # Width of the autoencoder's code vectors (its decoder's input for each token id), added to the learned token
    # embeddings through a projection: what a code looks like, known from the first step. 0: off (checkpoints
    # written before it existed); the joint stage sets it from its autoencoder (`model.image_code_vectors`).
    code_dim: int = 0
    # fields that act only while training: a checkpoint loads whatever this run sets (`check_config`)
    training_only: ClassVar[tuple[str, ...]] = ("dropout",)

    def __post_init__(self) -> None:
        self.grid_size = tuple(self.grid_size)
        if self.dim % self.heads:
            raise ValueError(f"model.image_text.dim={self.dim} must be divisible by heads={self.heads}")
        if self.text_layers and self.text_dim % self.heads:
            raise ValueError(
                f"model.image_text.text_layers={self.text_layers} needs the text width {self.text_dim} divisible by "
                f"heads={self.heads}"
            )


IMAGE_TEXT_SIZES: dict[str, ImageTextConfig] = {
    "tiny": ImageTextConfig(
        dim=32, conv_layers=1, encoder_layers=1, decoder_layers=1, heads=2, embed_dim=32, text_layers=1
    ),
    "shapes": ImageTextConfig(
        dim=192, conv_layers=2, encoder_layers=2, decoder_layers=2, heads=4, embed_dim=128, text_layers=1
    ),
    "B": ImageTextConfig(
        dim=512, conv_layers=2, encoder_layers=6, decoder_layers=6, heads=8, embed_dim=512, text_layers=1
    ),
}


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    negative_text: torch.Tensor | None = None,
    also_true: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) over normalized embeddings (B, E): row i of each is the other's positive.
    `negative_text` (M, E): further captions each image is contrasted with (hard negatives, as in NegCLIP).
    `also_true` (B, B) bool, [image i, caption j]: other pairs of the batch that match (a repeated scene, a caption
    true of another image too); they are left out of the negatives, not pushed apart."""
    logits = logit_scale * image @ text.t()  # (B, B): [image i, caption j]
    if also_true is not None:
        also_true = also_true.to(logits.device) & ~torch.eye(
            len(logits), dtype=torch.bool, device=logits.device
        )
        logits = logits.masked_fill(also_true, float("-inf"))
    labels = torch.arange(image.shape[0], device=image.device)
    image_to_text = logits
    if negative_text is not None:
        image_to_text = torch.cat([logits, logit_scale * image @ negative_text.t()], dim=1)  # (B, B + M)
    return 0.5 * (F.cross_entropy(image_to_text, labels) + F.cross_entropy(logits.t(), labels))


MAX_LOGIT_SCALE = math.log(100.0)


class ImageTextNet(CodeVectorInput, nn.Module):
    """Captioner and matcher over image tokens; plain module (the stage owns tokenizers and losses' weights)."""

    def __init__(self, config: ImageTextConfig):
        super().__init__()
        self.config = c = config
        h, w = c.grid_size
        self.image_emb = nn.Embedding(c.vocab_size, c.dim)
        if c.code_dim:
            self.register_buffer("code_vectors", torch.zeros(c.vocab_size, c.code_dim))  # set_code_vectors
            self.code_proj = nn.Linear(c.code_dim, c.dim)
        self.conv = nn.Sequential(*(ResBlock(c.dim) for _ in range(c.conv_layers)))
        self.row_emb = nn.Parameter(torch.randn(h, c.dim) * 0.02)
        self.col_emb = nn.Parameter(torch.randn(w, c.dim) * 0.02)
        self.encoder = nn.ModuleList(EncoderBlock(c.dim, c.heads, c.dropout) for _ in range(c.encoder_layers))
        self.encoder_norm = nn.LayerNorm(c.dim)
        # the caption decoder reuses the generator's block (causal self-attention + cross-attention)
        block = ARConfig(
            dim=c.dim, heads=c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout, conditioning="cross"
        )
        self.caption_emb = nn.Embedding(c.caption_vocab_size, c.dim)
        self.caption_pos = nn.Parameter(torch.randn(c.max_caption_length, c.dim) * 0.02)
        self.decoder = nn.ModuleList(Block(block) for _ in range(c.decoder_layers))
        self.decoder_norm = nn.LayerNorm(c.dim)
        self.caption_head = nn.Linear(c.dim, c.caption_vocab_size, bias=False)
        self.image_proj = nn.Linear(c.dim, c.embed_dim)
        self.text_blocks = nn.ModuleList(
            EncoderBlock(c.text_dim, c.heads, c.dropout) for _ in range(c.text_layers)
        )
        self.text_proj = nn.Linear(c.text_dim, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's initial temperature
        # GPT-2's initialisation, as the generator's: embeddings at the scale of the positions added to them
        self.apply(ARTransformer._init_weights)

    @classmethod
    def from_size(cls, size: str = "shapes", **overrides) -> ImageTextNet:
        """Build from a named size in `IMAGE_TEXT_SIZES`, with any config field overridden."""
        return cls(config_from_size(IMAGE_TEXT_SIZES, size, overrides, "model.image_text"))

    # -- image side -----------------------------------------------------------------------------------------------

    def encode_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image token ids (B, N) in raster order -> features (B, N, dim)."""
        positions = grid_positions(self.row_emb, self.col_emb)  # (N, dim)
        x = self.image_emb(tokens)
        if self.config.code_dim:
            x = x + self.code_proj(self.code_vectors[tokens])
        if self.config.conv_layers:
            grid = x.transpose(1, 2).unflatten(2, self.config.grid_size)  # (B, dim, h, w)
            x = self.conv(grid).flatten(2).transpose(1, 2)  # (B, N, dim)
        x = x + positions
        everywhere = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        for block in self.encoder:
            x = block(x, everywhere)
        return self.encoder_norm(x)

    def image_embedding(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, N, dim) -> unit-norm embeddings (B, embed_dim)."""
        return F.normalize(self.image_proj(features.mean(1)), dim=-1)

    def text_embedding(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Text-encoder states (B, L, text_dim) and mask (B, L) -> unit-norm embeddings (B, embed_dim)."""
        for block in self.text_blocks:
            states = block(states, mask)
        weights = mask.to(states.dtype)[..., None]
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def match_cosine(self, image: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) cosine of image embeddings (B, embed_dim) with the text embeddings of states (B, L, text_dim)."""
        return (self.text_embedding(states, mask) * image).sum(-1)

    def matching_loss(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        negative_text: torch.Tensor | None = None,
        also_true: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return contrastive_loss(image, text, self.matching_scale(), negative_text, also_true)

    def matching_scale(self) -> torch.Tensor:
        """The learned inverse temperature of embedding cosines (CLIP's), at most 100. A weight above the cap (an
        older checkpoint's; within a step of training) is read as the cap, with the gradient passed straight through,
        and the weight itself is capped after each optimizer step (`clamp_logit_scale_`)."""
        excess = (self.logit_scale - MAX_LOGIT_SCALE).clamp(min=0).detach()
        return (self.logit_scale - excess).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Cap the inverse temperature at 100 in the weight itself, after each optimizer step, as CLIP does: a cap
        in the forward pass would pass no gradient above it, and the weight could never come back down."""
        self.logit_scale.clamp_(max=MAX_LOGIT_SCALE)

    # -- caption decoder ------------------------------------------------------------------------------------------

    def caption_logits(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for the token after each of `ids` (B, T) ([BOS] first)."""
        t = ids.shape[1]
        if t > self.config.max_caption_length:
            raise ValueError(
                f"caption of {t} tokens exceeds max_caption_length={self.config.max_caption_length}"
            )
        x = self.caption_emb(ids) + self.caption_pos[:t]
        whole_image = self._whole_image(features)
        for block in self.decoder:  # self-attention mask None: causal
            x = block(x, None, block.cross_attn.keys_values(features), whole_image)
        return self.caption_head(self.decoder_norm(x))

    @staticmethod
    def _whole_image(features: torch.Tensor) -> torch.Tensor:
        """Cross-attention mask (1, 1, 1, N): every caption token sees every image cell."""
        return torch.ones(1, 1, 1, features.shape[-2], dtype=torch.bool, device=features.device)

    def caption_cross_kv(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values (B, H, N, hd) of image features (B, N, dim): computed
        once per image for decoding, not at every step."""
        return [block.cross_attn.keys_values(features) for block in self.decoder]

    def caption_step(
        self,
        ids: torch.Tensor,
        start: int,
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
        self_kv: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Cached decoding: logits (B, t, V) after caption ids (B, t) at positions start .. start + t - 1. Their
        self-attention keys and values are written into each layer's buffers `self_kv` (B, H, S, hd), which already
        hold positions 0 .. start - 1; `cross_kv` from `caption_cross_kv`."""
        t = ids.shape[1]
        if start + t > self.config.max_caption_length:
            raise ValueError(
                f"caption of {start + t} tokens exceeds max_caption_length={self.config.max_caption_length}"
            )
        positions = torch.arange(start, start + t, device=ids.device)
        x = self.caption_emb(ids) + self.caption_pos[positions]
        slots = torch.arange(self_kv[0][0].shape[2], device=ids.device)
        # (1, 1, t, S): each token sees the written slots up to its own
        causal = (slots[None, :] <= positions[:, None])[None, None]
        whole_image = self._whole_image(cross_kv[0][0])
        for block, cross, cache in zip(self.decoder, cross_kv, self_kv, strict=True):
            x = block(x, causal, cross, whole_image, cache, positions)
        return self.caption_head(self.decoder_norm(x))

    def caption_loss(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of caption ids (B, T) ([BOS] ... [EOS] [PAD]...), padding ignored."""
        logits = self.caption_logits(features, ids[:, :-1])
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD_ID
        )

    def caption_logprob(
        self, features: torch.Tensor, ids: torch.Tensor, per_token: bool = True
    ) -> torch.Tensor:
        """(B,) log-probability of caption ids (B, T) given the image features: its mean per token (captions of
        different lengths compared), or the caption's whole log-likelihood (`per_token=False`)."""
        logp = self.caption_logits(features, ids[:, :-1]).float().log_softmax(-1)
        targets = ids[:, 1:]
        valid = targets != PAD_ID
        picked = (logp.gather(-1, targets[..., None]).squeeze(-1) * valid).sum(1)
        return picked / valid.sum(1).clamp(min=1) if per_token else picked


class CaptionVocabulary(TokenizerInStateDict, nn.Module):
    """A caption tokenizer that travels inside the state dict, for text encoders without one (pretrained)."""

    def __init__(self):
        super().__init__()
        self.tokenizer = CaptionTokenizer()
