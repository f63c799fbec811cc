"""The pre-tokenized cache: written tokens read back equal, an interrupted encode resumes, loads are verified."""

from __future__ import annotations

import json
import pickle
import re
import tarfile

import numpy as np
import pytest
import torch

import imagen.data.token_cache as token_cache
from imagen.checkpoints import load_autoencoder
from imagen.data.bad_samples import TooManyBadSamples
from imagen.data.image_text import ImageTextDataModule
from imagen.data.token_cache import (
    VERSION,
    TokenCacheDataset,
    TokenCacheError,
    write_shard,
    write_token_cache,
)
from tests.conftest import compose_config
from tests.image_text_fixtures import (
    make_pairs,
    shard_spec,
    write_autoencoder_ckpt,
    write_coco,
    write_image_txt,
    write_shards,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_autoencoder_ckpt(tmp_path_factory.mktemp("ae") / "ae.ckpt")


@pytest.fixture
def coco_dm(tmp_path):
    images, annotations = write_coco(tmp_path / "coco", make_pairs(10))
    return ImageTextDataModule("coco", images=str(images), annotations=str(annotations), image_size=32,
                               holdout_fraction=0.1)  # fmt: skip


def expected_tokens(dm, ckpt) -> tuple[np.ndarray, list[list[str]]]:
    """Tokens and captions of the training split computed directly (center crops, in record order)."""
    dataset = dm.build_dataset("train")
    dataset.preprocess.random_crop = False
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    captions = [[" ".join(c.split()) for c in r.captions] for r in dataset.records]
    return load_autoencoder(ckpt).encode(images).numpy(), captions


def test_round_trip(coco_dm, ckpt, tmp_path):
    write_token_cache(str(ckpt), coco_dm, tmp_path / "cache", ("train", "val"), shard_size=3, device="cpu")
    dataset = TokenCacheDataset(
        tmp_path / "cache" / "train", verify="checksum", image_size=32, autoencoder_ckpt=str(ckpt)
    )
    tokens, captions = expected_tokens(coco_dm, ckpt)
    assert len(dataset) == len(tokens) == 8 and len(dataset.index["shards"]) == 3
    for i in range(len(dataset)):
        grid, read_captions = dataset.captions(i)
        assert np.array_equal(grid, tokens[i]) and read_captions == captions[i]
        assert torch.equal(dataset[i]["tokens"], torch.from_numpy(tokens[i].astype(np.int64)).flatten())
        assert dataset[i]["all_captions"].split("\n") == captions[i]  # evaluation's references: every caption
    assert len(TokenCacheDataset(tmp_path / "cache" / "val")) == 1
    assert "all_captions" not in TokenCacheDataset(tmp_path / "cache" / "train", random_caption=True)[0]


def test_interrupted_encode_resumes(coco_dm, ckpt, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real_write, calls = token_cache.write_shard, []

    def crash_on_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed while writing its second shard
        return real_write(*args, **kwargs)

    monkeypatch.setattr(token_cache, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=3, device="cpu")
    with pytest.raises(TokenCacheError, match="1 finished shards: rerun"):
        TokenCacheDataset(out / "train")
    monkeypatch.setattr(token_cache, "write_shard", real_write)
    result = write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=3, device="cpu")
    assert result["train"] == {"written": ["shard_00001", "shard_00002"], "skipped": ["shard_00000"],
                               "unfinished": []}  # fmt: skip
    dataset = TokenCacheDataset(out / "train", verify="checksum")
    tokens, _ = expected_tokens(coco_dm, ckpt)
    assert np.array_equal(np.stack([dataset.captions(i)[0] for i in range(len(dataset))]), tokens)


def test_ranks_share_shards_and_one_writes_the_index(coco_dm, ckpt, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        result = write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=3, device="cpu")
        assert result["train"]["written"] == (["shard_00001"] if rank else ["shard_00000", "shard_00002"])
    assert len(TokenCacheDataset(out / "train")) == 8


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_STEPID",
                    "SLURM_STEP_NUM_TASKS")  # fmt: skip


