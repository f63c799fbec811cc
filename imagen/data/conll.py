"""NER data: CoNLL-style column files (or a Hugging Face dataset) -> subword windows for a token classifier.

Reading: one token per line, token in the first column and tag in the last (CoNLL-2003's token/POS/chunk/NER,
two-column files such as WNUT); blank lines end sentences; `-DOCSTART-` lines end documents. Tags come out in
IOB2 (IOB1 and IOBES input are converted).

Encoding: every word is tokenized once with a fast tokenizer; a sentence is cut into windows of at most
`max_length` subtokens whose *cores* partition its words (context around a core is fed to the encoder but not
labelled), so long sentences lose no word and each word is predicted exactly once. A word is labelled on its
first subtoken (`-100` elsewhere), or on all of them with `label_all_subtokens`. With `document_context`, the
context comes from the neighbouring sentences of the same document (the BERT paper's CoNLL-2003 recipe).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from imagen.data.resumable import ResumableLoader
from imagen.models.ner import IGNORE_INDEX
from imagen.values import is_int

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# File names of the original CoNLL-2003 release and of the common re-distribution, tried in this order.
LAYOUTS = (
    {"train": "eng.train", "val": "eng.testa", "test": "eng.testb"},
    {"train": "train.txt", "val": "valid.txt", "test": "test.txt"},
)
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
DOCSTART = "-DOCSTART-"
SCHEMES = ("auto", "iob1", "iob2", "iobes")
IGNORE = IGNORE_INDEX  # label of positions that carry no loss
_TAG = re.compile(r"^(O|[BIES]-\S+)$")
_SPACES = re.compile(" +")


class ConllFormatError(ValueError):
    """A line that is not UTF-8 `TOKEN ... TAG`; the message starts with `file:line` (or `dataset[split][row]`)."""


class ConllEncodingError(ConllFormatError):
    """A line that is not UTF-8: no text format reads the file as it is."""


def check_tag(tag, where: str, column: str) -> None:
    """Raise `ConllFormatError` at `where` unless `tag` is O, B-X, I-X, E-X or S-X."""
    if not isinstance(tag, str) or not _TAG.match(tag):
        raise ConllFormatError(f"{where}: expected a tag (O, B-TYPE, I-TYPE) {column}, got {tag!r}")


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]
    document: int  # documents are numbered per source; -DOCSTART- starts a new one
    origin: str  # "file:line" of the first token, for error messages


def fixture_dir(name: str = "conll_tiny") -> str:
    """Path of a CoNLL fixture shipped with the package (train.txt / valid.txt / test.txt)."""
    return str(resources.files("imagen.data") / "fixtures" / name)


# -- reading ------------------------------------------------------------------------------------------------------


def split_columns(line: str) -> list[str]:
    """The columns of a line of a column file ([] for a blank one): split at tabs if the line has one (a token may
    hold spaces), else at runs of ASCII spaces. Other spaces (U+00A0 no-break space, ...) are part of a column.
    Leading spaces and trailing spaces and tabs are dropped: a line that starts with a tab has an empty token."""
    line = line.rstrip("\r\n").lstrip(" ").rstrip(" \t")
    if not line:
        return []
    return [field.strip(" ") for field in line.split("\t")] if "\t" in line else _SPACES.split(line)


def read_conll(path: str | Path, scheme: str = "auto") -> list[Sentence]:
    """Sentences of a CoNLL-style file, tags converted to IOB2 (see `to_iob2`).

    The file is UTF-8 (a byte order mark is allowed); columns are split as `split_columns` does. Raises
    `ConllFormatError` naming `file:line` for a line that is not UTF-8, without a token and a tag, with an empty
    token, with a column count different from the file's first line (named too), or whose last column is not a
    tag (O, B-X, I-X, E-X, S-X).
    """
    path = Path(path)
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    document, start, columns, columns_line = 0, 0, None, 0

    def end_sentence() -> None:
        if tokens:
            sentences.append(Sentence(tokens.copy(), tags.copy(), document, f"{path}:{start}"))
            tokens.clear()
            tags.clear()

    with open(path, "rb") as f:  # decoded line by line (\n, \r\n or \r), so that an error names its line
        for number, raw in enumerate(f.read().splitlines(), 1):
            try:
                line = raw.decode("utf-8-sig")  # a BOM would make '-DOCSTART-' a token
            except UnicodeDecodeError as e:
                raise ConllEncodingError(
                    f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start} of the line); convert the file, "
                    "e.g. `iconv -f latin1 -t utf-8` for the Latin-1 CoNLL-2002/2003 releases"
                ) from None
            fields = split_columns(line)
            if not fields:
                end_sentence()
                continue
            if fields[0] == DOCSTART:
                end_sentence()
                document += 1 if sentences else 0
                continue
            where = f"{path}:{number}"
            if not fields[0]:
                raise ConllFormatError(f"{where}: the token (first column) is empty: {line!r}")
            if len(fields) < 2:
                raise ConllFormatError(
                    f"{where}: expected 'TOKEN [...] TAG' (at least 2 columns), got {line!r}"
                )
            if columns is None:
                columns, columns_line = len(fields), number
            elif len(fields) != columns:
                raise ConllFormatError(
                    f"{where}: expected {columns} columns like line {columns_line}, got {len(fields)}: {line!r}"
                )
            check_tag(fields[-1], where, "in the last column")
            if not tokens:
                start = number
            tokens.append(fields[0])
            tags.append(fields[-1])
    end_sentence()
    return convert_scheme(sentences, scheme, str(path))


def sentences_from_hf(dataset, name: str = "dataset") -> list[Sentence]:
    """Sentences of a Hugging Face `datasets.Dataset` with `tokens` and `ner_tags` columns (tag ids or strings).

    Rows whose only token is `-DOCSTART-` end documents, as in the column files; without them the split is one
    document. Tags are returned as they are (convert with `convert_scheme`). Raises `ConllFormatError` naming
    `name[row]` for a row whose tags and tokens differ in number, or with a tag that is not O, B-X, I-X, E-X or S-X.
    """
    for column in ("tokens", "ner_tags"):
        if column not in dataset.column_names:
            raise ValueError(
                f"{name}: no {column!r} column (has {dataset.column_names}); NER data needs tokens and ner_tags"
            )
    feature = dataset.features["ner_tags"]
    names = getattr(getattr(feature, "feature", None), "names", None)  # Sequence(ClassLabel) -> tag names
    sentences: list[Sentence] = []
    document = 0
    for i, row in enumerate(dataset):
        tokens, tags, where = list(row["tokens"]), list(row["ner_tags"]), f"{name}[{i}]"
        if tokens == [DOCSTART]:
            document += 1 if sentences else 0
            continue
        if len(tags) != len(tokens):
            raise ConllFormatError(f"{where}: {len(tokens)} 'tokens' but {len(tags)} 'ner_tags'")
        if names:
            tags = [names[t] if 0 <= t < len(names) else t for t in tags]
        elif any(isinstance(t, int) for t in tags):
            raise ConllFormatError(
                f"{where}: 'ner_tags' holds tag ids {tags}, but the dataset's ner_tags feature ({feature}) has no "
                "label names; make it a Sequence(ClassLabel(names=[...])) or store the tags as strings"
            )
        for tag in tags:
            check_tag(tag, where, "in 'ner_tags'")
        if tokens:
            sentences.append(Sentence(tokens, tags, document, where))
    return sentences


def detect_scheme(sentences: Iterable[Sentence]) -> str:
    """`iobes` if E-/S- tags occur, `iob1` if a chunk starts with I- (never in IOB2), else `iob2`."""
    found = "iob2"
    for s in sentences:
        previous = "O"
        for tag in s.tags:
            if tag[:2] in ("E-", "S-"):
                return "iobes"
            if tag.startswith("I-") and previous[2:] != tag[2:]:
                found = "iob1"
            previous = tag
    return found


def to_iob2(tags: Sequence[str], scheme: str) -> list[str]:
    """Tags of one sentence in IOB2: IOB1 chunks that start with I- get B-; IOBES S-/E- become B-/I-."""
    if scheme == "iob2":
        return list(tags)
    if scheme == "iobes":
        return [
            "B-" + t[2:] if t.startswith("S-") else "I-" + t[2:] if t.startswith("E-") else t for t in tags
        ]
    out, previous = [], "O"
    for tag in tags:
        begins = tag.startswith("I-") and previous[2:] != tag[2:]
        out.append("B-" + tag[2:] if begins else tag)
        previous = tag
    return out


def convert_scheme(sentences: list[Sentence], scheme: str, source: str) -> list[Sentence]:
    """Convert `sentences` (in place) to IOB2; `scheme="auto"` detects the input scheme."""
    if scheme not in SCHEMES:
        raise ValueError(f"tag scheme {scheme!r} is unknown; choose from {SCHEMES}")
    if scheme == "auto":
        scheme = detect_scheme(sentences)
    if scheme != "iob2":
        log.info(f"{source}: {scheme.upper()} tags converted to IOB2")
        for s in sentences:
            s.tags = to_iob2(s.tags, scheme)
    for s in sentences:  # E-/S- tags are left when data.scheme is not the file's
        for word, tag in enumerate(s.tags):
            if tag != "O" and tag[:2] not in ("B-", "I-"):
                hint = (
                    "set data.scheme=iobes, or auto to detect the scheme"
                    if tag[:2] in ("E-", "S-")
                    else "tags are O, B-TYPE, I-TYPE (or E-/S- under data.scheme=iobes)"
                )
                raise ConllFormatError(
                    f"{word_origin(s, word)}: tag {tag!r} does not fit data.scheme={scheme}; {hint}"
                )
    return sentences


def word_origin(sentence: Sentence, word: int) -> str:
    """`file:line` of a word of a file's sentence (its words are on consecutive lines), else `origin word N`."""
    path, _, line = sentence.origin.rpartition(":")
    if path and line.isdigit():
        return f"{path}:{int(line) + word}"
    return f"{sentence.origin} word {word}"


