"""The WebDataset stream: evaluation shards held out of training, a fresh draw every epoch with persistent workers,
shards that are missing or cannot be read."""

from __future__ import annotations

import json
import tarfile
from types import SimpleNamespace

import pytest

from imagen.data.bad_samples import TooManyBadSamples
from imagen.data.image_text import ImageTextDataModule
from tests.image_text_fixtures import add_member, make_pairs, shard_spec, write_shards


def shard_names(dm: ImageTextDataModule, split: str) -> set[str]:
    """The shards (file names) a split's loader reads."""
    return {name.split(":")[0].rsplit("/", 1)[-1] for batch in dm._loader(split) for name in batch["name"]}


def test_evaluation_reads_shards_held_out_of_training(tmp_path):
    shards = write_shards(tmp_path / "wds", make_pairs(10, size=(8, 8)), per_shard=2)  # 5 shards
    dm = ImageTextDataModule("webdataset", shards=shard_spec(shards), image_size=8, resampled=False,
                             eval_samples=None)  # fmt: skip
    train, val, test = (shard_names(dm, split) for split in ("train", "val", "test"))
    assert (train, val, test) == ({"00000.tar", "00001.tar", "00002.tar"}, {"00003.tar"}, {"00004.tar"})
    # a mapping with its own val shards: only test is held out of the training shards
    dm = ImageTextDataModule("webdataset", shards={"train": shard_spec(shards[:4]), "val": str(shards[4])},
                             image_size=8, resampled=False, eval_samples=None)  # fmt: skip
    train, val, test = (shard_names(dm, split) for split in ("train", "val", "test"))
    assert (train, val, test) == ({"00000.tar", "00001.tar", "00002.tar"}, {"00004.tar"}, {"00003.tar"})
    dm = ImageTextDataModule("webdataset", shards=shard_spec(shards[:2]), image_size=8)
    with pytest.raises(ValueError, match=r"data.shards=.* matches 2 shard\(s\): too few to hold out"):
        dm.build_dataset("train")


def test_persistent_workers_draw_other_shards_and_order_every_epoch(tmp_path):
    shards = write_shards(tmp_path / "wds", make_pairs(16, size=(8, 8)), per_shard=2)
    dm = ImageTextDataModule("webdataset", shards={"train": shard_spec(shards), "val": str(shards[0])},
                             image_size=8, samples_per_epoch=16, shuffle_buffer=4, batch_size=4, num_workers=2,
                             persistent_workers=True)  # fmt: skip
    loader = dm._loader("train")  # one loader for the whole fit, as Lightning keeps it
    epochs = [[name for batch in loader for name in batch["name"]] for _ in range(3)]
    assert all(len(names) == 16 for names in epochs)
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]


def test_missing_shards_are_named_and_unreadable_ones_stop_a_resampled_stream(tmp_path):
    shards = write_shards(tmp_path / "wds", make_pairs(6, size=(8, 8)), per_shard=2)
    dm = ImageTextDataModule("webdataset", shards=f"{tmp_path}/typo/{{00000..00002}}.tar", image_size=8)
    with pytest.raises(FileNotFoundError, match=r"data.shards=.*typo.*: 3 of 3 shards do not exist"):
        dm.build_dataset("train")
    for shard in shards:
        shard.write_bytes(b"not a tar file" * 100)
    dm = ImageTextDataModule("webdataset", shards={"train": shard_spec(shards), "val": str(shards[0])},
                             image_size=8, samples_per_epoch=8)  # fmt: skip
    # resampling would draw the unreadable shards forever
    with pytest.raises(TooManyBadSamples, match="no shard of data.shards could be read"):
        next(iter(dm._loader("train")))


def test_every_rank_writes_the_bad_samples_it_skipped(tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "wds", make_pairs(6, size=(8, 8)), per_shard=2)
    with tarfile.open(shards[1], "a") as tar:  # a sample whose image cannot be decoded
        add_member(tar, "broken.png", b"not a png")
        add_member(tar, "broken.txt", b"a caption")
    # this process is rank 1 of 2: it trains on the second of the three shards
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = ImageTextDataModule("webdataset", shards={"train": shard_spec(shards), "val": shard_spec(shards),
                             "test": shard_spec(shards)}, image_size=8, resampled=False, max_bad_fraction=1.0)  # fmt: skip
    # the trainer says one process, so that the loader does not refuse an unresampled stream on two (the split
    # into ranks follows RANK/WORLD_SIZE above)
    trainer = SimpleNamespace(global_rank=1, world_size=1, is_global_zero=False, default_root_dir=str(tmp_path / "run"),
                              training=True, current_epoch=0)  # fmt: skip
    monkeypatch.setattr(dm, "trainer", trainer)
    names = [name for batch in dm._loader("train") for name in dm.on_before_batch_transfer(batch, 0)["name"]]
    assert len(names) == 2 and all("00001.tar" in name for name in names)
    dm.teardown("fit")
    summary = json.loads((tmp_path / "run" / "bad_samples.rank1.json").read_text())
    assert summary["counts"] == {"not_an_image": 1} and summary["good"] == 2
    assert not (tmp_path / "run" / "bad_samples.json").exists()  # rank 0's own file


def test_every_rank_and_worker_evaluates_its_share_of_one_held_out_shard(tmp_path, monkeypatch):
    # one held-out shard and two ranks of two workers: a shard split would leave three readers without a sample
    # 3 shards: train, val, test
    shards = write_shards(tmp_path / "wds", make_pairs(24, size=(8, 8)), per_shard=8)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = ImageTextDataModule("webdataset", shards=shard_spec(shards), image_size=8, num_workers=2,
                                 eval_batch_size=1, eval_samples=None)  # fmt: skip
        seen[rank] = [name for batch in dm._loader("val") for name in batch["name"]]
    assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])
    assert sorted(name.rsplit(":", 1)[1] for name in seen[0] + seen[1]) == [
        f"img{i:03d}.png" for i in range(8, 16)
    ]


def test_a_caption_key_that_the_json_captions_lack_is_refused_up_front(tmp_path):
    shards = write_shards(tmp_path / "wds", make_pairs(6, size=(8, 8)), per_shard=2, json_captions=True)
    spec = shard_spec(shards)
    dm = ImageTextDataModule("webdataset", shards=spec, image_size=8, resampled=False, caption_key="text")
    with pytest.raises(ValueError, match=r"data.caption_key='text': .*00000.tar .* its keys: \['caption'\]"):
        dm.build_dataset("train")
    dm = ImageTextDataModule("webdataset", shards=spec, image_size=8, resampled=False, eval_samples=None)
    names = [name for batch in dm._loader("train") for name in batch["name"]]
    assert len(names) == 2  # the one training shard
