"""Small image-text corpora in every supported format, written with Pillow, json and tarfile."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Pair:
    stem: str
    png: bytes  # lossless, so every format decodes identical pixels
    captions: list[str]


def make_pairs(n: int, size: tuple[int, int] = (40, 32), seed: int = 0) -> list[Pair]:
    """`n` distinct non-square images with two captions each (the first with messy whitespace)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pairs.append(
            Pair(f"img{i:03d}", buffer.getvalue(), [f"  picture\tnumber {i} ", f"another caption {i}"])
        )
    return pairs


def write_image_txt(root: Path, pairs: list[Pair]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for p in pairs:
        (root / f"{p.stem}.png").write_bytes(p.png)
        (root / f"{p.stem}.txt").write_text("\n".join(p.captions) + "\n")
    return root


def write_imagefolder(root: Path, pairs: list[Pair], as_csv: bool = False) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in pairs:
        (root / "images" / f"{p.stem}.png").write_bytes(p.png)
        rows.append({"file_name": f"images/{p.stem}.png", "text": p.captions[0]})
    if as_csv:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_coco(root: Path, pairs: list[Pair]) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    data: dict = {"images": [], "annotations": []}
    for i, p in enumerate(pairs):
        (images / f"{p.stem}.png").write_bytes(p.png)
        data["images"].append({"id": 100 + i, "file_name": f"{p.stem}.png", "width": 40, "height": 32})
        for j, caption in enumerate(p.captions):
            data["annotations"].append({"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": caption})
    annotations = root / "captions.json"
    annotations.write_text(json.dumps(data))
    return images, annotations


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, pairs: list[Pair], per_shard: int, json_captions: bool = False) -> list[Path]:
    """Tar shards `00000.tar`, ... with `<stem>.png` + `<stem>.txt` (or `.json` with a `caption` list)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(pairs), per_shard)):
        path = root / f"{number:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for p in pairs[start : start + per_shard]:
                add_member(tar, f"{p.stem}.png", p.png)
                if json_captions:
                    add_member(tar, f"{p.stem}.json", json.dumps({"caption": p.captions}).encode())
                else:
                    add_member(tar, f"{p.stem}.txt", "\n".join(p.captions).encode())
        paths.append(path)
    return paths


def shard_spec(paths: list[Path]) -> str:
    return f"{paths[0].parent}/{{00000..{len(paths) - 1:05d}}}.tar"


def write_autoencoder_ckpt(path: Path, size: str = "tiny") -> Path:
    """An autoencoder-stage checkpoint with freshly initialized weights (what `load_autoencoder` reads); FSQ, whose
    codes need no data-dependent initialization."""
    from dataclasses import asdict

    import torch

    from imagen.models.autoencoder import Autoencoder

    torch.manual_seed(0)
    net = Autoencoder.from_size(size, quantizer="fsq")
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"imagen": {"stage": "autoencoder", "net_config": asdict(net.config)}, "state_dict": state}, path
    )
    return path


# Overrides that make the real-corpus experiments tiny: 32 px, small batches, no workers, tiny models.
TINY_CORPUS = ["data.image_size=32", "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0",
               "data.persistent_workers=false", "data.pin_memory=false", "data.prefetch_factor=null",
               "trainer.limit_val_batches=1"]  # fmt: skip
TINY_TEXT = ["model.text_encoder.vocab_size=256", "model.text_encoder.max_length=32", "model.text_encoder.layers=1",
             "model.text_encoder.heads=2"]  # fmt: skip


def build_corpora(root: Path, n: int = 12) -> dict[str, list[str]]:
    """Fixtures of every format under `root`; per format the `data=` override and its path overrides."""
    pairs = make_pairs(n)
    txt = write_image_txt(root / "txt", pairs)
    folder = write_imagefolder(root / "hf", pairs)
    images, annotations = write_coco(root / "coco", pairs)
    shards = write_shards(root / "wds", pairs, per_shard=4)
    return {
        "image_txt": ["data=image_txt", f"data.root={txt}", "data.holdout_fraction=0.1"],
        "imagefolder": ["data=imagefolder", f"data.root={folder}", "data.holdout_fraction=0.1"],
        "coco": [
            "data=coco",
            f"data.images={images}",
            f"data.annotations={annotations}",
            "data.holdout_fraction=0.1",
        ],
        "webdataset": [
            "data=webdataset",
            f"data.shards='{shard_spec(shards)}'",
            "data.samples_per_epoch=8",
            "data.eval_samples=4",
            "data.shuffle_buffer=4",
        ],  # fmt: skip
    }