def label_list(splits: dict[str, list[Sentence]], given: Sequence[str] | None = None) -> list[str]:
    """The label set: `given`, or every tag of every split (so a tag seen only in dev/test does not crash).

    Sorted as `O`, then per entity type `B-` and `I-`; both are present for every type (continuation subtokens
    and the model may need the `I-` of a type that only occurs as single words). A tag missing from `given`
    raises, naming where it occurs.
    """
    if given is not None:
        check_labels(given)
        known = set(given)
        for sentences in splits.values():
            for s in sentences:
                for word, tag in enumerate(s.tags):
                    if tag not in known:
                        raise ValueError(
                            f"{word_origin(s, word)}: tag {tag!r} is not in data.labels={list(given)}"
                        )
        training = splits.get("train") or [s for sentences in splits.values() for s in sentences]
        used = {tag[2:] for s in training for tag in s.tags if tag != "O"}
        unused = [t for t in dict.fromkeys(tag[2:] for tag in given if tag != "O") if t not in used]
        if unused:
            log.warning(
                f"data.labels: no tag of the training data has the type(s) {unused} "
                f"({', '.join(f'B-{t}, I-{t}' for t in unused)}): the model never learns to predict them; "
                "check their spelling, or leave them out unless a checkpoint's label list needs them"
            )
        return list(given)
    types = sorted(
        {tag[2:] for sentences in splits.values() for s in sentences for tag in s.tags if tag != "O"}
    )
    return ["O"] + [f"{prefix}-{t}" for t in types for prefix in ("B", "I")]


