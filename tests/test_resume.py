"""Exact resume after a kill, checkpoint-then-exit on signals, and fallback from a corrupt checkpoint."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from imagen.callbacks.checkpoint import LastAndBestCheckpoint
from imagen.callbacks.fault import Preemption
from imagen.checkpoints import read_checkpoint
from imagen.cli.checks import ConfigError
from imagen.cli.train import train
from imagen.data.resumable import ResumableLoader
from tests.conftest import REPO, TINY_SHAPES
from tests.test_callbacks import TwoLayers

# The public interface of the kill test (the command) ...
KILL_RUN = [
    "experiment=shapes_autoencoder",
    "trainer.max_steps=240",
    "trainer.deterministic=true",
    "callbacks.model_checkpoint.every_n_train_steps=40",
    "seed=7",
]
# ... made small: 16 px images, 7 batches of 8 per epoch, so that every checkpoint (steps 40, 80, ...) falls in the
# middle of an epoch; VQ (random dead-code replacement) so that the restored RNG matters; validation every 60 steps,
# so that it runs between two checkpoints and, at steps 120 and 240, at the step of a checkpoint.
SMALL = [
    *(o for o in TINY_SHAPES if not o.startswith(("data.num_train=", "data.batch_size="))),
    "data.num_train=56",
    "data.batch_size=8",
    "data.image_size=16",
    "model.net.size=tiny",
    "model.net.quantizer=vq",
    "trainer.val_check_interval=60",
    "test=false",
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
]


def train_command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *KILL_RUN, f"hydra.run.dir={run_dir}", *SMALL, *extra]


def start(command: list[str], cwd: Path, log: Path, own_group: bool = False) -> subprocess.Popen:
    """The command in the background; `own_group`: in a process group of its own, which `os.killpg` stops with the
    processes it starts (the other DDP ranks)."""
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "IMAGEN_ROOT": str(cwd),
        "IMAGEN_CACHE": str(cwd / "cache"),
    }
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=own_group)  # fmt: skip


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended (code {process.returncode}) before writing {path}"
        assert time.time() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.02)


def run_to_end(command: list[str], cwd: Path, log: Path) -> str:
    process = start(command, cwd, log)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    return log.read_text()


def state(path: Path) -> dict:
    checkpoint = read_checkpoint(path)
    return {"step": checkpoint["global_step"], "weights": checkpoint["state_dict"],
            "optimizer": checkpoint["optimizer_states"][0]["state"]}  # fmt: skip


def test_killed_run_resumes_to_bit_identical_weights(tmp_path):
    """SIGKILL after the first checkpoint, rerun the same command: it resumes at the saved step and ends with the
    weights (and optimizer moments) of an uninterrupted run, bit for bit (CPU, deterministic mode)."""
    reference = tmp_path / "reference"
    run_to_end(train_command(reference), tmp_path, tmp_path / "reference.log")

    run = tmp_path / "killed"
    process = start(train_command(run), tmp_path, tmp_path / "killed.log")
    wait_for(run / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (run / "metrics.json").exists(), (
        "the run finished before the kill; the test needs a slower run"
    )
    saved_step = state(run / "checkpoints" / "last.ckpt")["step"]
    assert 0 < saved_step < 240 and saved_step % 7, "the kill should fall in the middle of an epoch"

    log = run_to_end(train_command(run), tmp_path, tmp_path / "resumed.log")
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'} at step {saved_step}" in log
    expected, resumed = (
        state(reference / "checkpoints" / "last.ckpt"),
        state(run / "checkpoints" / "last.ckpt"),
    )
    assert resumed["step"] == expected["step"] == 240
    assert expected["weights"].keys() == resumed["weights"].keys()
    different = [k for k, v in expected["weights"].items() if not torch.equal(v, resumed["weights"][k])]
    assert not different, f"weights differ after resume: {different}"
    for index, moments in expected["optimizer"].items():
        for name, value in moments.items():
            assert torch.equal(value, resumed["optimizer"][index][name]), (
                f"optimizer state {index}.{name} differs"
            )


def test_a_killed_ddp_run_resumes_within_its_epoch_to_bit_identical_weights(tmp_path):
    """Two processes (`trainer=ddp_sim`), 7 batches each per epoch: both killed after the checkpoint of step 40, in
    the middle of an epoch; the same command resumes and ends with an uninterrupted run's weights. (Lightning wraps a
    sampler that is not a DistributedSampler in one of its own, whose position a checkpoint does not keep: the
    resumed epoch then trained again on its first batches.) VQ: its codebook is kept the same on both processes
    (`synchronise_codebook`), and each process's random streams, which its dead-code replacement draws from, resume."""
    ddp = ["trainer=ddp_sim", "trainer.max_steps=120", "data.num_train=112"]
    reference = tmp_path / "reference"
    run_to_end(train_command(reference, *ddp), tmp_path, tmp_path / "reference.log")

    run = tmp_path / "killed"
    process = start(train_command(run, *ddp), tmp_path, tmp_path / "killed.log", own_group=True)
    wait_for(run / "checkpoints" / "last.ckpt", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    checkpoint = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 40  # the first scheduled save, before the first validation (step 60)
    # saved in the middle of epoch 5 (of 7 batches), by the loader itself
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 5, "batches": 5, "num_replicas": 2}
    ]

    run_to_end(train_command(run, *ddp), tmp_path, tmp_path / "resumed.log")
    expected, resumed = (
        state(reference / "checkpoints" / "last.ckpt"),
        state(run / "checkpoints" / "last.ckpt"),
    )
    assert resumed["step"] == expected["step"] == 120
    different = [k for k, v in expected["weights"].items() if not torch.equal(v, resumed["weights"][k])]
    assert not different, f"weights differ after resume: {different}"


