"""Real-corpus formats, preprocessing, bad samples and the WebDataset rank/worker split (no training)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagen.data.bad_samples import REASONS, BadSample, BadSampleTracker, TooManyBadSamples
from imagen.data.image_text import ImageTextDataModule, Preprocess, collate
from imagen.data.preprocess import clean_caption, open_image, resize_crop, truncate_caption
from tests.image_text_fixtures import (
    add_member,
    make_pairs,
    shard_spec,
    write_coco,
    write_image_txt,
    write_imagefolder,
    write_shards,
)


def every_split(value) -> dict:
    return {"train": value, "val": value, "test": value}


def eval_items(dm: ImageTextDataModule, split: str = "val") -> list[dict]:
    dataset = dm.build_dataset(split)
    return list(dataset) if not hasattr(dataset, "__len__") else [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    pairs = make_pairs(9)
    images, annotations = write_coco(root / "coco", pairs)
    shards = write_shards(root / "wds", pairs, per_shard=4)
    return {
        "pairs": pairs,
        "image_txt": {"root": every_split(str(write_image_txt(root / "txt", pairs)))},
        "imagefolder": {"root": every_split(str(write_imagefolder(root / "hf", pairs)))},
        "imagefolder_csv": {"root": every_split(str(write_imagefolder(root / "hfcsv", pairs, as_csv=True)))},
        "coco": {"images": every_split(str(images)), "annotations": every_split(str(annotations))},
        "webdataset": {"shards": every_split(shard_spec(shards))},
        "webdataset_json": {"shards": every_split(shard_spec(write_shards(root / "wdsj", pairs, 4, True)))},
    }


@pytest.mark.parametrize(
    "name", ["image_txt", "imagefolder", "imagefolder_csv", "coco", "webdataset", "webdataset_json"]
)
def test_each_format_yields_the_same_pairs(corpora, name):
    fmt = name.split("_csv")[0].split("_json")[0]
    dm = ImageTextDataModule(fmt, image_size=32, **corpora[name])
    got = sorted((item["caption"], item["image"].numpy().tobytes()) for item in eval_items(dm))
    # the reference: decode the PNG, shorter side 32 (40x32 stays), center crop 32x32, in [-1, 1]
    expected = []
    for p in corpora["pairs"]:
        pixels = np.asarray(Image.open(io.BytesIO(p.png)))[:, 4:36]
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
        expected.append((clean_caption(p.captions[0]), image.numpy().tobytes()))
    assert got == sorted(expected)


def test_training_split_picks_among_all_captions(corpora):
    dm = ImageTextDataModule("coco", image_size=32, **corpora["coco"])
    dataset = dm.build_dataset("train")
    torch.manual_seed(0)
    seen = {dataset[0]["caption"] for _ in range(40)}
    assert seen == {"picture number 0", "another caption 0"}


def test_evaluation_items_keep_every_caption_as_references(corpora):
    dm = ImageTextDataModule("coco", image_size=32, **corpora["coco"])
    item = dm.build_dataset("val")[0]
    assert item["caption"] == "picture number 0"  # evaluation reads the first
    assert item["all_captions"].split("\n") == ["picture number 0", "another caption 0"]
    assert "all_captions" not in dm.build_dataset("train")[0]


def test_training_crops_and_captions_follow_the_item_seed_and_resume(corpora):
    def loader():
        torch.manual_seed(5)  # the run's seed
        dm = ImageTextDataModule("coco", image_size=32, batch_size=2, **corpora["coco"])
        return dm._loader("train")

    def items(loader) -> list[tuple[str, bytes]]:
        pairs = [zip(batch["caption"], batch["image"], strict=True) for batch in loader]
        return [(caption, image.numpy().tobytes()) for batch in pairs for caption, image in batch]

    run, rng = loader(), torch.get_rng_state()
    epochs = []
    for epoch in range(2):
        run.sampler.set_epoch(epoch)
        epochs.append(items(run))
    # the random crops and captions leave the model's RNG alone, and draw both captions of the samples
    assert torch.equal(torch.get_rng_state(), rng)
    assert len({c.split()[0] for c, _ in epochs[0] + epochs[1]}) == 2
    restarted = loader()
    restarted.load_state_dict({"epoch": 1, "batches": 1, "num_replicas": 1})  # saved after a step of epoch 1
    restarted.sampler.set_epoch(1)
    assert items(restarted) == epochs[1][2:]  # the same captions and crops as the uninterrupted run


def test_one_folder_is_split_into_disjoint_train_val_test(tmp_path):
    root = write_image_txt(tmp_path / "txt", make_pairs(20))
    dm = ImageTextDataModule("image_txt", root=str(root), image_size=32, holdout_fraction=0.1)
    dm.setup()
    names = {s: {r.image.name for r in dm.datasets[s].records} for s in ("train", "val", "test")}
    sizes = [len(names[s]) for s in ("train", "val", "test")]
    assert sum(sizes) == 20 and min(sizes) >= 1 and sizes[0] >= 14  # about 10% each held out
    assert not (names["train"] & names["val"]) and not (names["train"] & names["test"])
    assert not names["val"] & names["test"]


def test_holdout_split_places_each_file_by_itself_and_never_holds_out_known_bad_records(tmp_path, caplog):
    import random

    from imagen.data.bad_samples import BadSample
    from imagen.data.formats import Record
    from imagen.data.image_text import holdout_split

    def split_of(names, fraction=0.05, root=tmp_path) -> dict[str, str]:
        split = holdout_split([Record(root / n, captions=["c"]) for n in names], fraction, 3, root)
        return {r.image.name: s for s, rs in split.items() for r in rs}

    names = [f"{i:04d}.png" for i in range(600)]
    whole = split_of(names)
    assert 0.03 < sum(s == "test" for s in whole.values()) / 600 < 0.07  # about the fraction
    rng = random.Random(0)
    for n in (60, 150, 300, 599):  # corpora that grew or shrank: each file keeps its split
        part = rng.sample(names, n)
        assert split_of(part) == {name: whole[name] for name in part}, n
    # the corpus moved elsewhere: the same split (names under the root, not absolute paths)
    assert split_of(names, root=tmp_path / "moved") == whole
    # a corpus too small for the fraction lends one file to each held-out split
    assert "stand in" not in caplog.text
    tiny = split_of(names[:3], fraction=0.01)
    assert sorted(tiny.values()) == ["test", "train", "val"]
    assert "no file falls in the test and val split at data.holdout_fraction=0.01" in caplog.text
    with pytest.raises(ValueError, match="data.holdout_fraction=0.45 holds out every sample"):
        split_of(names[:3], fraction=0.45)
    # records known to be bad stay in training, where they are counted when read
    bad = [
        Record(tmp_path / f"bad{i}.png", problem=BadSample("missing_caption", f"bad{i}")) for i in range(50)
    ]
    good = [Record(tmp_path / n, captions=["c"]) for n in ("a.png", "b.png", "c.png")]
    split = holdout_split(good + bad, 0.01, 0, tmp_path)
    assert len(split["val"]) == len(split["test"]) == 1 and len(split["train"]) == 51
    with pytest.raises(ValueError, match="2 samples with an image and a caption are too few"):
        holdout_split(good[:2] + bad, 0.01, 0, tmp_path)


def test_images_without_a_caption_are_known_bad_at_indexing_and_never_held_out(tmp_path):
    root = write_image_txt(tmp_path / "txt", make_pairs(40))
    for txt in sorted(root.glob("*.txt"))[::2]:
        txt.unlink()  # half the images lose their caption file
    dm = ImageTextDataModule("image_txt", root=str(root), image_size=32, holdout_fraction=0.1)
    dm.setup("fit")
    dm.check_split("test")
    held = dm.datasets["val"].records + dm.datasets["test"].records
    assert held and all(r.problem is None and r.caption_file.is_file() for r in held)
    missing = [r for r in dm.datasets["train"].records if r.problem is not None]
    assert len(missing) == 20 and {r.problem.reason for r in missing} == {"missing_caption"}


def test_a_missing_or_unreadable_evaluation_split_is_found_before_training(tmp_path):
    pairs = make_pairs(6)
    write_image_txt(tmp_path / "split" / "train", pairs[:4])
    write_image_txt(tmp_path / "split" / "val", pairs[4:])
    dm = ImageTextDataModule("image_txt", root=str(tmp_path / "split"), image_size=32)
    dm.setup("fit")
    with pytest.raises(ValueError, match="no test split; .*or train without a test: test=false"):
        dm.check_split("test")
    # a held-out split whose only sample does not decode
    root = write_image_txt(tmp_path / "one", pairs)
    dm = ImageTextDataModule("image_txt", root=str(root), image_size=32, holdout_fraction=0.1)
    dm.setup("fit")
    test = dm.build_dataset("test").records[0].image
    test.write_bytes(b"")
    with pytest.raises(
        TooManyBadSamples, match=rf"data .test split.: .*{test.name}.*fix or replace these files"
    ):
        dm.check_split("test")


def test_fewer_training_samples_than_a_batch_is_refused(tmp_path):
    root = write_image_txt(tmp_path / "txt", make_pairs(20))
    dm = ImageTextDataModule("image_txt", root=str(root), image_size=32, holdout_fraction=0.1)
    dm.setup("fit")
    n = len(dm.datasets["train"])
    dm.hparams.batch_size = n + 1
    with pytest.raises(ValueError, match=rf"data.batch_size={n + 1}: the training split has {n} samples"):
        dm.train_dataloader()
    dm.hparams.batch_size = n
    assert len(dm.train_dataloader()) == 1


def test_coco_splits_need_annotations_per_split_when_images_are_per_split(corpora, tmp_path):
    images, annotations = corpora["coco"]["images"]["train"], corpora["coco"]["annotations"]["train"]
    dm = ImageTextDataModule("coco", images=every_split(images), annotations=annotations, image_size=32)
    with pytest.raises(
        ValueError, match="data.images is a .train, val, test. mapping but data.annotations is one"
    ):
        dm.setup("fit")
    dm = ImageTextDataModule("coco", images=str(tmp_path / "nope"), annotations=annotations, image_size=32)
    with pytest.raises(FileNotFoundError, match=r"data.images=.*nope: no such directory"):
        dm.setup("fit")


def test_imagefolder_rows_of_one_image_are_one_record_in_one_split(tmp_path):
    from imagen.data.formats import index_imagefolder

    pairs = make_pairs(20, size=(8, 8))
    for p in pairs:
        (tmp_path / f"{p.stem}.png").write_bytes(p.png)
    # one row per caption, an image's rows apart: first captions, then second captions (reversed)
    rows = [{"file_name": f"{p.stem}.png", "text": p.captions[0]} for p in pairs]
    rows += [{"file_name": f"./{p.stem}.png", "text": p.captions[1]} for p in reversed(pairs)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = index_imagefolder(tmp_path)
    assert [(r.image.name, r.captions) for r in records] == [(f"{p.stem}.png", p.captions) for p in pairs]
    dm = ImageTextDataModule("imagefolder", root=str(tmp_path), image_size=8, holdout_fraction=0.1)
    dm.setup()
    names = [[r.image.name for r in dm.datasets[s].records] for s in ("train", "val", "test")]
    assert sum(len(n) for n in names) == len(set().union(*names)) == 20  # no image in two splits


def test_split_subfolders(tmp_path):
    for split, n in (("train", 5), ("validation", 2), ("test", 3)):
        write_imagefolder(tmp_path / split, make_pairs(n, seed=len(split)))
    dm = ImageTextDataModule("imagefolder", root=str(tmp_path), image_size=32)
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 5, "val": 2, "test": 3}


# -- preprocessing ---------------------------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_every_mode_becomes_rgb_and_transparency_is_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    la = Image.new("LA", (4, 4), (0, 0))
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] * 256)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    for image, fmt, corner, centre in [
        (rgba, "PNG", (255, 0, 0), (255, 255, 255)),
        (la, "PNG", (255, 255, 255), (255, 255, 255)),
        (palette, "PNG", (0, 0, 255), (0, 0, 255)),
        (sixteen, "PNG", (255, 255, 255), (255, 255, 255)),
        (cmyk, "JPEG", None, None),
        (Image.new("L", (4, 4), 7), "PNG", (7, 7, 7), (7, 7, 7)),
    ]:
        out = open_image(encoded(image, fmt), "x", None)
        assert out.mode == "RGB", image.mode
        if corner is not None:
            assert out.getpixel((0, 0)) == corner and out.getpixel((2, 2)) == centre, image.mode
        else:
            r, g, b = out.getpixel((2, 2))
            assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_is_scaled_by_257_whatever_its_content():
    for value, expected in ((200, 1), (300, 1), (32896, 128), (65535, 255)):
        out = open_image(encoded(Image.fromarray(np.full((4, 4), value, dtype=np.uint16))), "x", None)
        assert out.getpixel((0, 0)) == (expected,) * 3, value


def test_int32_and_float_grayscale_have_a_fixed_scale_whatever_their_content():
    # brighter input never comes out darker: mode I (16-bit PGM, 32-bit TIFF) as 16 bits, mode F as [0, 1]
    for mode, value, expected in (("I", 200, 1), ("I", 1000, 4), ("I", 65535, 255), ("I", 70000, 255),
                                  ("F", 0.5, 128), ("F", 1.0, 255), ("F", 2.0, 255)):  # fmt: skip
        dtype = np.int32 if mode == "I" else np.float32
        image = Image.fromarray(np.full((4, 4), value, dtype=dtype), mode)
        out = open_image(encoded(image, "TIFF"), "x", None)
        assert out.getpixel((0, 0)) == (expected,) * 3, (mode, value)


def test_trns_transparency_is_white():
    for mode, background, opaque in (("RGB", (0, 0, 0), (255, 0, 0)), ("L", 0, 128), ("L", 9, 0)):
        image = Image.new(mode, (4, 4), background)  # transparent by a PNG tRNS color, not an alpha channel
        image.putpixel((0, 0), opaque)
        out = open_image(encoded(image, transparency=background), "x", None)
        assert out.getpixel((2, 2)) == (255, 255, 255)
        assert out.getpixel((0, 0)) == image.convert("RGB").getpixel((0, 0))


def test_sixteen_bit_trns_key_is_transparent():
    values = np.full((4, 4), 1000, dtype=np.uint16)  # the key: 1000/257 rounds to 4, as does 1001
    values[0, 0] = 1001
    out = open_image(encoded(Image.fromarray(values), transparency=1000), "x", None)
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (4, 4, 4)


def test_max_pixels_replaces_pillow_s_limit(monkeypatch):
    # Pillow's default limit, scaled down: data.max_pixels over it lets 90,000 pixels pass
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encoded(Image.new("RGB", (300, 300)))
    assert open_image(data, "big.png", None).size == (300, 300)  # null: no limit
    assert open_image(data, "big.png", 100_000).size == (300, 300)
    with pytest.raises(BadSample, match=r"big.png: too_many_pixels.*data.max_pixels=50000"):
        open_image(data, "big.png", 50_000)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored for other readers


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 4, 4))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display it turned 90 degrees clockwise
    out = open_image(encoded(image, "JPEG", exif=exif.tobytes(), quality=95), "x", None)
    assert out.size == (4, 8)
    assert sum(out.getpixel((2, 1))) > 600 and sum(out.getpixel((2, 6))) < 100  # white now on top


def test_resize_shorter_side_and_crops():
    image = Image.new("RGB", (100, 50))
    assert resize_crop(image, 32, random_crop=False).size == (32, 32)
    strip = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (32, 1)))  # a horizontal ramp
    strip = strip.convert("RGB")
    centre = np.asarray(resize_crop(strip, 32, random_crop=False))
    assert centre[0, 0, 0] == 16
    torch.manual_seed(0)
    lefts = {int(np.asarray(resize_crop(strip, 32, random_crop=True))[0, 0, 0]) for _ in range(30)}
    assert len(lefts) > 5 and min(lefts) >= 0 and max(lefts) <= 32
    seeded = [
        np.asarray(resize_crop(strip, 32, True, np.random.default_rng(seed)))[0, 0, 0] for seed in range(30)
    ]
    assert len(set(seeded)) > 5 and seeded == [  # from the generator: the same for the same seed
        np.asarray(resize_crop(strip, 32, True, np.random.default_rng(seed)))[0, 0, 0] for seed in range(30)
    ]


def test_a_thin_strip_is_resampled_only_where_it_is_cropped(monkeypatch):
    # an ordinary image: the same as resizing all of it and cropping, up to resampling rounding
    ramp = Image.fromarray(np.tile(np.arange(0, 250, 2.5).astype(np.uint8), (50, 1))).convert("RGB")  # 100x50
    whole = np.asarray(
        ramp.resize((64, 32), Image.BICUBIC, reducing_gap=3.0).crop((16, 0, 48, 32)), dtype=int
    )
    assert np.abs(np.asarray(resize_crop(ramp, 32, random_crop=False), dtype=int) - whole).max() <= 1
    # 2x20000 pixels, far under data.max_pixels: shorter side 256 first would be 256x2,560,000 pixels (2.6 GB)
    resize = Image.Image.resize

    def bounded(self, size, *args, **kwargs):
        assert size[0] * size[1] <= 256 * 256, f"an intermediate image of {size}"
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded)
    strip = Image.new("RGB", (2, 20000), (200, 0, 0))
    strip.paste((0, 0, 200), (0, 10000, 2, 20000))  # lower half blue: the centre crop straddles the edge
    image = Preprocess(image_size=256)(encoded(strip), ["a strip"], "strip.png")["image"]
    assert image.shape == (3, 256, 256)
    assert image[0, 0, 0] > 0.5 > image[2, 0, 0] and image[2, -1, 0] > 0.5 > image[0, -1, 0]


def test_caption_cleanup_and_counted_truncation():
    assert clean_caption("  a\tred \n\n square  ") == "a red square"
    assert truncate_caption("one two three four", 9) == ("one two", True)
    assert truncate_caption("short", 9) == ("short", False)
    dm = ImageTextDataModule("image_txt", root=None, max_caption_chars=10, image_size=32)
    tracker_before = dm.bad.truncated
    batch = collate([{"image": torch.zeros(3, 2, 2), "caption": "c", "name": "n", "truncated": 1}])
    dm.on_before_batch_transfer(batch, 0)
    assert dm.bad.truncated == tracker_before + 1


# -- bad samples -----------------------------------------------------------------------------------------------


def jpeg_bytes(size=(48, 40)) -> bytes:
    return encoded(
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)), "JPEG"
    )


def write_bad_folder(root, good: int = 4):
    """An image_txt folder with `good` good samples and one sample of every folder-level bad kind."""
    write_image_txt(root, make_pairs(good))
    png = make_pairs(1)[0].png
    files = {
        "truncated.jpg": jpeg_bytes()[:300],
        "corrupt.png": png[:60] + bytes(40) + png[100:],
        "empty.png": b"",
        "notes.png": b"this is not an image at all",
        "huge.png": encoded(Image.new("RGB", (300, 300))),
        "nocaption.png": png,
        "blankcaption.png": png,
        "latin1.png": png,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        if name != "nocaption.png":
            (root / name).with_suffix(".txt").write_text("a caption")
    (root / "blankcaption.txt").write_text("  \n\t\n")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "orphan.txt").write_text("a caption without its image")
    return root


FOLDER_KINDS = {
    "truncated.jpg": "corrupt_image",
    "corrupt.png": "corrupt_image",
    "empty.png": "empty_file",
    "notes.png": "not_an_image",
    "huge.png": "too_many_pixels",
    "nocaption.png": "missing_caption",
    "blankcaption.png": "empty_caption",
    "latin1.png": "undecodable_text",
    "orphan.txt": "missing_image",
}


def write_bad_shards(root):
    """Two good shards whose samples include a tar sample with no image and one with a corrupt image, plus an
    unreadable shard (not a tar) and a truncated tar."""
    pairs = make_pairs(6)
    shards = write_shards(root, pairs, per_shard=3)
    with tarfile.open(root / "00002.tar", "w") as tar:
        add_member(tar, "textonly.txt", b"a caption with no image")
        add_member(tar, "good.png", pairs[0].png)
        add_member(tar, "good.txt", b"fine")
    with tarfile.open(root / "00003.tar", "w") as tar:
        add_member(tar, "badjpeg.jpg", jpeg_bytes()[:300])
        add_member(tar, "badjpeg.txt", b"caption")
    (root / "00004.tar").write_bytes(b"garbage, not a tar archive" * 40)
    return shards + [root / "00002.tar", root / "00003.tar", root / "00004.tar"]


SHARD_KINDS = {"textonly": "missing_image", "badjpeg.jpg": "corrupt_image", "00004.tar": "unreadable_shard"}
SHARD_OF = {"textonly": "00002.tar", "badjpeg.jpg": "00003.tar", "00004.tar": "00004.tar"}


def drain(dm: ImageTextDataModule, split: str = "train") -> list[str]:
    """Read a split through its dataloader and the main-process hook; returns the good names."""
    names = []
    for batch in dm._loader(split):
        names += dm.on_before_batch_transfer(batch, 0)["name"]
    return names


def test_every_folder_bad_kind_is_skipped_and_counted(tmp_path):
    root = write_bad_folder(tmp_path / "bad")
    dm = ImageTextDataModule("image_txt", root=every_split(str(root)), image_size=32, max_pixels=50_000,
                             bad_samples="skip", max_bad_fraction=1.0, batch_size=2, num_workers=2)  # fmt: skip
    names = drain(dm, "val")  # every sample once, in order
    assert all("img" in n for n in names)
    expected: dict[str, int] = {}
    for reason in FOLDER_KINDS.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(dm.bad.total) == expected
    for file, reason in FOLDER_KINDS.items():  # the image, or for caption problems its .txt
        assert any(Path(file).stem in name for name in dm.bad.examples[reason]), (file, dm.bad.examples)
    assert "corrupt_image=2" in dm.bad.summary() and "truncated.jpg" in dm.bad.summary()
    assert set(dm.bad.total) <= set(REASONS)


@pytest.mark.parametrize("file", sorted(FOLDER_KINDS))
def test_every_folder_bad_kind_raises_with_the_file_name(tmp_path, file):
    root = write_bad_folder(tmp_path / "bad", good=0)
    dm = ImageTextDataModule("image_txt", root=every_split(str(root)), image_size=32, max_pixels=50_000,
                             bad_samples="raise")  # fmt: skip
    dataset = dm.build_dataset("val")
    index = next(i for i, r in enumerate(dataset.records) if r.image.name == file)
    with pytest.raises(BadSample, match=Path(file).stem) as error:
        dataset[index]
    assert error.value.reason == FOLDER_KINDS[file]


def test_an_unreadable_caption_or_image_file_is_a_bad_sample(tmp_path, monkeypatch):
    root = write_image_txt(tmp_path / "txt", make_pairs(3, size=(8, 8)))
    read_bytes = Path.read_bytes

    def failing(self):  # what EACCES looks like (chmod cannot show it to root)
        if self.name in ("img000.txt", "img001.png"):
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", failing)
    dm = ImageTextDataModule("image_txt", root=every_split(str(root)), image_size=8, max_bad_fraction=1.0)
    names = drain(dm, "val")
    assert [Path(n).name for n in names] == ["img002.png"] * 3  # each bad one replaced by the next good one
    assert dm.bad.total == {"unreadable_file": 2}
    assert [Path(n).name for n in dm.bad.examples["unreadable_file"]] == ["img000.txt", "img001.png"]
    assert dm.train_captions()  # fitting a tokenizer leaves the unreadable one out
    dataset = ImageTextDataModule(
        "image_txt", root=every_split(str(root)), bad_samples="raise"
    ).build_dataset("val")
    with pytest.raises(BadSample, match=r"img000.txt: unreadable_file \(.*Permission denied"):
        dataset[0]


def test_raise_from_a_dataloader_worker_names_file_and_reason(tmp_path):
    root = write_image_txt(tmp_path / "txt", make_pairs(3))
    (root / "empty.png").write_bytes(b"")
    (root / "empty.txt").write_text("caption")
    dm = ImageTextDataModule("image_txt", root=every_split(str(root)), image_size=32, bad_samples="raise",
                             num_workers=2, eval_batch_size=1)  # fmt: skip
    with pytest.raises(BadSample, match="empty.png: empty_file") as error:
        drain(dm, "val")
    assert error.value.reason == "empty_file" and error.value.name.endswith("empty.png")


def test_every_shard_bad_kind_is_skipped_and_counted(tmp_path):
    shards = write_bad_shards(tmp_path / "wds")
    dm = ImageTextDataModule("webdataset", shards=every_split(shard_spec(shards)), image_size=32,
                             max_bad_fraction=1.0, eval_samples=None, batch_size=4)  # fmt: skip
    names = drain(dm, "val")
    assert len(names) == 7  # 6 + the good sample of the mixed shard
    assert dict(dm.bad.total) == {"missing_image": 1, "corrupt_image": 1, "unreadable_shard": 1}
    for needle, reason in SHARD_KINDS.items():
        assert any(needle in name for name in dm.bad.examples[reason])


@pytest.mark.parametrize("needle", sorted(SHARD_KINDS))
def test_every_shard_bad_kind_raises_with_the_name(tmp_path, needle):
    shards = write_bad_shards(tmp_path / "wds")
    shards = [s for s in shards if s.name == SHARD_OF[needle]]
    dm = ImageTextDataModule("webdataset", shards=every_split([str(s) for s in shards]), image_size=32,
                             bad_samples="raise", eval_samples=None)  # fmt: skip
    with pytest.raises(BadSample, match=needle.replace(".", r"\.")) as error:
        eval_items(dm)
    assert error.value.reason == SHARD_KINDS[needle]


def test_truncated_tar_is_an_unreadable_shard(tmp_path):
    shards = write_shards(tmp_path / "wds", make_pairs(4), per_shard=4)
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2 + 100])
    dm = ImageTextDataModule("webdataset", shards=every_split(str(shards[0])), image_size=32,
                             max_bad_fraction=1.0, eval_samples=None)  # fmt: skip
    names = drain(dm, "val")
    assert 0 < len(names) < 4 and dict(dm.bad.total) == {"unreadable_shard": 1}


def test_too_many_bad_samples_stop():
    tracker = BadSampleTracker(max_bad_fraction=0.1, min_samples=20)
    tracker.update([("empty_file", "a.png")], good=5)  # 1/6 bad but under min_samples: not yet judged
    with pytest.raises(TooManyBadSamples, match=r"data.max_bad_fraction=0.1.*a.png"):
        tracker.update([("corrupt_image", f"{i}.png") for i in range(2)], good=12)


def test_the_bad_fraction_stop_is_decided_on_every_process_s_training_reads(tmp_path):
    import types

    from imagen.data.image_text import BAD_CHECK_EVERY

    def rank_with(other: tuple[int, int]) -> ImageTextDataModule:
        """This rank's datamodule under a 2-process trainer whose other rank read `other` (bad, good)."""
        # the other rank's counts by reason are left at 0; its totals (bad, good) come last
        strategy = types.SimpleNamespace(reduce=lambda t, reduce_op: t + torch.tensor([0] * (len(t) - 2) + [*other]),
                                         root_device=torch.device("cpu"))  # fmt: skip
        dm = ImageTextDataModule(
            "image_txt", root=every_split("unused"), max_bad_fraction=0.3, bad_check_after=10
        )
        dm.trainer = types.SimpleNamespace(world_size=2, training=True, testing=False, current_epoch=0,
                                           strategy=strategy)  # fmt: skip
        return dm

    def train_batches(dm: ImageTextDataModule, good: int) -> None:
        for i in range(BAD_CHECK_EVERY):  # batches of `good` good samples and one bad
            dm.on_before_batch_transfer({"caption": ["c"] * good, "bad": [("empty_file", f"{i}.png")]}, 0)

    train_batches(rank_with(other=(0, 200)), good=1)  # 20 of 40 bad here, 20 of 240 in all: goes on
    with pytest.raises(TooManyBadSamples, match=r"data.max_bad_fraction=0.3.*This process: 20 bad"):
        train_batches(rank_with(other=(60, 20)), good=4)  # 20 of 100 here, 80 of 180 in all: stops
    # a run shorter than the checks' interval is judged at its epoch's end (and at teardown)
    dm = rank_with(other=(30, 10))
    dm.trainer.__dict__.update(global_rank=1, is_global_zero=False, loggers=[])
    for i in range(3):
        dm.on_before_batch_transfer({"caption": ["c"], "bad": [("empty_file", f"{i}.png")]}, 0)
    with pytest.raises(TooManyBadSamples, match=r"33 of 46 samples read were bad"):
        dm.report_epoch(0)
    dm.trainer.default_root_dir = str(tmp_path / "run")  # and at teardown, the counts written first
    dm._epoch = 0
    with pytest.raises(TooManyBadSamples, match=r"33 of 46 samples read were bad"):
        dm.teardown("fit")
    assert json.loads((tmp_path / "run" / "bad_samples.rank1.json").read_text())["counts"] == {
        "empty_file": 3
    }
    # evaluation reads are counted apart and stop nothing, however bad
    dm = rank_with(other=(0, 0))
    dm.trainer.training = False
    dm.trainer.testing = True
    for _ in range(30):
        dm.on_before_batch_transfer({"caption": [], "bad": [("corrupt_image", "x.jpg")]}, 0)
    assert dm.bad.bad == 0 and dm.bad_eval["test"].bad == 30
    assert dm.bad_eval["test"].examples == {"corrupt_image": ["x.jpg"]}  # a file read again is named once


