"""End-to-end runs through the real entry point's task: compose the configs, fit, test, write outputs."""

from __future__ import annotations

import json

import hydra
import pytest

from imagen.cli.train import train
from tests.conftest import EXPERIMENTS, TINY_SHAPES

TINY_MODELS = {
    "shapes_autoencoder": ["model.net.size=tiny", "model.net.quantizer=vq"],
}


def experiment_overrides(name: str) -> list[str]:
    return [f"experiment={name}", *TINY_SHAPES, *TINY_MODELS.get(name, [])]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(make_cfg, experiment):
    cfg = make_cfg(experiment_overrides(experiment))
    assert cfg.task_name == experiment
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    assert datamodule is not None and sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run(make_cfg, experiment):
    cfg = make_cfg([*experiment_overrides(experiment), "trainer.fast_dev_run=true", "logger=csv"])
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished
    assert any(k.startswith("test/") for k in metrics)


def test_short_run_writes_checkpoints_metrics_and_grids(make_cfg, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(
        [*experiment_overrides("shapes_autoencoder"), "trainer.max_steps=6", "trainer.val_check_interval=3"],
        run_dir=run,
    )
    metrics, _ = train(cfg)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name.startswith("step_") for p in (run / "checkpoints").iterdir())
    written = json.loads((run / "metrics.json").read_text())
    for key in ("test/psnr", "test/ssim", "test/codebook_usage", "val/psnr"):
        assert key in written and written[key] == pytest.approx(metrics[key])
    assert 0 < written["test/codebook_usage"] <= 1
    grids = list((run / "images" / "val").rglob("*.png"))
    assert grids, "the image logger should write input/reconstruction grids"
    assert (run / "csv" / "metrics.csv").is_file()
