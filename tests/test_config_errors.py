"""Config mistakes stop before any work, with a message that names the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import MissingMandatoryValue

from imagen.cli.checks import ConfigError, check_train_config
from imagen.cli.train import train
from tests.conftest import TINY_SHAPES

CASES = [
    (["data.image_size=30"], ConfigError, "data.image_size=30 is not divisible"),
    (["+model.net.channel_mult=[1,2,2]", "data.image_size=36"], ConfigError, "downsampling factor 8"),
    (["model.net.size=huge"], ConfigError, "model.net.size='huge'"),
    (["+model.net.codebook_sise=3"], ConfigError, "model.net.codebook_sise"),
    (["model.net.quantizer=pq"], ConfigError, "model.net.quantizer"),
    (["trainer.gradient_clip_val=1.0"], ConfigError, "model.grad_clip"),
    (["ckpt_path=/no/such.ckpt"], ConfigError, "ckpt_path=/no/such.ckpt: no such file"),
    (["trainer.max_steps=-1"], ConfigError, "trainer.max_steps"),
]


@pytest.mark.parametrize("overrides, error, message", CASES)
def test_invalid_autoencoder_configs(make_cfg, overrides, error, message):
    cfg = make_cfg(["experiment=shapes_autoencoder", *TINY_SHAPES, *overrides])
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(")):
        check_train_config(cfg)


def test_captioned_stages_refuse_heldout_compositions_in_training(make_cfg, tmp_path):
    ckpt = tmp_path / "ae.ckpt"
    ckpt.touch()
    cfg = make_cfg(
        ["experiment=shapes_generator", f"model.autoencoder_ckpt={ckpt}", "data.heldout_in_train=true"]
    )
    with pytest.raises(ConfigError, match="data.heldout_in_train=true would show the held-out compositions"):
        check_train_config(cfg)


def test_unknown_key_is_rejected_at_composition(make_cfg):
    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        make_cfg(["trainer.max_stepz=3"])


def test_generator_needs_an_autoencoder_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(["experiment=shapes_generator", *TINY_SHAPES])
    with pytest.raises(MissingMandatoryValue, match="autoencoder_ckpt"):
        train(cfg)
    cfg = make_cfg(
        ["experiment=shapes_generator", *TINY_SHAPES, f"model.autoencoder_ckpt={tmp_path / 'x.ckpt'}"]
    )
    with pytest.raises(ConfigError, match="model.autoencoder_ckpt=.*no such file"):
        train(cfg)