def set_launch_env(monkeypatch, env: dict[str, str]) -> None:
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"},
            (0, 1),
        ),  # the sbatch script itself (--ntasks=4, no srun)
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": str(0xFFFFFFFB)},
            (0, 1),
        ),  # its batch step
        (
            {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"},
            (2, 4),
        ),
        (
            {"SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "2"},
            (1, 2),
        ),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"},
            (1, 2),
        ),  # torchrun's first
    ],
)
def test_slurm_ranks_count_only_inside_an_srun_step(monkeypatch, env, expected):
    set_launch_env(monkeypatch, env)
    assert token_cache.rank_and_world() == expected


def test_an_encode_run_in_the_batch_script_encodes_every_shard(coco_dm, ckpt, tmp_path, monkeypatch):
    set_launch_env(monkeypatch, {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})
    result = write_token_cache(str(ckpt), coco_dm, tmp_path / "cache", ("train",), shard_size=3, device="cpu")
    assert result["train"]["written"] == ["shard_00000", "shard_00001", "shard_00002"]
    assert len(TokenCacheDataset(tmp_path / "cache" / "train")) == 8


def encode_config(coco_dm, ckpt, tmp_path, overrides: tuple[str, ...] = ()):
    images, annotations = coco_dm.hparams.images, coco_dm.hparams.annotations
    return compose_config(["data=coco", f"data.images={images}", f"data.annotations={annotations}",
                           "data.image_size=32", "data.num_workers=0", "data.holdout_fraction=0.1",
                           f"autoencoder_ckpt={ckpt}", f"out_dir={tmp_path / 'cache'}", "shard_size=3", *overrides],
                          tmp_path / "run", config_name="encode")  # fmt: skip


def test_a_rank_that_finishes_first_says_the_index_waits_for_the_others(
    coco_dm, ckpt, tmp_path, monkeypatch, caplog
):
    from imagen.cli.encode import encode

    cfg = encode_config(coco_dm, ckpt, tmp_path)
    set_launch_env(monkeypatch, {"RANK": "1", "WORLD_SIZE": "2"})
    with caplog.at_level("INFO"):
        result = encode(cfg)
    # rank 1 of 2 encodes the train split's shard 1 of 0-2; val's and test's one shard are rank 0's
    assert result["train"]["unfinished"] == ["shard_00000", "shard_00002"]
    assert "1 of 3 shards are finished, so index.json is not written yet" in caplog.text
    assert "the other 1 of the 2 processes must finish theirs" in caplog.text
    assert "is not complete" in caplog.text and "token cache: " not in caplog.text
    caplog.clear()
    set_launch_env(monkeypatch, {"RANK": "0", "WORLD_SIZE": "2"})
    with caplog.at_level("INFO"):
        result = encode(cfg)
    assert all(not names["unfinished"] for names in result.values())
    assert "token cache: " in caplog.text and "not complete" not in caplog.text
    assert len(TokenCacheDataset(tmp_path / "cache" / "train")) == 8


def test_a_pickled_dataset_leaves_the_opened_shards_out(coco_dm, ckpt, tmp_path):
    write_token_cache(str(ckpt), coco_dm, tmp_path / "cache", ("train",), shard_size=3, device="cpu")
    dataset = TokenCacheDataset(tmp_path / "cache" / "train")
    size = len(pickle.dumps(dataset))
    dataset.all_captions()  # opens every shard, as training a caption tokenizer on the cache does
    # a spawned dataloader worker gets no copy of the shards' data: it maps them itself
    assert dataset._arrays is not None and len(pickle.dumps(dataset)) == size
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._arrays is None and copy.captions(7)[1] == dataset.captions(7)[1]


