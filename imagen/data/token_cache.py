"""The pre-tokenized cache: a trained autoencoder's image token grids + captions in numpy memmap shards.

Layout of one split (`<root>/<split>/`):
- `shard_NNNNN.tokens.npy`: (N, h, w) uint16 (int32 above 65536 codes) image token grids;
- `shard_NNNNN.captions.npy`: uint8, the UTF-8 bytes of every sample's captions (one per line), concatenated;
  `shard_NNNNN.offsets.npy`: (N + 1,) int64 byte offsets of each sample's captions. Captions are stored as
  byte-level token ids rather than ids of one tokenizer: the generator's caption tokenizer is a config choice
  (trained on the corpus captions in the stage's setup, or a pretrained one), and any of them reads this cache.
- `shard_NNNNN.json`: the shard's record (sample count, byte sizes and CRC32 of its files, bad samples by reason
  with the first few names), written last: a shard with this file is finished, and a rerun skips it (resume);
- `index.json`: the split's shards, written once every shard is finished and the split's bad samples, counted over
  all its shard records (earlier runs' included), are within `data.max_bad_fraction`; checked at load (sizes
  always, CRC32 with `verify=checksum`) together with the autoencoder checkpoint's SHA-256 and the image size.

Written by `python -m imagen.cli.encode` (`write_token_cache`), one process per GPU.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from imagen.checkpoints import checkpoint_sha256
from imagen.data.bad_samples import BadSampleTracker, TooManyBadSamples
from imagen.distributed import in_srun_step, srun_tasks
from imagen.files import atomic_file, write_text_atomic
from imagen.progress import progress_bar

log = logging.getLogger(__name__)

VERSION = 1
FILES = ("tokens", "captions", "offsets")
INDEX_KEYS = ("version", "autoencoder", "image_size", "shards", "total")
RECORD_KEYS = ("name", "count", "files")  # of a shard's record, in its own file and in the index
# a rerun encodes every shard without a finished record, and writes the index once all are finished
RERUN = "rerun `python -m imagen.cli.encode` with the same settings"


class TokenCacheError(RuntimeError):
    """A token cache that is incomplete, corrupt, or made for another autoencoder or image size."""


def file_crc32(path: str | Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def shard_name(number: int) -> str:
    return f"shard_{number:05d}"


def reencode_hint(directory: Path, name: str) -> str:
    """How to replace a damaged shard: without its record, a rerun encodes it again."""
    return f"delete {directory / name}.json and {RERUN} to encode the shard again"


def require_keys(value, keys: tuple[str, ...], where: str, fix: str) -> None:
    """Raise `TokenCacheError` at `where` unless `value` is a dict holding `keys`."""
    missing = [k for k in keys if k not in value] if isinstance(value, dict) else list(keys)
    if missing:
        raise TokenCacheError(f"{where}: no {', '.join(missing)} (corrupt or incomplete); {fix}")


def read_json(path: Path, keys: tuple[str, ...], fix: str) -> dict:
    """The dict in `path` with `keys`; `TokenCacheError` naming the file and `fix` when it is unreadable."""
    try:
        value = json.loads(path.read_bytes())
    except ValueError as e:  # JSON or UTF-8 errors of a truncated or damaged file
        raise TokenCacheError(f"{path}: not valid JSON ({e}); {fix}") from None
    require_keys(value, keys, str(path), fix)
    return value


def load_array(path: Path, fix: str) -> np.ndarray:
    """A read-only memmap of a shard's `.npy` file; `TokenCacheError` naming it when its header is damaged."""
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise TokenCacheError(f"{path}: not a readable .npy array ({e}); {fix}") from None


# -- writing ------------------------------------------------------------------------------------------------------


