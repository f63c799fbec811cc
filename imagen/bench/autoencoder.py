"""Autoencoder throughput: encode and decode images/s, and the reconstruction training step (no GAN loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imagen.bench.common import timed
from imagen.models.autoencoder import Autoencoder
from imagen.stages.optim import build_optimizer


def run(
    size: str, image_size: int, batch: int, train_batch: int, device: torch.device, repeats: int = 3
) -> dict:
    torch.manual_seed(0)
    model = Autoencoder.from_size(size, vq_kmeans_init=False).to(device)
    images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    model.eval()
    with autocast:
        tokens = model.encode(images)
        encode_s = timed(lambda: model.encode(images), repeats, device)
        decode_s = timed(lambda: model.decode(tokens), repeats, device)
    model.train()
    optimizer = build_optimizer(torch.optim.AdamW, model)
    train_images = images[:train_batch]

    def train_step():
        with autocast:
            recon, q = model(train_images)
            loss = F.mse_loss(recon.float(), train_images) + q.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = timed(train_step, repeats, device, warmup=2)
    return {
        "size": size,
        "image_size": image_size,
        "tokens": list(tokens.shape[1:]),
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "encode_images_per_s": batch / encode_s,
        "decode_images_per_s": batch / decode_s,
        "train_batch": train_batch,
        "train_images_per_s": train_batch / step_s,
    }
