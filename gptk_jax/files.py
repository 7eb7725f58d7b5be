"""Folders written atomically: built in a hidden sibling, renamed into place only when complete.

    with atomic_folder(out) as tmp:     # tmp = OUT_PARENT/.OUT.partial-PID, empty
        write everything under tmp
    # out now holds it; on any exception tmp is removed and out is left as it was

Replacing an existing `out` (the caller decides whether that is allowed) moves the old folder
aside only after the new one is complete, then deletes it: a crash never leaves `out` half-written.
A process killed inside the block (SIGKILL: no cleanup runs) leaves its hidden sibling behind;
the next `atomic_folder` for the same `out` removes siblings whose process is gone and reports
them through `log`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

from gptk_jax.errors import GptkError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's process: alive
        return True
    return True


def remove_stale_siblings(out: Path) -> list[Path]:
    """Removes `.OUT.partial-PID` / `.OUT.old-PID` siblings of `out` whose process no longer
    runs (left by a killed writer); returns what was removed. Live writers' folders are kept."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_folder(out: Path, log: Optional[Callable[[str], None]] = None) -> Iterator[Path]:
    out = Path(out)
    for stale in remove_stale_siblings(out):
        if log is not None:
            log(f"removed {stale}, left by a writer that no longer runs")
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


def read_json_object(path: Path, error: type[Exception]) -> dict:
    """A JSON file holding an object; anything else raises `error` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def atomic_write_text(path: Path, text: str) -> None:
    """`path` holds `text` or what it held before, never a part: written to a hidden sibling,
    fsync-ed, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def os_error_text(error: OSError, path, what: str) -> str:
    """A one-line message for an OSError about the file `path` (the role it plays: `what`) that
    says what to do instead of a raw errno text ("Is a directory", "File exists", "Not a
    directory"): `what path: reason` (os_error_reason)."""
    reason = os_error_reason(error, path)
    if reason.startswith("it is "):           # "--output X is a folder, where a file ..."
        return f"{what} {path} {reason[len('it '):]}"
    return f"{what} {path}: {reason}"


def os_error_reason(error: OSError, path, *, folder: bool = False) -> str:
    """What is wrong with `path` after `error`, and what to do, for the tail of a message that
    already names it ("workdir X is not writable: <reason>"); never a raw errno text. `folder`:
    `path` should be a folder (else a file)."""
    import errno as errno_codes
    path = Path(path)
    if error.errno in (errno_codes.ENOTDIR, errno_codes.EEXIST, errno_codes.EISDIR):
        if folder and path.exists() and not path.is_dir():
            return "it is a file, where a folder is needed: give a folder path"
        if not folder and path.is_dir():
            return "it is a folder, where a file is needed: remove it or choose another path"
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return (f"{blocker} is a file, not a folder: choose a path whose folders are "
                    f"folders")
    if error.errno == errno_codes.ENOENT:
        return "no such file or folder"
    if error.errno in (errno_codes.EACCES, errno_codes.EPERM):
        return "permission denied: choose a path you can write / read"
    if error.errno == errno_codes.EROFS:
        return "on a read-only file system: choose a path you can write"
    if error.errno == errno_codes.ENOSPC:
        return "no space left on its device: free some or choose another path"
    return error.strerror or str(error)


class OutputFileError(GptkError, OSError):
    """An output file that cannot be written; the message names it."""


class JsonLines:
    """OUT.partial, appended and flushed one line at a time; `finish` renames it to OUT. Opened
    before the model loads, so an unwritable OUT fails first."""

    def __init__(self, path: Optional[Path]):
        self.path, self.written, self._file = path, 0, None
        if path is None:
            return
        self.partial = path.with_name(path.name + ".partial")
        if path.is_dir():   # open() would write OUT.partial beside it; finish() then fails
            raise OutputFileError(f"--output-json {path}: cannot write it: it is a folder, where "
                                  "a file is needed: remove it or choose another path")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputFileError(f"--output-json {path}: cannot write it: "
                                  f"{os_error_reason(e, path)}") from None
        try:
            self._file = open(self.partial, "w", encoding="utf-8")
        except OSError as e:
            raise OutputFileError(f"--output-json {path}: cannot write {self.partial}: "
                                  f"{os_error_reason(e, self.partial)}") from None

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
            self.written += 1

    def finish(self, records: Optional[list] = None) -> None:
        """OUT.partial becomes OUT; with `records`, OUT is written whole from them instead
        (atomically) and OUT.partial removed."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if records is None:
            os.replace(self.partial, self.path)
            return
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                             for r in records))
        self.partial.unlink(missing_ok=True)

    def abandon(self) -> str:
        """After a failure: drops an empty OUT.partial; says where finished lines are kept."""
        if self._file is None:
            return ""
        self._file.close()
        self._file = None
        if not self.written:
            self.partial.unlink(missing_ok=True)
            return ""
        return f" ({self.written} finished prompts kept in {self.partial})"