def write_many_caption_cache(root, samples: int = 12) -> None:
    """A one-shard training split of 2x2 token grids, each sample with four captions `<k> of <i>`."""
    (root / "train").mkdir(parents=True)
    tokens = np.arange(samples, dtype=np.uint16).repeat(4).reshape(samples, 2, 2)
    captions = ["\n".join(f"{k} of {i}" for k in "abcd") for i in range(samples)]
    record = write_shard(root / "train", "shard_00000", tokens, captions, {})
    index = {"version": VERSION, "autoencoder": {"path": "ae.ckpt", "sha256": "0"}, "image_size": 8, "grid": [2, 2],
             "shards": [record], "total": samples}  # fmt: skip
    (root / "train" / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("workers", [0, 1])
def test_the_training_caption_follows_the_item_seed_and_resumes(tmp_path, workers):
    write_many_caption_cache(tmp_path)

    def loader():
        torch.manual_seed(3)  # the run's seed
        dm = ImageTextDataModule(
            "token_cache", root=str(tmp_path), image_size=8, batch_size=3, num_workers=workers
        )
        return dm._loader("train")

    run, rng = loader(), torch.get_rng_state()
    epochs = []
    for epoch in range(3):
        run.sampler.set_epoch(epoch)
        epochs.append([caption for batch in run for caption in batch["caption"]])
    assert torch.equal(torch.get_rng_state(), rng)  # the random captions leave the model's RNG alone
    assert len({c.split()[0] for c in epochs[2]}) > 1 and epochs[1] != epochs[2]
    restarted = loader()
    restarted.load_state_dict({"epoch": 2, "batches": 1, "num_replicas": 1})  # saved after a step of epoch 2
    restarted.sampler.set_epoch(2)
    assert [caption for batch in restarted for caption in batch["caption"]] == epochs[2][3:]


def test_load_is_verified(coco_dm, ckpt, tmp_path):
    out = tmp_path / "cache"
    write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=4, device="cpu")
    tokens_file = out / "train" / "shard_00000.tokens.npy"
    data = bytearray(tokens_file.read_bytes())
    data[-1] ^= 0xFF
    tokens_file.write_bytes(bytes(data))
    TokenCacheDataset(out / "train", verify="size")  # same size: only the checksum sees it
    with pytest.raises(TokenCacheError, match="shard_00000.tokens.npy: CRC32 mismatch"):
        TokenCacheDataset(out / "train", verify="checksum")
    tokens_file.write_bytes(bytes(data[:-10]))
    with pytest.raises(TokenCacheError, match="shard_00000.tokens.npy: .* bytes, the index says"):
        TokenCacheDataset(out / "train")
    other = write_autoencoder_ckpt(tmp_path / "other.ckpt", size="shapes")
    (out / "train" / "shard_00000.tokens.npy").unlink()
    write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=4, device="cpu")  # re-encodes the shard
    with pytest.raises(TokenCacheError, match="model.autoencoder_ckpt=.*other.ckpt is not the checkpoint"):
        TokenCacheDataset(out / "train", autoencoder_ckpt=str(other))
    with pytest.raises(TokenCacheError, match="data.image_size=64"):
        TokenCacheDataset(out / "train", image_size=64)


def test_a_damaged_index_or_shard_names_the_file_and_how_to_reencode(coco_dm, ckpt, tmp_path):
    out = tmp_path / "cache"
    write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=4, device="cpu")
    split, rerun = out / "train", r"rerun `python -m imagen.cli.encode`"
    index_file = split / "index.json"
    index_text = index_file.read_text()
    index_file.write_text(index_text[: len(index_text) // 2])  # truncated
    with pytest.raises(
        TokenCacheError, match=rf"index.json: not valid JSON .*delete .*index.json and {rerun}"
    ):
        TokenCacheDataset(split)
    index_file.write_text(json.dumps({k: v for k, v in json.loads(index_text).items() if k != "total"}))
    with pytest.raises(TokenCacheError, match=r"index.json: no total"):
        TokenCacheDataset(split)
    index_file.unlink()  # as the error says: a rerun rebuilds the index from the finished shards
    result = write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=4, device="cpu")
    assert result["train"]["written"] == [] and len(TokenCacheDataset(split)) == 8

    damage = rf"delete .*shard_00000.json and {rerun}"
    captions = split / "shard_00000.captions.npy"
    data = bytearray(captions.read_bytes())
    data[-1] = 0xFF  # in the last sample's captions; the same size, so verify=size loads the cache
    captions.write_bytes(bytes(data))
    dataset = TokenCacheDataset(split)
    with pytest.raises(
        TokenCacheError, match=rf"shard_00000.captions.npy: .* sample 3 .* not UTF-8.*{damage}"
    ):
        dataset[3]
    offsets = split / "shard_00000.offsets.npy"
    np.save(offsets, np.load(offsets) + 1)
    with pytest.raises(TokenCacheError, match=rf"shard_00000.offsets.npy: captions end at byte .*{damage}"):
        TokenCacheDataset(split)
    tokens = split / "shard_00000.tokens.npy"
    tokens.write_bytes(b"\0" * 6 + tokens.read_bytes()[6:])  # the .npy magic
    with pytest.raises(
        TokenCacheError, match=rf"shard_00000.tokens.npy: not a readable .npy array .*{damage}"
    ):
        TokenCacheDataset(split)
    (split / "shard_00000.json").unlink()
    result = write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=4, device="cpu")
    assert result["train"] == {"written": ["shard_00000"], "skipped": ["shard_00001"], "unfinished": []}
    dataset = TokenCacheDataset(split, verify="checksum")
    assert dataset.captions(3)[1] == expected_tokens(coco_dm, ckpt)[1][3]
    # an offsets file one entry short, its size in the index: named apart from the tokens' count
    np.save(offsets, np.load(offsets)[:-1])
    index = json.loads(index_file.read_text())
    index["shards"][0]["files"]["offsets"]["bytes"] = offsets.stat().st_size
    index_file.write_text(json.dumps(index))
    with pytest.raises(
        TokenCacheError, match=rf"shard_00000.offsets.npy: 4 offsets for 4 samples \(5 expected\); {damage}"
    ):
        TokenCacheDataset(split)


