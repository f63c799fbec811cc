"""Safe loading: no code runs from a checkpoint; the safetensors export samples what the checkpoint samples;
checkpoints of another stage or config fail with the mismatched keys."""

from __future__ import annotations

import os
import random
import shutil
import stat
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import InstantiationException

from imagen.checkpoints import CheckpointError, find_resume_checkpoint, read_checkpoint
from imagen.cli.checks import ConfigError
from imagen.cli.export import main as export_main
from imagen.cli.sample import sample
from imagen.cli.train import train
from tests.conftest import TINY_SHAPES
from tests.image_text_fixtures import write_autoencoder_ckpt
from tests.test_checkpoints import RunsCode
from tests.test_sample import generator_ckpt  # noqa: F401  (module fixture)
from tests.test_train import TINY_AUTOENCODER, TINY_GENERATOR, tiny_autoencoder_ckpt  # noqa: F401


@pytest.fixture
def evil_ckpt(tmp_path) -> tuple[Path, Path]:
    """A checkpoint that creates `marker` when unpickled, shaped like a real stage checkpoint."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"imagen": {"stage": "ar_generator"}, "state_dict": {}, "payload": RunsCode(marker)}, path)
    return path, marker


def test_sample_refuses_a_checkpoint_that_runs_code(make_cfg, tmp_path, evil_ckpt):
    path, marker = evil_ckpt
    cfg = make_cfg(
        [f"ckpt={path}", "prompts=[a red circle]", f"out_dir={tmp_path / 'out'}"], config_name="sample"
    )
    with pytest.raises(CheckpointError, match="refusing it.*trust_checkpoint=true"):
        sample(cfg)
    assert not marker.exists(), "the payload must not have run"


def test_auto_resume_reads_a_trusted_checkpoint_only_when_told(tmp_path, evil_ckpt):
    path, marker = evil_ckpt
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    path.rename(tmp_path / "run" / "checkpoints" / "last.ckpt")
    # refused, reported, skipped
    assert find_resume_checkpoint(tmp_path / "run") is None and not marker.exists()
    found, checkpoint = find_resume_checkpoint(tmp_path / "run", trust=True)  # trust_checkpoint=true
    assert found.name == "last.ckpt" and checkpoint["imagen"]["stage"] == "ar_generator" and marker.exists()


def test_auto_resume_falls_back_past_a_corrupt_file_trusted_or_not(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"global_step": 3, "state_dict": {}}, checkpoints / "step_000003.ckpt")
    os.utime(checkpoints / "step_000003.ckpt", ns=(1, 1))  # older than last.ckpt
    (checkpoints / "last.ckpt").write_bytes(random.Random(0).randbytes(4096))  # a disk error: not even a zip
    for trust in (False, True):
        found, checkpoint = find_resume_checkpoint(tmp_path / "run", trust=trust)
        assert found == checkpoints / "step_000003.ckpt" and checkpoint["global_step"] == 3


@pytest.mark.parametrize("stage", ["autoencoder", "generator"])
def test_init_from_refuses_a_checkpoint_that_runs_code(make_cfg, evil_ckpt, tiny_autoencoder_ckpt, stage):  # noqa: F811
    path, marker = evil_ckpt
    overrides = (
        ["experiment=shapes_autoencoder", *TINY_AUTOENCODER]
        if stage == "autoencoder"
        else [
            "experiment=shapes_generator",
            *TINY_GENERATOR,
            f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}",
        ]
    )
    with pytest.raises(ConfigError, match=r"model.init_from: checkpoint .* refusing it"):
        train(make_cfg([*overrides, *TINY_SHAPES, f"model.init_from={path}"]))
    assert not marker.exists(), "the payload must not have run"


def test_export_samples_the_same_images(make_cfg, generator_ckpt, tmp_path):  # noqa: F811
    exported = tmp_path / "exported"
    export_main([str(generator_ckpt), str(exported)])
    assert sorted(p.name for p in exported.iterdir()) == ["config.yaml", "model.safetensors"]
    images = {}
    for name, ckpt in (("checkpoint", generator_ckpt), ("export", exported)):
        cfg = make_cfg([f"ckpt={ckpt}", "prompts=[a small red circle,a large blue square]", "n=2", "seed=3",
                        f"out_dir={tmp_path / name}"], config_name="sample")  # fmt: skip
        sample(cfg)
        images[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name / "images").glob("*.png"))}
    assert len(images["checkpoint"]) == 4 and images["checkpoint"] == images["export"]


def test_exported_weights_get_a_new_files_permissions(generator_ckpt, tmp_path):  # noqa: F811
    umask = os.umask(0o027)
    try:
        export_main([str(generator_ckpt), str(tmp_path / "exported")])
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "exported").iterdir()}
    assert modes == {"config.yaml": 0o640, "model.safetensors": 0o640}


@pytest.fixture
def autoencoder_ckpt(tmp_path) -> Path:
    """An untrained autoencoder-stage checkpoint: enough to export."""
    return write_autoencoder_ckpt(tmp_path / "ae.ckpt")


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("out", ["notes.txt", "notes.txt/exported"])
def test_export_into_a_file_is_refused_naming_it(autoencoder_ckpt, tmp_path, out):
    (tmp_path / "notes.txt").write_text("notes")
    with pytest.raises(
        NotADirectoryError, match=f"OUT_DIR {tmp_path / out}: {tmp_path / 'notes.txt'} is a file"
    ):
        export_main([str(autoencoder_ckpt), str(tmp_path / out)])
    assert (tmp_path / "notes.txt").read_text() == "notes"


@pytest.mark.parametrize("earlier", ["autoencoder", "ar_generator", "weights only"])
def test_export_refuses_a_folder_holding_an_export_unless_overwrite(autoencoder_ckpt, tmp_path, earlier):
    exported = tmp_path / "exported"
    if earlier == "autoencoder":
        export_main([str(autoencoder_ckpt), str(exported)])
    else:  # another stage's export, or one with its config lost
        exported.mkdir()
        (exported / "model.safetensors").write_bytes(b"earlier weights")
        if earlier == "ar_generator":
            (exported / "config.yaml").write_text("imagen:\n  stage: ar_generator\n")
    (exported / "NOTES.md").write_text("kept")
    before = folder_files(exported)
    stage = "" if earlier == "weights only" else f" of the {earlier} stage"
    refusal = (
        rf"OUT_DIR {exported} already holds an export{stage} \(model.safetensors.*\); .* pass --overwrite"
    )
    with pytest.raises(FileExistsError, match=refusal):
        export_main([str(autoencoder_ckpt), str(exported)])
    assert folder_files(exported) == before, "a refused export writes nothing"
    export_main([str(autoencoder_ckpt), str(exported), "--overwrite"])
    assert sorted(folder_files(exported)) == ["NOTES.md", "config.yaml", "model.safetensors"]
    assert read_checkpoint(exported)["imagen"]["stage"] == "autoencoder"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failed_export_leaves_no_half_export(autoencoder_ckpt, tmp_path, monkeypatch, overwrite):
    """Weights without their config (or beside another export's) never stay behind: an earlier export is kept."""
    import imagen.checkpoints as checkpoints

    exported = tmp_path / "exported"
    if overwrite:
        export_main([str(autoencoder_ckpt), str(exported)])
    before = folder_files(exported) if overwrite else {}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.yaml, "safe_dump", disk_full)  # after the weights are written
    other = write_autoencoder_ckpt(tmp_path / "other.ckpt", size="shapes")
    with pytest.raises(OSError, match="No space left"):
        export_main([str(other), str(exported), *(["--overwrite"] if overwrite else [])])
    assert (folder_files(exported) if exported.exists() else {}) == before