def write_shard(
    directory: Path,
    name: str,
    tokens: np.ndarray,
    captions: list[str],
    bad: dict[str, int],
    encoded_from: dict | None = None,
    bad_examples: dict[str, list[str]] | None = None,
) -> dict:
    """Write one shard (files first, its record last, each atomically); returns the record. `encoded_from`: the
    autoencoder, sizes and inputs it was made from, which a resumed encode must match; `bad_examples`: the first few
    names of its bad samples by reason."""
    data = [c.encode("utf-8") for c in captions]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(d) for d in data])
    arrays = {"tokens": tokens, "captions": np.frombuffer(b"".join(data), dtype=np.uint8), "offsets": offsets}
    files = {}
    for key, array in arrays.items():
        path = directory / f"{name}.{key}.npy"
        # np.save given a file object adds no .npy suffix to the temporary's name
        with atomic_file(path) as temporary, open(temporary, "wb") as f:
            np.save(f, array)
        files[key] = {"bytes": path.stat().st_size, "crc32": file_crc32(path)}
    record = {"name": name, "count": int(tokens.shape[0]), "files": files, "bad": bad}
    if bad_examples:
        record["bad_examples"] = bad_examples
    if encoded_from is not None:
        record["encoded_from"] = encoded_from
    _write_json(directory / f"{name}.json", record)
    return record


def _write_json(path: Path, value: dict) -> None:
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


def shard_finished(directory: Path, name: str, encoded_from: dict | None = None) -> bool:
    """A shard whose record exists and whose files have the recorded sizes. Made from other inputs or settings than
    `encoded_from` (a resumed encode that changed them), it is an error naming what differs."""
    record_path = directory / f"{name}.json"
    if not record_path.is_file():
        return False
    record = read_json(record_path, RECORD_KEYS, reencode_hint(directory, name))
    theirs = record.get("encoded_from")
    if (
        theirs is None and encoded_from is not None
    ):  # written before shards recorded their inputs: not checkable
        log.warning(f"{record_path}: the shard does not record what it was encoded from; kept unchecked")
    elif encoded_from is not None and theirs != encoded_from:
        differ = sorted(k for k in encoded_from if theirs.get(k) != encoded_from[k])
        raise TokenCacheError(
            f"{record_path}: encoded with other {', '.join(differ)} than this run "
            f"({[theirs.get(k) for k in differ]} against {[encoded_from[k] for k in differ]}); "
            "encode into a new directory, or delete this one"
        )
    return all(
        (directory / f"{name}.{k}.npy").is_file()
        and (directory / f"{name}.{k}.npy").stat().st_size == f["bytes"]
        for k, f in record["files"].items()
    )


def add_record(tracker: BadSampleTracker, record: dict) -> None:
    """Count a finished shard's samples in `tracker`, as its record gives them."""
    tracker.add_recorded(record.get("bad") or {}, record["count"], record.get("bad_examples"))


def too_many_bad(tracker: BadSampleTracker, split: str, out: Path, final: bool) -> str:
    """The refusal of a split whose bad samples are over `data.max_bad_fraction`: what, where, and what to do."""
    seen = tracker.bad + tracker.good
    return (
        f"token cache of split {split!r} ({out}): {tracker.bad} of {seen} samples {'' if final else 'so far '}were "
        f"bad ({tracker.bad / seen:.1%} > data.max_bad_fraction={tracker.max_bad_fraction}); refusing the split: "
        f"its index.json is not written, so it does not load. Bad samples: {tracker.by_reason()}. Its finished "
        "shards are kept and counted again by a rerun: fix or remove the bad files and encode into a new "
        "directory, or raise data.max_bad_fraction and rerun"
    )


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of encoding processes: torchrun's `RANK`/`WORLD_SIZE`, else SLURM's task
    rank and count inside an `srun` step; else 0 of 1 (a script run directly in an sbatch job encodes every shard)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if in_srun_step():
        return int(os.environ["SLURM_PROCID"]), srun_tasks()
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        log.warning(
            f"SLURM_NTASKS={os.environ['SLURM_NTASKS']} outside an srun step: this process encodes every shard alone; "
            "launch it with `srun` to share the shards between the tasks"
        )
    return 0, 1