# -- gradient accumulation: checkpoints fall at the end of an optimizer step -----------------------------------------


class Killed(RuntimeError):
    """A SIGKILL, in this process."""


class Interrupt(pl.Callback):
    """At the start of the run's batch `batch` (counted over its attempts), stops the process (`Killed`) or, with
    `signum`, sends it that signal."""

    def __init__(self, batch: int, signum: int | None = None):
        self.batch, self.signum = batch, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.fit_loop.epoch_loop.batch_progress.total.processed != self.batch:
            return
        if self.signum is None:
            raise Killed
        os.kill(os.getpid(), self.signum)


class SavePoints(pl.Callback):
    """The (global step, batches done) of each checkpoint written; with `slow_batch`, that batch takes 0.5 s."""

    def __init__(self, slow_batch: int | None = None):
        self.slow_batch, self.points = slow_batch, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.fit_loop.epoch_loop.batch_progress.total.processed == self.slow_batch:
            time.sleep(0.5)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.points.append((trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.total.processed))


def fit_accumulating(
    directory: Path, max_steps: int, ckpt_path=None, callbacks=(), **checkpoint_args
) -> TwoLayers:
    """Train with 2 batches to a step (16 batches an epoch), `last.ckpt` in `directory`; returns the module."""
    torch.manual_seed(0)
    data = ResumableLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=4, seed=0)
    checkpoints = LastAndBestCheckpoint(dirpath=directory, save_last=True, **checkpoint_args)
    trainer = pl.Trainer(callbacks=[*callbacks, checkpoints], accumulate_grad_batches=2, max_steps=max_steps,
                         limit_val_batches=0, deterministic=True, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")  # fmt: skip
    module = TwoLayers()
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("interruption", ["kill after a resume", "signal"])
def test_with_accumulation_an_interrupted_run_resumes_to_bit_identical_weights(tmp_path, interruption):
    # the first batch after a resume (the first of step 2's two) wrote `last.ckpt` again, and a signal wrote it at
    # once: in the middle of a step, without its accumulated gradient, its micro-batch counted as done
    every_2_steps = {"every_n_train_steps": 2, "save_top_k": 1}
    expected = fit_accumulating(tmp_path / "reference", 4, **every_2_steps).weight()
    run = tmp_path / "run"
    if interruption == "signal":  # in batch 2, the first of step 1's
        stop = Preemption(signals=["SIGUSR1"])
        fit_accumulating(run, 4, callbacks=[stop, Interrupt(2, signal.SIGUSR1)], **every_2_steps)
        assert stop.stopped_at_step == 2, "the checkpoint waits for the step's end"
    else:
        fit_accumulating(run, 2, **every_2_steps)
        with pytest.raises(Killed):  # after batch 4, the first of step 2's
            fit_accumulating(run, 4, run / "last.ckpt", [Interrupt(5)], **every_2_steps)
    assert read_checkpoint(run / "last.ckpt")["global_step"] == 2
    resumed = fit_accumulating(tmp_path / "resumed", 4, run / "last.ckpt", **every_2_steps).weight()
    assert torch.equal(resumed, expected)


def test_with_accumulation_a_timed_checkpoint_waits_for_the_end_of_the_step(tmp_path):
    # the interval runs out in batch 2, the first of step 1's two: the save was written right after it
    saves = SavePoints(slow_batch=2)
    fit_accumulating(
        tmp_path, 3, callbacks=[saves], save_top_k=0, train_time_interval=datetime.timedelta(seconds=0.3)
    )
    assert (2, 4) in saves.points, "the save due in step 1 is written at its end"
    assert all(batches == 2 * step for step, batches in saves.points), saves.points


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    run = tmp_path / "run"
    process = start(train_command(run, "trainer.max_steps=100000"), tmp_path, tmp_path / "run.log")
    wait_for(run / "checkpoints" / "last.ckpt", process)
    first = state(run / "checkpoints" / "last.ckpt")["step"]
    process.send_signal(signum)
    assert process.wait(timeout=120) == 0, (tmp_path / "run.log").read_text()[-3000:]
    log = (tmp_path / "run.log").read_text()
    saved = state(run / "checkpoints" / "last.ckpt")["step"]
    assert saved > first, "a new checkpoint is written on the signal"
    assert f"stopped by a signal at step {saved}" in log
    assert not (run / "metrics.json").exists(), "a stopped run is not tested"
    assert not list((run / "checkpoints").glob(".*.tmp*")), "no temporary file is left behind"


@pytest.mark.parametrize("rerun", ["ckpt_path=auto", "ckpt_path=null"])
def test_last_ckpt_stays_the_newest_after_a_signal_and_a_rerun(make_cfg, tmp_path, rerun):
    """The checkpoint written on a signal is the checkpoint callback's `last.ckpt`, without a validation on the way
    out; rerunning the command, resumed or started afresh in the used directory, goes on updating that file."""
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "test=false", "logger=csv",
                 "trainer.max_steps=8", "trainer.val_check_interval=100"]  # fmt: skip
    signalled = ["+callbacks.preempt._target_=tests.test_finetune.SignalAtStep", "+callbacks.preempt.step=2"]
    _, objects = train(make_cfg([*overrides, *signalled], run_dir=run))
    assert objects.get("preempted")
    assert not [k for k in objects["trainer"].callback_metrics if k.startswith("val/")], "no validation ran"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["last.ckpt"]
    assert 2 <= read_checkpoint(checkpoints / "last.ckpt")["global_step"] < 8

    train(make_cfg([*overrides, rerun], run_dir=run))
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 8
    assert not list(checkpoints.glob("last-v*.ckpt"))
    # the CSV log: a resume appends to metrics.csv; a fresh start writes its own, the earlier one kept beside it
    previous = sorted(p.name for p in (run / "csv").glob("metrics.previous*.csv"))
    assert previous == (["metrics.previous1.csv"] if rerun == "ckpt_path=null" else [])


