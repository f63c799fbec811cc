"""One image-text DataModule for real corpora: imagefolder, image_txt, coco, webdataset and the token cache.

Items are `{"image": (3, S, S) float in [-1, 1], "caption": str, "name": str}` (token cache:
`{"tokens": (h * w,) long, "caption": str, "name": str}`), plus `index` in the map-style formats (the sample's
index in its split); batches add `bad` (the (reason, file) pairs of the
samples dropped before them) and `truncated`, which the datamodule takes out in the main process and counts
(`imagen.data.bad_samples`), so drops inside dataloader workers are counted too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from imagen.data.bad_samples import REASONS, BadSample, BadSampleTracker, TooManyBadSamples, read_sample_file
from imagen.data.formats import (
    SPLITS,
    STAGE_SPLITS,
    Record,
    index_coco,
    index_image_txt,
    index_imagefolder,
    split_subfolder,
    split_value,
)
from imagen.data.preprocess import (
    IMAGE_EXTENSIONS,
    clean_captions,
    decode_text,
    open_image,
    resize_crop,
    split_lines,
    to_tensor,
    truncate_caption,
)
from imagen.data.resumable import ResumableLoader
from imagen.distributed import sum_over_ranks

log = logging.getLogger(__name__)

FORMATS = ("imagefolder", "image_txt", "coco", "webdataset", "token_cache")
# training batches between the checks of the bad fraction on every process's counts (DDP)
BAD_CHECK_EVERY = 20
POLICIES = ("skip", "raise")
# the paths each map-style format needs (the others: data.root)
REQUIRED_KEYS = {"coco": ("images", "annotations")}
# `holdout_split`'s rule, as checkpoints record it: a new rule gets a new name
HOLDOUT_RULE = "sha256(seed, path) < fraction"


@dataclass
class Preprocess:
    """Bytes + raw captions -> an item; raises `BadSample`. The random crop and caption draw from `seed` when given
    (a training item's seed, `EpochShuffleSampler(item_seeds=True)`), else from the torch RNG."""

    image_size: int = 256
    random_crop: bool = False  # else a center crop
    random_caption: bool = False  # one of a sample's captions at random (training), else the first
    max_pixels: int | None = 64_000_000
    max_caption_chars: int | None = 300
    keep_all_captions: bool = (
        False  # also `all_captions`: every caption, one per line (the token cache writer)
    )

    def __call__(
        self, image_bytes: bytes, captions: list[str] | None, name: str, seed: int | None = None
    ) -> dict:
        # captions first: a caption problem skips the decode
        cut = [truncate_caption(c, self.max_caption_chars) for c in clean_captions(captions, name)]
        rng = None if seed is None else np.random.default_rng(seed)
        pick = 0
        if self.random_caption and len(cut) > 1:
            pick = int(rng.integers(len(cut))) if rng is not None else int(torch.randint(len(cut), ()))
        image = open_image(image_bytes, name, self.max_pixels, draft_size=self.image_size)
        image = resize_crop(image, self.image_size, self.random_crop, rng)
        item = {
            "image": to_tensor(image),
            "caption": cut[pick][0],
            "name": name,
            "truncated": int(cut[pick][1]),
        }
        if self.keep_all_captions:
            item["all_captions"] = "\n".join(c for c, _ in cut)
            item["truncated"] = int(any(t for _, t in cut))
        return item


def _with_bad(item: dict, bad: list[tuple[str, str]]) -> dict:
    item["bad"] = list(bad)
    bad.clear()
    return item


class RecordDataset(Dataset):
    """Map-style dataset over `Record`s, indexed by `index` or `(index, item_seed)` (the seed of `Preprocess`'s
    random choices). Under `policy="skip"` a bad sample is replaced by the next good one (its record travels in the
    item's `bad`, and the item is marked `stand_in`: evaluation leaves it out, since its own index is read too);
    under `"raise"` the `BadSample` propagates."""

    def __init__(
        self, records: list[Record], preprocess: Preprocess, policy: str = "skip", substitute: bool = True
    ):
        if not records:
            raise ValueError("an empty split: no samples were found")
        self.records, self.preprocess, self.policy = records, preprocess, policy
        self.substitute = (
            substitute  # False: a bad sample yields an item with only `bad` (the token cache writer)
        )

    def __len__(self) -> int:
        return len(self.records)

    def load(self, record: Record, seed: int | None = None) -> dict:
        captions = record.read_captions()
        return self.preprocess(read_sample_file(record.image), captions, str(record.image), seed)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, item_seed = key if isinstance(key, tuple) else (key, None)
        bad: list[tuple[str, str]] = []
        for offset in range(len(self.records)):
            read = (index + offset) % len(self.records)
            try:
                item = _with_bad(self.load(self.records[read], item_seed), bad)
                return {**item, "index": read, "stand_in": offset > 0}
            except BadSample as e:
                if self.policy == "raise":
                    raise
                if offset == 0:  # a stand-in that is bad too is counted when its own index is read
                    bad.append((e.reason, e.name))
                if not self.substitute:
                    return {"bad": bad}
        raise TooManyBadSamples(f"every one of the {len(self.records)} samples is bad: {bad[:5]} ...")


def _worker_seed(epoch: int) -> int:
    """A per-rank, per-worker, per-epoch seed that follows the global seed: the DataLoader draws a base seed from
    the main process's torch RNG whenever it starts its workers, and persistent workers keep theirs, so `epoch`
    (the worker's count of its passes) tells their epochs apart."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    info = get_worker_info()
    base = info.seed if info is not None else int(torch.randint(2**62, ()))
    return wds.utils.make_seed(base, rank, worker, epoch)


class WebDatasetStream(IterableDataset):
    """Streams (image, caption) samples from WebDataset tar shards with the `webdataset` library.

    `resampled=True` (training): every rank and worker draws shards at random with replacement, forever; an
    epoch is `samples_per_epoch` samples in all (split evenly over ranks and workers). `resampled=False`: each
    shard is read once per epoch, shared out by `split`: "shards" (training) splits the shards by rank
    (`wds.split_by_node`) and then by dataloader worker (`wds.split_by_worker`), so no two ranks or workers read the
    same shard; "samples" (evaluation, whose one held-out shard must reach every rank) has every rank and worker read
    every shard and keep every (ranks x workers)-th sample; "none" reads every shard here (the token cache writer
    gives each process its own).
    Members: an image (`.jpg/.jpeg/.png/.webp`) and a caption (`.txt`, else `caption_key` of `.json`).
    `substitute=False` (the token cache writer): shards that give no good sample end with an item holding only
    `bad`, instead of an error.
    """

    def __init__(self, urls: list[str], preprocess: Preprocess, policy: str = "skip", resampled: bool = False,
                 samples_per_epoch: int | None = None, shuffle_buffer: int = 0, caption_key: str = "caption",
                 limit: int | None = None, split: str = "shards", substitute: bool = True):  # fmt: skip
        super().__init__()
        self.urls, self.preprocess, self.policy = list(urls), preprocess, policy
        self.resampled, self.samples_per_epoch, self.limit = resampled, samples_per_epoch, limit
        self.shuffle_buffer, self.caption_key = shuffle_buffer, caption_key
        if split not in ("shards", "samples", "none"):
            raise ValueError(f"split={split!r}: choose shards, samples or none")
        self.split, self.substitute = split, substitute
        self.epoch = 0  # passes over the stream in this process (a persistent worker's count of its epochs)

    def captions_of(self, raw: dict, name: str) -> list[str] | None:
        """A tar sample's captions: the lines of `.txt`, else `caption_key` of `.json` (None: neither)."""
        if "txt" in raw:
            return split_lines(decode_text(raw["txt"], f"{name}.txt"))
        if "json" in raw:
            try:
                meta = json.loads(decode_text(raw["json"], f"{name}.json"))
            except json.JSONDecodeError as e:
                raise BadSample("undecodable_text", f"{name}.json", str(e)) from None
            value = meta.get(self.caption_key) if isinstance(meta, dict) else None
            return None if value is None else (value if isinstance(value, list) else [value])
        return None

    def check_caption_key(self) -> None:
        """Refuse a `caption_key` that the first sample's `.json` lacks when it has no `.txt` (every sample would be
        a `missing_caption` skip). A first shard that cannot be read is left to the stream to report."""
        try:
            raw = next(iter(wds.DataPipeline(wds.SimpleShardList(self.urls[:1]), wds.tarfile_to_samples())))
            meta = json.loads(raw["json"]) if "json" in raw and "txt" not in raw else None
        except Exception:  # noqa: BLE001 - unreadable shards and samples are counted when read
            return
        if isinstance(meta, dict) and self.caption_key not in meta:
            raise ValueError(
                f"data.caption_key={self.caption_key!r}: the first sample of {self.urls[0]} "
                f"({raw.get('__key__')}) has no .txt and its .json has no such key; its keys: {sorted(meta)}"
            )

    def sample(self, raw: dict) -> dict:
        """A grouped tar sample (`__key__`, `__url__`, members by extension) -> an item, or `BadSample`."""
        name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        image_key = next((k for k in raw if not k.startswith("__") and "." + k in IMAGE_EXTENSIONS), None)
        if image_key is None:
            members = sorted(k for k in raw if not k.startswith("__"))
            raise BadSample("missing_image", name, f"members: {members}")
        return self.preprocess(raw[image_key], self.captions_of(raw, name), f"{name}.{image_key}")

    def __iter__(self) -> Iterator[dict]:
        self.epoch += 1
        # drawn only where it is used: an evaluation pass leaves the global RNG alone
        seed = _worker_seed(self.epoch) if self.resampled or self.shuffle_buffer else None
        bad: list[tuple[str, str]] = []
        count = 0  # good samples yielded
        failed: set[str] = set()
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        share, shares = rank * workers + worker, world * workers

        def shard_error(exn: Exception) -> bool:
            text = " ".join(map(str, exn.args))  # webdataset appends the url, or names the open file
            url = next((u for u in self.urls if u in text), "?")
            if url in failed:  # the tar reader and the expander both report a broken stream
                return True
            failed.add(url)
            error = BadSample(
                "unreadable_shard", url, f"{type(exn).__name__}: {exn.args[0] if exn.args else ''}"
            )
            if self.policy == "raise":
                raise error from exn
            if self.split != "samples" or share == 0:  # a shard every reader opens is counted once
                bad.append((error.reason, error.name))
            # a resampled stream would draw them again forever
            if self.resampled and not count and failed >= set(self.urls):
                raise TooManyBadSamples(f"no shard of data.shards could be read: {bad[:5]}") from exn
            return True

        def this_share(samples: Iterator[dict]) -> Iterator[dict]:
            return (sample for i, sample in enumerate(samples) if i % shares == share)

        if self.resampled:
            stages = [wds.ResampledShards(self.urls, worker_seed=lambda: seed, deterministic=True)]
        else:
            stages = [wds.SimpleShardList(self.urls)]
            if self.split == "shards":
                stages += [wds.split_by_node, wds.split_by_worker]
        stages.append(wds.tarfile_to_samples(handler=shard_error))
        if not self.resampled and self.split == "samples":
            stages.append(this_share)
        if self.shuffle_buffer:
            stages.append(wds.shuffle(self.shuffle_buffer, rng=random.Random(seed)))
        # one good item is held back so that drops after the last good sample travel with it
        budget, held = self._budget(), None
        for raw in wds.DataPipeline(*stages):
            try:
                item = self.sample(raw)
            except BadSample as e:
                if self.policy == "raise":
                    raise
                bad.append((e.reason, e.name))
                continue
            if held is not None:
                yield held
            held = _with_bad(item, bad)
            count += 1
            if budget is not None and count >= budget:
                break
        if held is not None:
            held["bad"] += bad
            yield held
        elif bad and not self.substitute:
            yield {"bad": bad}
        elif bad:
            raise TooManyBadSamples(f"no good sample in this rank/worker's shards; dropped: {bad[:5]}")

    def _budget(self) -> int | None:
        """Samples this rank/worker yields per epoch: its share of `samples_per_epoch` (resampled), or `limit`."""
        if self.resampled:
            if not self.samples_per_epoch:
                raise ValueError(
                    "data.samples_per_epoch is required with data.resampled=true (an epoch's length)"
                )
            _, world, _, workers = wds.utils.pytorch_worker_info()
            return math.ceil(self.samples_per_epoch / (world * workers))
        return self.limit


def collate(items: list[dict]) -> dict:
    """Stack images or tokens; captions and names as lists; gather the dropped samples' records."""
    bad = [pair for item in items for pair in item.get("bad", ())]
    good = [item for item in items if "caption" in item]
    batch: dict = {
        "caption": [item["caption"] for item in good],
        "name": [item["name"] for item in good],
        "bad": bad,
        "truncated": sum(item.get("truncated", 0) for item in good),
    }
    if good and "all_captions" in good[0]:
        batch["all_captions"] = [item["all_captions"] for item in good]
    if good and "index" in good[0]:  # the dataset's index of each sample (map-style formats)
        batch["index"] = torch.tensor([item["index"] for item in good])
        # the rows that stand in for a bad sample (a repeat of a sample read at its own index too)
        batch["stand_in"] = torch.tensor([item.get("stand_in", False) for item in good], dtype=torch.bool)
    for key in ("image", "tokens"):
        if good and key in good[0]:
            batch[key] = torch.stack([item[key] for item in good])
    return batch


def expand_shards(spec: str | list[str], key: str = "data.shards") -> list[str]:
    """`DIR/{00000..00099}.tar` (brace notation), a list, or a glob -> shard paths; an error names the key, and
    the local files that do not exist (URLs and `pipe:` commands are read as they come)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [url for s in specs for url in wds.shardlists.expand_urls(s)]
    if len(urls) == 1 and any(c in urls[0] for c in "*?["):
        urls = sorted(str(p) for p in Path("/").glob(str(Path(urls[0]).resolve()).lstrip("/")))
    if not urls:
        raise ValueError(f"{key}={spec!r}: matches no shard")
    local = [u for u in urls if not urlparse(u).scheme and u != "-"]  # not a URL, `pipe:` command or stdin
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{key}={spec!r}: {len(missing)} of {len(urls)} shards do not exist: {missing[:3]}"
        )
    return urls


def holdout_split(records: list[Record], fraction: float, seed: int, root: Path) -> dict[str, list[Record]]:
    """Carve test and val (each about `fraction` of the records, at least one) out of one list, deterministically.

    Each file's place follows from a hash of `seed` and its path under `root` alone, as a number u in [0, 1): test
    holds the files with u < `fraction`, val those with u < 2 x `fraction`, training the rest. So adding files to
    the corpus, or removing some, moves no other file between splits (a corpus too small to have a file in test or
    val lends it the training file of lowest u). Records already known to be bad (no caption, no image) are never
    held out: they stay in training, where they are counted when read."""

    def place(record: Record) -> float:
        image = record.image
        name = image.relative_to(root).as_posix() if image.is_relative_to(root) else str(image)
        return int(hashlib.sha256(f"{seed}\0{name}".encode()).hexdigest()[:15], 16) / 16**15

    places = {id(r): place(r) for r in records if r.problem is None}
    usable = sorted((r for r in records if r.problem is None), key=lambda r: places[id(r)])
    if len(usable) < 3:
        raise ValueError(
            f"{root}: {len(usable)} samples with an image and a caption are too few to hold out validation and test "
            "sets and train on the rest"
        )
    test = {id(r) for r in usable if places[id(r)] < fraction}
    val = {id(r) for r in usable if id(r) not in test and places[id(r)] < 2 * fraction}
    rest = [id(r) for r in usable if id(r) not in test and id(r) not in val]  # by place: the lowest first
    lent = [name for name, chosen in (("test", test), ("val", val)) if not chosen]
    for chosen in (test, val):
        if not chosen and rest:
            chosen.add(rest.pop(0))
    if not (rest and test and val):
        raise ValueError(f"{root}: data.holdout_fraction={fraction} holds out every sample; lower it")
    if lent:
        log.warning(
            f"{root}: no file falls in the {' and '.join(lent)} split at data.holdout_fraction={fraction} ({len(usable)} "
            "usable samples); the training file(s) of lowest hash stand in, and may move back when files are added"
        )
    return {
        "val": [r for r in records if id(r) in val],
        "test": [r for r in records if id(r) in test],
        "train": [r for r in records if id(r) not in test and id(r) not in val],
    }


class ImageTextDataModule(pl.LightningDataModule):
    """Image-text pairs from a real corpus, in one of `FORMATS` (see `conf/data/<format>.yaml`).

    Path keys (`root`, `images`, `annotations`, `shards`) take one value or a `{train, val, test}` mapping. With
    one `root`, the splits are its `train/`, `val/` (or `validation/`) and `test/` subfolders if present;
    otherwise (and for one COCO file) validation and test are a held-out `holdout_fraction` each. WebDataset
    without its own val (test) shards holds the last training shard but one (the last) out of training for them;
    evaluation reads at most `eval_samples` samples per rank and worker.

    Bad samples follow `bad_samples` (`skip` | `raise`); under `skip` they are counted by reason, logged every
    epoch and summarized at the end of each stage (also into `bad_samples.json` in the run directory, one file per
    rank under DDP), and the run stops once more than `max_bad_fraction` of the samples read were bad.
    """

    def __init__(
        self,
        format: str,
        root: str | dict | None = None,
        images: str | dict | None = None,
        annotations: str | dict | None = None,
        shards: str | list | dict | None = None,
        caption_column: str = "text",
        caption_key: str = "caption",
        image_size: int = 256,
        random_crop: bool = True,
        max_pixels: int | None = 64_000_000,
        max_caption_chars: int | None = 300,
        bad_samples: str = "skip",
        max_bad_fraction: float = 0.1,
        bad_check_after: int = 100,
        holdout_fraction: float = 0.01,
        seed: int = 0,
        resampled: bool = True,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        eval_samples: int | None = 1000,
        tokenizer_captions: int = 100_000,
        verify: str = "size",
        autoencoder_ckpt: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if format not in FORMATS:
            raise ValueError(f"data.format={format!r} is unknown; choose from {FORMATS}")
        if bad_samples not in POLICIES:
            raise ValueError(f"data.bad_samples={bad_samples!r}: choose from {POLICIES}")
        if verify not in ("size", "checksum"):
            raise ValueError(f"data.verify={verify!r}: choose size or checksum")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"data.image_size={image_size!r}: must be an integer >= 1, e.g. 256")
        if not 0 < holdout_fraction < 0.5:
            raise ValueError(
                f"data.holdout_fraction={holdout_fraction}: must be in (0, 0.5), the share of one folder or COCO "
                "file held out for each of val and test (at least one sample each)"
            )
        for key, value in (("max_pixels", max_pixels), ("max_caption_chars", max_caption_chars)):
            if value is not None and value < 1:
                raise ValueError(f"data.{key}={value}: must be >= 1, or null for no limit")
        self.datasets: dict[str, Dataset] = {}
        # training reads: they can stop the run
        self.bad = BadSampleTracker(max_bad_fraction, bad_check_after)
        # evaluation reads, counted and reported (a held-out split is what it is: its bad samples stop nothing)
        self.bad_eval = {split: BadSampleTracker(max_bad_fraction=1.0) for split in ("val", "test")}
        self._train_batches = 0
        self._epoch: int | None = None
        self._resumed_from: str | None = None  # the checkpoint whose training counts `self.bad` went on from

    # -- datasets -----------------------------------------------------------------------------------------------

    def preprocess(self, split: str) -> Preprocess:
        """Training: a random crop and caption; evaluation: the center crop and first caption, with every caption kept
        (`all_captions`: the references of caption metrics)."""
        h = self.hparams
        train = split == "train"
        return Preprocess(h.image_size, h.random_crop and train, train, h.max_pixels, h.max_caption_chars,
                          keep_all_captions=not train)  # fmt: skip

    def _holdout_base(self) -> Path | None:
        """The one folder (COCO: the images of one annotations file) that val and test are held out of (`holdout_split`);
        None where the corpus comes split (per-split paths, or split subfolders) or is a stream."""
        h = self.hparams
        required = REQUIRED_KEYS.get(h.format, ("root",))
        if h.format in ("webdataset", "token_cache") or any(
            h[k] is None or isinstance(h[k], dict) for k in required
        ):
            return None
        if h.format == "coco":
            return Path(h.images)
        return None if split_subfolder(Path(h.root), "train") else Path(h.root)

    def holdout_rule(self) -> dict | None:
        """How val and test were chosen from one folder (`holdout_split`): the folder, the rule, `data.seed` and
        `data.holdout_fraction`; checkpoints keep it (`state_dict`). None where the corpus comes split."""
        base = self._holdout_base()
        if base is None:
            return None
        h = self.hparams
        return {
            "root": str(base.resolve()),
            "rule": HOLDOUT_RULE,
            "seed": h.seed,
            "fraction": h.holdout_fraction,
        }

    def state_dict(self) -> dict:
        """What checkpoints keep of the data (Lightning saves it, and hands it to `load_state_dict` on a resume or a
        test from a checkpoint): the held-out split's rule, and the training reads' bad-sample counts (rank 0's:
        Lightning saves one process's state)."""
        rule = self.holdout_rule()
        return {**({"holdout": rule} if rule else {}), "bad_samples": self.bad.state()}

    def load_state_dict(self, state: dict) -> None:
        """A resumed training run goes on from the checkpoint's bad-sample counts (rank 0's, on rank 0: the other
        ranks' were not saved), so `bad_samples.json` and the bad-fraction check cover the earlier attempts' reads too.
        A checkpoint trained on val and test held out of this very folder by another rule, seed or fraction is
        refused: its resumed training, validation or test would read images it trained on."""
        self.check_checkpoint_state(state)
        trainer = self.trainer
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if "bad_samples" in state and fitting and trainer.global_rank == 0:
            self.bad.load_state(state["bad_samples"])
            self._resumed_from = str(trainer.ckpt_path) if trainer.ckpt_path else "a checkpoint"

    def check_checkpoint_state(self, state: dict) -> None:
        """Refuse a checkpoint's data state (`state_dict`) whose val and test were held out of this folder otherwise."""
        theirs, ours = state.get("holdout"), self.holdout_rule()
        if not (theirs and ours and theirs.get("root") == ours["root"]) or theirs == ours:
            return
        keys = {"rule": "held-out split rule", "seed": "data.seed", "fraction": "data.holdout_fraction"}
        differ = [k for k in keys if theirs.get(k) != ours[k]]
        shown = ", ".join(f"{keys[k]}={ours[k]} (the checkpoint's: {theirs.get(k)})" for k in differ)
        fix = " ".join(f"{keys[k]}={theirs[k]}" for k in differ if k != "rule")
        raise ValueError(
            f"{ours['root']}: the checkpoint was trained with val and test held out of this folder otherwise: {shown}; "
            "this run's val and test would hold images it trained on. "
            + (f"Set {fix}" if "rule" not in differ else "Its split rule is not this version's: train afresh")
        )

    def _records(self) -> dict[str, list[Record]]:
        """Records per split for the map-style formats."""
        h = self.hparams
        required = REQUIRED_KEYS.get(h.format, ("root",))
        for key in required:
            if h[key] is None:
                raise ValueError(f"data.{key} is required for data={h.format}")

        def index(split_paths: dict[str, tuple]) -> list[Record]:
            if h.format == "coco":
                images = Path(split_paths["images"])
                if not images.is_dir():
                    raise FileNotFoundError(f"data.images={images}: no such directory")
                return index_coco(images, Path(split_paths["annotations"]))
            root = Path(split_paths["root"])
            if not root.is_dir():
                raise FileNotFoundError(f"data.root={root}: no such directory")
            if h.format == "imagefolder":
                return index_imagefolder(root, h.caption_column)
            return index_image_txt(root)

        if h.format == "coco" and isinstance(h.images, dict) and not isinstance(h.annotations, dict):
            # every split would read the one file's images from its own folder: the same samples, or missing ones
            raise ValueError(
                "data.images is a {train, val, test} mapping but data.annotations is one file: give the "
                "annotations per split too (data.annotations={train: ..., val: ..., test: ...}), or one images "
                "folder with one file (val and test held out of it)"
            )
        base = self._holdout_base()
        if base is not None:  # one folder / one file: hold val and test out of it
            return holdout_split(index({k: h[k] for k in required}), h.holdout_fraction, h.seed, base)
        if not any(isinstance(h[k], dict) for k in required):  # split subfolders
            sub = {s: split_subfolder(Path(h.root), s) for s in SPLITS}
            return {s: index({"root": sub[s]}) for s in SPLITS if sub[s]}
        per_split = {s: {k: split_value(h[k], s) for k in required} for s in SPLITS}
        return {
            s: index(paths) for s, paths in per_split.items() if all(v is not None for v in paths.values())
        }

    def _shards(self, split: str) -> tuple[list[str], bool]:
        """A split's shard list, and whether it is held out of the training shards: a split without its own entry
        (one spec for all, or a mapping without it) gets one of them, never read in training (val the last but
        one, test the last)."""
        h = self.hparams
        if h.shards is None:
            raise ValueError(
                "data.shards is required for data=webdataset, e.g. data.shards='DIR/{00000..00099}.tar'"
            )
        per_split = isinstance(h.shards, dict)
        own = split_value(h.shards, split) if per_split and split != "train" else None
        if own is not None:
            return expand_shards(own, f"data.shards.{split}"), False
        spec = split_value(h.shards, "train")
        if spec is None:
            raise ValueError("data.shards has no 'train' entry")
        key = "data.shards.train" if per_split else "data.shards"
        urls = expand_shards(spec, key)
        held = [s for s in ("val", "test") if not per_split or split_value(h.shards, s) is None]
        if len(urls) <= len(held):
            raise ValueError(
                f"{key}={spec!r} matches {len(urls)} shard(s): too few to hold out one for each of {held} and "
                "train on the rest; give data.shards as {train: ..., val: ..., test: ...}"
            )
        keep = len(urls) - len(held)
        return (urls[:keep], False) if split == "train" else ([urls[keep + held.index(split)]], True)

    def build_dataset(self, split: str) -> Dataset:
        h = self.hparams
        if h.format == "token_cache":
            from imagen.data.token_cache import TokenCacheDataset

            if h.root is None:
                raise ValueError(
                    "data.root is required for data=token_cache (the encoder's output directory)"
                )
            root = split_value(h.root, split)
            if root is None:
                raise ValueError(f"data.root has no {split!r} entry")
            directory = Path(root) if isinstance(h.root, dict) else Path(root) / split
            return TokenCacheDataset(directory, random_caption=split == "train", verify=h.verify,
                                     image_size=h.image_size, autoencoder_ckpt=h.autoencoder_ckpt)  # fmt: skip
        if h.format == "webdataset":
            urls, held_out = self._shards(split)
            if held_out:
                log.info(f"data.shards has no {split} entry: {split} reads {urls[0]}, held out of training")
            train = split == "train"
            dataset = WebDatasetStream(urls, self.preprocess(split), h.bad_samples, resampled=train and h.resampled,
                                    samples_per_epoch=h.samples_per_epoch, shuffle_buffer=h.shuffle_buffer if train else 0,
                                    caption_key=h.caption_key, limit=None if train else h.eval_samples,
                                    split="shards" if train else "samples")  # fmt: skip
            if train:
                dataset.check_caption_key()
            return dataset
        if not hasattr(self, "_all_records"):
            self._all_records = self._records()
        if split not in self._all_records:
            keys = {"coco": "data.images / data.annotations"}.get(h.format, "data.root")
            raise ValueError(f"data={h.format}: no {split} split; give its path in {keys} (a {{train, val, test}} "
                             f"mapping) or a {split}/ subfolder" + (", or train without a test: test=false"
                                                                    if split == "test" else ""))  # fmt: skip
        return RecordDataset(self._all_records[split], self.preprocess(split), h.bad_samples)

    def setup(self, stage: str | None = None) -> None:
        for split in STAGE_SPLITS.get(stage, SPLITS):
            self.check_split(split)

    def check_split(self, split: str) -> None:
        """Build `split`'s dataset (kept for `setup`) and, for an evaluation split of files, read until its first good
        sample: a split that is missing, or whose every sample is bad, stops the run before training rather than at
        its first validation or its test (`train.py` checks the test split this way when the run will test)."""
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        dataset = self.datasets[split]
        if split != "train" and isinstance(dataset, RecordDataset):
            try:
                # usually one read; the bad samples before a good one are counted when evaluation reads them
                dataset[0]
            except TooManyBadSamples as e:
                raise TooManyBadSamples(f"data ({split} split): {e}; fix or replace these files") from None

    def train_captions(self) -> list[str]:
        """Up to `tokenizer_captions` cleaned training captions (every caption of a sample), for training a
        caption tokenizer. Samples whose captions cannot be read are left out here; they are counted as bad
        when training reads them."""
        self.setup("fit")
        dataset, limit = self.datasets["train"], self.hparams.tokenizer_captions
        if hasattr(dataset, "all_captions"):  # token cache
            return dataset.all_captions(limit)
        captions: list[str] = []
        if isinstance(dataset, RecordDataset):
            for record in dataset.records:
                try:
                    captions += clean_captions(record.read_captions(), str(record.image))
                except BadSample:
                    continue
                if len(captions) >= limit:
                    break
            return captions[:limit]
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(dataset.urls),
            wds.tarfile_to_samples(
                handler=wds.warn_and_continue, select_files=lambda n: n.endswith((".txt", ".json"))
            ),
        )
        for raw in pipeline:
            try:
                captions += clean_captions(dataset.captions_of(raw, raw["__key__"]), raw["__key__"])
            except BadSample:
                continue
            if len(captions) >= limit:
                break
        return captions[:limit]

    # -- loaders ------------------------------------------------------------------------------------------------

    def _loader(self, split: str) -> DataLoader:
        h = self.hparams
        dataset = self.datasets.get(split) or self.build_dataset(split)
        self.datasets[split] = dataset
        workers = h.num_workers
        settings = {"num_workers": workers, "pin_memory": h.pin_memory, "collate_fn": collate,
                    "persistent_workers": h.persistent_workers and workers > 0}  # fmt: skip
        if workers > 0 and h.prefetch_factor:
            settings["prefetch_factor"] = h.prefetch_factor
        world = self.trainer.world_size if self.trainer is not None else 1
        if split == "train" and isinstance(dataset, WebDatasetStream) and not dataset.resampled and world > 1:
            # each process reads its own shards to their end: unequal batch counts leave one waiting in a collective
            raise ValueError(
                f"data.resampled=false with {world} processes: each reads its own shards once, so they get unequal "
                "numbers of batches and the run hangs at the end of an epoch; train with data.resampled=true "
                "and data.samples_per_epoch=N (the same number of samples on every process)"
            )
        if split == "train" and not isinstance(dataset, IterableDataset):
            # resumable mid-epoch; the order comes from the run's seed (`seed`, set by seed_everything), and each
            # item's random crop and caption from its item seed: a resumed run draws what an uninterrupted one does
            return ResumableLoader(
                dataset, h.batch_size, seed=torch.initial_seed(), item_seeds=True, **settings
            )
        # a stream shuffles itself; its last batch may hold the last drops
        return DataLoader(
            dataset, batch_size=h.batch_size if split == "train" else h.eval_batch_size, **settings
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # -- bad-sample accounting (main process) -------------------------------------------------------------------

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = self.trainer
        training = trainer is None or trainer.training
        if trainer is not None and training:
            if self._epoch is not None and trainer.current_epoch != self._epoch:
                self.report_epoch(self._epoch)
            self._epoch = trainer.current_epoch
        bad, truncated = batch.pop("bad", []), batch.pop("truncated", 0)
        good = (
            len(batch["caption"]) - int(batch["stand_in"].sum())
            if "stand_in" in batch
            else len(batch["caption"])
        )
        tracker = self.bad if training else self.bad_eval["test" if trainer.testing else "val"]
        distributed = trainer is not None and trainer.world_size > 1
        pairs = [tuple(pair) for pair in bad]
        tracker.update(pairs, good=good, truncated=int(truncated), check=training and not distributed)
        if training and distributed:
            self._train_batches += 1
            if self._train_batches % BAD_CHECK_EVERY == 0:
                self.check_bad_fraction()
        return batch

    def check_bad_fraction(self) -> None:
        """Stop on the bad fraction of every process's training reads, summed: one process stopping alone would leave
        the others waiting in a collective. Every rank calls it at the same training batch."""
        bad, good = sum_over_ranks(self.trainer, [self.bad.bad, self.bad.good])
        self.bad.check(counts=(bad, good))

    def report_epoch(self, epoch: int) -> None:
        """Warn with this process's counts of the epoch; log the counts of all processes (`data/bad_<reason>`), and
        under DDP check the bad fraction of all of them (runs shorter than `BAD_CHECK_EVERY` batches included). Every
        rank calls it at the same step (its first training batch of the next epoch, or teardown)."""
        counts = self.bad.end_epoch()
        if counts:
            log.warning(f"[rank {self._rank()}] epoch {epoch}: skipped bad samples by reason {counts}")
        trainer = self.trainer
        if trainer is None:
            return
        if trainer.world_size > 1:  # each rank reads its own samples: sum, every rank taking part
            reasons = (*REASONS, "other")
            local = [counts.get(r, 0) for r in REASONS] + [
                sum(n for r, n in counts.items() if r not in REASONS)
            ]
            *summed, bad, good = sum_over_ranks(trainer, [*local, self.bad.bad, self.bad.good])
            counts = {reason: n for reason, n in zip(reasons, summed, strict=True) if n}
            self.bad.check(counts=(bad, good))
        if counts and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {f"data/bad_{k}": float(v) for k, v in counts.items()}, step=trainer.global_step
                )

    def teardown(self, stage: str) -> None:
        try:
            if self._epoch is not None:  # under DDP, the last epoch's check may stop the run: reported first
                epoch, self._epoch = self._epoch, None
                self.report_epoch(epoch)
        finally:
            self._report_splits(getattr(stage, "value", stage))

    def _report_splits(self, stage: str) -> None:
        """Log the counts of the splits `stage` read, and write `bad_samples.json`."""
        splits = STAGE_SPLITS.get(stage, ())
        trackers = {"train": self.bad, **self.bad_eval}
        for split in (s for s in splits if trackers[s].good or trackers[s].bad):
            tracker = trackers[split]
            level = logging.WARNING if tracker.bad else logging.INFO
            log.log(level, f"[rank {self._rank()}] data ({split} split, {stage}): {tracker.summary()}")
        if any(trackers[s].good or trackers[s].bad for s in splits):
            self._write_summary()

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _write_summary(self) -> None:
        """`bad_samples.json` in the run directory: this process's counts (under DDP each rank reads its own samples
        and writes its own file, `bad_samples.rank<N>.json` beside rank 0's)."""
        if self.trainer is None or not self.trainer.default_root_dir:
            return
        rank = self._rank()
        path = Path(self.trainer.default_root_dir) / (
            "bad_samples.json" if rank == 0 else f"bad_samples.rank{rank}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)

        def counts(tracker: BadSampleTracker) -> dict:
            return {"counts": dict(tracker.total), "examples": tracker.examples, "good": tracker.good,
                    "truncated_captions": tracker.truncated}  # fmt: skip

        # the training reads at the top (a resumed run's include the earlier attempts', as its checkpoint kept them);
        # evaluation reads (and re-reads, each epoch) per split, this attempt's
        summary = {
            **counts(self.bad),
            **({"training_counts_resumed_from": self._resumed_from} if self._resumed_from else {}),
            **{split: counts(t) for split, t in self.bad_eval.items() if t.good or t.bad},
        }
        path.write_text(json.dumps(summary, indent=2) + "\n")
