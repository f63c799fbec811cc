"""The entry points as a user runs them: subprocesses of train.py (DDP simulation, SLURM launcher config)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, TINY_SHAPES, compose_config


def run_train(*overrides: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "IMAGEN_ROOT": str(cwd)}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


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