def encode_split(
    autoencoder,
    datamodule,
    split: str,
    out: Path,
    header: dict,
    shard_size: int = 10000,
    batch_size: int = 64,
    device: str = "cpu",
    rank: int = 0,
    world: int = 1,
    max_shards: int | None = None,
) -> dict[str, list[str]]:
    """Encode one split into `out` (this rank's shards: every `world`-th); returns the shard names this rank
    `written` and `skipped` (already finished), and those of the split still `unfinished` (other ranks', or past
    `max_shards`). The split's index is written by whichever rank finds every shard finished."""
    from imagen.data.image_text import RecordDataset, WebDatasetStream, collate

    out.mkdir(parents=True, exist_ok=True)
    dataset = datamodule.build_dataset(split)
    dataset.preprocess.keep_all_captions = True  # the cache holds every caption; training picks one
    dataset.preprocess.random_crop = False  # and the center crop (one fixed token grid per image)
    if isinstance(dataset, RecordDataset):
        dataset.substitute = False  # a bad sample is left out of the cache, never replaced by a duplicate
        spans = [range(s, min(s + shard_size, len(dataset))) for s in range(0, len(dataset), shard_size)]
        first_last = lambda span: [str(dataset.records[i].image) for i in (span[0], span[-1])]  # noqa: E731
        # (name, samples, inputs: its first and last image and its count)
        units = [
            (shard_name(i), Subset(dataset, span), [*first_last(span), len(span)])
            for i, span in enumerate(spans)
        ]
    elif isinstance(dataset, WebDatasetStream):  # one output shard per input tar, whatever the process's rank
        units = [
            (shard_name(i), WebDatasetStream([url], dataset.preprocess, dataset.policy, split="none",
                                             caption_key=dataset.caption_key, substitute=False), url)
            for i, url in enumerate(dataset.urls)
        ]  # fmt: skip
    else:
        raise ValueError(f"cannot encode a {type(dataset).__name__}")
    # what each shard is made from: the autoencoder's weights, the sizes and its inputs
    settings = {k: v for k, v in header.items() if k != "autoencoder"}
    settings["autoencoder_sha256"] = header["autoencoder"]["sha256"]
    encoded_from = {name: {**settings, "inputs": inputs} for name, _, inputs in units}
    names = [name for name, _, _ in units]
    result: dict[str, list[str]] = {"written": [], "skipped": []}
    limits = datamodule.hparams.max_bad_fraction, datamodule.hparams.bad_check_after
    tracker = BadSampleTracker(*limits)  # this run's shards, and those it skips as finished
    workers = datamodule.hparams.num_workers

    def encode_shard(name: str, unit, inputs) -> tuple[int, dict[str, int]]:
        """Encode one unit into shard `name`; returns its sample count and bad samples by reason."""
        tokens, captions, bad = [], [], BadSampleTracker(max_bad_fraction=1.0)
        loader = DataLoader(unit, batch_size=batch_size, num_workers=workers if isinstance(unit, Subset) else 0,
                            collate_fn=collate)  # fmt: skip
        for batch in loader:
            bad.update(batch["bad"], good=len(batch["caption"]))
            tracker.update(batch["bad"], good=len(batch["caption"]))
            if "image" not in batch:
                continue
            with torch.no_grad():
                grid = autoencoder.encode(batch["image"].to(device))  # (B, h, w)
            tokens.append(grid.cpu().numpy().astype(header["dtype"]))
            captions += batch["all_captions"] if "all_captions" in batch else batch["caption"]
        # an empty tar: counted, so that the cache says where samples are missing
        if not tokens and not bad.total:
            bad.update([("empty_shard", str(inputs))], good=0)
            tracker.update([("empty_shard", str(inputs))], good=0)
        h, w = header["grid"]
        array = np.concatenate(tokens) if tokens else np.zeros((0, h, w), dtype=header["dtype"])
        write_shard(out, name, array, captions, dict(bad.total), encoded_from[name], bad.examples)
        return array.shape[0], dict(bad.total)

    def record(name: str) -> dict:
        return read_json(out / f"{name}.json", RECORD_KEYS, reencode_hint(out, name))

    def refusal(counts: BadSampleTracker, final: bool) -> TooManyBadSamples:
        # a refused split never loads, whatever index an earlier run (under a higher limit) left
        (out / "index.json").unlink(missing_ok=True)
        return TooManyBadSamples(too_many_bad(counts, split, out, final))

    mine = [unit for number, unit in enumerate(units) if number % world == rank]  # this rank's shards
    try:
        with progress_bar() as bar:
            task = bar.add_task(f"[rank {rank}] encoding {split}: {len(mine)} shards", total=len(mine))
            for name, unit, inputs in mine:
                if shard_finished(out, name, encoded_from[name]):
                    result["skipped"].append(name)
                    add_record(tracker, record(name))  # a rerun stops where the first run stopped
                elif max_shards is not None and len(result["written"]) >= max_shards:
                    break
                else:
                    count, shard_bad = encode_shard(name, unit, inputs)
                    result["written"].append(name)
                    log.info(f"[rank {rank}] {out / name}: {count} samples, bad {shard_bad or 'none'}")
                bar.update(task, advance=1)
    except TooManyBadSamples:  # over the limit after `data.bad_check_after` samples
        raise refusal(tracker, final=False) from None
    result["unfinished"] = [n for n in names if not shard_finished(out, n, encoded_from[n])]
    # the split's bad fraction, from every finished shard's record (those of earlier runs and other ranks too), so
    # that a rerun that skips them refuses as the run that wrote them did
    shards = [record(n) for n in names if n not in result["unfinished"]]
    split_bad = BadSampleTracker(*limits)
    for shard in shards:
        add_record(split_bad, shard)
    final = not result["unfinished"]
    try:
        split_bad.check(final=final)
    except TooManyBadSamples:
        raise refusal(split_bad, final) from None
    if split_bad.bad:
        log.warning(
            f"[rank {rank}] token cache of split {split!r} ({out}): {split_bad.bad} bad samples left out of "
            f"{split_bad.bad + split_bad.good} in {len(shards)} finished shards: {split_bad.by_reason()}"
        )
    if final:
        _write_json(out / "index.json", {**header, "version": VERSION, "split": split, "shards": shards,
                                         "total": sum(s["count"] for s in shards)})  # fmt: skip
    else:
        log.warning(f"[rank {rank}] {out}: {unfinished_note(len(result['unfinished']), len(names), world)}")
    return result


