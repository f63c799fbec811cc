"""Numerical faults: a non-finite loss is skipped and counted; N in a row stop the run with a checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from imagen.callbacks.fault import NonFiniteError, NonFiniteGuard, grads_are_finite
from imagen.checkpoints import read_checkpoint
from imagen.cli.train import BASIC_LAUNCHER, StoppedBySignal, end_stopped_run, train
from imagen.stages.autoencoder import AutoencoderStage
from tests.conftest import REPO, TINY_SHAPES
from tests.test_callbacks import TwoLayers
from tests.test_cli import run_train
from tests.test_train import TINY_GENERATOR, tiny_autoencoder_ckpt  # noqa: F401  (a session fixture)

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


class NaNLossAtBatches(TwoLayers):
    """The loss of the given batches is NaN: with NaN gradients, or (`nan_grads=False`) with finite ones."""

    def __init__(self, batches: set[int], nan_grads: bool):
        super().__init__()
        self.batches, self.nan_grads = batches, nan_grads

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx not in self.batches:
            return loss
        return loss * float("nan") if self.nan_grads else loss + float("nan")


@pytest.mark.parametrize("nan_grads", [True, False])
def test_with_accumulation_a_step_is_judged_on_all_its_micro_batches(tmp_path, nan_grads):
    # batch 2 is the first of the two that make step 1: that step is skipped and counted once. Before, each
    # micro-batch counted (under DDP, on the rank with the NaN only), and a NaN loss with finite gradients was stepped
    module = NaNLossAtBatches({2}, nan_grads)
    guard = NonFiniteGuard(max_consecutive=2)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4)
    trainer = pl.Trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[guard], default_root_dir=tmp_path,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0)  # fmt: skip
    trainer.fit(module, data)
    assert trainer.global_step == 4
    assert (guard.total, guard.consecutive, guard.first_bad_step) == (1, 0, 1)
    assert torch.equal(module.raw[3], module.start[2]), "step 1 left the weights as they were"
    assert not torch.equal(module.raw[5], module.start[4])


class OverflowingUnderFloat16(TwoLayers):
    """A loss whose gradients overflow float16 until the scale is down to 2**8 (the scaler starts at 2**16, and
    halves it on each overflow): the first 8 steps overflow, as a float16 run's first steps do. The loss of batch
    `nan_batch` is NaN, with finite gradients."""

    def __init__(self, fused: bool, nan_batch: int):
        super().__init__()
        self.fused, self.nan_batch = fused, nan_batch

    def training_step(self, batch, batch_idx):
        loss = 40 * self.trained(self.frozen(batch[0])).float().sum()
        return loss + float("nan") if batch_idx == self.nan_batch else loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trained.parameters(), lr=1e-3, fused=self.fused)


@pytest.mark.parametrize("fused", [False, True])
def test_under_a_grad_scaler_overflowing_gradients_are_left_to_it(tmp_path, fused):
    # the guard counted the scaler's routine overflow steps (5 in a row stopped the run) and dropped their gradients,
    # so that a fused optimizer's scaler found nothing to check ("No inf checks were recorded prior to update")
    torch.manual_seed(0)
    module = OverflowingUnderFloat16(fused, nan_batch=10)
    guard = NonFiniteGuard(max_consecutive=5)
    scaler = torch.amp.GradScaler("cpu")  # CUDA's, on the CPU
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=4)
    trainer = pl.Trainer(max_steps=12, callbacks=[guard], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
                         default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0)  # fmt: skip
    trainer.fit(module, data)
    assert trainer.global_step == 12
    assert scaler.get_scale() <= 2**8, "the scaler saw the overflow and lowered its scale"
    assert torch.equal(module.raw[7], module.start[0]), "the scaler skipped the overflowing steps"
    assert not torch.equal(module.raw[9], module.start[8]), "the steps after them trained"
    # a non-finite loss is still the guard's: counted, and its step skipped
    assert (guard.total, guard.first_bad_step) == (1, 10)
    assert torch.equal(module.raw[10], module.start[10])


class NaNWeightOnRank1(Callback):
    """From step `step` on, rank 1's copy of one weight of the network is NaN (a fault on one GPU)."""

    def __init__(self, step: int = 1):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step >= self.step:
            with torch.no_grad():
                next(pl_module.net.parameters()).fill_(float("nan"))


