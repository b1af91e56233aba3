"""Is a file still the one the plan was made from? Size, modification and change times, inode.

Readers record a file's identity when they read its header; the engine checks it when it opens the file
for data and again before any output is renamed into place, so an input truncated, rewritten in place
or replaced while the merge reads it stops the merge instead of giving an output that mixes versions.
The times are as fine as the file system keeps them (nanoseconds on ext4, XFS, btrfs, tmpfs; a rewrite
within the same clock tick of the kernel's coarse clock, a few milliseconds, keeps them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ckpt_ema.errors import InputError


@dataclass(frozen=True)
class FileIdentity:
    """``os.stat`` fields that change when a file's content is changed or the file is replaced."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino, status.st_dev)


def identity(path: Path) -> FileIdentity:
    """The identity of ``path`` now (follows symbolic links, as opening it does)."""
    return FileIdentity.of(os.stat(path))


def check_unchanged(path: Path, expected: FileIdentity | None, status: os.stat_result | None = None) -> None:
    """Raise ``InputError`` naming ``path`` if it is no longer the file ``expected`` describes.

    ``status``: the ``fstat`` of a descriptor already open on it (else the path is stat'ed).
    """
    if expected is None:
        return
    try:
        now = FileIdentity.of(status if status is not None else os.stat(path))
    except OSError as exc:
        raise InputError(f"{path}: changed while being read ({exc.strerror or exc}); no output written") from None
    if now.size < expected.size:
        raise InputError(
            f"{path}: truncated while being read ({expected.size} bytes, now {now.size}); no output written"
        )
    if now != expected:
        what = "replaced" if (now.inode, now.device) != (expected.inode, expected.device) else "modified"
        raise InputError(f"{path}: changed while being read ({what}); no output written, run the merge again")