def check_labels(labels: Sequence[str]) -> None:
    """Refuse an explicit label list (`data.labels`) that the IOB2 tags this module produces cannot match: an
    entry that is not O, B-TYPE or I-TYPE, a repeated entry, or a B-TYPE without its I-TYPE or vice versa (the
    entry is named)."""
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise TypeError(f"data.labels={labels!r} must be a list of tags, e.g. [O, B-PER, I-PER]")
    seen = set()
    for i, tag in enumerate(labels):
        if not isinstance(tag, str) or not re.match(r"^(O|[BI]-\S+)$", tag):
            hint = " (E-/S- tags are converted to B-/I-: list those)" if str(tag)[:2] in ("E-", "S-") else ""
            raise ValueError(
                f"data.labels[{i}]={tag!r} is not a tag of the IOB2 scheme the data is converted to: use O, "
                f"B-TYPE or I-TYPE{hint}"
            )
        if tag in seen:
            raise ValueError(f"data.labels[{i}]={tag!r} is listed twice")
        seen.add(tag)
    unpaired = []
    for i, tag in enumerate(labels):
        partner = ("I-" if tag[0] == "B" else "B-") + tag[2:]
        if tag != "O" and partner not in seen:
            unpaired.append(f"data.labels[{i}]={tag!r} has no {partner!r}")
    if unpaired:
        raise ValueError(
            f"{'; '.join(unpaired)} in data.labels={list(labels)}: every entity type needs both its B- and I- "
            "tag (a misspelt type?)"
        )


