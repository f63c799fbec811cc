"""The pre-tokenized cache: written tokens read back equal, an interrupted encode resumes, loads are verified."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import imagen.data.token_cache as token_cache
from imagen.checkpoints import load_autoencoder
from imagen.data.image_text import ImageTextDataModule
from imagen.data.token_cache import TokenCacheDataset, TokenCacheError, write_token_cache
from tests.conftest import compose_config
from tests.image_text_fixtures import make_pairs, write_autoencoder_ckpt, write_coco, write_image_txt


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
    assert len(TokenCacheDataset(tmp_path / "cache" / "val")) == 1


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
    assert result["train"] == {"written": ["shard_00001", "shard_00002"], "skipped": ["shard_00000"]}
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


def test_bad_samples_are_left_out_and_recorded(ckpt, tmp_path):
    root = write_image_txt(tmp_path / "txt", make_pairs(4))
    (root / "empty.png").write_bytes(b"")
    (root / "empty.txt").write_text("caption")
    dm = ImageTextDataModule("image_txt", root={"train": str(root)}, image_size=32, max_bad_fraction=0.5)
    write_token_cache(str(ckpt), dm, tmp_path / "cache", ("train",), shard_size=10, device="cpu")
    dataset = TokenCacheDataset(tmp_path / "cache" / "train")
    assert len(dataset) == 4 and dataset.index["shards"][0]["bad"] == {"empty_file": 1}


def test_encode_command(coco_dm, ckpt, tmp_path):
    from imagen.cli.encode import encode

    images, annotations = coco_dm.hparams.images, coco_dm.hparams.annotations
    cfg = compose_config(["data=coco", f"data.images={images}", f"data.annotations={annotations}",
                          "data.image_size=32", "data.num_workers=0", "data.holdout_fraction=0.1",
                          f"autoencoder_ckpt={ckpt}", f"out_dir={tmp_path / 'cache'}", "shard_size=5"],
                         tmp_path / "run", config_name="encode")  # fmt: skip
    encode(cfg)
    assert [len(TokenCacheDataset(tmp_path / "cache" / s)) for s in ("train", "val", "test")] == [8, 1, 1]
