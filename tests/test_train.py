"""End-to-end runs through the real entry point's task: compose the configs, fit, test, write outputs."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest

from imagen.checkpoints import export_checkpoint, read_checkpoint
from imagen.cli.train import train
from imagen.data.conll import fixture_dir
from imagen.models.ner import tiny_random_encoder
from tests.conftest import EXPERIMENTS, TINY_SHAPES, train_tiny_stage
from tests.image_text_fixtures import TINY_CORPUS, TINY_TEXT, build_corpora

TINY_AUTOENCODER = ["model.net.size=tiny", "model.net.quantizer=vq"]
# eager blocks (experiment=shapes_generator compiles them; test_compiled_blocks_train_like_eager covers that)
TINY_GENERATOR = ["model.net.size=tiny", "model/text_encoder=scratch", "model.text_encoder.dim=32",
                  "model.eval_prompts=8", "model.test_prompts=8", "model.compute_fid=false",
                  "model.compile=false"]  # fmt: skip
TINY_JOINT = [*TINY_GENERATOR, "model.image_text.size=tiny", "model.rerank.candidates=3"]
# the new-concept fine-tune at tiny sizes (besides TINY_SHAPES and TINY_JOINT)
TINY_NEW_CONCEPT = ["data.num_replay=32", "data.num_val_new=16", "data.num_test_new=16"]


@pytest.fixture(scope="session")
def tiny_autoencoder_ckpt(tmp_path_factory) -> Path:
    """A few steps of the tiny autoencoder: a real stage checkpoint for the stages that build on it."""
    return train_tiny_stage(
        [
            "experiment=shapes_autoencoder",
            *TINY_SHAPES,
            *TINY_AUTOENCODER,
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
        ],  # fmt: skip
        tmp_path_factory.mktemp("tiny_autoencoder"),
    )


@pytest.fixture(scope="session")
def tiny_joint_ckpt(tmp_path_factory, tiny_autoencoder_ckpt) -> Path:
    """A few steps of the tiny joint stage (pre-trained on the six default colors): what fine-tunes start from."""
    overrides = ["experiment=shapes_joint", *TINY_SHAPES, *TINY_JOINT, f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}",
                 "trainer.max_steps=4", "trainer.limit_val_batches=0"]  # fmt: skip
    return train_tiny_stage(overrides, tmp_path_factory.mktemp("tiny_joint"))


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict[str, list[str]]:
    """Small fixtures of every real-corpus format (`data=` override first, then its paths)."""
    return build_corpora(tmp_path_factory.mktemp("corpora"))


@pytest.fixture
def experiment_overrides(tiny_autoencoder_ckpt, tiny_joint_ckpt, cache_dir, corpora):
    """Per experiment, the overrides that make it tiny and offline."""

    def overrides(name: str) -> list[str]:
        if name.startswith(("coco_", "wds_")):  # the experiment picks data=; the fixture gives the paths
            paths = corpora["webdataset" if name.startswith("wds_") else "coco"][1:]
            model = TINY_AUTOENCODER if "autoencoder" in name else [
                *TINY_GENERATOR, *TINY_TEXT, f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}"]  # fmt: skip
            return [f"experiment={name}", *paths, *TINY_CORPUS, *model]
        if name.startswith("ner_"):
            extra = [] if name == "ner_tiny" else [
                f"model.pretrained={tiny_random_encoder(cache_dir / 'ner_tiny_encoder')}",
                f"data.data_dir={fixture_dir()}",
            ]  # fmt: skip
            return [f"experiment={name}", *extra]
        if name == "shapes_finetune_new_concept":  # starts from a joint run; its autoencoder comes with it
            return [f"experiment={name}", *TINY_SHAPES, *TINY_JOINT, *TINY_NEW_CONCEPT,
                    f"model.init_from={tiny_joint_ckpt}"]  # fmt: skip
        tiny = TINY_GENERATOR + [f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}"]
        return [f"experiment={name}", *TINY_SHAPES, *(TINY_AUTOENCODER if "autoencoder" in name else tiny)]

    return overrides


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(make_cfg, experiment_overrides, experiment):
    import lightning.pytorch as pl

    cfg = make_cfg(experiment_overrides(experiment))
    assert cfg.task_name == experiment
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert isinstance(datamodule, pl.LightningDataModule) and isinstance(model, pl.LightningModule)
    assert type(model).__name__ == cfg.model._target_.rsplit(".", 1)[-1] and sum(
        p.numel() for p in model.parameters()
    )


@pytest.mark.parametrize("mode", ["fdr", "limit", "overfit", "profiler"])
def test_debug_modes_run_without_a_logger(make_cfg, experiment_overrides, mode):
    # debug modes have no logger, so the default callbacks' learning-rate monitor must step aside
    steps = [] if mode == "fdr" else ["trainer.max_steps=4", "trainer.val_check_interval=2"]
    cfg = make_cfg([*experiment_overrides("shapes_autoencoder"), f"debug={mode}", *steps])
    assert cfg.task_name == "debug" and cfg.logger is None
    _, objects = train(cfg)
    assert objects["trainer"].state.finished and objects["trainer"].global_step == (1 if mode == "fdr" else 4)
    if mode == "fdr":  # one batch of each split, no checkpoints
        assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))
    if mode == "profiler":  # it times the steps, not anomaly detection
        assert not cfg.trainer.detect_anomaly


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run(make_cfg, experiment_overrides, experiment):
    cfg = make_cfg([*experiment_overrides(experiment), "trainer.fast_dev_run=true", "logger=csv"])
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished
    assert any(k.startswith("test/") for k in metrics)


def test_short_run_writes_checkpoints_metrics_and_grids(make_cfg, experiment_overrides, tmp_path):
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


@pytest.mark.parametrize("stage", ["autoencoder", "generator"])
def test_gradient_clipping_works_with_fused_adamw_under_bf16(make_cfg, experiment_overrides, tmp_path, stage):
    # on a GPU the stages' AdamW is fused; Lightning refuses to clip gradients of such optimizers under mixed
    # precision (they unscale inside step), which stopped both shapes experiments on an H200. Fused AdamW also
    # runs on CPU, so the same path is exercised here.
    cfg = make_cfg(
        [
            *experiment_overrides(f"shapes_{stage}"),
            "+model.optimizer.fused=true",
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=2",
            "test=false",
            "callbacks=none",
            "logger=csv",
        ]  # fmt: skip
    )
    if stage == "autoencoder":
        assert cfg.model.grad_clip
    else:
        assert cfg.trainer.gradient_clip_val
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 2  # Lightning did not refuse clipping the fused optimizer


def test_the_generator_trains_under_bf16_true_with_its_autoencoder_in_float32(make_cfg, experiment_overrides):
    import torch

    cfg = make_cfg([*experiment_overrides("shapes_generator"), "trainer.precision=bf16-true", "trainer.max_steps=2",
                    "test=false", "callbacks=none", "logger=csv"])  # fmt: skip
    _, objects = train(cfg)
    model = objects["model"]
    assert objects["trainer"].global_step == 2 and next(model.net.parameters()).dtype == torch.bfloat16
    # the autoencoder as it was trained: float32, not rounded to bf16 and back
    trained = read_checkpoint(cfg.model.autoencoder_ckpt)["state_dict"]
    for name, value in model.autoencoder.state_dict().items():
        assert value.dtype == trained[f"net.{name}"].dtype and torch.equal(value, trained[f"net.{name}"]), (
            name
        )


@pytest.mark.parametrize("experiment", ["shapes_generator", "shapes_joint"])
@pytest.mark.parametrize("exported", [False, True])
def test_an_image_size_other_than_the_autoencoders_is_warned_about(
    make_cfg, tiny_autoencoder_ckpt, experiment, exported, caplog, tmp_path
):
    checkpoint = read_checkpoint(tiny_autoencoder_ckpt)
    trained = checkpoint["datamodule_hyper_parameters"]["image_size"]
    assert checkpoint["imagen"]["image_size"] == trained  # the stage's own entry, which an export keeps
    path = (
        export_checkpoint(tiny_autoencoder_ckpt, tmp_path / "exported") if exported else tiny_autoencoder_ckpt
    )
    tiny = TINY_JOINT if experiment == "shapes_joint" else TINY_GENERATOR
    for size in (trained, 2 * trained):
        caplog.clear()
        cfg = make_cfg([f"experiment={experiment}", *TINY_SHAPES, *tiny, f"model.autoencoder_ckpt={path}",
                        f"data.image_size={size}"])  # fmt: skip
        with caplog.at_level("WARNING", logger="imagen.checkpoints"):
            hydra.utils.instantiate(cfg.model, _convert_="all")
        warned = f"data.image_size={size}, but the autoencoder model.autoencoder_ckpt={path}"
        assert (f"{warned} was trained at data.image_size={trained}" in caplog.text) == (size != trained)


def test_the_token_cache_encoder_warns_of_another_image_size(tiny_autoencoder_ckpt, tmp_path, caplog):
    from imagen.data.image_text import ImageTextDataModule
    from imagen.data.token_cache import write_token_cache
    from tests.image_text_fixtures import make_pairs, write_image_txt

    trained = read_checkpoint(tiny_autoencoder_ckpt)["imagen"]["image_size"]
    root = write_image_txt(tmp_path / "corpus", make_pairs(6))
    for size in (trained, 2 * trained):
        caplog.clear()
        datamodule = ImageTextDataModule("image_txt", root=str(root), image_size=size, holdout_fraction=0.2)
        with caplog.at_level("WARNING", logger="imagen.checkpoints"):
            write_token_cache(str(tiny_autoencoder_ckpt), datamodule, tmp_path / f"cache{size}", ("val",),
                              device="cpu")  # fmt: skip
        warned = f"data.image_size={size}, but the autoencoder autoencoder_ckpt={tiny_autoencoder_ckpt}"
        assert (f"{warned} was trained at data.image_size={trained}" in caplog.text) == (size != trained)


def clipping_module(precision: str, grouped: bool):
    """A LightningModule with the clipping mixin, two linear layers (`small`, `large`; clipped apart when `grouped`)
    and a stand-in trainer of the given precision."""
    from types import SimpleNamespace

    import lightning.pytorch as pl
    import torch

    from imagen.stages.optim import FusedOptimizerClipping

    class Module(FusedOptimizerClipping, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.small, self.large = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def gradient_clip_groups(self):
            return [list(self.small.parameters()), list(self.large.parameters())] if grouped else None

    module = Module()
    module._trainer = SimpleNamespace(precision=precision)
    return module


def grad_norm(module) -> float:
    import torch

    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))


def test_adamw_is_fused_unless_the_config_chooses():
    import functools

    import torch

    from imagen.stages.optim import build_optimizer

    model = torch.nn.Linear(3, 3)
    chosen = {
        "default": functools.partial(torch.optim.AdamW, lr=1e-3),
        "fused=false": functools.partial(torch.optim.AdamW, fused=False),  # e.g. to clip gradients under fp16
        "foreach=true": functools.partial(torch.optim.AdamW, foreach=True),
    }
    options = {name: build_optimizer(partial, model).defaults for name, partial in chosen.items()}
    assert {name: (o["fused"], o["foreach"]) for name, o in options.items()} == {
        "default": (True, None), "fused=false": (False, None), "foreach=true": (None, True)
    }  # fmt: skip


def test_fused_clipping_clips_the_gradient_norm():
    import torch

    module = clipping_module("bf16-mixed", grouped=False)
    optimizer = torch.optim.AdamW(module.large.parameters(), fused=True)
    (module.large(torch.randn(8, 4)) * 100).sum().backward()
    assert grad_norm(module.large) > 1.5
    module.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert grad_norm(module.large) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize(
    ("precision", "fused"), [("bf16-mixed", True), ("32-true", False), ("16-mixed", False)]
)
def test_gradient_clip_groups_are_clipped_each_on_its_own(precision, fused):
    """A group with a large gradient is clipped without shrinking a small one beside it (the joint stage's
    captioner/matcher beside its generator)."""
    import torch

    module = clipping_module(precision, grouped=True)
    optimizer = torch.optim.AdamW(module.parameters(), fused=fused)
    x = torch.randn(8, 4)
    (module.small(x) * 0.01 + module.large(x) * 100).sum().backward()
    small_before = [p.grad.clone() for p in module.small.parameters()]
    assert grad_norm(module.small) < 0.5 and grad_norm(module.large) > 1.5
    module.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert grad_norm(module.large) == pytest.approx(1.0, rel=1e-4)
    assert all(torch.equal(a, p.grad) for a, p in zip(small_before, module.small.parameters(), strict=True))


def test_ema_keeps_frozen_weights_bit_identical_and_averages_the_trained_ones():
    import warnings

    import lightning.pytorch as pl
    import torch

    from imagen.callbacks import EMAWeights

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.frozen, self.trained = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
            self.frozen.requires_grad_(False)
            self.history: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            return self.trained(self.frozen(batch[0])).square().mean()

        # the weights after each step (not the average)
        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.history.append(self.trained.weight.detach().clone())

        def configure_optimizers(self):
            return torch.optim.SGD(self.trained.parameters(), lr=0.1)

        def configure_model(self):  # as the imagen stages do (weights, adapters, compile; no sharding)
            pass

    torch.manual_seed(0)
    module, data = Module(), torch.utils.data.TensorDataset(torch.randn(32, 4))
    frozen_before = module.frozen.weight.detach().clone()
    trainer = pl.Trainer(max_steps=5, callbacks=[EMAWeights(decay=0.9)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert not [w for w in caught if "sharding" in str(w.message)]  # the parent's warning does not apply
    assert torch.equal(module.frozen.weight, frozen_before)  # Lightning's own update drifts it by rounding
    expected = module.history[0]  # the first update copies, then each one moves a tenth of the way
    for weight in module.history[1:]:
        expected = torch.lerp(expected, weight, 0.1)
    # training ends with the average copied into the module
    assert torch.equal(module.trained.weight, expected)
    with pytest.raises(ValueError, match=r"callbacks.ema.decay must be in \[0, 1\], got 1.5"):
        EMAWeights(decay=1.5)
