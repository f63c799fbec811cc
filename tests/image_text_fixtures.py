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
