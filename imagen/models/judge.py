"""The judge: a small CNN that reads a shapes image and says, per grid cell, which object it shows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from imagen.data.shapes import GRID


@dataclass
class JudgeConfig:
    num_colors: int = 6
    num_shapes: int = 3
    num_sizes: int = 2
    channels: int = 32


class JudgeNet(nn.Module):
    """Per-cell classifier: `forward(images (B, 3, H, W) in [-1, 1]) -> logits (B, GRID*GRID, 1 + C + S + Z)`.

    The first logit of a cell says whether it holds an object; the rest are color, shape and size logits.
    """

    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        c = config.channels

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        # full resolution only for the first (cheap, 3-channel) layer; small objects still span >= 5 pixels
        self.features = nn.Sequential(
            block(3, c, 1),
            block(c, 2 * c, 2),
            block(2 * c, 2 * c, 1),
            block(2 * c, 4 * c, 2),
            block(4 * c, 4 * c, 1),
        )
        self.num_outputs = 1 + config.num_colors + config.num_shapes + config.num_sizes
        self.head = nn.Sequential(
            nn.Conv2d(8 * c, 2 * c, 1), nn.ReLU(inplace=True), nn.Conv2d(2 * c, self.num_outputs, 1)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.features(images)
        pooled = torch.cat([F.adaptive_max_pool2d(f, GRID), F.adaptive_avg_pool2d(f, GRID)], dim=1)
        logits = self.head(pooled)  # (B, K, GRID, GRID)
        return logits.flatten(2).transpose(1, 2)  # (B, GRID*GRID, K)

    def split_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(presence (B, N), color (B, N, C), shape (B, N, S), size (B, N, Z))."""
        c = self.config
        presence, color, shape, size = logits.split([1, c.num_colors, c.num_shapes, c.num_sizes], dim=-1)
        return presence.squeeze(-1), color, shape, size

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against per-cell targets (B, GRID*GRID, 3) holding -1 in empty cells."""
        presence, color, shape, size = self.split_logits(self(images))
        occupied = targets[..., 0] >= 0
        loss = F.binary_cross_entropy_with_logits(presence, occupied.float())
        for logits, t in zip((color, shape, size), targets.unbind(-1), strict=True):
            loss = loss + F.cross_entropy(logits[occupied], t[occupied])
        return loss

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Per-cell labels (B, GRID*GRID, 3): color, shape, size indices, -1 where the cell looks empty."""
        presence, color, shape, size = self.split_logits(self(images))
        labels = torch.stack([color.argmax(-1), shape.argmax(-1), size.argmax(-1)], dim=-1)
        return torch.where((presence > 0).unsqueeze(-1), labels, torch.full_like(labels, -1))


def degrade(
    images: torch.Tensor, max_blur: float = 1.0, max_noise: float = 0.06, max_color_shift: float = 0.1
) -> torch.Tensor:
    """Random Gaussian blur (sigma up to `max_blur` px), per-channel color gain/offset (up to `max_color_shift`)
    and pixel noise per image, for training a judge that reads which shape and color an object has rather than
    whether its pixels are exact (generated images never are)."""
    b, ch, h, w = images.shape
    sigma = torch.rand(b, device=images.device) * max_blur + 1e-3
    taps = torch.arange(-2, 3, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(taps[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (B * C, 5)
    x = images.reshape(1, b * ch, h, w)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * ch)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None], groups=b * ch)
    x = x.reshape(b, ch, h, w)
    gain = 1 + (torch.rand(b, ch, 1, 1, device=images.device) * 2 - 1) * max_color_shift
    offset = (torch.rand(b, ch, 1, 1, device=images.device) * 2 - 1) * max_color_shift
    x = (x + 1) * gain - 1 + offset * (x > -0.9)  # shift object colors; keep the background dark
    noise = torch.randn_like(images) * (torch.rand(b, 1, 1, 1, device=images.device) * max_noise)
    return (x + noise).clamp(-1, 1)


class JudgeFeatures(nn.Module):
    """The judge's globally pooled features (B, 4 * channels): a feature extractor for FID on shapes images,
    which needs no download (Inception weights do)."""

    def __init__(self, judge: JudgeNet):
        super().__init__()
        self.judge = judge
        self.num_features = 4 * judge.config.channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.judge.features(images.float()), 1).flatten(1)