def resolve_files(data_dir: str | Path | None, files: dict[str, str] | None = None) -> dict[str, Path]:
    """The train/val/test files: `files` entries (relative to `data_dir` unless absolute), the rest from the
    first of `LAYOUTS` present in `data_dir`."""
    root = Path(data_dir) if data_dir else Path.cwd()
    chosen = dict(files or {})
    unknown = set(chosen) - set(SPLITS)
    if unknown:
        raise ValueError(f"data.files: unknown split(s) {sorted(unknown)}; use {list(SPLITS)}")
    missing = [s for s in SPLITS if s not in chosen]
    if missing:
        layout = next((lay for lay in LAYOUTS if all((root / lay[s]).is_file() for s in missing)), None)
        if layout is None:
            tried = " or ".join(", ".join(lay[s] for s in missing) for lay in LAYOUTS)
            raise FileNotFoundError(
                f"data.data_dir={root}: no {tried} there; name other files with data.files"
            )
        chosen.update({s: layout[s] for s in missing})
    paths = {s: root / chosen[s] for s in SPLITS}
    for split, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(f"data.files.{split}={path}: no such file")
    return paths


# -- tokenizer and windows ----------------------------------------------------------------------------------------

# byte-level BPE tokenizers need a space before each pre-split word to tokenize it as in running text
_PREFIX_SPACE_MODELS = {"roberta", "xlm-roberta", "longformer", "gpt2", "bart", "deberta", "bloom"}


def load_tokenizer(name_or_path: str):
    """The fast tokenizer of `name_or_path` (hub name or local folder); a slow-only tokenizer raises. A byte-level
    BPE one puts a space before each pre-split word, as running text has it: by its class's own setting, which
    `tokenizer_config.json` keeps (the listed model types, and any other whose class takes it), else on its
    pre-tokenizer, which `tokenizer.json` keeps."""
    from transformers import AutoConfig, AutoTokenizer

    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    kwargs = {"add_prefix_space": True} if model_type in _PREFIX_SPACE_MODELS else {}
    tokenizer = require_fast(AutoTokenizer.from_pretrained(name_or_path, **kwargs), name_or_path)
    if byte_level_without_space(tokenizer):
        tokenizer = require_fast(
            AutoTokenizer.from_pretrained(name_or_path, add_prefix_space=True), name_or_path
        )
    if byte_level_without_space(tokenizer):  # a class that ignores the setting
        from tokenizers import pre_tokenizers

        use_regex = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"].get("use_regex", True)
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True,
                                                                             use_regex=use_regex)  # fmt: skip
    return tokenizer


def byte_level_without_space(tokenizer) -> bool:
    """Whether a byte-level BPE tokenizer would read a pre-split word without the space running text has."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")


def require_fast(tokenizer, name: str):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{name}: {type(tokenizer).__name__} is a slow (Python) tokenizer; word-to-subword alignment needs a "
            "fast one (tokenizers backend, word_ids()); use a model that ships a tokenizer.json"
        )
    return tokenizer


def tokenizer_files(tokenizer) -> dict[str, str | bytes]:
    """The files `save_pretrained` writes for `tokenizer`, by name (text as str), to store in a checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for path in sorted(Path(tmp).iterdir()):
            data = path.read_bytes()
            try:
                files[path.name] = data.decode("utf-8")
            except UnicodeDecodeError:  # e.g. a sentencepiece model
                files[path.name] = data
    return files


