"""The entry points as a user runs them: subprocesses of train.py (DDP simulation, a multirun sweep with W&B, SLURM
launcher config) and the logger configs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, TINY_SHAPES, compose_config
from tests.test_train import (  # noqa: F401  (session fixtures)
    TINY_JOINT,
    TINY_NEW_CONCEPT,
    tiny_autoencoder_ckpt,
    tiny_joint_ckpt,
)


def run_train(
    *overrides: str, cwd: Path, timeout: int = 600, root_env: bool = True
) -> subprocess.CompletedProcess:
    """`python train.py OVERRIDES` in `cwd` (IMAGEN_ROOT set to it, or, without `root_env`, unset: the paths then
    follow the launch directory); past `timeout` seconds (a hung DDP run) its whole process group, the processes DDP
    launched included, is killed and the test fails."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "IMAGEN_ROOT": str(cwd)}
    if not root_env:
        env.pop("IMAGEN_ROOT")
    command = [sys.executable, str(REPO / "train.py"), *overrides]
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"train.py {' '.join(overrides)} ran past {timeout} s; stderr:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_ddp_sim_writes_one_run_directory(tmp_path):
    result = run_train(
        "experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "model.net.quantizer=vq",
        "trainer=ddp_sim", "trainer.max_steps=4", "trainer.val_check_interval=2", "extras.print_config=false",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "logs" / "shapes_autoencoder" / "runs").iterdir())
    assert len(runs) == 1, f"expected one run directory, got {runs}"
    run = runs[0]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.json").is_file()
    assert len(list(run.rglob("metrics.csv"))) == 1, "one set of CSV logs"
    assert len(list(run.glob(".hydra"))) == 1
    assert "test/psnr" in (run / "metrics.json").read_text()


