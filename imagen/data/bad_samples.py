"""Bad samples: one exception type, a counter by reason, and the policy (`skip` or `raise`) that uses them.

Datasets raise `BadSample(reason, name)` where a sample cannot be used. Under `skip` the dataset catches it,
moves on to another sample and hands the record along with the next good sample (`item["bad"]`); the
datamodule collects these records in the main process (`BadSampleTracker.update`), so samples dropped inside
dataloader workers are counted as well. Under `raise` the exception propagates with the file and reason.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

# The reasons a sample is dropped (the keys of the counts); `truncated_caption` is counted but not dropped.
REASONS = (
    "corrupt_image",  # a decoder error, including truncated files
    "unreadable_file",  # an image or caption file that exists but cannot be read (permissions, I/O errors)
    "empty_file",  # zero bytes
    "not_an_image",  # a file Pillow cannot identify as an image
    "too_many_pixels",  # over data.max_pixels (decompression bombs)
    "missing_caption",  # no caption file / entry / member
    "empty_caption",  # a caption that is empty after cleanup
    "undecodable_text",  # caption bytes that are not UTF-8, JSON that does not parse, a caption that is no string
    "missing_image",  # a tar sample with no image member, or an indexed image file that does not exist
    "unreadable_shard",  # a tar shard that cannot be opened or read to its end
)


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of `REASONS`, `name` the file (or shard/member)."""

    def __init__(self, reason: str, name: str = "", detail: str = ""):
        if not name:  # re-raised by a DataLoader from a worker, which passes the formatted message only
            match = re.search(r"bad sample (.+?): (\w+)", reason)
            super().__init__(reason)
            self.name, self.reason = (match.group(1), match.group(2)) if match else ("", "unknown")
            self.detail = ""
            return
        self.reason, self.name, self.detail = reason, str(name), detail
        super().__init__(f"bad sample {self.name}: {reason}" + (f" ({detail})" if detail else ""))


def read_sample_file(path: Path) -> bytes:
    """The bytes of a sample's file; `BadSample` if it cannot be read (`missing_image`: not found;
    `unreadable_file`: permissions, I/O errors)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadSample("missing_image", str(path)) from None
    except OSError as e:
        raise BadSample("unreadable_file", str(path), str(e)) from None


class TooManyBadSamples(RuntimeError):
    """More than `max_bad_fraction` of the samples read so far were bad."""


class BadSampleTracker:
    """Counts bad samples by reason (this epoch and in all), keeps the first few file names per reason, and
    stops the run when the bad fraction exceeds `max_bad_fraction` (checked once `min_samples` were read)."""

    def __init__(self, max_bad_fraction: float = 0.1, min_samples: int = 50, keep_names: int = 5):
        self.max_bad_fraction, self.min_samples, self.keep_names = max_bad_fraction, min_samples, keep_names
        self.total: Counter[str] = Counter()
        self.epoch: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.good = 0
        self.truncated = 0

    @property
    def bad(self) -> int:
        return sum(self.total.values())

    def update(self, bad: list[tuple[str, str]], good: int, truncated: int = 0, check: bool = True) -> None:
        """Record a batch: its dropped samples as (reason, name) pairs and its number of good samples; then `check`
        (without it, the caller checks: under DDP, on the counts of every process)."""
        for reason, name in bad:
            self.total[reason] += 1
            self.epoch[reason] += 1
            names = self.examples.setdefault(reason, [])
            if len(names) < self.keep_names and name not in names:  # a file read again is named once
                names.append(name)
        self.good += good
        self.truncated += truncated
        if check:
            self.check()

    def check(self, final: bool = False, counts: tuple[int, int] | None = None) -> None:
        """Raise `TooManyBadSamples` when the bad fraction is over the limit (after `min_samples`, or at the end);
        of `counts` (bad, good: every process's, summed) when given, else of this tracker's."""
        bad, good = counts if counts is not None else (self.bad, self.good)
        seen = bad + good
        if not seen or (seen < self.min_samples and not final):
            return
        if bad / seen > self.max_bad_fraction:
            raise TooManyBadSamples(
                f"{bad} of {seen} samples read were bad ({bad / seen:.1%} > "
                f"data.max_bad_fraction={self.max_bad_fraction}); refusing to train on what is left. "
                f"{'This process: ' if counts is not None else ''}{self.summary()}"
            )

    def end_epoch(self) -> dict[str, int]:
        """This epoch's counts by reason (then reset)."""
        counts = dict(self.epoch)
        self.epoch.clear()
        return counts

    def state(self) -> dict:
        """The counts in all (not this epoch's), for a checkpoint: a resumed run goes on counting from them."""
        return {"counts": dict(self.total), "examples": {k: list(v) for k, v in self.examples.items()},
                "good": self.good, "truncated": self.truncated}  # fmt: skip

    def load_state(self, state: dict) -> None:
        """Replace the counts in all with `state` (from `state()`); this epoch's are left as they are."""
        self.total = Counter({str(k): int(v) for k, v in state.get("counts", {}).items()})
        self.examples = {
            str(k): [str(n) for n in v][: self.keep_names] for k, v in state.get("examples", {}).items()
        }
        self.good, self.truncated = int(state.get("good", 0)), int(state.get("truncated", 0))

    def add_recorded(
        self, counts: dict[str, int], good: int, examples: dict[str, list[str]] | None = None
    ) -> None:
        """Add counts recorded elsewhere (a token cache shard's): bad samples by reason, their first few names, and
        the good samples."""
        for reason, count in counts.items():
            self.total[reason] += count
            names = self.examples.setdefault(reason, [])
            names += [n for n in (examples or {}).get(reason, []) if n not in names][
                : self.keep_names - len(names)
            ]
        self.good += good

    def by_reason(self) -> str:
        """The bad samples' counts by reason, with the first few names where known."""
        return "; ".join(
            f"{reason}={count}"
            + (f" (e.g. {', '.join(self.examples[reason])})" if self.examples.get(reason) else "")
            for reason, count in self.total.most_common()
        )

    def summary(self) -> str:
        """One line: counts by reason with the first few file names, and the truncated captions."""
        text = f"{self.bad} bad samples skipped: {self.by_reason()}" if self.total else "no bad samples"
        return f"{text}; {self.good} good samples read, {self.truncated} captions truncated"
