"""Image autoencoder with a discrete bottleneck: conv (or patch-local) encoder -> quantizer -> conv decoder.

`encode(images) -> tokens (B, h, w)` and `decode(tokens) -> images` are the interface later stages use; the
decoder is the design's "pixel generator". Quantizers come from `vector-quantize-pytorch`: VQ (EMA codebook,
optional cosine codes, dead-code replacement), FSQ and LFQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

from imagen.inference import eval_mode
from imagen.models.sizes import config_from_size
from imagen.values import is_int


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    channels: int = 64
    # one stride-2 level each: downsampling factor 2 ** len(channel_mult)
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    norm: str = "none"  # none | group: GroupNorm in residual blocks (slows learning on mostly-flat images)
    # conv: a conv stack whose tokens see (nearly) the whole image; patch: each token is a function of its own f x f
    # pixels and those of `patch_context` neighbouring patches on every side (a flat background far from objects
    # is one token, wherever it is)
    encoder: str = "conv"
    patch_context: int = 0
    latent_dim: int = 64  # encoder output / decoder input width
    quantizer: str = "vq"  # vq | fsq | lfq
    codebook_size: int = 256  # vq and lfq (a power of two for lfq); fsq's is the product of fsq_levels
    # vq
    codebook_dim: int = 16  # codes live in this (projected) space
    vq_decay: float = 0.9  # EMA decay of the codebook
    vq_cosine: bool = True  # l2-normalized codes, cosine-similarity lookup
    vq_kmeans_init: bool = True
    vq_dead_code_threshold: float = 2.0  # codes used less than this (EMA count) are replaced by batch vectors
    commitment_weight: float = 0.25
    # fsq
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    # lfq
    lfq_entropy_weight: float = 0.1
    # fields that act only while training: a checkpoint loads whatever this run sets (`check_config`)
    training_only: ClassVar[tuple[str, ...]] = (
        "vq_decay", "vq_kmeans_init", "vq_dead_code_threshold", "commitment_weight", "lfq_entropy_weight",
    )  # fmt: skip

    def __post_init__(self) -> None:
        for key in ("channel_mult", "fsq_levels"):
            value = getattr(self, key)
            if not isinstance(value, list | tuple) or not all(is_int(v) and v >= 1 for v in value):
                raise ValueError(
                    f"model.net.{key} must be a list of integers >= 1, e.g. [1, 2]; got {value!r}"
                )
            setattr(self, key, tuple(value))
        if self.codebook_size < 2:
            raise ValueError(f"model.net.codebook_size must be >= 2; got {self.codebook_size}")
        if self.norm not in ("none", "group"):
            raise ValueError(f"model.net.norm must be none or group; got {self.norm!r}")
        if self.encoder not in ("conv", "patch"):
            raise ValueError(f"model.net.encoder must be conv or patch; got {self.encoder!r}")
        if self.patch_context < 0:
            raise ValueError(f"model.net.patch_context must be >= 0; got {self.patch_context}")
        if self.quantizer not in ("vq", "fsq", "lfq"):
            raise ValueError(f"model.net.quantizer must be one of vq, fsq, lfq; got {self.quantizer!r}")
        if self.quantizer == "lfq" and self.codebook_size & (self.codebook_size - 1):
            raise ValueError(
                f"model.net.codebook_size must be a power of two for lfq; got {self.codebook_size}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.channel_mult)

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids `encode` can return."""
        if self.quantizer == "fsq":
            n = 1
            for level in self.fsq_levels:
                n *= level
            return n
        return self.codebook_size


# Named sizes; `Autoencoder.from_size(name, **overrides)` starts from one of these.
AUTOENCODER_SIZES: dict[str, AutoencoderConfig] = {
    "tiny": AutoencoderConfig(
        channels=16, channel_mult=(1, 2), latent_dim=32, codebook_size=64, codebook_dim=8
    ),
    # 32 px shapes -> 8x8 tokens over 1000 FSQ codes; trains to > 26 dB PSNR in a few CPU minutes
    "shapes": AutoencoderConfig(channels=32, channel_mult=(1, 2), quantizer="fsq", fsq_levels=(8, 5, 5, 5)),
    "f8": AutoencoderConfig(channels=128, channel_mult=(1, 2, 2), num_res_blocks=2, codebook_size=4096),
    "f16": AutoencoderConfig(
        channels=128,
        channel_mult=(1, 1, 2, 2),
        num_res_blocks=2,
        latent_dim=256,
        codebook_size=16384,
        codebook_dim=8,
        fsq_levels=(8, 8, 8, 6, 5),  # 15360 codes, as many as VQ's 16384 within FSQ's level choices
    ),
}