def tokenizer_from_files(files: dict[str, str | bytes]):
    """Rebuild a fast tokenizer from `tokenizer_files` output, offline."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return require_fast(AutoTokenizer.from_pretrained(tmp), "the checkpoint's tokenizer")


def word_subtokens(tokenizer, sentences: Sequence[Sentence]) -> list[list[list[int]]]:
    """Subtoken ids of every word: [sentence][word] -> ids. A word the tokenizer drops (e.g. a zero-width
    character) becomes the unknown token, so that it still gets a prediction."""
    encoded = tokenizer([s.tokens for s in sentences], is_split_into_words=True, add_special_tokens=False)
    out = []
    for i, s in enumerate(sentences):
        words: list[list[int]] = [[] for _ in s.tokens]
        for token_id, word in zip(encoded["input_ids"][i], encoded.word_ids(i), strict=True):
            words[word].append(token_id)
        out.append([ids or [tokenizer.unk_token_id] for ids in words])
    return out


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a sequence (BERT: [CLS] / [SEP])."""
    encoded = tokenizer(["x"], is_split_into_words=True)
    ids, words = encoded["input_ids"], encoded.word_ids()
    first = words.index(0)
    last = len(words) - 1 - words[::-1].index(0)
    return ids[:first], ids[last + 1 :]


@dataclass(frozen=True)
class Window:
    """Word indices into a stream: the encoder sees [start, end); only the core [core_start, core_end) is
    labelled and predicted."""

    start: int
    core_start: int
    core_end: int
    end: int


def plan_windows(
    lengths: Sequence[int], core: tuple[int, int], bounds: tuple[int, int], max_tokens: int, context: int
) -> list[Window]:
    """Windows whose cores partition the words `core` = [a, b) of a stream with subtoken counts `lengths`.

    Each window holds at most `max_tokens` subtokens. A core is the rest of [a, b) if it fits (beside `context`
    subtokens of left context, after the first window), else as many words as leave `context` for the sides.
    The room a core leaves is filled with context from `bounds` = [lo, hi), up to half of it on the left first.
    Every length must be <= max_tokens - 2 * context (see `EncodingSettings.word_cap`).
    """
    a, b = core
    lo, hi = bounds
    windows = []
    core_start = a
    while core_start < b:
        budget = max_tokens - (context if core_start > a else 0)
        if sum(lengths[core_start:b]) > budget:
            budget -= context  # more windows follow: keep room for right context too
        core_end, used = core_start, 0
        while core_end < b and used + lengths[core_end] <= budget:
            used += lengths[core_end]
            core_end += 1
        start, end = core_start, core_end
        room = max_tokens - used
        left = room // 2
        while start > lo and lengths[start - 1] <= left:
            left -= lengths[start - 1]
            room -= lengths[start - 1]
            start -= 1
        while end < hi and lengths[end] <= room:
            room -= lengths[end]
            end += 1
        while start > lo and lengths[start - 1] <= room:  # the right side ran out: more on the left
            room -= lengths[start - 1]
            start -= 1
        windows.append(Window(start, core_start, core_end, end))
        core_start = core_end
    return windows


