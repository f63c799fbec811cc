"""Index builders for the map-style image-text formats: a split's directory or annotation file -> `Record`s.

- `imagefolder` (Hugging Face convention): images plus `metadata.jsonl` or `metadata.csv` whose rows hold
  `file_name` and a caption column (`text` by default; a list of strings is several captions);
- `image_txt`: each image beside a same-stem `.txt` file holding one caption per line;
- `coco`: a captions JSON (`images` with `id`/`file_name`, `annotations` with `image_id`/`caption`).

A record that is already known to be bad (an image without a caption, a caption without an image) carries
its `problem`; the dataset reports it as a bad sample when it is read, like a file that fails to decode.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from imagen.data.bad_samples import BadSample
from imagen.data.preprocess import IMAGE_EXTENSIONS, decode_text, split_lines

SPLITS = ("train", "val", "test")
# the splits a datamodule reads for each Lightning stage
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}


@dataclass
class Record:
    """One sample of a map-style format: an image file and its captions (or the file they are read from)."""

    image: Path
    captions: list[str] | None = None
    caption_file: Path | None = None  # image_txt: read when the sample is loaded
    problem: BadSample | None = None

    def read_captions(self) -> list[str] | None:
        if self.problem is not None:
            raise self.problem
        if self.caption_file is None:
            return self.captions
        if not self.caption_file.is_file():
            return None
        try:
            data = self.caption_file.read_bytes()
        except OSError as e:  # permissions, I/O errors
            raise BadSample("unreadable_file", str(self.caption_file), str(e)) from None
        return split_lines(decode_text(data, str(self.caption_file)))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _read_text(path: Path) -> str:
    """A UTF-8 text file (a BOM, as Excel writes, is dropped); `ValueError` naming the file if it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from None


def index_imagefolder(root: Path, caption_column: str = "text") -> list[Record]:
    """Records of a Hugging Face imagefolder directory (images may sit in subfolders; `file_name` is relative
    to the metadata file's folder), one per image with the captions of all its rows. Images without a metadata
    row are records with a missing caption. `ValueError` (naming the file, and line for jsonl) for metadata that
    is not UTF-8, a row that is not an object or lacks `file_name`, and a `caption_column` that no row has."""
    files = {
        p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() and _is_image(p)
    }
    jsonl, csv_file = root / "metadata.jsonl", root / "metadata.csv"
    rows: list[dict] = []
    if jsonl.is_file():
        for number, line in enumerate(split_lines(_read_text(jsonl)), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{jsonl}:{number}: not a JSON object ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{jsonl}:{number}: not a JSON object: {line.strip()[:100]}")
                rows.append(row)
    elif csv_file.is_file():
        rows = list(csv.DictReader(io.StringIO(_read_text(csv_file), newline="")))
    else:
        raise FileNotFoundError(f"{root}: no metadata.jsonl or metadata.csv (imagefolder needs one)")
    meta_name = jsonl if jsonl.is_file() else csv_file
    captions: dict[str, list[str]] = defaultdict(list)  # file_name -> its captions (one row or several)
    for row in rows:
        if "file_name" not in row:
            raise ValueError(f"{meta_name}: a row has no 'file_name' column: {row}")
        value = row.get(caption_column)
        found = captions[Path(row["file_name"]).as_posix()]
        if value is not None:
            found += value if isinstance(value, list) else [value]  # not text: a counted skip when read
    if rows and not any(caption_column in row for row in rows):
        columns = sorted({key for row in rows for key in row})
        raise ValueError(
            f"data.caption_column={caption_column!r}: no row of {meta_name} has it; its columns are {columns}"
        )
    records: list[Record] = []
    for name, found in captions.items():  # in the order of the files' first rows
        path = root / name
        if name not in files:
            records.append(Record(path, problem=BadSample("missing_image", str(path))))
        elif not found:  # rows without a caption value
            records.append(Record(path, problem=BadSample("missing_caption", str(path))))
        else:
            records.append(Record(path, captions=found))
    for name in sorted(set(files) - set(captions)):
        records.append(Record(files[name], problem=BadSample("missing_caption", str(files[name]))))
    return records


def index_image_txt(root: Path) -> list[Record]:
    """Records of a folder of images with same-stem `.txt` caption files (subfolders included). Any other file
    with an image extension is a sample (and reported if it does not decode); a `.txt` without an image is a
    record with a missing image."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images = [p for p in files if _is_image(p)]
    stems = {p.with_suffix("") for p in images}
    listed = set(files)
    records = [
        Record(p, caption_file=p.with_suffix(".txt"))
        if p.with_suffix(".txt") in listed
        else Record(p, problem=BadSample("missing_caption", str(p)))
        for p in images
    ]
    for txt in files:
        if txt.suffix == ".txt" and txt.with_suffix("") not in stems:
            records.append(Record(txt, problem=BadSample("missing_image", str(txt))))
    return records


def index_coco(images: Path, annotations: Path) -> list[Record]:
    """Records of a COCO captions file: one per image entry, with all of its captions. Captions of an `image_id`
    with no `images` entry are a record with a missing image (named `<annotations>#image_id=<id>`)."""
    try:
        data = json.loads(Path(annotations).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"data.annotations={annotations}: cannot read a COCO JSON ({e})") from None
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"data.annotations={annotations}: no {key!r} list (is it a captions file?)")
        for number, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise ValueError(f"{annotations}: {key}[{number}] is no JSON object: {entry!r}")
    captions: dict[int, list[str]] = defaultdict(list)
    for number, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{annotations}: annotations[{number}] lacks 'image_id' or 'caption': {ann}")
        if not isinstance(ann["caption"], str):
            raise ValueError(f"{annotations}: annotations[{number}] has a caption that is no string: {ann}")
        captions[ann["image_id"]].append(ann["caption"])
    records, first_entry = [], {}
    for number, entry in enumerate(data["images"]):
        for key in ("id", "file_name"):
            if entry.get(key) is None:
                raise ValueError(f"{annotations}: images[{number}] lacks {key!r}: {entry}")
            # a repeated image would be two samples, and could land in training and in a held-out split
            if (key, entry[key]) in first_entry:
                raise ValueError(f"{annotations}: images[{number}] repeats the {key} {entry[key]!r} of "
                                 f"images[{first_entry[key, entry[key]]}]; list each image once")  # fmt: skip
            first_entry[key, entry[key]] = number
        path = Path(images) / entry["file_name"]
        if entry["id"] not in captions:
            records.append(Record(path, problem=BadSample("missing_caption", str(path))))
        else:
            records.append(Record(path, captions=captions[entry["id"]]))
    listed = {entry["id"] for entry in data["images"]}
    for image_id in (i for i in captions if i not in listed):  # captions of an image with no entry
        name = f"{annotations}#image_id={image_id}"
        records.append(Record(Path(name), problem=BadSample("missing_image", name)))
    return records


def split_value(value, split: str):
    """`value` for `split`: a `{train, val, test}` mapping (val also as `validation`) or one value for all."""
    if isinstance(value, dict):
        for key in SPLIT_DIRS[split]:
            if key in value:
                return value[key]
        return None
    return value


def split_subfolder(root: Path, split: str) -> Path | None:
    """`root/<split>` (val also `validation`/`valid`) when the corpus is split by subfolder."""
    for name in SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    return None
