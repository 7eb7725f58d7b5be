"""Folders written atomically: built in a hidden sibling, renamed into place only when complete.

    with atomic_folder(out) as tmp:     # tmp = OUT_PARENT/.OUT.partial-PID, empty
        write everything under tmp
    # out now holds it; on any exception tmp is removed and out is left as it was

Replacing an existing `out` (the caller decides whether that is allowed) moves the old folder
aside only after the new one is complete, then deletes it: a crash never leaves `out` half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