def test_auto_resume_refuses_a_run_directory_trained_with_other_settings(make_cfg, tmp_path):
    """A sweep run again in the same hydra.sweep.dir with other values: its jobs resumed the earlier jobs'
    checkpoints, trained nothing and reported the earlier settings' metrics."""
    run = tmp_path / "run"
    overrides = ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "test=false", "logger=csv",
                 "trainer.val_check_interval=100", "model.optimizer.lr=0.001"]  # fmt: skip
    train(make_cfg([*overrides, "trainer.max_steps=2"], run_dir=run))
    last = run / "checkpoints" / "last.ckpt"
    with pytest.raises(
        ConfigError, match=r"ckpt_path=auto: .* other settings: model.optimizer.lr=0.004 \(was 0.001\)"
    ):
        train(make_cfg([*overrides, "trainer.max_steps=4", "model.optimizer.lr=0.004"], run_dir=run))
    assert read_checkpoint(last)["global_step"] == 2
    # a longer run and another number of loader workers are the same run
    train(make_cfg([*overrides, "trainer.max_steps=4", "data.num_workers=1"], run_dir=run))
    assert read_checkpoint(last)["global_step"] == 4
    # an explicit checkpoint resumes as asked, and the run goes on with its settings; a fresh start records its own
    train(
        make_cfg(
            [*overrides, "trainer.max_steps=6", "model.optimizer.lr=0.004", f"ckpt_path={last}"], run_dir=run
        )
    )
    assert read_checkpoint(last)["global_step"] == 6
    lr = "model.optimizer.lr=0.004"
    # the run goes on with those settings
    train(make_cfg([*overrides, "trainer.max_steps=7", lr], run_dir=run))
    assert read_checkpoint(last)["global_step"] == 7
    train(
        make_cfg(
            [*overrides, "trainer.max_steps=2", "model.optimizer.lr=0.004", "ckpt_path=null"], run_dir=run
        )
    )
    train(make_cfg([*overrides, "trainer.max_steps=4", "model.optimizer.lr=0.004"], run_dir=run))
    assert read_checkpoint(last)["global_step"] == 4
    # how it trains counts too: a sweep over trainer settings, and a shorter run than the one held
    for changed, message in (("trainer.precision=bf16-mixed", "trainer.precision=bf16-mixed \\(was \\$"),
                             ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2 \\(was 1\\)"),
                             ("trainer.max_steps=3", "is at step 4, past trainer.max_steps=3")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            train(
                make_cfg(
                    [*overrides, "trainer.max_steps=4", "model.optimizer.lr=0.004", changed], run_dir=run
                )
            )
    assert read_checkpoint(last)["global_step"] == 4


def test_auto_resume_of_a_run_recorded_before_its_trainer_settings_were(make_cfg, tmp_path):
    run = tmp_path / "run"
    overrides = ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "test=false", "logger=csv",
                 "trainer.val_check_interval=100"]  # fmt: skip
    train(make_cfg([*overrides, "trainer.max_steps=2"], run_dir=run))
    record = run / "run_settings.json"
    settings = json.loads(record.read_text())
    # as written: the same on another machine
    assert settings["trainer.precision"] == "${imagen.auto_precision:${trainer.accelerator}}"
    record.write_text(
        json.dumps({k: v for k, v in settings.items() if not k.startswith(("trainer.", "callbacks."))})
    )
    train(make_cfg([*overrides, "trainer.max_steps=3", "trainer.precision=bf16-mixed"], run_dir=run))
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_a_fresh_start_in_a_used_directory_keeps_the_earlier_tensorboard_run_apart(make_cfg, tmp_path):
    run, events = tmp_path / "run", tmp_path / "run" / "tensorboard"
    overrides = ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "test=false",
                 "logger=tensorboard", "trainer.max_steps=2", "trainer.val_check_interval=100"]  # fmt: skip
    train(make_cfg(overrides, run_dir=run))
    first = sorted(p.name for p in events.glob("events.out.tfevents.*"))
    assert first
    train(make_cfg([*overrides, "ckpt_path=null"], run_dir=run))
    assert sorted(p.name for p in (events / "previous1").iterdir()) == sorted([*first, "hparams.yaml"])
    assert len(list(events.glob("events.out.tfevents.*"))) == 1  # the fresh start's own


