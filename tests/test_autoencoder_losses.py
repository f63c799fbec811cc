"""The autoencoder stage's optional losses: the PatchGAN hinge loss from its start step, and the perceptual loss on a
Hugging Face vision backbone (a tiny random one, saved and loaded offline)."""

from __future__ import annotations

from pathlib import Path

import hydra
import pandas as pd
import pytest
import torch

from imagen.cli.train import train
from imagen.models.losses import HFFeaturePerceptualLoss
from tests.conftest import TINY_SHAPES
from tests.test_train import TINY_AUTOENCODER


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_vit")
    ViTModel(config).save_pretrained(path)
    return path


def test_perceptual_loss_compares_features_of_a_frozen_backbone(tiny_vit):
    loss = HFFeaturePerceptualLoss(str(tiny_vit), layers=(-2, -1))
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(target.clone(), target).item() == 0
    reconstruction = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    value = loss(reconstruction, target)
    value.backward()
    assert value.item() > 0 and reconstruction.grad.abs().sum() > 0
    # each position's feature vector is normalized over its channels: the distance is the mean over positions
    features = [f.detach() for f in loss._features(reconstruction)]
    assert all(f.shape == (2, 17, 32) and torch.allclose(f.norm(dim=-1), torch.ones(2, 17)) for f in features)
    expected = sum(
        (a - b).square().sum(-1).mean() for a, b in zip(features, loss._features(target), strict=True)
    )
    assert 0 < value.item() <= 4 * 2 and value.item() == pytest.approx(expected.item())
    assert all(not p.requires_grad and p.grad is None for p in loss.backbone.parameters())
    assert not loss.train().backbone.training  # frozen: stays in eval mode
    # the frozen backbone stays out of the state dict (and checkpoints); loading one still checks every key
    assert loss.state_dict() == {}
    loss.load_state_dict({}, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        loss.load_state_dict({"other.weight": torch.zeros(1)}, strict=True)
    # images of another size are resized to the backbone's
    assert loss(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)).item() > 0
    with pytest.raises(
        ValueError, match=r"layers=\[-6\]: the vit backbone returns 5 hidden states \(indices -5 to 4\)"
    ):
        HFFeaturePerceptualLoss(str(tiny_vit), layers=(-6,))(target, target)


def test_gan_stage_steps_the_discriminator_from_its_start_step(make_cfg, tiny_vit, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(
        ["experiment=shapes_autoencoder", *TINY_SHAPES, *TINY_AUTOENCODER, "model=autoencoder_gan",
         "model.discriminator.channels=8", "model.adversarial_start_step=2", "trainer.max_steps=4",
         "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", "test=false", "logger=csv",
         # as conf/model/autoencoder.yaml says to switch it on
         f"model.perceptual={{_target_: imagen.models.losses.HFFeaturePerceptualLoss, pretrained: {tiny_vit}}}",
         "model.perceptual_weight=0.1"],
        run_dir=run,
    )  # fmt: skip
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.global_step == 4  # max_steps counts batches, not the two optimizers' steps
    generator_opt, discriminator_opt = trainer.optimizers
    steps = {opt: {int(s["step"]) for s in opt.state.values()} for opt in (generator_opt, discriminator_opt)}
    assert steps[generator_opt] == {4} and steps[discriminator_opt] == {2}  # steps 2 and 3 only
    logged = pd.read_csv(run / "csv" / "metrics.csv")
    adversarial = logged.dropna(subset=["train/d_loss"])
    assert sorted(adversarial["step"]) == [2, 3] and adversarial["train/g_loss"].notna().all()
    assert objects["model"].perceptual is not None
    # its checkpoints hold no perceptual weights, and load strictly into a new stage of the same config
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and not any(key.startswith("perceptual.") for key in state)
    hydra.utils.instantiate(cfg.model, _convert_="all").load_state_dict(state, strict=True)
