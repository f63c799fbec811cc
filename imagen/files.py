"""Files written so that a reader, or a process killed meanwhile, never sees half of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` (named after this process: concurrent writers never share one),
    then rename it over `path`: the old file or the whole new one, never a cut one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def file_in_the_way(folder: str | Path) -> Path | None:
    """The file (not a folder) at `folder` or at the nearest of its parents that exists, which would stop `folder`
    being used or created as a folder; None where nothing is in the way."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), None)
    return existing if existing is not None and not existing.is_dir() else None