def make_norm(kind: str, channels: int) -> nn.Module:
    return nn.GroupNorm(8, channels) if kind == "group" else nn.Identity()


class ResBlock(nn.Module):
    def __init__(self, channels: int, norm: str = "none"):
        super().__init__()
        self.block = nn.Sequential(
            make_norm(norm, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            make_norm(norm, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, latent_dim, H / f, W / f)."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        widths = [c.channels * m for m in c.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, widths[0], 4, 2, 1)]
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.Conv2d(widths[i - 1], width, 4, 2, 1))
            layers += [ResBlock(width, c.norm) for _ in range(c.num_res_blocks)]
        layers += [ResBlock(widths[-1], c.norm) for _ in range(c.num_res_blocks)]
        layers += [make_norm(c.norm, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], c.latent_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchEncoder(nn.Module):
    """(B, 3, H, W) -> (B, latent_dim, H / f, W / f), each output cell computed from its own f x f patch (and, with
    `patch_context` k, the patches up to k cells away) alone: the patch's pixels as one vector (space-to-depth),
    a (2k + 1)^2 convolution over neighbouring patches, then a residual MLP (1x1 convolutions). A conv encoder's
    receptive field spans the whole image, so its background tokens vary with far-away objects and the image
    border: on the shapes data 276 distinct codes for flat black patches, against 1 here for those more than k cells
    from an object; an AR model over the tokens must learn to predict them."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.factor = c.downsample_factor
        width = c.channels * c.channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels * self.factor**2, width, 1)]
        if c.patch_context:
            k = 2 * c.patch_context + 1  # replicate padding: a patch at the border sees itself, not zeros
            layers += [
                nn.SiLU(),
                nn.Conv2d(width, width, k, padding=c.patch_context, padding_mode="replicate"),
            ]
        for _ in range(2 * c.num_res_blocks):
            layers.append(PointwiseResBlock(width))
        layers += [nn.SiLU(), nn.Conv2d(width, c.latent_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.pixel_unshuffle(x, self.factor))  # (B, 3 f^2, H / f, W / f) -> latents


class PointwiseResBlock(nn.Module):
    def __init__(self, channels: int, mult: int = 2):
        super().__init__()
        self.block = nn.Sequential(
            nn.SiLU(),
            nn.Conv2d(channels, mult * channels, 1),
            nn.SiLU(),
            nn.Conv2d(mult * channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Decoder(nn.Module):
    """(B, latent_dim, h, w) -> (B, 3, h * f, w * f); the pixel generator."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        widths = [c.channels * m for m in c.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(c.latent_dim, widths[-1], 3, padding=1)]
        layers += [ResBlock(widths[-1], c.norm) for _ in range(c.num_res_blocks)]
        for i in reversed(range(len(widths))):
            layers += [ResBlock(widths[i], c.norm) for _ in range(c.num_res_blocks)]
            if i > 0:
                layers.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 4, 2, 1))
        layers += [
            make_norm(c.norm, widths[0]),
            nn.SiLU(),
            nn.ConvTranspose2d(widths[0], c.in_channels, 4, 2, 1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, h, w), straight-through
    indices: torch.Tensor  # (B, h, w) long
    aux_loss: torch.Tensor  # scalar: commitment (vq) or entropy (lfq) loss; zero for fsq


class Quantizer(nn.Module):
    """One interface over vector-quantize-pytorch's VQ, FSQ and LFQ for channel-first feature maps."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.kind = c.quantizer
        if c.quantizer == "vq":
            self.impl = VectorQuantize(
                dim=c.latent_dim,
                codebook_size=c.codebook_size,
                codebook_dim=c.codebook_dim,
                decay=c.vq_decay,
                use_cosine_sim=c.vq_cosine,
                kmeans_init=c.vq_kmeans_init,
                threshold_ema_dead_code=c.vq_dead_code_threshold,
                commitment_weight=c.commitment_weight,
                accept_image_fmap=True,
            )
        elif c.quantizer == "fsq":
            self.impl = FSQ(levels=list(c.fsq_levels), dim=c.latent_dim, channel_first=True)
        else:
            self.impl = LFQ(
                dim=c.latent_dim,
                codebook_size=c.codebook_size,
                entropy_loss_weight=c.lfq_entropy_weight,
                commitment_loss_weight=c.commitment_weight,
                channel_first=True,
            )

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if self.kind == "vq":
            quantized, indices, aux = self.impl(z)
        elif self.kind == "fsq":
            quantized, indices = self.impl(z)
            aux = z.new_zeros(())
        else:
            quantized, indices, aux = self.impl(z)
        return QuantizerOutput(quantized, indices.long(), aux.sum())

    def synchronise_codebook(self) -> None:
        """VQ under DDP: sum the codebook's statistics (cluster sizes and sums, k-means init) over the processes and
        draw dead-code replacements from all of their batches, so every process keeps the same codebook.
        vector-quantize-pytorch turns this on (`sync_codebook`) only when the process group exists as the quantizer
        is built, which is before Lightning starts it: call this once it does."""
        if self.kind != "vq" or not torch.distributed.is_initialized():
            return
        from importlib.metadata import version

        from vector_quantize_pytorch.vector_quantize_pytorch import sample_vectors_distributed

        codebook = self.impl._codebook  # the attributes its constructor sets from `use_ddp`
        settings = ("use_ddp", "all_reduce_fn", "kmeans_all_reduce_fn", "sample_fn", "replace_sample_fn")
        if not all(hasattr(codebook, name) for name in settings):
            raise RuntimeError(
                f"vector-quantize-pytorch {version('vector-quantize-pytorch')}: its codebook lacks one of {settings}, "
                "which imagen sets to synchronise VQ codebooks under DDP; use the version in pyproject.toml"
            )
        codebook.use_ddp = True
        codebook.all_reduce_fn = codebook.kmeans_all_reduce_fn = torch.distributed.all_reduce
        codebook.sample_fn = codebook.replace_sample_fn = sample_vectors_distributed

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) token ids -> (B, D, h, w) decoder input; the exact inverse of the index lookup."""
        if self.kind == "vq":
            codes = self.impl.get_codes_from_indices(indices)  # (B, codebook_dim, h, w)
            return self.impl.project_out(codes.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.impl.indices_to_codes(indices)  # fsq/lfq: (B, D, h, w), projected out


class Autoencoder(nn.Module):
    """Conv encoder -> quantizer -> conv decoder over images in [-1, 1]."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = PatchEncoder(config) if config.encoder == "patch" else Encoder(config)
        self.quantizer = Quantizer(config)
        self.decoder = Decoder(config)

    @classmethod
    def from_size(cls, size: str = "shapes", **overrides) -> Autoencoder:
        """Build from a named size in `AUTOENCODER_SIZES`, with any config field overridden."""
        return cls(config_from_size(AUTOENCODER_SIZES, size, overrides))

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """images (B, 3, H, W) -> (reconstruction (B, 3, H, W), quantizer output)."""
        q = self.quantizer(self.encoder(images))
        return self.decoder(q.quantized), q

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> token ids (B, H / f, W / f) long. Inference whatever the module's mode:
        a VQ codebook's averages are not updated by it (a fresh k-means codebook is still initialized by its first
        batch)."""
        f, channels = self.downsample_factor, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != channels or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"images of shape {tuple(images.shape)}: encode reads (B, {channels}, H, W), H and W multiples of {f}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images are floats in [-1, 1], not {images.dtype}: e.g. uint8 / 127.5 - 1")
        # vector-quantize-pytorch updates a VQ codebook's averages in training mode
        with eval_mode(self.quantizer):
            return self.quantizer(self.encoder(images)).indices

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """(vocab_size, D): the decoder's input vector for every token id."""
        ids = torch.arange(self.vocab_size, device=next(self.parameters()).device)
        return self.quantizer.codes_from_indices(ids.view(1, -1, 1))[0, :, :, 0].t()  # (1, D, V, 1) -> (V, D)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids (B, h, w) in [0, vocab_size) -> images (B, C, h * f, w * f), clamped to [-1, 1]."""
        if tokens.ndim != 3 or tokens.is_floating_point():
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)}, {tokens.dtype}: decode reads ids (B, h, w)"
            )
        if ((tokens < 0) | (tokens >= self.vocab_size)).any():  # one host sync
            raise ValueError(
                f"token ids from {int(tokens.min())} to {int(tokens.max())}: this autoencoder has ids 0 to "
                f"{self.vocab_size - 1}"
            )
        return self.decoder(self.quantizer.codes_from_indices(tokens)).clamp(-1.0, 1.0)
