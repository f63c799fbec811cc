"""`python train.py` runs the quickstart pipeline: every stage in order, a summary table, reuse on a rerun."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import open_dict, read_write

from imagen.cli.pipeline import STAGE_RECORD
from imagen.cli.train import train
from tests.conftest import TINY_SHAPES, compose_config
from tests.test_cli import run_train
from tests.test_joint import TINY_JOINT
from tests.test_train import TINY_AUTOENCODER

SHORT = ["trainer.max_steps=4", "trainer.val_check_interval=4", "logger=csv"]


def quickstart_cfg(make_cfg, tmp_path, stages: dict[str, list[str]]):
    # no experiment: the default is the quickstart
    cfg = make_cfg([f"pipeline.dir={tmp_path / 'quickstart'}"])
    with open_dict(cfg):
        cfg.pipeline.stages = stages
    return cfg


def tiny_stages() -> dict[str, list[str]]:
    return {
        "autoencoder": ["experiment=shapes_autoencoder", *TINY_SHAPES, *TINY_AUTOENCODER, *SHORT],
        "joint": ["experiment=shapes_joint", *TINY_SHAPES, *TINY_JOINT, *SHORT,
                      "model.autoencoder_ckpt={autoencoder}", "callbacks.model_checkpoint.monitor=val/nll_bits",
                      "callbacks.model_checkpoint.mode=min"],
    }  # fmt: skip


def test_quickstart_trains_each_stage_then_reuses_them(make_cfg, tmp_path, capsys, caplog):
    cfg = quickstart_cfg(make_cfg, tmp_path, tiny_stages())
    assert cfg.task_name == "quickstart"
    metrics, objects = train(cfg)
    root = tmp_path / "quickstart"
    assert [r["stage"] for r in objects["rows"]] == ["autoencoder", "joint"]
    assert not any(r["reused"] for r in objects["rows"])
    # the joint model was built on the autoencoder the pipeline had just trained
    joint_cfg = objects["stages"]["joint"]["cfg"]
    assert joint_cfg.model.autoencoder_ckpt == str(root / "autoencoder" / "checkpoints" / "last.ckpt")
    assert "autoencoder/test/psnr" in metrics and "joint/test/nll_bits" in metrics
    assert metrics["test/psnr"] == metrics["autoencoder/test/psnr"]  # the final keys, each from its stage
    assert metrics["test/nll_bits"] == metrics["joint/test/nll_bits"]
    summary = (root / "summary.md").read_text()
    assert summary.splitlines()[0].startswith("| stage | minutes | reused | PSNR")
    assert "| autoencoder |" in summary and "| joint |" in summary
    assert objects["grid"] is not None and objects["grid"].is_file() and str(objects["grid"]) in summary
    assert summary in capsys.readouterr().out + "\n"
    assert json.loads((root / "metrics.json").read_text()) == pytest.approx(metrics)

    # the same command again: nothing is trained, the table is rebuilt from the finished runs
    again, objects = train(quickstart_cfg(make_cfg, tmp_path, tiny_stages()))
    assert all(r["reused"] for r in objects["rows"]) and objects["stages"] == {}
    assert again == metrics
    assert "by older code" not in (root / "summary.md").read_text()

    # a stage trained by other code (imagen/ edited since) is reused, and the warning and the summary say so
    record_file = root / "joint" / "pipeline_stage.yaml"
    record = yaml.safe_load(record_file.read_text())
    record_file.write_text(yaml.safe_dump({**record, "source": "digest-of-older-code"}))
    with caplog.at_level(logging.WARNING, logger="imagen"):
        _, objects = train(quickstart_cfg(make_cfg, tmp_path, tiny_stages()))
    assert [r["reused"] for r in objects["rows"]] == [True, True]
    assert "stage joint in" in caplog.text and "may have been trained by other code: imagen/" in caplog.text
    assert "stage autoencoder in" not in caplog.text
    assert (
        "| joint | " in (summary := (root / "summary.md").read_text()) and "| yes, by older code |" in summary
    )
    # a record of an earlier version, without a digest: the warning says so
    record_file.write_text(yaml.safe_dump({k: v for k, v in record.items() if k != "source"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imagen"):
        _, objects = train(quickstart_cfg(make_cfg, tmp_path, tiny_stages()))
    assert [r["reused"] for r in objects["rows"]] == [True, True]
    assert "written by an earlier version, has no source digest" in caplog.text
    record_file.write_text(yaml.safe_dump(record))

    # a stage whose composed config differs from the finished run's (a default changed in conf/ since) runs again
    record_file.write_text(yaml.safe_dump({**record, "settings": "written-by-other-conf"}))
    _, objects = train(quickstart_cfg(make_cfg, tmp_path, tiny_stages()))
    assert [r["reused"] for r in objects["rows"]] == [True, False]
    assert yaml.safe_load(record_file.read_text())["settings"] == record["settings"]

    # a changed stage is trained again; the stages before it are still reused
    stages = tiny_stages()
    stages["joint"] = [*stages["joint"], "model.cond_drop_prob=0.2"]
    _, objects = train(quickstart_cfg(make_cfg, tmp_path, stages))
    assert [r["reused"] for r in objects["rows"]] == [True, False]
    # the earlier joint run was moved aside, not mixed into the new one
    assert (root / "joint.previous" / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (root / "joint" / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]

    # an earlier stage trained again: the stages built on its checkpoint are trained again too
    stages["autoencoder"] = [*stages["autoencoder"], "seed=7"]
    _, objects = train(quickstart_cfg(make_cfg, tmp_path, stages))
    assert [r["reused"] for r in objects["rows"]] == [False, False]

    # pipeline.reuse=false trains every stage afresh: a finished run is moved aside, never resumed
    finished_ckpt = (root / "joint" / "checkpoints" / "last.ckpt").read_bytes()
    cfg = quickstart_cfg(make_cfg, tmp_path, stages)
    cfg.pipeline.reuse = False
    with caplog.at_level(logging.INFO, logger="imagen"):
        _, objects = train(cfg)
    assert [r["reused"] for r in objects["rows"]] == [False, False]
    assert (root / "joint.previous" / "checkpoints" / "last.ckpt").read_bytes() == finished_ckpt
    assert "resuming from" not in caplog.text


def test_a_failed_variant_never_costs_the_finished_stage_and_switching_back_reuses_it(
    make_cfg, tmp_path, caplog
):
    from unittest import mock

    root, first = tmp_path / "quickstart", {"autoencoder": tiny_stages()["autoencoder"]}
    variant = {"autoencoder": [*first["autoencoder"], "seed=7"]}
    train(quickstart_cfg(make_cfg, tmp_path, first))
    finished_ckpt = (root / "autoencoder" / "checkpoints" / "last.ckpt").read_bytes()
    # a variant refused by the config checks moves nothing
    with pytest.raises(ValueError, match="trainer.max_steps"):
        train(
            quickstart_cfg(
                make_cfg, tmp_path, {"autoencoder": [*variant["autoencoder"], "trainer.max_steps=1.5"]}
            )
        )
    assert not (root / "autoencoder.previous").exists()
    # a variant that fails before its first checkpoint (a GPU missing, a crash in setup) leaves a stub behind ...
    with (
        mock.patch("imagen.cli.train.train", side_effect=RuntimeError("no GPU")),
        pytest.raises(RuntimeError, match="^no GPU$"),
    ):
        train(quickstart_cfg(make_cfg, tmp_path, variant))
    stub = yaml.safe_load((root / "autoencoder" / STAGE_RECORD).read_text())
    assert not stub["finished"] and not (root / "autoencoder" / "checkpoints" / "last.ckpt").exists()
    # ... which neither replaces the finished run nor makes the first command train again
    with caplog.at_level(logging.INFO, logger="imagen"):
        _, objects = train(quickstart_cfg(make_cfg, tmp_path, first))
    assert [r["reused"] for r in objects["rows"]] == [True]
    assert (root / "autoencoder" / "checkpoints" / "last.ckpt").read_bytes() == finished_ckpt
    # the variant trains (the first run moved aside), and the first command brings that run back
    train(quickstart_cfg(make_cfg, tmp_path, variant))
    _, objects = train(quickstart_cfg(make_cfg, tmp_path, first))
    assert [r["reused"] for r in objects["rows"]] == [True]
    assert (root / "autoencoder" / "checkpoints" / "last.ckpt").read_bytes() == finished_ckpt
    assert yaml.safe_load((root / "autoencoder.previous" / STAGE_RECORD).read_text())["finished"]
    # an interrupted stage of the same settings resumes, except under pipeline.reuse=false, which starts afresh
    record_file = root / "autoencoder" / STAGE_RECORD
    record_file.write_text(yaml.safe_dump({**yaml.safe_load(record_file.read_text()), "finished": False}))
    cfg = quickstart_cfg(make_cfg, tmp_path, first)
    cfg.pipeline.reuse = False
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imagen"):
        _, objects = train(cfg)
    assert [r["reused"] for r in objects["rows"]] == [False] and "resuming from" not in caplog.text


def test_a_signal_as_a_stage_finishes_keeps_the_next_stage_from_starting(make_cfg, tmp_path):
    stages = tiny_stages()
    stages["autoencoder"] = [*stages["autoencoder"], "callbacks.image_logger=null",
                             "+callbacks.signal._target_=tests.test_faults.SignalInLastValidation"]  # fmt: skip
    _, objects = train(quickstart_cfg(make_cfg, tmp_path, stages))
    assert objects.get("preempted") and list(objects["stages"]) == ["autoencoder"]
    root = tmp_path / "quickstart"
    assert yaml.safe_load((root / "autoencoder" / STAGE_RECORD).read_text())["finished"]
    assert not (root / "joint").exists()
    # the same command goes on: the finished stage is reused, the next one trains
    _, objects = train(quickstart_cfg(make_cfg, tmp_path, stages))
    assert [r["reused"] for r in objects["rows"]] == [True, False]


def test_a_stage_cannot_use_a_later_one(make_cfg, tmp_path):
    stages = tiny_stages()
    stages = {"joint": stages["joint"], "autoencoder": stages["autoencoder"]}
    with pytest.raises(ValueError, match=r"pipeline.stages.joint: .* refers to stage 'autoencoder'"):
        train(quickstart_cfg(make_cfg, tmp_path, stages))


@pytest.fixture
def no_training(monkeypatch):
    """A stage that starts training fails the test: the pipeline's config errors come before the first one."""
    import imagen.cli.train

    def fake_train(stage_cfg):
        raise AssertionError(f"a stage trained in {stage_cfg.paths.output_dir}")

    monkeypatch.setattr(imagen.cli.train, "train", fake_train)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pipeline.reuse=no"], "pipeline.reuse='no' must be a boolean"),
        (
            ["pipeline.common='trainer.max_steps=3'"],
            "pipeline.common='trainer.max_steps=3' must be a list of overrides",
        ),
        (
            ["pipeline.stages.autoencoder='experiment=shapes_autoencoder'"],
            "pipeline.stages.autoencoder='experiment=shapes_autoencoder' must be a list of overrides",
        ),
        (["~pipeline.stages.joint", "~pipeline.stages.autoencoder"], "pipeline.stages is empty"),
    ],
    ids=["reuse-string", "common-string", "stage-string", "no-stages"],
)
def test_pipeline_settings_of_the_wrong_kind_are_refused(make_cfg, tmp_path, no_training, overrides, message):
    from imagen.cli.checks import ConfigError

    root = tmp_path / "quickstart"
    cfg = make_cfg([f"pipeline.dir={root}", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(cfg)
    assert not root.exists()


def test_a_pipeline_dir_that_is_a_file_is_refused(make_cfg, tmp_path, no_training):
    from imagen.cli.checks import ConfigError

    (tmp_path / "afile").write_text("")
    cfg = make_cfg([f"pipeline.dir={tmp_path / 'afile'}"])
    with pytest.raises(
        ConfigError, match=re.escape(f"pipeline.dir={tmp_path / 'afile'}: {tmp_path / 'afile'} is a file")
    ):
        train(cfg)


@pytest.mark.parametrize(
    ("joint", "message"),
    [
        (
            ["experiment=shapes_joint", "model.autoencoder_ckpt={autoencodr}"],
            "pipeline.stages.joint: 'model.autoencoder_ckpt={autoencodr}' refers to stage 'autoencodr', which this "
            "pipeline does not have; its stages: ['autoencoder', 'joint']",
        ),
        (
            ["experiment=shapes_jont"],
            "pipeline.stages.joint (its overrides, then pipeline.common's): In 'train': Could not find "
            "'experiment/shapes_jont'",
        ),
        (["experiment=shapes_joint", "model.no_such_key=1"], "pipeline.stages.joint (its overrides"),
        (["trainer.max_steps=3"], "pipeline.stages.joint must select a stage's experiment (experiment=NAME)"),
        (
            ["experiment=shapes_joint", "model.autoencoder_ckpt={autoencoder}", "model.optimizer.lr=-1"],
            "pipeline.stages.joint: model.optimizer.lr=-1 must be >= 0",
        ),
    ],
    ids=["unknown-stage-reference", "unknown-experiment", "unknown-key", "no-experiment", "bad-value"],
)
def test_a_bad_later_stage_is_refused_before_the_first_stage_trains(
    make_cfg, tmp_path, no_training, joint, message
):
    from imagen.cli.checks import ConfigError

    stages = {"autoencoder": tiny_stages()["autoencoder"], "joint": joint}
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(quickstart_cfg(make_cfg, tmp_path, stages))
    assert not (tmp_path / "quickstart" / "autoencoder").exists()


def test_overrides_the_pipeline_would_ignore_are_refused(tmp_path):
    from tests.test_cli import run_train

    result = run_train("model.net.quantizer=vq", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert (
        "['model.net.quantizer=vq']: the quickstart pipeline does not pass these to its stages"
        in result.stderr
    )
    assert "experiment=shapes_autoencoder model.net.quantizer=vq" in result.stderr
    # the other way it names parses as a command-line override (each list item quoted: '=' ends a bare value)
    hint = "'pipeline.common=[\"model.net.quantizer=vq\"]'"
    assert hint in result.stderr
    cfg = compose_config([hint.strip("'")], tmp_path)
    assert list(cfg.pipeline.common) == ["model.net.quantizer=vq"]
    # the metric a sweeper optimizes is read from the pipeline's own config (its merged test metrics)
    from imagen.cli.pipeline import ignored_overrides

    assert ignored_overrides(["optimized_metric=test/judge_acc", "model.lr=1e-3"]) == ["model.lr=1e-3"]


def test_stage_overrides_quote_paths_that_the_override_grammar_would_parse(tmp_path):
    # a launch directory such as `exp(1)`, or a Hydra sweep folder named `lr=0.1,seed=2`, in every path a stage gets
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from imagen.cli.pipeline import override_value, stage_overrides

    root = tmp_path / "exp(1) lr=0.1,seed=2 it's"
    cfg = compose_config([f"paths.root_dir={override_value(str(root))}"], tmp_path / "run")
    ckpt = str(root / "logs" / "quickstart" / "autoencoder" / "checkpoints" / "last.ckpt")
    overrides = stage_overrides(cfg, "joint", {"autoencoder": ckpt}, root / "logs" / "quickstart" / "joint")
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert parsed["model.autoencoder_ckpt"] == ckpt
    assert parsed["paths.root_dir"] == str(root)
    assert parsed["paths.log_dir"] == str(root / "logs")
    assert parsed["hydra.run.dir"] == str(root / "logs" / "quickstart" / "joint")
    # a path the grammar reads back as it is stays unquoted, so the stage records of earlier runs still match
    for plain in ("/Users/Jane Doe/imagen", "/data/run-1/last.ckpt", r"C:\runs\a"):
        assert override_value(plain) == plain


def test_each_job_of_a_quickstart_sweep_keeps_its_stages_in_its_own_directory(tmp_path):
    """`python train.py -m 'pipeline.common=["seed=1"],["seed=2"]'`: one shared `pipeline.dir` would have each job
    move aside and delete the stages of the job before it. A `pipeline.dir` given on the command line is kept."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from imagen.cli.pipeline import pipeline_root

    for extra, expected in (
        ([], tmp_path / "job"),
        ([f"pipeline.dir={tmp_path / 'mine'}"], tmp_path / "mine"),
    ):
        cfg = compose_config(['pipeline.common=["seed=1"]', *extra], tmp_path / "job")
        assert pipeline_root(cfg) == Path(cfg.pipeline.dir)  # a single run: the fixed folder
        with read_write(cfg.hydra), open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.overrides.task = ['pipeline.common=["seed=1"]', *extra]
        HydraConfig().set_config(cfg)
        assert pipeline_root(cfg) == expected


def test_the_command_lines_tags_and_extras_reach_every_stage_without_retraining_it(tmp_path, monkeypatch):
    """`python train.py tags=[baseline] extras.print_config=false`: each stage's run is tagged (W&B) and reports as
    asked; a stage that finished under other tags is reused, not trained again."""
    import imagen.cli.pipeline
    import imagen.cli.train
    from imagen.cli.pipeline import run_pipeline

    stage_runs = []

    def fake_train(stage_cfg):  # records what each stage was given and leaves a finished run
        stage_runs.append((list(stage_cfg.tags), stage_cfg.extras.print_config))
        run_dir = Path(stage_cfg.paths.output_dir)
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        (run_dir / "metrics.json").write_text('{"test/psnr": 30.0}')
        return {"test/psnr": 30.0}, {}

    monkeypatch.setattr(imagen.cli.train, "train", fake_train)
    # the stage's config checks read the upstream checkpoint, which the fake training only pretends to write
    monkeypatch.setattr(imagen.cli.pipeline, "check_train_config", lambda stage_cfg, pending=(): None)
    monkeypatch.setattr(imagen.cli.pipeline, "check_input_checkpoints", lambda stage_cfg: None)
    for tags, trained in (("[baseline]", [(["baseline"], False)] * 2), ("[other]", [])):
        stage_runs.clear()
        cfg = compose_config(
            [f"pipeline.dir={tmp_path / 'quickstart'}", f"tags={tags}", "extras.print_config=false"],
            tmp_path / "run",
        )
        _, objects = run_pipeline(cfg)
        assert stage_runs == trained
        assert [r["reused"] for r in objects["rows"]] == [not trained] * 2
    record = yaml.safe_load((tmp_path / "quickstart" / "joint" / STAGE_RECORD).read_text())
    assert not any(o.startswith(("tags", "extras")) for o in record["overrides"])


def test_under_ddp_only_the_launching_process_touches_the_stage_directories(tmp_path, monkeypatch):
    """Every DDP process runs the pipeline: another process waits for rank 0 to decide on each stage (its record,
    stamped with this command's launch id), then trains beside it, and moves, deletes and writes nothing. With
    `pipeline.reuse=false` it deleted rank 0's run; and a finished record of the same settings left by an earlier
    command must not pass for this command's."""
    import threading
    import time

    from lightning.pytorch.utilities import rank_zero_only

    import imagen.cli.pipeline
    import imagen.cli.train
    from imagen.cli.pipeline import prepare_run_dir, read_record, run_pipeline

    trained = []

    def fake_train(stage_cfg):
        trained.append(rank_zero_only.rank)
        return {"test/psnr": 30.0}, {}

    monkeypatch.setattr(imagen.cli.train, "train", fake_train)
    monkeypatch.setattr(imagen.cli.pipeline, "check_train_config", lambda stage_cfg, pending=(): None)
    monkeypatch.setattr(imagen.cli.pipeline, "check_input_checkpoints", lambda stage_cfg: None)
    monkeypatch.delenv("IMAGEN_LAUNCH_ID", raising=False)
    cfg = compose_config([f"pipeline.dir={tmp_path / 'q'}", "pipeline.reuse=false"], tmp_path / "run")
    with open_dict(cfg):
        cfg.pipeline.stages = {"autoencoder": ["experiment=shapes_autoencoder"]}
    run_dir = tmp_path / "q" / "autoencoder"
    run_pipeline(cfg)  # an earlier command, as rank 0: trains the stage and records it finished
    earlier = read_record(run_dir)
    assert earlier["finished"] and earlier["launch"] == os.environ["IMAGEN_LAUNCH_ID"]
    (tmp_path / "q" / "summary.md").unlink()
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")

    monkeypatch.setenv("IMAGEN_LAUNCH_ID", "this-command")  # what rank 0 of the next command passes on
    settings = earlier["overrides"], earlier["settings"], earlier["inputs"]

    def rank_0_prepares():  # reuse=false: moves the finished run aside and starts afresh
        time.sleep(1.5)
        prepare_run_dir(run_dir, *settings, fresh=True, launch="this-command")

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    preparing = threading.Thread(target=rank_0_prepares)
    start = time.time()
    preparing.start()
    run_pipeline(cfg)
    preparing.join()
    assert time.time() - start >= 1.5 and trained == [
        0,
        1,
    ]  # it waited for this command's record, then trained
    record = read_record(run_dir)
    assert record["launch"] == "this-command" and not record["finished"]  # rank 0's, untouched
    assert not (tmp_path / "q" / "summary.md").exists()
    assert (tmp_path / "q" / "autoencoder.previous" / "checkpoints" / "last.ckpt").is_file()


def test_the_pipeline_under_ddp_takes_lightning_s_own_launcher_only(tmp_path, monkeypatch):
    """Processes started apart (torchrun, srun with several tasks, another node) cannot tell this command's stage
    records from an earlier command's: the pipeline refuses them, and points to the stages one by one."""
    from lightning.pytorch.utilities import rank_zero_only

    from imagen.cli.pipeline import run_pipeline

    cfg = compose_config([f"pipeline.dir={tmp_path / 'q'}"], tmp_path / "run")
    monkeypatch.delenv("IMAGEN_LAUNCH_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ValueError, match="runs under DDP only with Lightning's own launcher on one node"):
        run_pipeline(cfg)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # a rank not started by this command's launching process
    with pytest.raises(ValueError, match="train the stages one by one there .experiment=NAME."):
        run_pipeline(cfg)
    assert not (tmp_path / "q").exists()


def test_a_quickstart_sweep_runs_each_job_in_its_own_directory(tmp_path):
    """`python train.py -m 'pipeline.common=["seed=1"],["seed=2"]'` end to end (a one-stage pipeline)."""
    from tests.test_cli import run_train

    stage = ["experiment=shapes_autoencoder", *TINY_SHAPES, *TINY_AUTOENCODER, "trainer.max_steps=2",
             "trainer.val_check_interval=2", "extras.print_config=false"]  # fmt: skip
    stages = "pipeline.stages={autoencoder: [" + ", ".join(json.dumps(o) for o in stage) + "]}"
    result = run_train("-m", stages, "~pipeline.stages.joint", 'pipeline.common=["seed=1"],["seed=2"]',
                       "extras.print_config=false", cwd=tmp_path, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "logs" / "quickstart" / "multiruns").glob("*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job, seed in zip(jobs, (1, 2), strict=True):
        assert (job / "autoencoder" / "checkpoints" / "last.ckpt").is_file() and (
            job / "summary.md"
        ).is_file()
        assert f"seed={seed}" in yaml.safe_load((job / "autoencoder" / STAGE_RECORD).read_text())["overrides"]
    assert not (tmp_path / "logs" / "quickstart" / "autoencoder").exists()


SETTINGS = {
    "model": {"image_code_vectors": True, "net": {"dim": 256, "grid": [8, 8]}},
    "paths": {"out": "${hydra:runtime.cwd}"},
}


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c["model"].update(image_code_vectors=False),  # a top-level flag
        lambda c: c["model"]["net"].update(dim=257),  # a nested value
        lambda c: c["model"]["net"]["grid"].__setitem__(1, 16),  # a list item
        lambda c: c["model"]["net"].update(width=c["model"]["net"].pop("dim")),  # a renamed key
        lambda c: c["paths"].update(out="${hydra:runtime.output_dir}"),  # an interpolation, unresolved
    ],
    ids=["flag", "nested", "list item", "renamed key", "interpolation"],
)
def test_the_settings_digest_follows_every_value_of_the_composed_config(change):
    import copy

    from omegaconf import OmegaConf

    from imagen.cli.pipeline import settings_digest

    changed = copy.deepcopy(SETTINGS)
    change(changed)
    assert settings_digest(OmegaConf.create(SETTINGS)) != settings_digest(OmegaConf.create(changed))


# The regression guard. The quickstart's joint stage (1800 steps since session 18) measured 85.9% and 85.5%
# seen-composition judge accuracy on 2 CPU cores, and 83.2% and 83.6% with another seed (BENCHMARKS.md, sessions 18-19).
QUICKSTART_MIN_JUDGE_ACC = 0.80
# Targets the quickstart meets (session 18: R@1 text->image 98.3%, caption accuracy 99.5%), guarded at the issue's
# figures. The causal cross-attention bug of earlier sessions held captions at 93.9% and R@1 at 92.3%.
QUICKSTART_MIN = {"test/recall_at_1_t2i": 0.95, "test/caption_acc": 0.95}


# The quickstart shortened to fit the suite on any CPU (about 5.5 minutes on 2 cores without AMX): its real configs and
# sizes, but 400 autoencoder and 300 joint steps (of 2000 and 1800), a quarter of the test split and no judge (its
# figures need the full run). At three seeds (42, the default, 0 and 1; session 36, BENCHMARKS.md) it measured PSNR
# 22.3, 22.0 and 22.0 dB, against 18.2 for a black image (the shapes' background), and R@1 text->image 26.3% / 25.0% /
# 19.0%, image->text 22.9% / 22.1% / 15.9%, where chance is under 0.4% (384 test images, 1.3 of them true of a caption
# on average)
SHORT_QUICKSTART_COMMON = ["data.use_judge=false", "data.num_test=256", "data.num_test_heldout=128"]
SHORT_QUICKSTART_STAGES = {
    "autoencoder": ["trainer.max_steps=400"],
    # compiling the generator's blocks would take a minute more than it saves in 300 steps
    "joint": ["trainer.max_steps=300", "model.compile=false", "model.test_prompts=16"],
}
SHORT_QUICKSTART_MIN = {"test/recall_at_1_t2i": 0.08, "test/recall_at_1_i2t": 0.06}
SHORT_QUICKSTART_PSNR_OVER_BLACK = 2.0  # dB


def hydra_list(items: list[str]) -> str:
    return "[" + ",".join(json.dumps(item) for item in items) + "]"


@pytest.mark.slow
def test_a_short_quickstart_learns_what_its_held_out_test_split_measures(tmp_path):
    """`python train.py` with fewer steps, on every CPU (the full run's thresholds need AMX, below): the autoencoder
    beats a black image and the matcher retrieves far above chance, on test images neither stage trained on."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from imagen.stages.autoencoder import ImagePSNR

    quickstart = compose_config([], tmp_path / "compose")
    stages = OmegaConf.to_container(quickstart.pipeline.stages)
    overrides = [f"pipeline.common={hydra_list(SHORT_QUICKSTART_COMMON)}"]
    for stage, extra in SHORT_QUICKSTART_STAGES.items():
        overrides.append(f"pipeline.stages.{stage}={hydra_list(stages[stage] + extra)}")
    paths = [f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    run = run_train(*overrides, *paths, cwd=tmp_path, timeout=20 * 60)
    assert run.returncode == 0, run.stderr[-4000:]
    metrics = json.loads((tmp_path / "logs" / "quickstart" / "metrics.json").read_text())
    for key, least in SHORT_QUICKSTART_MIN.items():
        assert metrics[key] >= least, (key, metrics[key])

    # the autoencoder's test images, reconstructed as all background
    data = compose_config(["experiment=shapes_autoencoder", *SHORT_QUICKSTART_COMMON], tmp_path / "data").data
    datamodule = instantiate(data, _convert_="all")
    datamodule.setup("test")
    black = ImagePSNR()
    for batch in datamodule.test_dataloader():
        images = (batch["image"] + 1) / 2  # [-1, 1] -> [0, 1], as the stage measures
        black.update(torch.zeros_like(images), images)
    least = black.compute().item() + SHORT_QUICKSTART_PSNR_OVER_BLACK
    assert metrics["autoencoder/test/psnr"] >= least, (metrics["autoencoder/test/psnr"], least)


def bf16_units() -> bool:
    import torch

    from imagen.precision import bf16_is_fast

    return bf16_is_fast("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
@pytest.mark.skipif(
    not bf16_units() and not os.environ.get("IMAGEN_FULL_QUICKSTART"),
    reason="without bf16 matrix units (AMX) the quickstart trains in float32: about 30 minutes on 2 CPU cores, over "
    "the suite's 30-minute budget; IMAGEN_FULL_QUICKSTART=1 runs it",
)
def test_the_real_quickstart_reports_every_figure_and_holds_its_judge_accuracy(tmp_path):
    """`python train.py`, the README's first command, from scratch (about 10 minutes on 2 CPU cores with AMX; left
    out with `-m 'not slow'`)."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, str(root / "train.py"), f"paths.log_dir={tmp_path / 'logs'}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=45 * 60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    quickstart = tmp_path / "logs" / "quickstart"
    metrics = json.loads((quickstart / "metrics.json").read_text())
    for key in ("test/psnr", "test/judge_acc", "test/judge_acc_heldout", "test/judge_acc_reranked",
                "test/recall_at_1_t2i", "test/recall_at_1_i2t", "test/caption_acc"):  # fmt: skip
        assert key in metrics, key
    assert "sample grid:" in (quickstart / "summary.md").read_text()
    assert metrics["test/judge_acc"] >= QUICKSTART_MIN_JUDGE_ACC, metrics["test/judge_acc"]
    for key, least in QUICKSTART_MIN.items():
        assert metrics[key] >= least, (key, metrics[key])