def test_ddp_sim_evaluates_prompt_groups_smaller_than_the_world(tmp_path, tiny_joint_ckpt):  # noqa: F811
    """2 processes. Validation: one prompt per group, so the second process has none to generate for, yet takes
    part in every metric's synchronisation and logs the same keys (the checkpoint callback monitors
    val/judge_acc_new on each). Test: 3 prompts per group, so the processes hold 2 and 1 images for the FID."""
    result = run_train(
        "experiment=shapes_finetune_new_concept", *TINY_SHAPES, *TINY_JOINT, *TINY_NEW_CONCEPT,
        f"model.init_from={tiny_joint_ckpt}", "data.use_judge=true", "data.judge_steps=20",
        "model.eval_prompts=1", "model.test_prompts=3", "model.compute_fid=true", "test_before_fit=false",
        "callbacks.image_logger=null",
        "trainer=ddp_sim", "trainer.max_steps=2",
        "extras.print_config=false", f"paths.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "logs" / "shapes_finetune_new_concept" / "runs").iterdir())
    written = json.loads((run / "metrics.json").read_text())
    for group in ("", "_heldout", "_new"):
        for name in (f"judge_acc{group}", f"judge_acc{group}_recon", f"judge_acc{group}_reranked"):
            assert written[f"val/{name}"] in (0, 1), name  # one prompt: its one image is right or wrong
            assert round(written[f"test/{name}"] * 3, 4) in (0, 1, 2, 3), name  # 3 prompts
        assert 0 <= written[f"val/round_trip{group}"] <= 1
    assert math.isfinite(written["test/fid"])


def test_the_resolved_config_prints_without_a_run_directory(tmp_path):
    # `--cfg job --resolve` composes without setting up a run: the logger's run name and id resolve to ""
    result = run_train("experiment=shapes_autoencoder", "logger=wandb", "--cfg", "job", "--resolve", cwd=tmp_path,
                       timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "run_name: ''" in result.stdout
    assert not list(tmp_path.rglob(".run_id")), "no run directory is made"


def test_slurm_launcher_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_config(["hydra/launcher=slurm", "experiment=shapes_autoencoder", "trainer=ddp", "trainer.devices=4",
                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"], tmp_path)  # fmt: skip
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    # one SLURM task per GPU, which Lightning's SLURMEnvironment picks up
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert launcher["partition"] == "gpu"
    # Lightning's SLURM environment with auto-requeue, surviving trainer=ddp
    assert OmegaConf.to_container(cfg.trainer.plugins) == [
        {"_target_": "lightning.pytorch.plugins.environments.SLURMEnvironment", "auto_requeue": True}
    ]
    # the warning before the time limit is the signal Lightning's requeue and the preemption callback answer (submitit
    # asks for USR2 of its own accord, which its handler answers by requeueing without a checkpoint)

    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from submitit.slurm.slurm import _make_sbatch_string

    sbatch = _make_sbatch_string(command="python train.py", folder=str(tmp_path), signal_delay_s=launcher["signal_delay_s"],
                                 additional_parameters=launcher["additional_parameters"])  # fmt: skip
    requeue = SLURMEnvironment(auto_requeue=True).requeue_signal
    assert f"#SBATCH --signal={requeue.name.removeprefix('SIG')}@90\n" in sbatch
    assert requeue.name in cfg.callbacks.preemption.signals
    # another sbatch option, added as the config's comment says, keeps the signal
    cfg = compose_config(["hydra/launcher=slurm", "experiment=shapes_autoencoder",
                          "+hydra.launcher.additional_parameters.account=lab"], tmp_path)  # fmt: skip
    assert dict(cfg.hydra.launcher.additional_parameters) == {"signal": "USR1@90", "account": "lab"}


def test_multirun_gives_each_job_its_own_wandb_run_and_a_missing_optimized_metric_is_an_error(tmp_path):
    tiny = ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "model.net.quantizer=vq",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false", "extras.print_config=false",
            "logger=many_loggers", "logger.wandb.offline=true"]  # fmt: skip
    # the paths from the launch directory (no IMAGEN_ROOT), even though each job runs in its own (job.chdir)
    result = run_train("-m", *tiny, "seed=1,2", "optimized_metric=val/psnr", "hydra.job.chdir=true", cwd=tmp_path,
                       root_env=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "shapes_autoencoder" / "multiruns").iterdir()
    runs = [list((sweep / job / "wandb").glob("offline-run-*")) for job in ("0", "1")]
    assert [len(r) for r in runs] == [1, 1], runs  # one W&B run per job, in the job's own directory
    assert runs[0][0].name.rsplit("-", 1)[1] != runs[1][0].name.rsplit("-", 1)[1]  # with ids of their own
    for job in ("0", "1"):  # the config the loggers got (the CSV logger's copy)
        logged = OmegaConf.load(sweep / job / "csv" / "hparams.yaml")
        assert logged.paths.log_dir == str(tmp_path / "logs")
        assert logged.run_name == f"shapes_autoencoder/multiruns/{sweep.name}/{job}"
        assert logged.logger.wandb.group == f"shapes_autoencoder/multiruns/{sweep.name}"  # the sweep's own
    missing = run_train(*tiny, "optimized_metric=val/missing", cwd=tmp_path)
    assert missing.returncode != 0
    assert "optimized_metric='val/missing' was not logged" in missing.stderr


def test_every_logger_config_instantiates_and_names_the_run_after_its_directory(tmp_path):
    from imagen.cli.utils import instantiate_loggers

    run_dir = tmp_path / "logs" / "shapes_autoencoder" / "runs" / "2026-12-06_10-00-00_123456"
    cfg = compose_config(["experiment=shapes_autoencoder", "logger=many_loggers", "logger.wandb.offline=true",
                          f"paths.log_dir={tmp_path / 'logs'}"], run_dir)  # fmt: skip
    loggers = {type(logger).__name__: logger for logger in instantiate_loggers(cfg.logger)}
    assert set(loggers) == {"ResumableCSVLogger", "TensorBoardLogger", "WandbLogger"}
    assert cfg.run_name == "shapes_autoencoder/runs/2026-12-06_10-00-00_123456"
    assert loggers["WandbLogger"]._wandb_init["name"] == cfg.run_name
    assert loggers["WandbLogger"]._wandb_init["group"] == "shapes_autoencoder"


def test_a_failed_run_is_marked_failed_in_wandb(monkeypatch, tmp_path):
    import sys
    import types

    from omegaconf import OmegaConf

    from imagen.cli.utils import task_wrapper

    finished = []
    wandb = types.SimpleNamespace(run=object(), finish=lambda exit_code=0: finished.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})

    @task_wrapper
    def failing(cfg):
        raise RuntimeError("diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        failing(cfg)
    assert task_wrapper(lambda cfg: "done")(cfg) == "done"
    assert finished == [1, 0]


def test_runs_started_in_the_same_second_get_directories_of_their_own():
    from hydra import compose, initialize_config_module

    with initialize_config_module("imagen.conf", version_base="1.3"):
        runs = [compose("train", return_hydra_config=True).hydra for _ in range(2)]
    assert runs[0].run.dir != runs[1].run.dir and runs[0].sweep.dir != runs[1].sweep.dir


def test_a_config_error_ends_a_run_with_one_line_and_a_sweep_job_with_its_exception(tmp_path):
    bad = ["experiment=shapes_autoencoder", "model.grad_clip=abc"]
    single = run_train(*bad, cwd=tmp_path, timeout=120)
    message = "model.grad_clip='abc' must be a number"
    assert single.returncode == 1 and f"config error: {message}" in single.stderr
    assert "Traceback" not in single.stderr + single.stdout
    # once: the log record goes to the run's log file alone
    assert (single.stderr + single.stdout).count(message) == 1
    (log_file,) = (tmp_path / "logs").glob("shapes_autoencoder/runs/*/train.log")
    assert f"run refused: {message}" in log_file.read_text()
    assert f"(run directory: {log_file.parent})" in single.stderr  # where the log is
    # a sweeper (Optuna) counts a job's exception as that trial's failure: multirun raises it as usual
    swept = run_train("-m", *bad, cwd=tmp_path, timeout=120)
    assert swept.returncode == 1 and f"ConfigError: {message}" in swept.stderr


@pytest.mark.parametrize("extras_applied", [False, True])
def test_a_run_leaves_out_lightnings_tips_and_its_leafspec_deprecation(extras_applied):
    import logging
    import warnings

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.utilities._pytree import _tree_flatten

    from imagen.cli.utils import LIGHTNING_TIPS, apply_extras

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.removeFilter(LIGHTNING_TIPS)  # an earlier run in this process added it
    records, level = Records(), rank_zero.level
    rank_zero.addHandler(records)
    rank_zero.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if extras_applied:
                apply_extras(OmegaConf.create({"extras": {"print_config": False}}))
            pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
            _tree_flatten(torch.zeros(1))  # builds torch's LeafSpec, as Lightning does on every step
    finally:
        rank_zero.removeHandler(records)
        rank_zero.removeFilter(LIGHTNING_TIPS)
        rank_zero.setLevel(level)
    tips = [m for m in records.messages if m.startswith("💡 Tip:")]
    leafspec = [w for w in caught if "LeafSpec" in str(w.message)]
    assert (not tips and not leafspec) if extras_applied else (tips and leafspec)
