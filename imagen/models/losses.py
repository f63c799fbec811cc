"""Losses for the autoencoder: PatchGAN discriminator, hinge GAN losses, and a pluggable perceptual loss."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """PatchGAN: (B, 3, H, W) -> realness logits (B, 1, H', W'), one per overlapping patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride, 1),
                nn.GroupNorm(8, out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


class HFFeaturePerceptualLoss(nn.Module):
    """Perceptual distance between images: how far apart a frozen vision model's hidden states put them, per position
    (a patch token, a feature-map cell) as the squared distance of the unit-length feature vectors.

    `pretrained` is a Hugging Face hub name or a local folder of any `AutoModel` vision backbone that returns
    `hidden_states` (ViT, DINOv2, ConvNeXt, ...). Loading it needs the weights, so this loss is off by default.
    """

    def __init__(
        self, pretrained: str, layers: tuple[int, ...] = (-4, -3, -2, -1), image_size: int | None = None
    ):
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_pretrained(pretrained).eval().requires_grad_(False)
        self.layers = tuple(layers)
        cfg = self.backbone.config
        self.image_size = image_size or getattr(cfg, "image_size", None)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        # the frozen backbone comes from `pretrained` at every start: its weights stay out of the state dict, so out of
        # checkpoints (DINOv2-small would add 88 MB to each), and loading takes them from the module (strict loading
        # still holds)
        self.register_state_dict_post_hook(self._without_backbone)
        self.register_load_state_dict_pre_hook(self._with_backbone)

    @staticmethod
    def _without_backbone(module, state_dict, prefix, local_metadata) -> None:
        for key in [k for k in state_dict if k.startswith(f"{prefix}backbone.")]:
            del state_dict[key]

    def _with_backbone(self, module, state_dict, prefix, *args) -> None:
        for key, value in self.backbone.state_dict(prefix=f"{prefix}backbone.").items():
            state_dict.setdefault(key, value)

    def train(self, mode: bool = True) -> HFFeaturePerceptualLoss:
        super().train(mode)
        self.backbone.eval()  # frozen: never switches to training mode
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x.add(1.0).div(2.0) - self.mean) / self.std
        if self.image_size and x.shape[-1] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        hidden = self.backbone(pixel_values=x, output_hidden_states=True).hidden_states
        if not all(-len(hidden) <= i < len(hidden) for i in self.layers):
            raise ValueError(
                f"model.perceptual.layers={list(self.layers)}: the {self.backbone.config.model_type} backbone returns "
                f"{len(hidden)} hidden states (indices {-len(hidden)} to {len(hidden) - 1})"
            )
        # (B, positions, C): a ViT's tokens as they are, a conv net's (B, C, H, W) maps flattened; each position's
        # feature vector to unit length over its channels
        return [
            F.normalize(hidden[i].flatten(2).transpose(1, 2) if hidden[i].dim() == 4 else hidden[i], dim=-1)
            for i in self.layers
        ]

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed over layers: the squared distance of unit feature vectors (0 to 4), averaged over positions."""
        with torch.no_grad():
            target_features = self._features(target)
        return sum(
            (a - b).square().sum(-1).mean()
            for a, b in zip(self._features(reconstruction), target_features, strict=True)
        )
