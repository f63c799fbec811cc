"""Files written so that a reader, or a process killed meanwhile, never sees half of one; a file in the way of a
folder; the digest of the source that runs."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def atomic_file(path: str | Path, one_writer: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write the file to, hidden. When the block ends it is renamed over `path`, so
    a reader, or a process killed meanwhile, sees the old file or the whole new one; when the block raises it is
    removed and `path` is left as it was. The temporary is named after the host and process, so that concurrent
    writers (jobs sharing a cache on a network disk) never share one; with `one_writer` (a run's own checkpoints) it
    is `.<name>.tmp`, which the next write replaces should a killed process leave one."""
    path = Path(path)
    writer = "" if one_writer else f"{socket.gethostname()}-{os.getpid()}"
    temporary = path.with_name(f".{path.name}.tmp{writer}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through `atomic_file`."""
    with atomic_file(path) as temporary:
        temporary.write_text(text)


def file_in_the_way(folder: str | Path) -> Path | None:
    """The file (not a folder) at `folder` or at the nearest of its parents that exists, which would stop `folder`
    being used or created as a folder; None where nothing is in the way."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), None)
    return existing if existing is not None and not existing.is_dir() else None


def source_digest(root: str | Path = REPO_ROOT) -> str:
    """sha256 over the source that runs: every imagen/**/*.py and conf/**/*.yaml under `root` (but conf/local, which
    git ignores), sorted by path, each as its path, a NUL, its bytes and a NUL. The same on a copy of the working tree
    (a lent GPU machine's) as here, and for a commit C on `git archive C imagen conf` unpacked (BENCHMARKS.md); an
    installed package's configs (imagen/conf/) count as conf/."""
    root = Path(root)
    named = {}
    for path in [
        *root.glob("imagen/**/*.py"),
        *root.glob("conf/**/*.yaml"),
        *root.glob("imagen/conf/**/*.yaml"),
    ]:
        name = path.relative_to(root).as_posix()
        if name.startswith("imagen/conf/"):
            if name.endswith(".py"):  # the package marker, not part of a checkout's conf/**/*.yaml
                continue
            name = name.removeprefix("imagen/")
        if not name.startswith("conf/local/") and path.is_file():
            named[name] = path
    digest = hashlib.sha256()
    for name in sorted(named):
        digest.update(name.encode() + b"\0" + named[name].read_bytes() + b"\0")
    return digest.hexdigest()
