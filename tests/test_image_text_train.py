"""Image stages train on every real-corpus format and on the token cache with only a `data=` override."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from imagen.data.bad_samples import TooManyBadSamples
from imagen.data.image_text import ImageTextDataModule
from imagen.data.token_cache import write_token_cache
from tests.conftest import train_tiny_stage
from tests.image_text_fixtures import (
    TINY_CORPUS,
    TINY_TEXT,
    build_corpora,
    make_pairs,
    write_autoencoder_ckpt,
    write_coco,
    write_image_txt,
)

TINY_GENERATOR = ["model.net.size=tiny", "model.text_encoder.dim=32", "model.eval_prompts=4", "model.test_prompts=4",
                  "model.compute_fid=false", *TINY_TEXT]  # fmt: skip
TINY_AUTOENCODER = ["model.net.size=tiny", "model.net.quantizer=fsq"]
STEPS = ["trainer.max_steps=3", "trainer.val_check_interval=3", "callbacks.image_logger=null"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return build_corpora(tmp_path_factory.mktemp("corpora"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_autoencoder_ckpt(tmp_path_factory.mktemp("ae") / "ae.ckpt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, ckpt):
    root = tmp_path_factory.mktemp("cache")
    images, annotations = write_coco(root / "coco", make_pairs(12))
    dm = ImageTextDataModule("coco", images=str(images), annotations=str(annotations), image_size=32,
                             holdout_fraction=0.1)  # fmt: skip
    write_token_cache(str(ckpt), dm, root / "tokens", shard_size=5, device="cpu")
    return root / "tokens"


@pytest.mark.parametrize("fmt", ["image_txt", "imagefolder", "coco", "webdataset", "token_cache"])
def test_generator_trains_from_each_format(corpora, cache, ckpt, tmp_path, fmt):
    data = ["data=token_cache", f"data.root={cache}"] if fmt == "token_cache" else corpora[fmt]
    last = train_tiny_stage(
        [
            "experiment=coco_generator",
            *data,
            *TINY_CORPUS,
            *TINY_GENERATOR,
            f"model.autoencoder_ckpt={ckpt}",
            *STEPS,
        ],
        tmp_path,
    )
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert "val/nll_bits" in (tmp_path / "csv" / "metrics.csv").read_text()


@pytest.mark.parametrize("fmt", ["webdataset", "token_cache"])
def test_joint_model_trains_and_evaluates_from_a_stream_and_from_the_cache(
    corpora, cache, ckpt, tmp_path, fmt
):
    # a stream gives no sample index, the cache no image: retrieval, caption grids and metrics do without
    data = ["data=token_cache", f"data.root={cache}"] if fmt == "token_cache" else corpora[fmt]
    steps = [o for o in STEPS if not o.startswith("callbacks.image_logger=")]  # with the image grids
    train_tiny_stage(["experiment=coco_joint", *data, *TINY_CORPUS, *TINY_GENERATOR, "model.image_text.size=tiny",
                      "model.rerank.candidates=2", f"model.autoencoder_ckpt={ckpt}", *steps], tmp_path)  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val/nll_bits", "val/caption_nll", "val/recall_at_1_t2i"} <= set(metrics)
    assert [p.parent.name for p in (tmp_path / "images" / "val").glob("captioned/*.png")] == ["captioned"]


def test_autoencoder_trains_on_a_corpus_with_ten_percent_bad_samples(tmp_path, caplog):
    root = write_image_txt(tmp_path / "txt", make_pairs(36))
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not an image")
    (root / "nocaption.png").write_bytes(make_pairs(1)[0].png)
    (root / "blank.png").write_bytes(make_pairs(1)[0].png)
    (root / "blank.txt").write_text(" ")
    for name in ("empty", "notes"):
        (root / f"{name}.txt").write_text("a caption")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="imagen.data.image_text"):
        train_tiny_stage(
            ["experiment=coco_autoencoder", "data=image_txt", f"data.root={{train: {root}, val: {root}}}",
             *TINY_CORPUS, *TINY_AUTOENCODER, "data.batch_size=8", "data.bad_check_after=10", "data.max_bad_fraction=0.2",
             "trainer.max_steps=10", "trainer.val_check_interval=5"],
            run,
        )  # fmt: skip
    counts = {"empty_file": 1, "not_an_image": 1, "missing_caption": 1, "empty_caption": 1}
    summary = json.loads((run / "bad_samples.json").read_text())
    assert all(summary["counts"][reason] >= 1 for reason in counts) and set(summary["counts"]) == set(counts)
    assert any("empty.png" in name for name in summary["examples"]["empty_file"])
    logged = caplog.text
    assert "epoch 0: skipped bad samples by reason" in logged and "not_an_image" in logged
    assert "bad samples skipped: " in logged and "nocaption.png" in logged


def test_too_many_bad_samples_stop_training(tmp_path):
    root = write_image_txt(tmp_path / "txt", make_pairs(10))
    for i in range(10):
        (root / f"bad{i}.png").write_bytes(b"")
        (root / f"bad{i}.txt").write_text("caption")
    with pytest.raises(TooManyBadSamples, match="data.max_bad_fraction=0.1"):
        train_tiny_stage(
            ["experiment=coco_autoencoder", "data=image_txt", f"data.root={{train: {root}, val: {root}}}",
             *TINY_CORPUS, *TINY_AUTOENCODER, "data.bad_check_after=8", *STEPS],
            tmp_path / "run",
        )  # fmt: skip


def test_a_run_without_a_test_split_stops_before_training(tmp_path):
    from imagen.cli.train import train
    from tests.conftest import compose_config

    pairs = make_pairs(12)
    write_image_txt(tmp_path / "data" / "train", pairs[:8])
    write_image_txt(tmp_path / "data" / "val", pairs[8:])
    overrides = ["experiment=coco_autoencoder", "data=image_txt", f"data.root={tmp_path / 'data'}", *TINY_CORPUS,
                 *TINY_AUTOENCODER, *STEPS, "logger=csv", "extras.print_config=false"]  # fmt: skip
    with pytest.raises(ValueError, match="no test split; .*test=false"):
        train(compose_config(overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    train(compose_config([*overrides, "test=false"], tmp_path / "trained"))  # trains without one
    assert (tmp_path / "trained" / "checkpoints" / "last.ckpt").is_file()


def test_a_checkpoint_is_tested_only_on_the_files_it_held_out(tmp_path):
    from imagen.cli.train import train
    from tests.conftest import compose_config

    root = write_image_txt(tmp_path / "txt", make_pairs(12))
    overrides = ["experiment=coco_autoencoder", "data=image_txt", f"data.root={root}", "data.holdout_fraction=0.2",
                 *TINY_CORPUS, *TINY_AUTOENCODER, *STEPS, "logger=csv", "extras.print_config=false"]  # fmt: skip
    _, trained = train(compose_config([*overrides, "test=false"], tmp_path / "trained"))
    seen = {record.image.read_bytes() for record in trained["datamodule"].datasets["train"].records}
    last = tmp_path / "trained" / "checkpoints" / "last.ckpt"
    recorded = torch.load(last, weights_only=True)["ImageTextDataModule"]["holdout"]
    assert recorded == {"root": str(root.resolve()), "rule": "sha256(seed, path) < fraction", "seed": 0,
                        "fraction": 0.2}  # fmt: skip
    test_only = [*overrides, "train=false", f"ckpt_path={last}"]
    # refused by train.py, before the datamodule indexes the corpus, naming the checkpoint
    with pytest.raises(
        ValueError, match=r"^ckpt_path=.*last.ckpt: .*data.seed=3 \(the checkpoint's: 0\).* Set data.seed=0$"
    ):
        train(compose_config([*test_only, "data.seed=3"], tmp_path / "other_seed"))
    metrics, tested = train(compose_config(test_only, tmp_path / "same_seed"))  # the split it trained with
    images = [record.image.read_bytes() for record in tested["datamodule"].datasets["test"].records]
    assert "test/psnr" in metrics and images and not seen.intersection(images)
    # another folder's held-out files (other images) are unseen whatever the seed
    other = write_image_txt(tmp_path / "other", make_pairs(12, seed=1))
    metrics, tested = train(
        compose_config([*test_only, f"data.root={other}", "data.seed=3"], tmp_path / "other_folder")
    )
    images = [record.image.read_bytes() for record in tested["datamodule"].datasets["test"].records]
    assert "test/psnr" in metrics and images and not seen.intersection(images)


def test_a_resumed_run_counts_the_bad_samples_of_the_attempts_before(tmp_path):
    from imagen.cli.train import train
    from tests.conftest import compose_config

    root = write_image_txt(tmp_path / "txt", make_pairs(20))
    for i in range(2):
        (root / f"bad{i}.png").write_bytes(b"")
        (root / f"bad{i}.txt").write_text("caption")
    overrides = ["experiment=coco_autoencoder", "data=image_txt", f"data.root={{train: {root}, val: {root}, test: {root}}}",
                 *TINY_CORPUS, *TINY_AUTOENCODER, "data.batch_size=4", "trainer.val_check_interval=3",
                 "callbacks.image_logger=null", "logger=csv", "extras.print_config=false"]  # fmt: skip
    train(compose_config([*overrides, "trainer.max_steps=3", "test=false"], tmp_path / "first"))
    first = json.loads((tmp_path / "first" / "bad_samples.json").read_text())
    assert first["good"] >= 10 and first["counts"]["empty_file"] >= 1
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    # resumed for 3 more steps, then tested with the weights it trained
    train(compose_config([*overrides, "trainer.max_steps=6", f"ckpt_path={last}"], tmp_path / "resumed"))
    resumed = json.loads((tmp_path / "resumed" / "bad_samples.json").read_text())
    # 3 batches of 4 read in each attempt, of which 2 at most bad
    assert resumed["good"] >= first["good"] + 10 and resumed["training_counts_resumed_from"] == str(last)
    assert resumed["counts"]["empty_file"] >= first["counts"]["empty_file"] and resumed["test"]["good"] > 0
    # a test of the checkpoint reads no training samples: its file holds none (the checkpoint's are not restored)
    resumed_last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    train(compose_config([*overrides, "train=false", f"ckpt_path={resumed_last}"], tmp_path / "tested"))
    tested = json.loads((tmp_path / "tested" / "bad_samples.json").read_text())
    assert tested["good"] == 0 and "training_counts_resumed_from" not in tested and tested["test"]["good"] > 0