def test_a_damaged_shard_record_on_resume_names_it(coco_dm, ckpt, tmp_path):
    out = tmp_path / "cache"
    write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=3, device="cpu", max_shards=1)
    record = out / "train" / "shard_00000.json"
    record.write_text(record.read_text()[:20])
    with pytest.raises(
        TokenCacheError, match=r"shard_00000.json: not valid JSON .*delete .*shard_00000.json and rerun"
    ):
        write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=3, device="cpu")
    record.unlink()
    result = write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=3, device="cpu")
    assert result["train"]["written"] == ["shard_00000", "shard_00001", "shard_00002"]


def test_bad_samples_are_left_out_and_recorded(ckpt, tmp_path):
    root = write_image_txt(tmp_path / "txt", make_pairs(4))
    (root / "empty.png").write_bytes(b"")
    (root / "empty.txt").write_text("caption")
    dm = ImageTextDataModule("image_txt", root={"train": str(root)}, image_size=32, max_bad_fraction=0.5)
    write_token_cache(str(ckpt), dm, tmp_path / "cache", ("train",), shard_size=10, device="cpu")
    dataset = TokenCacheDataset(tmp_path / "cache" / "train")
    assert len(dataset) == 4 and dataset.index["shards"][0]["bad"] == {"empty_file": 1}


@pytest.mark.parametrize("check_after", [100, 5], ids=["at_the_end", "while_encoding"])
def test_a_split_refused_for_bad_samples_is_refused_again_by_a_rerun(ckpt, tmp_path, check_after):
    root = write_image_txt(tmp_path / "txt", make_pairs(6))
    for i in range(3):  # the first shard's three samples
        (root / f"bad{i}.png").write_bytes(b"")
        (root / f"bad{i}.txt").write_text("caption")
    dm = ImageTextDataModule("image_txt", root={"train": str(root)}, image_size=32, max_bad_fraction=0.1,
                             bad_check_after=check_after, num_workers=0)  # fmt: skip
    out = tmp_path / "cache"
    # at the end: 3 of 9, once every shard is written; while encoding (from 5 samples on): 3 of 6, in shard 1
    counted = "3 of 9 samples were" if check_after == 100 else "3 of 6 samples so far were"
    refusal = re.escape(f"token cache of split 'train' ({out / 'train'}): {counted} bad")
    for _ in range(2):  # the rerun skips the finished shards, and counts their recorded bad samples
        with pytest.raises(TooManyBadSamples, match=refusal):
            write_token_cache(str(ckpt), dm, out, ("train",), shard_size=3, device="cpu")
        assert not (out / "train" / "index.json").exists()
        (out / "train" / "index.json").write_text("{}")  # as a run under a higher limit would leave: removed
    assert json.loads((out / "train" / "shard_00000.json").read_text())["bad_examples"] == {
        "empty_file": [str(root / f"bad{i}.png") for i in range(3)]
    }


def test_encode_command(coco_dm, ckpt, tmp_path):
    from imagen.cli.encode import encode

    encode(encode_config(coco_dm, ckpt, tmp_path))
    assert [len(TokenCacheDataset(tmp_path / "cache" / s)) for s in ("train", "val", "test")] == [8, 1, 1]