@dataclass(frozen=True)
class EncodingSettings:
    """How sentences become encoder inputs; saved in checkpoints so prediction encodes the same way."""

    max_length: int = 128
    window_context: int = 32  # subtokens of context kept on each side of a window's core
    document_context: bool = False
    label_all_subtokens: bool = False

    def __post_init__(self):
        for key in ("max_length", "window_context"):
            value = getattr(self, key)
            if not is_int(value):
                raise TypeError(f"data.{key}={value!r} must be an integer")
        if self.max_length < 1:
            raise ValueError(f"data.max_length={self.max_length} must be >= 1 (subtokens per window)")
        if self.window_context < 0:
            raise ValueError(
                f"data.window_context={self.window_context} must be >= 0 (subtokens of context on each side "
                "of a window's core; 0: none)"
            )
        for key in ("document_context", "label_all_subtokens"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise TypeError(f"data.{key}={value!r} must be a boolean (true or false)")

    def word_cap(self, num_special: int) -> int:
        """Subtokens kept per word (a longer word is cut: its first subtoken carries the label)."""
        cap = self.max_length - num_special - 2 * self.window_context
        if cap < 1:
            # a window needs the special tokens, the context on both sides and at least one subtoken of core
            fixes = [f"data.max_length >= {num_special + 2 * self.window_context + 1}"]
            if self.max_length - num_special >= 1:
                fixes.append(f"data.window_context <= {(self.max_length - num_special - 1) // 2}")
            raise ValueError(
                f"data.window_context={self.window_context} leaves no room in data.max_length={self.max_length} "
                f"({num_special} special tokens + 2 x {self.window_context} context leave no subtoken for the "
                f"words); set {' or '.join(fixes)}"
            )
        return cap


class NerWindows(Dataset):
    """Encoder inputs of a list of sentences. Items: `input_ids`, `labels` (-100: no loss) and `word_index`
    (the word's index in the flattened split at the first subtoken of each core word, else -1).

    `word_offsets[i]` is the flat index of sentence i's first word, so predictions `p[word_index]` read back
    per sentence as `p[word_offsets[i] : word_offsets[i] + len(sentences[i].tokens)]`.
    """

    def __init__(
        self, sentences: list[Sentence], tokenizer, labels: Sequence[str], settings: EncodingSettings
    ):
        self.sentences = sentences
        self.settings = settings
        label_id = {tag: i for i, tag in enumerate(labels)}
        continuation_id = [
            label_id.get("I-" + t[2:], i) if t.startswith("B-") else i for i, t in enumerate(labels)
        ]
        prefix, suffix = special_tokens(tokenizer)
        max_tokens = settings.max_length - len(prefix) - len(suffix)
        cap = settings.word_cap(len(prefix) + len(suffix))
        subtokens = [[ids[:cap] for ids in words] for words in word_subtokens(tokenizer, sentences)]

        self.word_offsets, total = [], 0
        for s in sentences:
            self.word_offsets.append(total)
            total += len(s.tokens)
        self.num_words = total

        # streams: a sentence, or with document_context the sentences of one document in a row
        streams: list[list[int]] = []
        for i, s in enumerate(sentences):
            if streams and settings.document_context and sentences[streams[-1][0]].document == s.document:
                streams[-1].append(i)
            else:
                streams.append([i])

        self.items: list[dict[str, list[int]]] = []
        for stream in streams:
            words = [(i, w) for i in stream for w in range(len(sentences[i].tokens))]  # (sentence, word)
            lengths = [len(subtokens[i][w]) for i, w in words]
            offset = 0
            for i in stream:
                n = len(sentences[i].tokens)
                for window in plan_windows(
                    lengths, (offset, offset + n), (0, len(words)), max_tokens, settings.window_context
                ):
                    self.items.append(
                        self._encode(window, words, subtokens, prefix, suffix, label_id, continuation_id)
                    )
                offset += n

    def _encode(
        self, window, words, subtokens, prefix, suffix, label_id, continuation_id
    ) -> dict[str, list[int]]:
        ids, labels, index = list(prefix), [IGNORE] * len(prefix), [-1] * len(prefix)
        for k in range(window.start, window.end):
            i, w = words[k]
            pieces = subtokens[i][w]
            ids += pieces
            if window.core_start <= k < window.core_end:
                tag = label_id[self.sentences[i].tags[w]]
                rest = continuation_id[tag] if self.settings.label_all_subtokens else IGNORE
                labels += [tag] + [rest] * (len(pieces) - 1)
                index += [self.word_offsets[i] + w] + [-1] * (len(pieces) - 1)
            else:
                labels += [IGNORE] * len(pieces)
                index += [-1] * len(pieces)
        n = len(suffix)
        return {
            "input_ids": ids + list(suffix),
            "labels": labels + [IGNORE] * n,
            "word_index": index + [-1] * n,
        }

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]

    def per_sentence(self, flat: Sequence) -> list[Sequence]:
        """Split per-word values of the whole split (indexed by `word_index`) into one slice per sentence."""
        return [flat[o : o + len(s.tokens)] for o, s in zip(self.word_offsets, self.sentences, strict=True)]


