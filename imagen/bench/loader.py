"""Loader throughput: JPEG decode + preprocessing per worker, and the token cache's samples/s.

    python -m imagen.bench.loader                       # 256 px crops of 640x480 JPEGs; a 16x16-token cache
    python -m imagen.bench.loader --workers 0 2 --json out.json

The JPEG part reads an image_txt corpus it writes to a temporary folder (photo-like content: smooth gradients
plus noise, quality 90) through the training dataset (shorter side resize, random crop, RGB, [-1, 1]); with
`--workers 0` the main process does the work, so its images/s is the rate of one worker. The cache part writes
shards of random tokens and captions and reads them through `TokenCacheDataset` with a batched DataLoader.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from imagen.data.image_text import ImageTextDataModule, collate
from imagen.data.token_cache import TokenCacheDataset, _write_json, write_shard


def photo_like(rng: np.random.Generator, width: int, height: int) -> bytes:
    """JPEG bytes of a smooth color field with noise (compresses and decodes like a photo, unlike pure noise)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [np.sin(x / rng.uniform(20, 90) + c) * np.cos(y / rng.uniform(20, 90)) for c in range(3)], -1
    )
    pixels = np.clip(127 + 100 * base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_jpeg_corpus(root: Path, count: int, width: int, height: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        (root / f"{i:05d}.jpg").write_bytes(photo_like(rng, width, height))
        (root / f"{i:05d}.txt").write_text(f"a photo-like test image number {i}\n")
    return root


def rate(loader, count_of, min_seconds: float) -> float:
    """Items per second over whole passes of `loader` lasting at least `min_seconds` (after one warm-up item)."""
    iterator = iter(loader)
    next(iterator)
    items, start = 0, time.perf_counter()
    while True:
        for batch in iterator:
            items += count_of(batch)
        if time.perf_counter() - start >= min_seconds:
            return items / (time.perf_counter() - start)
        iterator = iter(loader)


def bench_jpeg(root: Path, size: int, workers: list[int], min_seconds: float) -> dict[str, float]:
    dm = ImageTextDataModule("image_txt", root={"train": str(root)}, image_size=size, max_caption_chars=300)
    dataset = dm.build_dataset("train")
    out = {}
    for w in workers:
        loader = DataLoader(dataset, batch_size=16, shuffle=True, num_workers=w, collate_fn=collate,
                            persistent_workers=w > 0)  # fmt: skip
        out[f"jpeg_{size}px_images_per_s_workers_{w}"] = rate(
            loader, lambda b: len(b["caption"]), min_seconds
        )
    return out


def bench_cache(root: Path, samples: int, grid: int, shard_size: int, batch: int, workers: list[int],
                min_seconds: float) -> dict[str, float]:  # fmt: skip
    rng = np.random.default_rng(0)
    shards = []
    for number, start in enumerate(range(0, samples, shard_size)):
        n = min(shard_size, samples - start)
        tokens = rng.integers(0, 16384, (n, grid, grid), dtype=np.uint16)
        captions = [f"a caption of about ten words for sample {start + i} in the cache" for i in range(n)]
        shards.append(write_shard(root, f"shard_{number:05d}", tokens, captions, {}))
    header = {"version": 1, "split": "train", "image_size": grid * 16, "grid": [grid, grid], "vocab_size": 16384,
              "dtype": "uint16", "autoencoder": {"path": "synthetic", "sha256": ""}}  # fmt: skip
    _write_json(root / "index.json", {**header, "shards": shards, "total": samples})
    dataset = TokenCacheDataset(root, random_caption=True)
    out = {}
    for w in workers:
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=w, collate_fn=collate,
                            persistent_workers=w > 0)  # fmt: skip
        out[f"cache_samples_per_s_workers_{w}"] = rate(loader, lambda b: b["tokens"].shape[0], min_seconds)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="crop size (px)")
    parser.add_argument("--source", type=int, nargs=2, default=[640, 480], help="JPEG width height")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--cache-samples", type=int, default=100_000)
    parser.add_argument("--grid", type=int, default=16, help="tokens per side in the cache")
    parser.add_argument("--batch", type=int, default=256, help="cache batch size")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum time per measurement")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core per worker, as in a DataLoader worker
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread",
                     "args": vars(args)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "jpeg").mkdir()
        jpeg_root = write_jpeg_corpus(Path(tmp) / "jpeg", args.images, *args.source)
        results.update(bench_jpeg(jpeg_root, args.size, args.workers, args.seconds))
        cache_root = Path(tmp) / "cache"
        cache_root.mkdir()
        results.update(bench_cache(cache_root, args.cache_samples, args.grid, 10_000, args.batch, args.workers,
                                   args.seconds))  # fmt: skip
    for key, value in results.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