def _report_bad_samples_in_process(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import types

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    def reduce(tensor, group=None, reduce_op="mean"):  # what DDPStrategy.reduce does for "sum"
        assert reduce_op == "sum"
        dist.all_reduce(tensor)
        return tensor

    logged = []
    logger = types.SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    strategy = types.SimpleNamespace(reduce=reduce, root_device=torch.device("cpu"))
    dm = ImageTextDataModule(
        "image_txt", root=every_split("unused"), bad_samples="skip", max_bad_fraction=1.0
    )
    dm.trainer = types.SimpleNamespace(world_size=world, global_rank=rank, is_global_zero=rank == 0, global_step=7,
                                       strategy=strategy, loggers=[logger], default_root_dir=None)  # fmt: skip
    # rank 0 read one truncated JPEG; rank 1 two empty files and a corrupt image; only rank 1 has a count to warn of
    bad = [("corrupt_image", "a.jpg")] if rank == 0 else [("empty_file", "b.png"), ("empty_file", "c.png")]
    dm.bad.update(bad + [("corrupt_image", "d.jpg")] * rank, good=10)
    dm.report_epoch(0)
    dm.report_epoch(1)  # nothing bad this epoch: every rank still takes part, nothing is logged
    torch.save(logged, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_the_logged_bad_sample_counts_are_the_sums_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_report_bad_samples_in_process, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "rank0.pt") == [
        (7, {"data/bad_corrupt_image": 2.0, "data/bad_empty_file": 2.0})
    ]
    assert torch.load(tmp_path / "rank1.pt") == []  # the loggers write on rank 0 only


# -- WebDataset under DDP: every sample once per epoch, no shard on two ranks ------------------------------------


def test_webdataset_split_over_two_ranks_and_workers(tmp_path, monkeypatch):
    pairs = make_pairs(24, size=(8, 8))
    shards = write_shards(tmp_path / "wds", pairs, per_shard=3)  # 8 shards: 2 ranks x 2 workers x 2 shards
    seen: dict[int, list[str]] = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))  # what webdataset's split_by_node reads (as torch.distributed)
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = ImageTextDataModule("webdataset", shards=every_split(shard_spec(shards)), image_size=8, resampled=False,
                                 shuffle_buffer=10, batch_size=5, num_workers=2)  # fmt: skip
        seen[rank] = drain(dm, "train")
    all_names = seen[0] + seen[1]
    assert sorted(n.rsplit(":", 1)[1] for n in all_names) == sorted(f"{p.stem}.png" for p in pairs)
    shards_of = {rank: {n.rsplit(":", 1)[0] for n in names} for rank, names in seen.items()}
    assert shards_of[0].isdisjoint(shards_of[1]) and len(shards_of[0]) == len(shards_of[1]) == 4


