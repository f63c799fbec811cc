"""Numerical faults: a non-finite loss is skipped and counted; N in a row stop the run with a checkpoint."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from imagen.callbacks.fault import NonFiniteError, grads_are_finite
from imagen.checkpoints import read_checkpoint
from imagen.cli.train import train
from imagen.stages.autoencoder import AutoencoderStage
from tests.conftest import TINY_SHAPES

# FSQ: no codebook statistics, so that a skipped step changes no tensor of the network at all
RUN = ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "test=false", "logger=csv",
       "trainer.val_check_interval=100", "callbacks.nonfinite_guard.max_consecutive=3"]  # fmt: skip


@pytest.mark.parametrize(
    ("bad", "finite"), [(None, True), (float("nan"), False), (float("-inf"), False), (3e38, True)]
)
def test_grads_are_finite_flags_nan_and_inf_only(bad, finite):
    params = [torch.nn.Parameter(torch.zeros(4, 4)) for _ in range(3)]
    for p in params:
        p.grad = torch.ones_like(p)
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: passed over
    if bad is not None:
        params[1].grad[2, 3] = bad
        params[0].grad.fill_(3e38)  # large but finite: their 2-norm would overflow to inf
    assert grads_are_finite(torch.optim.SGD(params, lr=1.0)) is finite


@pytest.fixture
def nan_at_steps(monkeypatch):
    """Make the training loss NaN at the given global steps."""
    steps: set[int] = set()
    original = AutoencoderStage.reconstruction_loss

    def faulty(self, images, recon):
        loss = original(self, images, recon)
        return loss * float("nan") if self.training and self.global_step in steps else loss

    monkeypatch.setattr(AutoencoderStage, "reconstruction_loss", faulty)
    return steps


class WeightsAtStep(Callback):
    """Records the network's parameters at the start of the batch that computes `step` and after it."""

    def __init__(self, step: int):
        self.step, self.before, self.after = step, None, None

    def _params(self, module):
        return {k: v.detach().clone() for k, v in module.net.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = self._params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is not None and self.after is None:
            self.after = self._params(pl_module)


def run(make_cfg, tmp_path, monkeypatch, max_steps: int, watch: WeightsAtStep):
    """The real task, with `watch` added to the configured callbacks."""
    import imagen.cli.train as train_module

    configured = train_module.instantiate_callbacks
    monkeypatch.setattr(train_module, "instantiate_callbacks", lambda cfg: [*configured(cfg), watch])
    return train(make_cfg([*RUN, f"trainer.max_steps={max_steps}"], run_dir=tmp_path / "run"))


def test_a_non_finite_loss_is_skipped_and_counted(make_cfg, tmp_path, monkeypatch, nan_at_steps):
    nan_at_steps.update({3, 5})
    watch = WeightsAtStep(3)
    metrics, objects = run(make_cfg, tmp_path, monkeypatch, 8, watch)
    assert objects["trainer"].global_step == 8, "the run goes on"
    assert metrics["train/nonfinite_steps"] == 2
    for name, value in watch.before.items():
        assert torch.equal(value, watch.after[name]), f"{name} changed in a skipped step"
    assert all(torch.isfinite(p).all() for p in objects["model"].parameters())


def test_consecutive_non_finite_steps_stop_the_run(make_cfg, tmp_path, monkeypatch, nan_at_steps):
    nan_at_steps.update(range(4, 100))
    watch = WeightsAtStep(4)
    with pytest.raises(NonFiniteError) as raised:
        run(make_cfg, tmp_path, monkeypatch, 20, watch)
    message = str(raised.value)
    assert "AutoencoderStage stage: 3 consecutive non-finite steps (steps 4-6" in message
    saved = tmp_path / "run" / "checkpoints" / "nonfinite_step_000004.ckpt"
    assert str(saved) in message
    weights = read_checkpoint(saved)["state_dict"]
    for name, value in watch.before.items():
        assert torch.equal(weights[f"net.{name}"], value), (
            "the checkpoint holds the weights from before the fault"
        )


def test_a_diverged_autoencoder_is_named_at_validation(make_cfg, tmp_path):
    # lr 1e9: the first step leaves finite but huge weights (the next step's non-finite gradients are skipped), so the
    # encoder's outputs at validation are not finite (before, a torch.bincount error on the quantizer's ids)
    cfg = make_cfg([*RUN, "trainer.max_steps=2", "trainer.val_check_interval=2", "model.optimizer.lr=1e9"],
                   run_dir=tmp_path / "run")  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"reconstructions are not finite at val \(global step 2\)"):
        train(cfg)


def test_codebook_usage_counts_the_ids():
    from imagen.metrics.codebook import CodebookUsage

    usage = CodebookUsage(4)
    usage.update(torch.tensor([[0, 1], [1, 0]]))
    assert usage.compute()["usage"] == 0.5 and usage.compute()["perplexity"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"token ids from -3 to 1, outside the codebook's \[0, 4\)"):
        usage.update(torch.tensor([-3, 1]))
