"""One writer at a time: an exclusive lock on a file beside what is written.

    with exclusive_lock(Path("out.en.lock"), "--output out.en", log=print):
        ...write out.en...

The lock is `fcntl.flock` on the lock file, held for the block and released on any exit (the
kernel releases it too when the process dies, even by SIGKILL). The holder writes its PID and
start time into the file, so a second writer is refused naming them (`LockHeld`, one line).
A lock file left by a process that no longer holds the lock (killed: no cleanup ran) is a stale
lock: it is taken over and reported through `log`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from gptk_jax.errors import GptkError


class LockHeld(GptkError, RuntimeError):
    """Another live process is writing the same output / workdir."""


class LockUnavailable(GptkError, OSError):
    """The lock file cannot be created (a folder in its place, an unwritable folder)."""


def _holder(text: str) -> str:
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    pid, started = fields.get("pid"), fields.get("started")
    if pid is None:
        return "another process (PID not yet written)"
    return f"PID {pid}" + (f", started {started}" if started else "")


def _holder_text(path: Path, wait_s: float = 2.0) -> str:
    """The lock file's text once its holder has written its PID: the holder writes it right
    after taking the lock, so a refusal that lands between the two waits briefly for it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = path.read_text()
        except OSError:
            text = ""
        if "pid=" in text or time.monotonic() >= deadline:
            return text
        time.sleep(0.01)


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str,
                   log: Optional[Callable[[str], None]] = None) -> Iterator[Path]:
    """Holds an exclusive lock on `path` (created if absent) for the block; raises LockHeld
    naming the holder's PID and start time when another process holds it. `what` names the
    thing guarded, for the messages."""
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            from gptk_jax.files import os_error_text
            raise LockUnavailable(f"cannot lock {what}: " + os_error_text(
                e, path, "its lock file") + " (nothing was written)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            text = _holder_text(path)
            raise LockHeld(f"{what} is being written by another run ({_holder(text)}; lock "
                           f"{path}): wait for it to finish, or stop it first") from None
        try:                       # the file may have been removed by its last holder
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)               # locked a file no longer at `path`: try again
    try:
        old = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if old and log is not None:
            log(f"cleared a stale lock {path} of {_holder(old)}, which no longer runs")
        mine = f"pid={os.getpid()} started={time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode()
        os.pwrite(fd, mine, 0)     # written over the old text, then cut: never empty once named
        os.ftruncate(fd, len(mine))
        yield path
    finally:
        try:
            os.unlink(path)        # still ours: nobody else can hold it while we do
        except FileNotFoundError:
            pass
        os.close(fd)


__all__ = ["LockHeld", "LockUnavailable", "exclusive_lock"]