def test_ddp_ranks_stop_together_on_a_fault_of_one(tmp_path, tiny_autoencoder_ckpt):  # noqa: F811
    # with accumulation, rank 1 alone had counted its micro-batches and stopped after one skipped step; rank 0 then
    # failed on the lost connection (under NCCL: hung)
    result = run_train(
        "experiment=shapes_generator", *TINY_SHAPES, *TINY_GENERATOR, f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}",
        "+callbacks.nan._target_=tests.test_faults.NaNWeightOnRank1", "callbacks.nonfinite_guard.max_consecutive=2",
        "callbacks.image_logger=null", "trainer=ddp_sim", "trainer.accumulate_grad_batches=2", "trainer.max_steps=6",
        "trainer.val_check_interval=6", "test=false", "extras.print_config=false", f"paths.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path, timeout=180,
    )  # fmt: skip
    assert result.returncode != 0
    assert "ARGeneratorStage stage: 2 consecutive non-finite steps (steps 1-2" in result.stderr, (
        result.stderr[-3000:]
    )
    assert "steps 1-1" not in result.stderr and "Connection closed by peer" not in result.stderr


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


class SigtermOnRank1(Callback):
    """Rank 1 alone receives SIGTERM after step `step` (a preemption that reached one process first)."""

    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def test_ddp_ranks_stop_together_when_one_is_signalled(tmp_path):
    # the signal is exchanged between the ranks (the highest number any received), so both write the checkpoint and
    # stop at the same step, without a validation on the way out
    result = run_train(
        "experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "callbacks.image_logger=null",
        "+callbacks.term._target_=tests.test_faults.SigtermOnRank1", "trainer=ddp_sim", "trainer.max_steps=40",
        "trainer.val_check_interval=40", "test=false", "extras.print_config=false", f"paths.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (ckpt,) = (tmp_path / "logs").rglob("last.ckpt")
    assert 2 <= read_checkpoint(ckpt)["global_step"] < 40
    assert "stopped by a signal at step" in result.stderr + result.stdout


def _random_streams_in_process(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import types

    import torch.distributed as dist

    from imagen.callbacks.fault import RandomState

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    trainer = types.SimpleNamespace(global_rank=rank, world_size=world, reload_dataloaders_every_n_epochs=0)
    callback = RandomState()
    callback.setup(trainer, None, "fit")
    torch.manual_seed(7)  # seed_everything: alike on every process
    callback.on_train_start(trainer, None)
    first = torch.rand(4)
    saved = callback.state_dict()  # every process takes part
    after_checkpoint = torch.rand(4)
    resumed = RandomState()
    resumed.setup(trainer, None, "fit")
    resumed.load_state_dict(saved)  # rank 0's checkpoint, which holds every process's states
    torch.manual_seed(7)
    resumed.on_train_start(trainer, None)
    resumed.on_train_batch_start(trainer, None, None, 0)
    torch.save((first, after_checkpoint, torch.rand(4)), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_processes_draw_their_own_random_numbers_and_each_resumes_its_own(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_random_streams_in_process, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    (first0, after0, resumed0), (first1, after1, resumed1) = (
        torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)
    )
    # rank 0 keeps the run's
    assert torch.equal(first0, torch.rand(4, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(first0, first1)  # dropout masks, caption dropout, noise: each process its own
    assert torch.equal(resumed0, after0) and torch.equal(resumed1, after1)


# -- a run stopped by a signal, under a sweeper or SLURM --------------------------------------------------------------

SIGNALLED = ["+callbacks.term._target_=tests.test_faults.SignalAtStep", "+callbacks.term.step=1"]


class SignalAtStep(Callback):
    """Sends this process `signal` (a name) after training step `step`: SIGTERM as a preemption, or SIGUSR1 as
    SLURM's warning before the time limit. With `once` (a file it then writes), only if that file is not there: in
    the first run of a test only."""

    def __init__(self, step: int, signal: str = "SIGTERM", once: str | None = None):
        self.step, self.signal, self.once = step, signal, once

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step or (self.once and os.path.exists(self.once)):
            return
        if self.once:
            open(self.once, "w").close()
        os.kill(os.getpid(), getattr(signal, self.signal))


class SignalInLastValidation(Callback):
    """Sends this process SIGUSR1 in the validation after the last training step."""

    def on_validation_start(self, trainer, pl_module):
        if trainer.global_step == trainer.max_steps:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_a_signal_in_the_last_validation_leaves_a_finished_run_tested(make_cfg, tmp_path):
    # the run counted as stopped by the signal, though it had trained every step: no test, no metrics.json, and a
    # rerun (nothing left to train) wrote only the test's figures
    run = tmp_path / "run"
    overrides = ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "logger=csv",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.image_logger=null",
                 "+callbacks.signal._target_=tests.test_faults.SignalInLastValidation"]  # fmt: skip
    metrics, objects = train(make_cfg(overrides, run_dir=run))
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert (run / "metrics.json").is_file(), "the finished run was not tested"
    recorded = json.loads((run / "metrics.json").read_text())
    assert {"train/loss", "val/psnr", "test/psnr"} <= recorded.keys()
    assert recorded["test/psnr"] == metrics["test/psnr"]
    assert objects.get("signalled") and not objects.get("preempted")  # for `main`


def set_hydra_job(cfg, mode, launcher: str) -> None:
    """Make `cfg`'s Hydra config that of a job run in `mode` (a RunMode) by `launcher` (its `_target_`)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = mode
        cfg.hydra.launcher = {"_target_": launcher}
    HydraConfig().set_config(cfg)


SUBMITIT_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


@pytest.mark.parametrize(
    ("mode", "launcher", "expected"),
    [("RUN", BASIC_LAUNCHER, None), ("MULTIRUN", SUBMITIT_LAUNCHER, StoppedBySignal),
     ("MULTIRUN", BASIC_LAUNCHER, SystemExit)],
)  # fmt: skip
def test_what_main_makes_of_a_run_stopped_by_a_signal(make_cfg, tmp_path, caplog, mode, launcher, expected):
    # a single run returns (exit status 0); a job of a local multirun ends the sweep, whose next job would run in the
    # time the signal left; a job of its own fails, so that Optuna counts a failed trial (it got None, which escaped
    # max_failure_rate, and a NaN would end the study: Optuna 2.x refuses it, and the sweeper fails on that)
    from hydra.types import RunMode

    cfg = make_cfg(["optimized_metric=val/psnr"], run_dir=tmp_path / "run")
    set_hydra_job(cfg, RunMode[mode], launcher)
    caplog.set_level("INFO")
    if expected is None:
        assert end_stopped_run(cfg, {"preempted": True, "requeued": False}) is None
        assert f"to resume: python {sys.argv[0]} " in caplog.text
        assert caplog.text.rstrip().endswith(f"hydra.run.dir={tmp_path / 'run'}")
        return
    with pytest.raises(expected) as raised:
        end_stopped_run(cfg, {"preempted": True, "requeued": False})
    if expected is SystemExit:
        assert raised.value.code == 1
        assert "To resume it in its directory: python " in caplog.text
    sweep_dir = Path(os.getcwd()) / cfg.hydra.sweep.dir
    assert f"hydra.sweep.dir={sweep_dir}" in caplog.text + str(raised.value)


def test_a_non_finite_optimized_metric_fails_the_trial(make_cfg, tmp_path, monkeypatch):
    # returned, a NaN ended an Optuna 2.x study (Optuna refuses it, and the sweeper fails on that refusal)
    import imagen.cli.train as train_module

    cfg = make_cfg(["optimized_metric=val/psnr"], run_dir=tmp_path / "run")
    monkeypatch.setattr(train_module, "train", lambda cfg: ({"val/psnr": float("nan")}, {}))
    with pytest.raises(FloatingPointError, match=r"optimized_metric=val/psnr is nan: training diverged"):
        train_module.main(cfg)
    monkeypatch.setattr(train_module, "train", lambda cfg: ({"val/psnr": 21.5}, {}))
    assert train_module.main(cfg) == 21.5


def test_a_requeued_run_ends_its_process_without_a_result(make_cfg, tmp_path):
    from hydra.types import RunMode

    cfg = make_cfg(["optimized_metric=val/psnr"], run_dir=tmp_path / "run")
    for mode in (RunMode.RUN, RunMode.MULTIRUN):
        set_hydra_job(cfg, mode, SUBMITIT_LAUNCHER)
        with pytest.raises(SystemExit) as raised:  # a pipeline's stage too
            end_stopped_run(cfg, {"preempted": True, "stages": {"autoencoder": {"requeued": True}}})
        assert raised.value.code == 0


@pytest.mark.parametrize(
    ("mode", "launcher", "ends_sweep"),
    [("RUN", BASIC_LAUNCHER, False), ("MULTIRUN", SUBMITIT_LAUNCHER, False), ("MULTIRUN", BASIC_LAUNCHER, True)],
)  # fmt: skip
def test_what_main_makes_of_a_run_a_signal_reached_after_training(
    make_cfg, tmp_path, monkeypatch, caplog, mode, launcher, ends_sweep
):
    # finished and tested, it returns its metric; a local multirun still ends with it, its next job would run in the
    # time the signal left
    from hydra.types import RunMode

    import imagen.cli.train as train_module

    cfg = make_cfg(["optimized_metric=val/psnr"], run_dir=tmp_path / "run")
    set_hydra_job(cfg, RunMode[mode], launcher)
    monkeypatch.setattr(train_module, "train", lambda cfg: ({"val/psnr": 21.5}, {"signalled": True}))
    if not ends_sweep:
        assert train_module.main(cfg) == 21.5
        return
    with pytest.raises(SystemExit) as raised:
        train_module.main(cfg)
    assert raised.value.code == 1
    assert f"To resume it in its directory: python {sys.argv[0]} " in caplog.text


def test_a_signal_ends_a_local_multirun_with_the_command_that_resumes_it(tmp_path):
    # before, Hydra's basic launcher went on to the next job, the command exited 0 and the log said "run the same
    # command again", which makes a new sweep directory
    overrides = ["-m", "experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "callbacks.image_logger=null",
                 "trainer.max_steps=3", "trainer.val_check_interval=3", "test=false", "extras.print_config=false",
                 "logger=csv", "seed=1,2", *SIGNALLED, f"+callbacks.term.once={tmp_path / 'signalled'}"]  # fmt: skip
    result = run_train(*overrides, cwd=tmp_path, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    (sweep,) = (tmp_path / "logs" / "shapes_autoencoder" / "multiruns").iterdir()
    assert read_checkpoint(sweep / "0" / "checkpoints" / "last.ckpt")["global_step"] == 1
    assert not (sweep / "1").exists(), "the sweep's next job did not start"
    command = shlex.split(re.search(r"To resume it in its directory: (.*)", output).group(1))
    assert command[:2] == ["python", str(REPO / "train.py")] and command[-1] == f"hydra.sweep.dir={sweep}"

    resumed = run_train(*command[2:], cwd=tmp_path, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list(sweep.parent.iterdir()) == [sweep], "the same sweep directory"
    resumed_job = sweep / "0" / "checkpoints" / "last.ckpt"
    assert f"resuming from {resumed_job} at step 1" in resumed.stderr + resumed.stdout
    for job in ("0", "1"):
        assert read_checkpoint(sweep / job / "checkpoints" / "last.ckpt")["global_step"] == 3


def run_train_main(*overrides: str) -> None:
    """`python train.py OVERRIDES` in this process: the function of a submitit job."""
    from imagen.cli.train import main

    sys.argv = [str(REPO / "train.py"), *overrides]
    main()


SUBMITIT_JOB = """
import sys
from submitit.core.submission import process_job
from submitit.core.utils import DelayedSubmission, JobPaths
from tests.test_faults import run_train_main

folder, job_id, *overrides = sys.argv[1:]
DelayedSubmission(run_train_main, *overrides).dump(JobPaths(folder, job_id, task_id=0).submitted_pickle)
process_job(folder)
"""


def test_a_requeued_slurm_job_leaves_its_result_to_the_requeued_attempt(tmp_path):
    # submitit writes a job's result when its function returns: the launcher collected the first attempt's (None)
    # while the requeued job still ran. SLURM and `scontrol` are faked: the job is this process, `scontrol` a script
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from submitit.core.utils import JobPaths

    bin_dir, folder, run = tmp_path / "bin", tmp_path / "submitit", tmp_path / "run"
    bin_dir.mkdir()
    folder.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore",
           "IMAGEN_ROOT": str(tmp_path), "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train",
           "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_JOB_NUM_NODES": "1"}  # fmt: skip
    overrides = ["hydra/launcher=slurm", "experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny",
                 "callbacks.image_logger=null", "trainer.max_steps=3", "trainer.val_check_interval=3", "test=false",
                 "extras.print_config=false", "logger=csv", "optimized_metric=val/psnr", f"hydra.run.dir={run}",
                 *SIGNALLED, "+callbacks.term.signal=SIGUSR1"]  # fmt: skip
    result_pickle = JobPaths(folder, "4242", task_id=0).result_pickle

    def attempt() -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", SUBMITIT_JOB, str(folder), "4242", *overrides]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)

    first = attempt()
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert read_checkpoint(run / "hpc_ckpt_1.ckpt")["global_step"] == 1
    assert not result_pickle.exists(), "the requeued attempt returned a result"
    assert "this attempt ends without a result" in first.stdout + first.stderr

    second = attempt()  # the requeued job: it resumes, finishes and returns the metric
    assert second.returncode == 0, second.stderr[-3000:]
    resumed_from = rf"resuming from {re.escape(str(run))}/\S+\.ckpt at step 1"
    assert re.search(resumed_from, second.stdout + second.stderr)
    outcome, _ = pickle.loads(result_pickle.read_bytes())
    assert outcome == "success"
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_the_optuna_sweep_survives_a_failed_trial_keeps_its_study_and_gives_each_trial_a_directory(tmp_path):
    # the sweeper's defaults: max_failure_rate 0 (one failed trial ended the study) and an in-memory study. A rerun
    # in the same sweep directory numbers its jobs from 0 again: with `<job>` directories, its job 0 resumed
    # (ckpt_path=auto) the first attempt's trial 0, whatever that trial's values
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    from imagen.cli.train import optuna_storage

    config = OmegaConf.load(REPO / "conf" / "hparams_search" / "shapes_autoencoder_optuna.yaml")
    sweeper = config.hydra.sweeper
    assert 1 / sweeper.n_jobs <= sweeper.max_failure_rate < 1, "the rate is judged per batch of n_jobs trials"
    storage = {"_target_": "imagen.cli.train.optuna_storage", "sweep_dir": "${hydra.sweep.dir}"}
    assert OmegaConf.to_container(sweeper.storage) == storage
    url = optuna_storage(str(tmp_path / "sweep"))
    assert url == f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}"
    # the sweeper opens the database before its launcher makes the directory
    sqlite3.connect(url.removeprefix("sqlite:///")).close()

    trial = {"model": {"optimizer": {"lr": 0.0025}, "net": {"quantizer": "lfq"}}, "data": {"batch_size": 64}}
    job = OmegaConf.merge(config, trial, {"hydra": {"job": {"num": 3}}})
    setup_globals()  # Hydra's `now` resolver
    assert re.fullmatch(r"\d\d-\d\d-\d\d_\d{6}_3_lfq_bs64_lr0.0025", job.hydra.sweep.subdir)
    subdir = OmegaConf.to_container(config.hydra.sweep)["subdir"]  # unresolved
    for key in sweeper.params:
        assert f"${{{key}}}" in subdir, f"{key}: a swept value the directory does not name"


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """`atomic_file`, which every writer of a file that others read uses (checkpoints, the judge, token shards,
    the text encoder's cache, metrics, exports): a save that raises halfway changes nothing on disk."""
    from imagen.checkpoints import AtomicCheckpointIO
    from imagen.files import atomic_file, write_text_atomic

    target = tmp_path / "last.ckpt"
    # what a save killed by SIGKILL left: the next save replaces it
    (tmp_path / ".last.ckpt.tmp").write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)

    def save_half(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "metrics.json") as temporary:
        temporary.write_text("{")
        raise RuntimeError("killed while writing")
    assert not (tmp_path / "metrics.json").exists()
    write_text_atomic(tmp_path / "metrics.json", "{}")
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "metrics.json"], "a temporary was left"