def unfinished_note(unfinished: int, total: int, world: int) -> str:
    """Why a split has no `index.json` yet after this process finished, and what completes it."""
    done = f"{total - unfinished} of {total} shards are finished, so index.json is not written yet"
    if world > 1:
        return (f"{done}: the other {world - 1} of the {world} processes must finish theirs (the last to finish "
                f"writes it), or {RERUN} to encode the missing shards")  # fmt: skip
    return f"{done}; {RERUN} to encode the remaining {unfinished}"


def write_token_cache(
    autoencoder_ckpt: str,
    datamodule,
    out_dir: str | Path,
    splits: tuple[str, ...] = ("train", "val", "test"),
    shard_size: int = 10000,
    batch_size: int = 64,
    device: str = "auto",
    max_shards: int | None = None,
    trust: bool = False,
) -> dict[str, dict[str, list[str]]]:
    """Encode `splits` of an image-text datamodule with a trained autoencoder into `out_dir/<split>/` (`trust`: a
    checkpoint that needs full unpickling is read, `read_checkpoint`).

    Resumable: finished shards are skipped. Several processes (`RANK`/`WORLD_SIZE`, or the tasks of an `srun` step)
    share the shards; each uses `cuda:LOCAL_RANK` when `device=auto` finds GPUs.
    """
    from imagen.checkpoints import load_autoencoder, read_checkpoint, warn_image_size
    from imagen.data.formats import SPLITS

    # the CLI checks its config first (`imagen.cli.encode.check_encode_config`); these guard direct calls
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size), ("max_shards", max_shards)):
        if (value is not None or name != "max_shards") and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(
                f"{name}={value!r} must be an integer >= 1{' or None' if name == 'max_shards' else ''}"
            )
    if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) < len(splits):
        raise ValueError(f"splits={list(splits)} must name some of {', '.join(SPLITS)}, each once")
    rank, world = rank_and_world()
    if device == "auto":
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    checkpoint = read_checkpoint(autoencoder_ckpt, trust)
    autoencoder = load_autoencoder(autoencoder_ckpt, trust, checkpoint=checkpoint).to(device)
    size = datamodule.hparams.image_size
    warn_image_size(checkpoint, autoencoder_ckpt, size, "autoencoder_ckpt")
    f = autoencoder.downsample_factor
    if size % f:
        raise ValueError(f"data.image_size={size} is not divisible by the autoencoder's factor {f}")
    header = {
        "autoencoder": {"path": str(autoencoder_ckpt), "sha256": checkpoint_sha256(autoencoder_ckpt)},
        "image_size": size,
        "grid": [size // f, size // f],
        "vocab_size": autoencoder.vocab_size,
        "dtype": "uint16" if autoencoder.vocab_size <= 65536 else "int32",
    }
    return {
        split: encode_split(
            autoencoder,
            datamodule,
            split,
            Path(out_dir) / split,
            header,
            shard_size,
            batch_size,
            device,
            rank,
            world,
            max_shards,
        )  # fmt: skip
        for split in splits
    }


# -- reading ------------------------------------------------------------------------------------------------------


def load_index(directory: Path, verify: str = "size") -> dict:
    """Read and check a split's index: every shard file present with its recorded size (and CRC32 with
    `verify="checksum"`), and each array's length equal to the recorded count."""
    path = directory / "index.json"
    if not path.is_file():
        partial = sorted(p.name for p in directory.glob("shard_*.json")) if directory.is_dir() else []
        hint = f"; {len(partial)} finished shards: rerun the encode command to finish it" if partial else ""
        raise TokenCacheError(f"{path}: no index (not a token cache, or its encoding did not finish){hint}")
    rebuild = f"delete {path} and {RERUN} to rebuild it from the finished shards"
    index = read_json(path, INDEX_KEYS, rebuild)
    if index["version"] != VERSION:
        raise TokenCacheError(f"{path}: version {index['version']}, expected {VERSION}; re-encode")
    for number, shard in enumerate(index["shards"]):
        require_keys(shard, RECORD_KEYS, f"{path}: shard {number}", rebuild)
        fix = reencode_hint(directory, shard["name"])
        for key, expected in shard["files"].items():
            file = directory / f"{shard['name']}.{key}.npy"
            if not file.is_file():
                raise TokenCacheError(f"{file}: missing (listed in {path})")
            if file.stat().st_size != expected["bytes"]:
                raise TokenCacheError(
                    f"{file}: {file.stat().st_size} bytes, the index says {expected['bytes']}"
                )
            if verify == "checksum" and file_crc32(file) != expected["crc32"]:
                raise TokenCacheError(f"{file}: CRC32 mismatch (corrupt); {fix}")
        tokens, captions, offsets = (load_array(directory / f"{shard['name']}.{k}.npy", fix) for k in FILES)
        if tokens.shape[0] != shard["count"]:
            raise TokenCacheError(
                f"{directory / shard['name']}.tokens.npy: {tokens.shape[0]} samples, the index says {shard['count']}; "
                f"{fix}"
            )
        if offsets.shape[0] != shard["count"] + 1:
            raise TokenCacheError(
                f"{directory / shard['name']}.offsets.npy: {offsets.shape[0]} offsets for {shard['count']} samples "
                f"({shard['count'] + 1} expected); {fix}"
            )
        if offsets[-1] != captions.shape[0]:
            raise TokenCacheError(
                f"{directory / shard['name']}.offsets.npy: captions end at byte {offsets[-1]}, but captions.npy "
                f"holds {captions.shape[0]} (corrupt); {fix}"
            )
    return index


class TokenCacheDataset(Dataset):
    """Items `{"tokens": (h * w,) long, "caption": str, "name": str, "index": int}` from one split of a token cache.

    Checks at construction (see `load_index`), plus the image size and, when given, that `autoencoder_ckpt` is
    the checkpoint the cache was encoded with. Memmaps are opened lazily, by each dataloader worker: a pickled
    dataset leaves them out. Indexed by `index` or by `(index, item_seed)` (`EpochShuffleSampler(item_seeds=True)`):
    `random_caption` picks one of a sample's captions from `item_seed` when given, else from the torch RNG."""

    def __init__(self, directory: str | Path, random_caption: bool = False, verify: str = "size",
                 image_size: int | None = None, autoencoder_ckpt: str | None = None):  # fmt: skip
        self.directory = Path(directory)
        self.index = load_index(self.directory, verify)
        if image_size is not None and image_size != self.index["image_size"]:
            raise TokenCacheError(f"data.image_size={image_size}, but {self.directory} was encoded at "
                                  f"{self.index['image_size']} px; set data.image_size={self.index['image_size']}")  # fmt: skip
        if autoencoder_ckpt and checkpoint_sha256(autoencoder_ckpt) != self.index["autoencoder"]["sha256"]:
            raise TokenCacheError(f"model.autoencoder_ckpt={autoencoder_ckpt} is not the checkpoint {self.directory} "
                                  f"was encoded with ({self.index['autoencoder']['path']})")  # fmt: skip
        if self.index["total"] == 0:
            raise TokenCacheError(f"{self.directory}: the cache holds no samples")
        self.random_caption = random_caption
        self.ends = np.cumsum([s["count"] for s in self.index["shards"]])
        self._arrays: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.index["total"])

    def __getstate__(self) -> dict:
        # a pickled dataset (a spawned dataloader worker's) maps the shards itself, not a copy of their data
        return {**self.__dict__, "_arrays": None}

    def arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = []
            for s in self.index["shards"]:
                fix = reencode_hint(self.directory, s["name"])
                self._arrays.append(
                    tuple(load_array(self.directory / f"{s['name']}.{k}.npy", fix) for k in FILES)
                )
        return self._arrays[shard]

    def captions(self, index: int) -> tuple[np.ndarray, list[str]]:
        """(tokens (h, w), the sample's captions) of global sample `index`."""
        shard = int(np.searchsorted(self.ends, index, side="right"))
        local = index - (int(self.ends[shard - 1]) if shard else 0)
        tokens, data, offsets = self.arrays(shard)
        try:
            text = bytes(data[offsets[local] : offsets[local + 1]]).decode("utf-8")
        except UnicodeDecodeError:
            name = self.index["shards"][shard]["name"]
            raise TokenCacheError(
                f"{self.directory / name}.captions.npy: the captions of sample {local} (item {index}) are not "
                f"UTF-8 (corrupt; data.verify=checksum finds this at load); {reencode_hint(self.directory, name)}"
            ) from None
        return tokens[local], text.split("\n")

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, item_seed = key if isinstance(key, tuple) else (key, None)
        grid, captions = self.captions(index)
        pick = 0
        if self.random_caption and len(captions) > 1 and item_seed is not None:
            pick = item_seed % len(captions)
        elif self.random_caption and len(captions) > 1:
            pick = int(torch.randint(len(captions), ()))
        tokens = torch.from_numpy(grid.astype(np.int64)).flatten()  # (h, w) -> (h * w,) raster order
        item = {
            "tokens": tokens,
            "caption": captions[pick],
            "name": f"{self.directory.name}/{index}",
            "index": index,
        }
        if not self.random_caption:  # evaluation: every caption, the references of caption metrics
            item["all_captions"] = "\n".join(captions)
        return item

    def all_captions(self, limit: int | None = None) -> list[str]:
        """Every caption of the first samples, up to `limit` captions."""
        out: list[str] = []
        for index in range(len(self)):
            out += self.captions(index)[1]
            if limit and len(out) >= limit:
                break
        return out[:limit]