@pytest.mark.parametrize(
    "override, match",
    [
        ("shard_size=0", r"shard_size=0 must be >= 1; samples per shard"),
        ("shard_size=null", r"shard_size=None must be an integer"),
        ("batch_size=0", r"batch_size=0 must be >= 1; e.g. batch_size=64"),
        ("max_shards=0", r"max_shards=0 must be >= 1; .* or null for all"),
        ("device=gpu", r"device='gpu' is not a device; use auto, cpu, cuda or cuda:N"),
        (
            "splits=[train,vall]",
            r"splits=\['train', 'vall'\]: 'vall' is not a split; list some of train, val, test",
        ),
        ("splits=[]", r"splits=\[\]: nothing to encode; list some of train, val, test"),
        ("splits=[train,train]", r"splits=\['train', 'train'\] names a split twice"),
        ("splits=train", r"splits='train' must be a list; list some of train, val, test"),
    ],
)
def test_a_wrong_encode_setting_is_refused_naming_its_key(coco_dm, ckpt, tmp_path, override, match):
    from imagen.cli.checks import ConfigError
    from imagen.cli.encode import encode

    with pytest.raises(ConfigError, match=match):
        encode(encode_config(coco_dm, ckpt, tmp_path, (override,)))
    assert not (tmp_path / "cache").exists(), "refused before anything is written"


def test_encode_reads_a_checkpoint_that_needs_unpickling_only_when_trusted(coco_dm, ckpt, tmp_path):
    from imagen.checkpoints import CheckpointError
    from imagen.cli.encode import encode
    from tests.test_checkpoints import RunsCode

    marker, untrusted = tmp_path / "ran", tmp_path / "untrusted.ckpt"
    torch.save({**torch.load(ckpt, weights_only=True), "payload": RunsCode(marker)}, untrusted)
    with pytest.raises(CheckpointError, match="trust_checkpoint=true"):
        encode(encode_config(coco_dm, untrusted, tmp_path, ("splits=[train]",)))
    assert not marker.exists() and not (tmp_path / "cache").exists()
    result = encode(encode_config(coco_dm, untrusted, tmp_path, ("splits=[train]", "trust_checkpoint=true")))
    assert marker.exists() and result["train"]["written"]


@pytest.mark.parametrize("file", ["cache", "parent", "cache/train", "cache/val"])
def test_an_encode_out_dir_that_is_a_file_is_refused(coco_dm, ckpt, tmp_path, file):
    from imagen.cli.checks import ConfigError
    from imagen.cli.encode import encode

    out = tmp_path / "parent" / "cache" if file == "parent" else tmp_path / "cache"
    if file == "cache/val":
        (tmp_path / "cache" / "train").mkdir(parents=True)  # an earlier run's split beside it
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text("notes")
    with pytest.raises(ConfigError, match=f"out_dir={out}: {tmp_path / file} is a file, not a folder"):
        encode(encode_config(coco_dm, ckpt, tmp_path, (f"out_dir={out}",)))
    assert (tmp_path / file).read_text() == "notes"


@pytest.mark.parametrize(
    "argument, match",
    [
        ({"shard_size": 0}, r"shard_size=0 must be an integer >= 1"),
        ({"batch_size": 0}, r"batch_size=0 must be an integer >= 1"),
        ({"max_shards": 0}, r"max_shards=0 must be an integer >= 1 or None"),
        ({"splits": ("train", "vall")}, r"splits=\['train', 'vall'\] must name some of train, val, test"),
    ],
)
def test_write_token_cache_refuses_a_wrong_argument_naming_it(coco_dm, ckpt, tmp_path, argument, match):
    arguments = {"splits": ("train",), "shard_size": 3, "device": "cpu", **argument}
    with pytest.raises(ValueError, match=match):
        write_token_cache(str(ckpt), coco_dm, tmp_path / "cache", **arguments)
    assert not (tmp_path / "cache").exists()


def test_an_encode_stopped_by_max_shards_says_so(coco_dm, ckpt, tmp_path, monkeypatch, caplog):
    from imagen.cli.encode import encode

    set_launch_env(monkeypatch, {})
    with caplog.at_level("INFO"):
        result = encode(encode_config(coco_dm, ckpt, tmp_path, ("max_shards=1", "splits=[train]")))
    assert result["train"]["written"] == ["shard_00000"] and len(result["train"]["unfinished"]) == 2
    assert "max_shards=1 stopped this run" in caplog.text and "other processes" not in caplog.text