def test_a_stream_read_once_per_epoch_is_refused_for_training_on_several_processes(tmp_path):
    from types import SimpleNamespace

    shards = write_shards(tmp_path / "wds", make_pairs(12, size=(8, 8)), per_shard=2)
    dm = ImageTextDataModule(
        "webdataset", shards=shard_spec(shards), image_size=8, resampled=False, batch_size=2
    )
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="data.resampled=false with 2 processes: .* data.resampled=true"):
        dm.train_dataloader()
    dm.val_dataloader()  # evaluation reads every shard on every process: fine
    dm.trainer = SimpleNamespace(world_size=1)
    assert sum(len(batch["caption"]) for batch in dm.train_dataloader()) == 8  # 4 training shards of 2


def test_resampled_training_stream_has_the_epoch_length(tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "wds", make_pairs(6, size=(8, 8)), per_shard=2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = ImageTextDataModule("webdataset", shards=shard_spec(shards), image_size=8, samples_per_epoch=20,
                             batch_size=4, num_workers=2)  # fmt: skip
    first, second = drain(dm), drain(dm)
    assert len(first) == len(second) == 10  # this rank's half of the epoch, 5 per worker
    assert first != second  # a fresh draw of shards and shuffle each epoch


def test_malformed_metadata_and_annotations_name_the_file_and_line(tmp_path):
    from imagen.data.formats import index_coco, index_imagefolder

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "a red circle"}\n{"file_name": "b.png",\n'
    )
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'metadata.jsonl'}:2: not a JSON object")):
        index_imagefolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"text": "a red circle"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl: a row has no 'file_name' column"):
        index_imagefolder(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl or metadata.csv"):
        index_imagefolder(tmp_path)
    # metadata.csv works too; an image without a row is reported, not dropped
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,a red circle\n")
    records = index_imagefolder(tmp_path)
    assert records[0].read_captions() == ["a red circle"]
    assert records[1].problem.reason == "missing_caption" and records[1].image.name == "b.png"

    annotations = tmp_path / "captions.json"
    annotations.write_text('{"images": []')
    with pytest.raises(
        ValueError, match=re.escape(f"data.annotations={annotations}: cannot read a COCO JSON")
    ):
        index_coco(tmp_path, annotations)
    annotations.write_text('{"images": []}')
    with pytest.raises(ValueError, match="no 'annotations' list"):
        index_coco(tmp_path, annotations)
    annotations.write_text('{"images": [], "annotations": [{"image_id": 1}]}')
    with pytest.raises(ValueError, match=r"annotations\[0\] lacks 'image_id' or 'caption'"):
        index_coco(tmp_path, annotations)
    captions = [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": None}]
    annotations.write_text(json.dumps({"images": [], "annotations": captions}))
    with pytest.raises(ValueError, match=r"annotations\[1\] has a caption that is no string"):
        index_coco(tmp_path, annotations)
    for entry, key in (({"file_name": "a.png"}, "id"), ({"id": 1, "file_name": None}, "file_name")):
        images = [{"id": 0, "file_name": "b.png"}, entry]
        annotations.write_text(json.dumps({"images": images, "annotations": []}))
        with pytest.raises(ValueError, match=rf"captions.json: images\[1\] lacks '{key}'"):
            index_coco(tmp_path, annotations)
    # entries that are no objects, and lists that are no lists, are named too
    for data, message in (
        ({"images": ["a.png"], "annotations": []}, r"images\[0\] is no JSON object: 'a.png'"),
        ({"images": [], "annotations": [[1, "a"]]}, r"annotations\[0\] is no JSON object"),
        ({"images": {"id": 1}, "annotations": []}, "no 'images' list"),
    ):
        annotations.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=message):
            index_coco(tmp_path, annotations)


def test_metadata_that_is_not_utf8_or_not_an_object_is_refused_naming_the_file(tmp_path):
    from imagen.data.formats import index_coco, index_imagefolder

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    csv_file, jsonl = tmp_path / "metadata.csv", tmp_path / "metadata.jsonl"
    csv_file.write_bytes("\ufefffile_name,text\na.png,café\n".encode())  # a BOM, as Excel writes
    assert [r.captions for r in index_imagefolder(tmp_path)] == [["café"]]
    csv_file.write_bytes("file_name,text\na.png,café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{csv_file}: not UTF-8 text")):
        index_imagefolder(tmp_path)
    csv_file.unlink()
    jsonl.write_bytes('\ufeff{"file_name": "a.png", "text": "x"}\n'.encode())
    assert [r.captions for r in index_imagefolder(tmp_path)] == [["x"]]
    jsonl.write_text('{"file_name": "a.png", "text": "x"}\n5\n')
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}:2: not a JSON object: 5")):
        index_imagefolder(tmp_path)
    annotations = tmp_path / "captions.json"
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": "café"}]}
    annotations.write_bytes(json.dumps(coco, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(
        ValueError, match=re.escape(f"data.annotations={annotations}: cannot read a COCO JSON")
    ):
        index_coco(tmp_path, annotations)
    annotations.write_bytes(("\ufeff" + json.dumps(coco, ensure_ascii=False)).encode())
    assert [r.captions for r in index_coco(tmp_path, annotations)] == [["café"]]


def test_captions_are_split_at_line_ends_only_and_must_be_text(tmp_path):
    from imagen.data.bad_samples import BadSample
    from imagen.data.formats import index_coco, index_image_txt, index_imagefolder
    from imagen.data.preprocess import clean_captions, split_lines

    # str.splitlines would also split at U+2028, \x85 and form feeds
    assert split_lines("a\u2028b\x85c\x0cd\r\ne\rf\n") == ["a\u2028b\x85c\x0cd", "e", "f"]
    assert split_lines("") == [] and split_lines("a") == ["a"] and split_lines("a\n\nb\n") == ["a", "", "b"]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\u2028on a table\nanother caption\n", encoding="utf-8")
    assert index_image_txt(tmp_path)[0].read_captions() == ["a red square\u2028on a table", "another caption"]
    (tmp_path / "a.txt").unlink()
    jsonl = tmp_path / "metadata.jsonl"
    jsonl.write_text(
        json.dumps({"file_name": "a.png", "text": "x\u2028y"}, ensure_ascii=False) + "\n", "utf-8"
    )
    assert index_imagefolder(tmp_path)[0].captions == ["x\u2028y"]  # one row, not a broken one
    # a caption that is no string is a counted bad sample naming it, not the text "None"
    for value, shown in (
        ([None, "b"], "caption 0 is None"),
        (5, "caption 0 is 5"),
        (["a", {"x": 1}], "caption 1"),
    ):
        jsonl.write_text(json.dumps({"file_name": "a.png", "text": value}) + "\n")
        with pytest.raises(BadSample, match=f"a.png: undecodable_text \\({re.escape(shown)}"):
            clean_captions(index_imagefolder(tmp_path)[0].read_captions(), str(tmp_path / "a.png"))
    # a COCO image listed twice would be two samples, and could sit in training and in a held-out split
    annotations = tmp_path / "captions.json"
    for images, message in (
        (
            [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "a.png"}],
            "file_name 'a.png' of images[0]",
        ),
        ([{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}], "id 1 of images[0]"),
    ):
        annotations.write_text(json.dumps({"images": images, "annotations": []}))
        with pytest.raises(ValueError, match=re.escape(f"{annotations}: images[1] repeats the {message}")):
            index_coco(tmp_path, annotations)


def test_coco_captions_of_an_unlisted_image_are_a_missing_image(tmp_path):
    images, annotations = write_coco(tmp_path / "coco", make_pairs(3, size=(8, 8)))
    data = json.loads(annotations.read_text())
    data["annotations"].append({"id": 1, "image_id": 99, "caption": "an image with no entry"})
    annotations.write_text(json.dumps(data))
    dm = ImageTextDataModule("coco", images=every_split(str(images)), annotations=every_split(str(annotations)),
                             image_size=8, max_bad_fraction=1.0)  # fmt: skip
    assert len(drain(dm, "val")) == 4  # the fourth record, image_id 99, replaced by the first
    assert dm.bad.total == {"missing_image": 1}
    assert dm.bad.examples["missing_image"] == [f"{annotations}#image_id=99"]


def test_a_caption_column_no_row_has_is_refused_listing_the_columns(tmp_path):
    root = write_imagefolder(tmp_path / "hf", make_pairs(6, size=(8, 8)))
    dm = ImageTextDataModule("imagefolder", root=str(root), caption_column="caption", holdout_fraction=0.1)
    with pytest.raises(
        ValueError, match=r"data.caption_column='caption'.*columns are \['file_name', 'text'\]"
    ):
        dm.train_captions()


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"image_size": 0}, "data.image_size=0: must be an integer >= 1"),
        ({"image_size": -8}, "data.image_size=-8: must be an integer >= 1"),
        ({"holdout_fraction": -0.5}, r"data.holdout_fraction=-0.5: must be in \(0, 0.5\)"),
        ({"holdout_fraction": 0.5}, r"data.holdout_fraction=0.5: must be in \(0, 0.5\)"),
        ({"max_pixels": -1}, "data.max_pixels=-1: must be >= 1, or null for no limit"),
        ({"max_caption_chars": 0}, "data.max_caption_chars=0: must be >= 1, or null for no limit"),
    ],
)
def test_settings_out_of_range_are_refused_up_front(setting, message):
    with pytest.raises(ValueError, match=message):
        ImageTextDataModule("image_txt", root="unused", **setting)