def test_corrupt_checkpoints_are_reported_and_the_newest_valid_one_is_used(make_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    overrides = [
        "experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "test=false", "logger=csv",
        "callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1", "trainer.val_check_interval=100",
    ]  # fmt: skip
    train(make_cfg([*overrides, "trainer.max_steps=12"], run_dir=run))
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == [
        "last.ckpt", "step_000004.ckpt", "step_000008.ckpt", "step_000012.ckpt"
    ]  # fmt: skip
    for name in ("last.ckpt", "step_000012.ckpt"):  # a kill during a copy to another disk, a full disk, ...
        data = (checkpoints / name).read_bytes()
        (checkpoints / name).write_bytes(data[: len(data) // 2])

    caplog.set_level("INFO")
    _, objects = train(make_cfg([*overrides, "trainer.max_steps=16"], run_dir=run))
    for name in ("last.ckpt", "step_000012.ckpt"):
        assert f"{checkpoints / name} is truncated or corrupt" in caplog.text
    assert f"resuming from {checkpoints / 'step_000008.ckpt'} at step 8" in caplog.text
    assert objects["trainer"].global_step == 16
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 16

    # the resumed run wrote step 12 again; a truncated one given as ckpt_path is refused before the run starts
    (checkpoints / "step_000012.ckpt").write_bytes((checkpoints / "step_000012.ckpt").read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"ckpt_path: checkpoint .*step_000012.ckpt is truncated"):
        train(
            make_cfg(
                [*overrides, f"ckpt_path={checkpoints / 'step_000012.ckpt'}"], run_dir=tmp_path / "other"
            )
        )


def test_csv_logger_appends_when_a_run_resumes(tmp_path):
    from imagen.loggers import ResumableCSVLogger

    for step, metrics in ((1, {"train/loss": 1.0}), (2, {"train/loss": 0.5, "val/psnr": 20.0})):
        logger = ResumableCSVLogger(tmp_path, name="csv", version="")
        logger.log_metrics(metrics, step=step)
        logger.save()
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert rows == ["step,train/loss,val/psnr", "1,1.0,", "2,0.5,20.0"]


def test_wandb_continues_the_same_run_after_a_resume(make_cfg, tmp_path):
    # the W&B run id follows the run directory, so rerunning the command of a killed run logs into the same run
    def wandb_cfg(run_dir):
        wandb = make_cfg(["experiment=shapes_autoencoder", "logger=wandb"], run_dir=run_dir).logger.wandb
        return {"id": wandb.id, "resume": wandb.resume}

    first, again, other = wandb_cfg(tmp_path / "a"), wandb_cfg(tmp_path / "a"), wandb_cfg(tmp_path / "b")
    assert first["id"] == again["id"] != other["id"]
    assert first["resume"] == "allow"
    # a new run at a used path (the quickstart moves a stage's earlier run aside to train it again) is a new W&B run
    (tmp_path / "a").rename(tmp_path / "a.previous")
    assert wandb_cfg(tmp_path / "a")["id"] != first["id"]


def test_a_fresh_start_in_a_used_directory_is_a_new_wandb_run(make_cfg, tmp_path):
    run = tmp_path / "run"
    steps = ["experiment=shapes_autoencoder", "trainer.max_steps=1", *SMALL, "trainer.val_check_interval=1"]
    run.mkdir()
    (run / ".run_id").write_text("killedbeforeitsfirstcheckpoint\n")
    train(make_cfg(steps, run_dir=run))  # ckpt_path=auto finds no checkpoint: training starts afresh
    assert (run / ".run_id.killedbeforeitsfirstcheckpoint").is_file() and not (run / ".run_id").exists()
    (run / ".run_id").write_text("second\n")
    train(make_cfg([*steps, "trainer.max_steps=2"], run_dir=run))  # resumes its checkpoint: the same W&B run
    assert (run / ".run_id").read_text() == "second\n"
    train(make_cfg([*steps, "ckpt_path=null"], run_dir=run))  # starts again: a new one
    assert not (run / ".run_id").exists()
    assert make_cfg([*steps, "logger=wandb"], run_dir=run).logger.wandb.id not in (
        "second",
        "killedbeforeitsfirstcheckpoint",
    )


def test_shuffle_order_accepts_any_seed_an_unseeded_run_has():
    from imagen.data.resumable import EpochShuffleSampler

    # `seed=null` leaves torch.initial_seed() anywhere in [0, 2**64): the sampler must still draw an order
    sampler = EpochShuffleSampler(10, seed=2**64 - 1)
    assert sorted(sampler) == list(range(10))
    assert list(EpochShuffleSampler(10, seed=3)) == list(EpochShuffleSampler(10, seed=3))


def test_under_ddp_each_process_takes_its_share_of_the_epoch_and_resumes_within_it(monkeypatch):
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    from imagen.data.resumable import EpochShuffleSampler, ResumableLoader

    whole = list(EpochShuffleSampler(11, seed=5))  # one process
    shares = [list(EpochShuffleSampler(11, seed=5, num_replicas=2, rank=rank)) for rank in (0, 1)]
    # interleaved, the one-process order; its 11th item is left out of this epoch (another one in each epoch)
    assert [i for pair in zip(*shares, strict=True) for i in pair] == whole[:10]
    # without drop_last (NER) every item is taken, the first again to fill the last round
    shares = [list(EpochShuffleSampler(11, seed=5, num_replicas=2, rank=r, drop_last=False)) for r in (0, 1)]
    assert [i for pair in zip(*shares, strict=True) for i in pair] == [*whole, whole[0]]

    # as in a process of an initialised group, whose rank 0's seed every process takes
    def loader_of_rank(rank: int, world: int = 2, seed: int = 5) -> ResumableLoader:
        monkeypatch.setattr(dist, "is_initialized", lambda: world > 1)
        monkeypatch.setattr(dist, "get_world_size", lambda: world)
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src: objects.__setitem__(0, 5))
        return ResumableLoader(list(range(11)), batch_size=2, seed=seed)

    shares = [list(EpochShuffleSampler(11, seed=5, num_replicas=2, rank=rank)) for rank in (0, 1)]
    for rank in (0, 1):
        loader = loader_of_rank(rank, seed=rank)  # an unseeded run: each process drew its own
        # Lightning wraps any other sampler in a DistributedSampler of its own, whose position is not checkpointed
        assert isinstance(loader.sampler, DistributedSampler) and len(loader) == 2
        uninterrupted = [b.tolist() for b in loader]
        assert sum(uninterrupted, []) == shares[rank][:4]
        first = next(iter(loader))
        state = loader.state_dict()  # a checkpoint after the first batch (rank 0's is saved; both are alike)
        assert state == {"epoch": 0, "batches": 1, "num_replicas": 2} and first.tolist() == uninterrupted[0]
        resumed = loader_of_rank(rank)
        resumed.load_state_dict(state)
        assert [b.tolist() for b in resumed] == uninterrupted[1:]
    # on one process, the epoch goes on at the batch where Lightning's own count of it resumes
    alone = loader_of_rank(0, world=1)
    alone.load_state_dict({"epoch": 0, "batches": 1, "num_replicas": 2})
    assert [b.tolist() for b in alone] == [whole[2:4], whole[4:6], whole[6:8], whole[8:10]]


def test_a_run_stopped_in_its_test_keeps_its_validation_figures_when_run_again(
    make_cfg, tmp_path, monkeypatch
):
    from imagen.stages.autoencoder import AutoencoderStage

    run = tmp_path / "run"
    overrides = ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "logger=csv",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "optimized_metric=val/psnr"]  # fmt: skip

    def killed(*args, **kwargs):
        raise RuntimeError("killed in the test")

    with monkeypatch.context() as patch:
        patch.setattr(AutoencoderStage, "test_step", killed)
        with pytest.raises(RuntimeError, match="killed in the test"):
            train(make_cfg(overrides, run_dir=run))
    measured = json.loads((run / "metrics.json").read_text())["val/psnr"]
    again, _ = train(make_cfg(overrides, run_dir=run))  # nothing left to train: tested, its val/ figures kept
    assert again["val/psnr"] == measured and "test/psnr" in again


def test_a_run_stopped_early_trains_no_further_when_run_again(make_cfg, tmp_path):
    run = tmp_path / "run"
    overrides = ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "logger=csv",
                 "callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=1",
                 "callbacks.early_stopping.min_delta=100", "trainer.max_steps=20", "trainer.val_check_interval=2"]  # fmt: skip
    first, objects = train(make_cfg(overrides, run_dir=run))
    stopped_at = objects["trainer"].global_step
    assert stopped_at < 20
    again, objects = train(make_cfg(overrides, run_dir=run))
    assert objects["trainer"].global_step == stopped_at
    assert again["test/psnr"] == first["test/psnr"] and again["val/psnr"] == first["val/psnr"]


