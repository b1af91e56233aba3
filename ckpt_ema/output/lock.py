"""One run per output: a lock file next to each output, held while the run writes it.

``.NAME.ckpt-ema-lock`` is created (or reused, if a killed run left it) next to the output ``NAME`` and
locked with ``flock`` for as long as the run writes; a second run asking for the same output finds it
locked and is refused, instead of both printing "wrote" and the last rename winning. The kernel drops the
lock when its process dies (also on ``kill -9``), so a stale lock file never blocks anyone: the next run
for that output takes it over and removes it when done. Only the run holding the lock removes the file,
and a run that took a lock on a file removed meanwhile starts again, so two runs never both hold it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ckpt_ema.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; outputs are not locked (the temporary files still are distinct)
    fcntl = None  # type: ignore[assignment]

LOCK_MARKER = ".ckpt-ema-lock"
ATTEMPTS = 20  # each retry means another run removed the lock file meanwhile


def lock_path_for(path: Path) -> Path:
    """The lock file of output ``path`` (a file or a folder)."""
    return path.with_name(f".{path.name}{LOCK_MARKER}")


class OutputLock:
    """Held while this process writes ``path``; ``acquire`` refuses when another run holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = lock_path_for(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (always, where there is no ``flock``)."""
        return self._fd is not None or fcntl is None

    def acquire(self) -> None:
        """Take the lock, or raise ``OutputError`` when another run holds it."""
        if fcntl is None or self._fd is not None:
            return
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for _ in range(ATTEMPTS):
            try:
                fd = os.open(self.lock_path, flags, 0o600)
            except OSError as exc:
                raise OutputError(f"{self.lock_path}: cannot create the lock file ({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                same = _same_file(fd, self.lock_path)
                os.close(fd)
                if not same:
                    continue  # its holder finished and removed it: try again with a fresh one
                raise OutputError(
                    f"{self.path}: another ckpt-ema run is writing it; wait for it to finish or choose another output"
                ) from None
            if not _same_file(fd, self.lock_path):  # removed between our open and our lock
                os.close(fd)
                continue
            self._fd = fd  # the file stays empty: it takes no space on a full disk
            return
        raise OutputError(f"{self.path}: could not take the output's lock ({self.lock_path}); try again")

    def release(self) -> None:
        """Remove the lock file and drop the lock (safe to call more than once)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.lock_path):
                with contextlib.suppress(OSError):
                    os.unlink(self.lock_path)
        finally:
            os.close(fd)


def output_locked(path: Path) -> bool:
    """Whether some run holds output ``path``'s lock right now (without taking it for longer than a check)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(lock_path_for(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