@pytest.mark.parametrize("size", [5_000, 20_000, 50_000])
def test_a_truncated_checkpoint_is_named_and_resuming_falls_back(generator_ckpt, tmp_path, size):  # noqa: F811
    """Some cuts make torch's zip reader fail with a bare `OSError: [Errno 22] Invalid argument`."""
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(generator_ckpt, checkpoints / "step_000003.ckpt")
    last = checkpoints / "last.ckpt"
    last.write_bytes(generator_ckpt.read_bytes()[:size])
    os.utime(checkpoints / "step_000003.ckpt", ns=(1, 1))  # older than last.ckpt
    with pytest.raises(CheckpointError, match=f"checkpoint {last} is truncated or corrupt"):
        read_checkpoint(last)
    found, checkpoint = find_resume_checkpoint(tmp_path / "run")
    assert found == checkpoints / "step_000003.ckpt" and checkpoint["global_step"] == 3


def test_init_from_checks_stage_and_config(make_cfg, tiny_autoencoder_ckpt):  # noqa: F811
    # a checkpoint of another stage
    cfg = make_cfg(["experiment=shapes_generator", *TINY_SHAPES, *TINY_GENERATOR,
                    f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}", f"model.init_from={tiny_autoencoder_ckpt}"])  # fmt: skip
    # the generator family loads `init_from` when the trainer configures the model (a subclass's modules exist then)
    generator = hydra.utils.instantiate(cfg.model, _convert_="all")
    with pytest.raises(CheckpointError, match="is from the 'autoencoder' stage; expected a 'ar_generator'"):
        generator.configure_model()
    # the same stage with another network size: the differing settings are named, before any key is compared
    # (hydra wraps what the stage raises in an InstantiationException that repeats its message)
    cfg = make_cfg(["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=shapes",
                    f"model.init_from={tiny_autoencoder_ckpt}"])  # fmt: skip
    with pytest.raises(InstantiationException, match="holds an autoencoder configured differently") as e:
        hydra.utils.instantiate(cfg.model, _convert_="all")
    message = str(e.value.__cause__)  # the stage's ValueError
    assert "\n  model.net.channels: checkpoint 16, this run 32" in message
    assert "\n  model.net.quantizer: checkpoint 'vq', this run 'fsq'" in message
    # the matching config loads every weight
    cfg = make_cfg(["experiment=shapes_autoencoder", *TINY_SHAPES, *TINY_AUTOENCODER,
                    f"model.init_from={tiny_autoencoder_ckpt}"])  # fmt: skip
    stage = hydra.utils.instantiate(cfg.model, _convert_="all")
    saved = torch.load(tiny_autoencoder_ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[f"net.{k}"]) for k, v in stage.net.state_dict().items())