def test_a_finished_run_run_again_keeps_the_metrics_its_training_measured(make_cfg, tmp_path):
    """`ckpt_path=auto` on a finished run trains nothing (a sweep re-run in a fixed `hydra.sweep.dir`); its
    metrics.json keeps the validation figures, which a sweeper's `optimized_metric` may name."""
    run = tmp_path / "run"
    overrides = ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "logger=csv",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "optimized_metric=val/psnr"]  # fmt: skip
    first, _ = train(make_cfg(overrides, run_dir=run))
    again, objects = train(make_cfg(overrides, run_dir=run))
    assert objects["trainer"].global_step == 2
    assert again["val/psnr"] == first["val/psnr"]
    assert again["time/fit_seconds"] == first["time/fit_seconds"]  # the training's, not the rerun's
    assert json.loads((run / "metrics.json").read_text())["val/psnr"] == first["val/psnr"]
    assert "test/psnr" in again


def test_a_share_of_the_epoch_too_small_for_one_batch_is_refused(monkeypatch):
    """The loader drops a last partial batch: a process whose share holds no full batch would train on nothing
    (Lightning stops with "no training batches", and the run tests its starting weights)."""
    import torch.distributed as dist

    from imagen.data.resumable import ResumableLoader

    assert len(ResumableLoader(list(range(6)), batch_size=4, seed=0)) == 1
    assert len(ResumableLoader(list(range(3)), batch_size=4, seed=0, drop_last=False)) == 1  # NER keeps it
    with pytest.raises(
        ValueError, match=r"data.batch_size=4: the training split has 3 samples \(3 per process"
    ):
        ResumableLoader(list(range(3)), batch_size=4, seed=0)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # rank 1 of 2
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src: None)
    with pytest.raises(ValueError, match=r"6 samples \(3 per process on 2\), too few for one batch"):
        ResumableLoader(list(range(6)), batch_size=4, seed=0)
