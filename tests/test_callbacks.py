"""The EMA callback: which weights validation, checkpoints and the end of training see, and its frozen modules
(under bf16 too); and the precision a run picks on its machine (`imagen.precision`)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from imagen.callbacks import EMAWeights
from imagen.callbacks.checkpoint import LastAndBestCheckpoint
from imagen.checkpoints import read_checkpoint
from tests.conftest import TINY_SHAPES
from tests.test_train import TINY_GENERATOR, tiny_autoencoder_ckpt  # noqa: F401  (session fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

BIG = 2**40 + 1  # an integer that float32 arithmetic would round


class TwoLayers(pl.LightningModule):
    """A frozen layer (with an integer buffer) and a trained one; records the trained layer's weights at the start
    and the end of each step and those each validation hook sees."""

    def __init__(self):
        super().__init__()
        self.frozen, self.trained = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
        self.frozen.requires_grad_(False)
        self.frozen.register_buffer("count", torch.tensor(BIG))
        self.start: list[torch.Tensor] = []
        self.raw: list[torch.Tensor] = []
        self.seen: dict[str, torch.Tensor] = {}

    def weight(self) -> torch.Tensor:
        return self.trained.weight.detach().clone()

    def training_step(self, batch, batch_idx):
        return self.trained(self.frozen(batch[0])).square().mean()

    def on_train_batch_start(self, batch, batch_idx):
        self.start.append(self.weight())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.raw.append(self.weight())

    def validation_step(self, batch, batch_idx):
        self.seen["validation_step"] = self.weight()

    def on_validation_epoch_end(self):  # where the joint stage scores retrieval
        self.seen["on_validation_epoch_end"] = self.weight()

    def configure_optimizers(self):
        return torch.optim.SGD(self.trained.parameters(), lr=0.1)


def fit(
    module: TwoLayers, tmp_path, ckpt_path=None, ema_args: dict | None = None, **trainer_args
) -> EMAWeights:
    """Train with EMA (decay 0.5) and the run's checkpoint callback (a checkpoint at each validation and the end),
    validating by steps as conf/trainer does."""
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4)
    ema = EMAWeights(**{"decay": 0.5, **(ema_args or {})})
    checkpoints = LastAndBestCheckpoint(dirpath=tmp_path, filename="step_{step:06d}", save_last=True, save_top_k=-1,
                                        auto_insert_metric_name=False)  # fmt: skip
    trainer = pl.Trainer(callbacks=[ema, checkpoints], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
                         **{"check_val_every_n_epoch": None, "val_check_interval": 100, "limit_val_batches": 1,
                            **trainer_args})  # fmt: skip
    trainer.fit(module, data, data, ckpt_path=ckpt_path)
    return ema


def expected_average(raw: list[torch.Tensor]) -> torch.Tensor:
    """decay 0.5: the first update copies, each later one moves half way."""
    average = raw[0]
    for weight in raw[1:]:
        average = torch.lerp(average, weight, 0.5)
    return average


def test_a_checkpoint_at_the_end_of_training_keeps_the_raw_weights(tmp_path):
    # no validation at the last step (the quickstart's joint stage): last.ckpt is written after EMA's on_train_end
    module = TwoLayers()
    fit(module, tmp_path, max_steps=6, limit_val_batches=0)
    saved = read_checkpoint(tmp_path / "last.ckpt")
    assert saved["global_step"] == 6
    assert torch.equal(saved["current_model_state"]["trained.weight"], module.raw[-1])
    assert torch.equal(saved["state_dict"]["trained.weight"], expected_average(module.raw))
    assert not torch.equal(module.raw[-1], expected_average(module.raw))
    # the test after fit runs on the average
    assert torch.equal(module.trained.weight, expected_average(module.raw))


def test_validation_epoch_end_sees_the_average_and_checkpoints_keep_both(tmp_path):
    module = TwoLayers()
    fit(module, tmp_path, max_steps=4, val_check_interval=3)
    average = expected_average(module.raw[:3])
    assert torch.equal(module.seen["validation_step"], average)
    assert torch.equal(module.seen["on_validation_epoch_end"], average)
    saved = read_checkpoint(tmp_path / "step_000003.ckpt")  # written at the end of that validation
    assert torch.equal(saved["state_dict"]["trained.weight"], average)
    assert torch.equal(saved["current_model_state"]["trained.weight"], module.raw[2])
    # training went on from the raw weights
    assert torch.equal(module.start[3], module.raw[2]) and not torch.equal(module.raw[2], average)


def test_frozen_modules_are_shared_with_the_average_not_copied(tmp_path):
    module = TwoLayers()
    frozen = {k: v.clone() for k, v in module.frozen.state_dict().items()}
    ema = fit(module, tmp_path, max_steps=6, val_check_interval=3)
    averaged = ema._average_model.module
    assert averaged.frozen is module.frozen and averaged.trained is not module.trained
    assert averaged.frozen.weight.data_ptr() == module.frozen.weight.data_ptr()
    # averaging and the swaps for validation and at the end leave the frozen layer as it was, its integer too
    assert torch.equal(module.trained.weight, expected_average(module.raw))
    for name, value in module.frozen.state_dict().items():
        assert torch.equal(value, frozen[name]), name
    assert module.frozen.count.item() == BIG
    saved = read_checkpoint(tmp_path / "last.ckpt")
    keys = set(module.state_dict())
    assert set(saved["state_dict"]) == set(saved["current_model_state"]) == keys
    assert torch.equal(saved["state_dict"]["frozen.weight"], frozen["weight"])
    # a resume loads both the average and the raw weights into the shared layout
    resumed = TwoLayers()
    ema = fit(
        resumed, tmp_path / "resumed", ckpt_path=tmp_path / "last.ckpt", max_steps=7, limit_val_batches=0
    )
    assert torch.equal(resumed.start[0], module.raw[-1])  # training goes on from the raw weights
    average = torch.lerp(expected_average(module.raw), resumed.raw[-1], 0.5)
    assert torch.equal(resumed.trained.weight, average)
    assert torch.equal(ema._average_model.module.trained.weight, average)  # copied in, not swapped with it
    assert resumed.frozen.count.item() == BIG and ema._average_model.module.frozen is resumed.frozen


def test_integer_buffers_of_trained_modules_are_copied_not_averaged(tmp_path):
    module = TwoLayers()  # FSQ's levels sit beside trained weights: an average would round 6 down to 5
    module.trained.register_buffer("levels", torch.tensor([8, 6, 5], dtype=torch.int32))
    module.trained.register_buffer("steps", torch.tensor(0))
    module.on_train_batch_end = lambda *args: module.trained.steps.add_(1)  # a count the module keeps
    ema = fit(module, tmp_path, ema_args={"decay": 0.9995}, max_steps=6, val_check_interval=3)
    average, raw = module.trained, read_checkpoint(tmp_path / "last.ckpt")["current_model_state"]
    assert average.levels.tolist() == raw["trained.levels"].tolist() == [8, 6, 5]
    assert ema._average_model.module.trained.levels.tolist() == [8, 6, 5]
    # the average took the count at its last update, before the module's hook counted the 6th step
    assert (average.steps.item(), raw["trained.steps"].item()) == (5, 6)


def test_a_finished_run_run_again_is_tested_on_the_average(tmp_path):
    # `ckpt_path=auto` on a run that has finished (killed in its test, a sweep re-run): the fit trains nothing
    module = TwoLayers()
    fit(module, tmp_path, max_steps=6, limit_val_batches=0)
    again = TwoLayers()
    fit(again, tmp_path / "again", ckpt_path=tmp_path / "last.ckpt", max_steps=6, limit_val_batches=0)
    assert again.raw == [] and torch.equal(again.trained.weight, expected_average(module.raw))


def test_before_the_first_update_the_raw_weights_are_validated_tested_and_saved(tmp_path):
    module = TwoLayers()  # `update_starting_at_step` past the run: the average stays the initial copy
    fit(module, tmp_path, ema_args={"update_starting_at_step": 100}, max_steps=4, val_check_interval=3)
    assert torch.equal(module.seen["validation_step"], module.raw[2])
    assert torch.equal(module.trained.weight, module.raw[-1])
    assert torch.equal(
        read_checkpoint(tmp_path / "last.ckpt")["state_dict"]["trained.weight"], module.raw[-1]
    )


def test_a_validation_after_fit_sees_the_average(tmp_path):
    module = TwoLayers()
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4)
    trainer = pl.Trainer(callbacks=[EMAWeights(decay=0.5)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", max_steps=6,
                         num_sanity_val_steps=0, check_val_every_n_epoch=None, val_check_interval=100,
                         limit_val_batches=1)  # fmt: skip
    trainer.fit(module, data, data)
    trainer.validate(module, data, verbose=False)
    assert torch.equal(module.seen["validation_step"], expected_average(module.raw))
    assert torch.equal(module.weight(), expected_average(module.raw))  # and it stays in the module


def test_under_bf16_true_the_average_stays_float32_and_validation_does_not_round_it(tmp_path):
    # the module is cast to bf16 after the average is copied from it; a swap with the module for validation
    # would round the average to bf16
    module = TwoLayers()
    ema = fit(module, tmp_path, max_steps=5, val_check_interval=3, precision="bf16-true")
    assert module.raw[0].dtype == torch.bfloat16
    raw = [weight.float() for weight in module.raw]
    at_validation = expected_average(raw[:3])
    assert not torch.equal(at_validation, at_validation.bfloat16().float())  # bf16 would round it
    assert torch.equal(module.seen["validation_step"], at_validation.bfloat16())
    saved = read_checkpoint(tmp_path / "step_000003.ckpt")  # written after the validation
    assert torch.equal(saved["state_dict"]["trained.weight"], at_validation)
    assert torch.equal(saved["current_model_state"]["trained.weight"], module.raw[2])
    average = ema._average_model.module.trained.weight
    assert average.dtype == torch.float32 and torch.equal(average, expected_average(raw))
    # training ends with the average in the module; last.ckpt keeps it in float32, and the raw weights
    assert torch.equal(module.trained.weight, expected_average(raw).bfloat16())
    saved = read_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(saved["state_dict"]["trained.weight"], expected_average(raw))
    assert torch.equal(saved["current_model_state"]["trained.weight"], module.raw[-1])


def test_the_generator_trains_under_bf16_true_with_its_ema(make_cfg, tiny_autoencoder_ckpt):  # noqa: F811
    from imagen.cli.train import train

    # shapes_generator keeps an EMA by default; the tiny data has no judge, so the checkpoint watches the likelihood
    cfg = make_cfg(["experiment=shapes_generator", *TINY_SHAPES, *TINY_GENERATOR,
                    f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}", "trainer.precision=bf16-true",
                    "trainer.max_steps=3", "trainer.val_check_interval=2", "test=false", "logger=csv",
                    "callbacks.model_checkpoint.monitor=val/nll_bits", "callbacks.model_checkpoint.mode=min"])  # fmt: skip
    _, objects = train(cfg)
    [ema] = [c for c in objects["trainer"].callbacks if isinstance(c, EMAWeights)]
    net, average = objects["model"].net, ema._average_model.module.net
    assert objects["trainer"].global_step == 3 and int(ema._average_model.n_averaged) == 3
    assert "val/nll_bits" in objects["trainer"].callback_metrics  # a validation ran, on the average
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in average.parameters()} == {torch.float32}
    # training ends with the average in the module
    assert all(
        torch.equal(p, a.bfloat16()) for p, a in zip(net.parameters(), average.parameters(), strict=True)
    )


@pytest.mark.parametrize(("major", "expected"), [(7, "32-true"), (8, "bf16-mixed")])
def test_auto_precision_takes_bf16_only_where_the_gpu_computes_in_it(monkeypatch, major, expected):
    """A V100 (sm_70) or a T4 (sm_75) emulates bf16, slower than float32; Ampere (sm_80) and later compute in it."""
    from types import SimpleNamespace

    from imagen.precision import auto_precision

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major, minor=0)
    )
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    assert auto_precision() == auto_precision("gpu") == expected
    # on a GPU host, a run on the CPU (trainer=cpu, the debug modes) takes the CPU's precision
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert auto_precision("cpu") == "32-true"


@pytest.mark.parametrize("own_signal", [True, False])
def test_preemption_under_slurm_hands_the_requeue_signal_to_lightnings_requeue(own_signal):
    """With SLURM auto-requeue, the warning before the time limit goes to Lightning's handler (hpc_ckpt_N.ckpt, then
    `scontrol requeue`) on every rank, also on one that did not receive it itself."""
    import signal
    from types import SimpleNamespace

    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from imagen.callbacks.fault import Preemption

    handed = []
    # the environment's requeue signal, whichever it is (here not Lightning's default, SIGUSR1)
    environment = SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR2)
    # the highest signal any rank received: here, another one's
    another_rank = torch.tensor(int(signal.SIGUSR2))
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda t, reduce_op: torch.maximum(t, another_rank)),
        _accelerator_connector=SimpleNamespace(cluster_environment=environment),
        _signal_connector=SimpleNamespace(_slurm_sigusr_handler_fn=lambda signum, frame: handed.append(signum)),
        global_step=7, limit_val_batches=1.0, should_stop=False,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_should_accumulate=lambda: False)),  # at a step
    )  # fmt: skip
    callback = Preemption(signals=["SIGUSR2", "SIGTERM"])
    callback.received = signal.SIGUSR2 if own_signal else None
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert handed == [signal.SIGUSR2]
    assert trainer.should_stop and trainer.limit_val_batches == 0 and callback.stopped_at_step == 7


def test_preemption_runs_after_the_other_callbacks_of_a_batch():
    # its checkpoint at the end of a batch must hold that batch's EMA update (`callbacks=[default,ema]` lists EMA
    # after it), or the resumed run's average misses one step
    from omegaconf import OmegaConf

    from imagen.cli.utils import instantiate_callbacks

    cfg = OmegaConf.create({"preemption": {"_target_": "imagen.callbacks.fault.Preemption"},
                            "random_state": {"_target_": "imagen.callbacks.fault.RandomState"},
                            "ema": {"_target_": "imagen.callbacks.EMAWeights", "decay": 0.9}})  # fmt: skip
    assert [type(c).__name__ for c in instantiate_callbacks(cfg)] == [
        "RandomState",
        "EMAWeights",
        "Preemption",
    ]


def test_the_progress_bar_names_the_epoch_without_a_negative_count():
    import types

    from imagen.progress import StepProgressBar

    bar = StepProgressBar()
    for max_epochs, expected in ((-1, "Epoch 3"), (None, "Epoch 3"), (5, "Epoch 3/4")):
        # runs are bounded by steps: max_epochs=-1
        bar._trainer = types.SimpleNamespace(max_epochs=max_epochs)
        assert bar._get_train_description(3).strip() == expected


def test_resumable_early_stopping_reads_and_writes_lightnings_checkpoint_state():
    from lightning.pytorch.callbacks import EarlyStopping

    from imagen.callbacks.fault import ResumableEarlyStopping

    ours, lightnings = (
        cls(monitor="val/psnr", mode="max") for cls in (ResumableEarlyStopping, EarlyStopping)
    )
    assert ours.state_key == lightnings.state_key  # a run checkpointed by either resumes with the other