def test_init_from_starts_a_joint_run_from_another_joint_run(make_cfg, tmp_path, tiny_autoencoder_ckpt):  # noqa: F811
    from tests.test_joint import TINY_JOINT

    base = [
        "experiment=shapes_joint",
        *TINY_SHAPES,
        *TINY_JOINT,
        f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}",
    ]
    # the run validates at its last step; the tiny data has no judge, so the checkpoint watches the likelihood
    overrides = ["trainer.max_steps=2", "test=false", "logger=csv", "callbacks.model_checkpoint.monitor=val/nll_bits",
                 "callbacks.model_checkpoint.mode=min"]  # fmt: skip
    train(make_cfg([*base, *overrides], run_dir=tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    joint = hydra.utils.instantiate(make_cfg([*base, f"model.init_from={ckpt}"]).model, _convert_="all")
    joint.configure_model()
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for prefix in ("net.", "text_encoder.", "image_text."):  # every trained module, the joint stage's own too
        module = joint.get_submodule(prefix.rstrip("."))
        weights = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
        assert weights and all(torch.equal(v, saved[prefix + k]) for k, v in weights.items())


@pytest.mark.parametrize("config", ["", "just a string\n", "stage: autoencoder\n"])
def test_an_export_whose_config_is_empty_or_foreign_is_named(autoencoder_ckpt, tmp_path, config):
    exported = tmp_path / "exported"
    export_main([str(autoencoder_ckpt), str(exported)])
    (exported / "config.yaml").write_text(config)
    with pytest.raises(
        CheckpointError, match=f"exported checkpoint {exported}: config.yaml has no 'imagen' entry"
    ):
        read_checkpoint(exported)
