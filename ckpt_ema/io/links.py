"""Symbolic links inside a folder checkpoint: followed only while they stay inside the checkpoint.

A folder checkpoint is read (its shards) and the newest one's other files are copied into a folder output
(configs, tokenizers). A link inside it may name another file of the same checkpoint, which is then read
or copied as that file; in a Hugging Face hub cache snapshot (``models--ORG--NAME/snapshots/REV/``) every
file is a link to a blob of the same repository (``models--ORG--NAME/blobs/HASH``), and those are followed
too. Any other link (to ``/etc/shadow``, to a private folder, to another run) is refused: the output would
carry a file the checkpoint does not hold.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ckpt_ema.errors import InputError

HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def hub_blobs(real_root: Path) -> Path | None:
    """The ``blobs/`` folder of the hub cache repository whose snapshot holds ``real_root`` (a real path)."""
    for folder in (real_root, *real_root.parents):
        if folder.name == "snapshots" and folder.parent.name.startswith(HUB_REPO_PREFIXES):
            return folder.parent / "blobs"
    return None


def inside(root: Path, path: Path) -> Path:
    """The real path of ``path`` (a file or folder of the checkpoint ``root``); refuses a link leaving ``root``.

    Raises:
        InputError: naming the link, where it leads, and what to do.
    """
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real == real_root or real_root in real.parents:
        return real
    blobs = hub_blobs(real_root)
    if blobs is not None and real.parent == blobs:
        return real
    raise InputError(
        f"{path}: is a symbolic link to {real}, outside the checkpoint {root}; ckpt-ema never follows a link out "
        "of a checkpoint (copy the file into the checkpoint, or remove the link)"
    )


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words (for messages)."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def walk_copy(root: Path, origin: Path, visiting: frozenset[Path] = frozenset()) -> Iterator[tuple[Path, Path | None]]:
    """What copying ``origin`` (a file or folder of the checkpoint ``root``) reads, in order.

    Yields ``(path relative to origin, real file)`` for each file and ``(relative folder, None)`` before a
    folder's contents; links are followed only inside the checkpoint (:func:`inside`).

    Raises:
        InputError: a link leaving the checkpoint or naming nothing, a loop of links, a FIFO or device.
    """
    real = inside(root, origin)
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise InputError(f"{origin}: is a symbolic link to {real}, which does not exist") from None
    if stat.S_ISDIR(info.st_mode):
        if real in visiting:
            raise InputError(f"{origin}: symbolic links in {root} form a loop")
        yield Path(), None
        for name in sorted(os.listdir(real)):
            for relative, file in walk_copy(root, origin / name, visiting | {real}):
                yield Path(name) / relative, file
    elif stat.S_ISREG(info.st_mode):
        yield Path(), real
    else:
        raise InputError(f"{origin}: is {kind_of(info.st_mode)}, not a file to copy; remove it from the checkpoint")


def copy_problems(root: Path, relpaths: list[str]) -> list[str]:
    """Why copying each of ``relpaths`` (files and folders of ``root``) would be refused: one message each."""
    problems = []
    for relpath in relpaths:
        try:
            for _ in walk_copy(root, root / relpath.rstrip("/")):
                pass
        except InputError as exc:
            problems.append(str(exc))
        except OSError as exc:
            problems.append(f"{root / relpath}: cannot read ({exc.strerror or exc})")
    return problems