def test_webdataset_encode_over_ranks_keeps_every_tar_and_the_held_out_ones_apart(
    ckpt, tmp_path, monkeypatch
):
    pairs = make_pairs(10, size=(32, 32))
    shards = write_shards(tmp_path / "wds", pairs, per_shard=2)  # 5 tars: train 0-2, val 3, test 4
    # one unreadable tar, and one empty: recorded, not fatal
    (tmp_path / "wds" / "00002.tar").write_bytes(b"not a tar" * 100)
    with tarfile.open(tmp_path / "wds" / "00001.tar", "w"):
        pass
    dm = ImageTextDataModule("webdataset", shards=shard_spec(shards), image_size=32, max_bad_fraction=1.0)
    out = tmp_path / "cache"
    for rank in (1, 0):  # each process encodes its own tars, whatever webdataset's rank split would give it
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        write_token_cache(str(ckpt), dm, out, ("train", "val", "test"), device="cpu")
    numbers = lambda split: sorted(  # noqa: E731  (of the samples' first captions, "picture number N")
        int(c.split()[-1]) for c in TokenCacheDataset(out / split).all_captions() if "picture" in c
    )
    caption_numbers = {split: numbers(split) for split in ("train", "val", "test")}
    assert caption_numbers == {"train": [0, 1], "val": [6, 7], "test": [8, 9]}
    records = TokenCacheDataset(out / "train").index["shards"]
    assert [(r["count"], r["bad"]) for r in records] == [
        (2, {}),
        (0, {"empty_shard": 1}),
        (0, {"unreadable_shard": 1}),
    ]


def test_a_resumed_encode_with_other_settings_is_refused(coco_dm, ckpt, tmp_path):
    out = tmp_path / "cache"
    write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=3, device="cpu", max_shards=1)
    with pytest.raises(TokenCacheError, match=r"shard_00000.json: encoded with other inputs than this run"):
        write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=2, device="cpu")
    other = write_autoencoder_ckpt(tmp_path / "other.ckpt", size="shapes")
    with pytest.raises(TokenCacheError, match=r"shard_00000.json: encoded with other autoencoder_sha256"):
        write_token_cache(str(other), coco_dm, out, ("train",), shard_size=3, device="cpu")
    # the same settings: resumes
    result = write_token_cache(str(ckpt), coco_dm, out, ("train",), shard_size=3, device="cpu")
    assert result["train"] == {"written": ["shard_00001", "shard_00002"], "skipped": ["shard_00000"],
                               "unfinished": []}  # fmt: skip


def test_an_exported_autoencoder_encodes_and_the_datamodule_checks_its_keys(coco_dm, ckpt, tmp_path):
    from imagen.checkpoints import export_checkpoint

    exported = export_checkpoint(str(ckpt), tmp_path / "exported")
    out = tmp_path / "cache"
    write_token_cache(str(exported), coco_dm, out, ("train", "val"), shard_size=4, device="cpu")
    root = {"train": str(out / "train"), "val": str(out / "val")}  # one directory per split
    dm = ImageTextDataModule("token_cache", root=root, image_size=32, autoencoder_ckpt=str(exported))
    assert len(dm.build_dataset("train")) == 8 and len(dm.build_dataset("val")) == 1
    with pytest.raises(ValueError, match="data.root has no 'test' entry"):
        dm.build_dataset("test")
    with pytest.raises(ValueError, match="data.verify='checksums': choose size or checksum"):
        ImageTextDataModule("token_cache", root=str(out), verify="checksums")


def test_training_from_the_cache_resumes_at_the_same_batch(coco_dm, ckpt, tmp_path):
    write_token_cache(str(ckpt), coco_dm, tmp_path / "cache", ("train",), shard_size=4, device="cpu")
    torch.manual_seed(3)  # the run's seed: the order of every epoch follows from it
    dm = ImageTextDataModule("token_cache", root=str(tmp_path / "cache"), image_size=32, batch_size=2)
    loader = dm._loader("train")
    run = iter(loader)
    seen = [next(run)["name"] for _ in range(2)]
    state = loader.state_dict()  # what Lightning writes into a checkpoint after two steps
    rest = [batch["name"] for batch in run]
    torch.manual_seed(3)  # the restarted run
    restarted = ImageTextDataModule("token_cache", root=str(tmp_path / "cache"), image_size=32, batch_size=2)
    loader = restarted._loader("train")
    loader.load_state_dict(state)
    assert [batch["name"] for batch in loader] == rest and len(seen + rest) == 4
