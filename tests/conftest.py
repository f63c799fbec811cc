"""Shared fixtures: compose the real configs (with Hydra's config set, so ${hydra:...} resolves)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import imagen.cli.utils  # noqa: F401  (registers the config resolvers)

REPO = Path(__file__).resolve().parents[1]
# single-stage experiments; pipelines (several stages in one command, like quickstart) are tested on their own
EXPERIMENTS = sorted(
    p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml") if "\npipeline:" not in p.read_text()
)

# Tiny data and models so that each end-to-end test takes seconds on a 2-core CPU.
TINY_SHAPES = [
    "data.num_train=128",
    "data.num_val=32",
    "data.num_val_heldout=16",
    "data.num_test=32",
    "data.num_test_heldout=16",
    "data.batch_size=16",
    "data.eval_batch_size=32",
    "data.use_judge=false",
]


def compose_config(overrides: list[str], run_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` as `python train.py <overrides>` would, with its run dir at `run_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="imagen.conf", version_base="1.3"):
        cfg = compose(
            config_name=config_name,
            return_hydra_config=True,
            overrides=[f"hydra.run.dir={run_dir}", *overrides],
        )
    # what hydra.main does at run time: resolve ${hydra:...} against this config
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def train_tiny_stage(overrides: list[str], run: Path) -> Path:
    """Train a stage briefly in `run` (CSV logs, no test, caches inside `run`); returns its last checkpoint."""
    from imagen.cli.train import train

    cfg = compose_config(
        [
            *overrides,
            "test=false",
            "logger=csv",
            "extras.print_config=false",
            f"paths.cache_dir={run / 'cache'}",
        ],
        run,
    )
    train(cfg)
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a shared 2-core machine a second intra-op thread makes each op many times slower (a module
    uses it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "cache"


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    def make(overrides: list[str], config_name: str = "train", run_dir: Path | None = None) -> DictConfig:
        return compose_config(
            [f"paths.cache_dir={cache_dir}", "extras.print_config=false", *overrides],
            run_dir or tmp_path / "run",
            config_name,
        )

    yield make
    GlobalHydra.instance().clear()