def collate_windows(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest window: input_ids, attention_mask, labels, word_index, all (B, T)."""
    length = max(len(item["input_ids"]) for item in items)
    batch = {
        "input_ids": torch.full((len(items), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(items), length, dtype=torch.long),
        "labels": torch.full((len(items), length), IGNORE, dtype=torch.long),
        "word_index": torch.full((len(items), length), -1, dtype=torch.long),
    }
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        batch["attention_mask"][row, :n] = 1
        for key in ("input_ids", "labels", "word_index"):
            batch[key][row, :n] = torch.tensor(item[key])
    return batch


# -- the datamodule -----------------------------------------------------------------------------------------------


class ConllDataModule(pl.LightningDataModule):
    """CoNLL-format NER data: files from `data_dir` (`eng.train/eng.testa/eng.testb` or
    `train.txt/valid.txt/test.txt`, others through `files`) or a Hugging Face dataset `hf_dataset` (a hub name,
    or a folder written by `DatasetDict.save_to_disk`) with `tokens`/`ner_tags` columns.

    After `setup()`: `labels` (the label list), `sentences[split]`, `tokenizer` and `settings`.
    """

    def __init__(
        self,
        tokenizer: str,
        data_dir: str | None = None,
        files: dict[str, str] | None = None,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        scheme: str = "auto",
        labels: list[str] | None = None,
        max_length: int = 128,
        window_context: int = 32,
        document_context: bool = False,
        label_all_subtokens: bool = False,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        # plain types (not Hydra's containers) so that checkpoints load with torch.load(weights_only=True)
        files = {str(k): str(v) for k, v in files.items()} if files else None
        if labels is not None:
            check_labels(labels)
            labels = [str(t) for t in labels]
        self.save_hyperparameters(logger=False)
        if (data_dir is None and not files) == (hf_dataset is None):
            raise ValueError("set exactly one of data.data_dir (CoNLL files) and data.hf_dataset")
        if scheme not in SCHEMES:
            raise ValueError(f"data.scheme={scheme!r} is unknown; choose from {SCHEMES}")
        self.settings = EncodingSettings(max_length, window_context, document_context, label_all_subtokens)
        self.sentences: dict[str, list[Sentence]] = {}
        self.labels: list[str] = []
        self.tokenizer = None
        self.datasets: dict[str, NerWindows] = {}

    def read_splits(self) -> dict[str, list[Sentence]]:
        h = self.hparams
        if h.hf_dataset is None:
            out = {}
            for split, path in resolve_files(h.data_dir, h.files).items():
                out[split] = read_conll(path, h.scheme)
                if not out[split]:
                    named = (
                        f"data.files.{split}="
                        if h.files and split in h.files
                        else f"data.data_dir={h.data_dir}: "
                    )
                    raise ValueError(
                        f"{named}{path}: no sentences (the file is empty or holds only blank and {DOCSTART} lines)"
                    )
            return out
        import datasets

        if (Path(h.hf_dataset) / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(h.hf_dataset)
        else:
            loaded = datasets.load_dataset(h.hf_dataset, h.hf_config)
        out = {}
        for split, name in HF_SPLITS.items():
            if name not in loaded:
                raise ValueError(f"data.hf_dataset={h.hf_dataset}: no {name!r} split (has {list(loaded)})")
            source = f"{h.hf_dataset}[{name}]"
            out[split] = convert_scheme(sentences_from_hf(loaded[name], source), h.scheme, source)
            if not out[split]:
                raise ValueError(f"data.hf_dataset={h.hf_dataset}: the {name!r} split has no sentences")
        return out

    def setup(self, stage: str | None = None) -> None:
        # all splits are read at every stage: the label set is built from all of them
        if not self.sentences:
            self.sentences = self.read_splits()
            self.labels = label_list(self.sentences, self.hparams.labels)
            from imagen.models.ner import check_pretrained

            self.tokenizer = load_tokenizer(check_pretrained(self.hparams.tokenizer, "data.tokenizer"))
            log.info(
                "NER data: "
                + ", ".join(f"{split} {len(s)} sentences" for split, s in self.sentences.items())
                + f"; labels {self.labels}"
            )

    def dataset(self, split: str) -> NerWindows:
        if split not in self.datasets:
            self.setup()
            self.datasets[split] = NerWindows(
                self.sentences[split], self.tokenizer, self.labels, self.settings
            )
        return self.datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader:
        h = self.hparams
        settings = {
            "num_workers": h.num_workers,
            "pin_memory": h.pin_memory,
            "collate_fn": functools.partial(collate_windows, pad_id=self.tokenizer.pad_token_id),
        }
        if train:  # resumable mid-epoch; the order comes from the run's seed (set by seed_everything)
            return ResumableLoader(
                self.dataset(split), h.batch_size, seed=torch.initial_seed(), drop_last=False, **settings
            )
        return DataLoader(self.dataset(split), batch_size=h.eval_batch_size, **settings)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
