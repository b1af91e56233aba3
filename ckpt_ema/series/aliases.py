"""Aliases: a second name for a checkpoint of the series (``last.ckpt``, ``last.pth.tar``, ``model_best.pth.tar``).

Trainers keep the newest or the best checkpoint under a fixed name beside the numbered ones: timm's
``CheckpointSaver`` as a hard link (``last.pth.tar``, ``model_best.pth.tar``), Lightning's ``save_last=True`` as
a copy saved at the same step (``last.ckpt``, ``last-v1.ckpt``). Such a file is the same checkpoint twice: it is
skipped, with a note naming the checkpoint it stands for. An alias whose step no numbered checkpoint has is a
checkpoint of its own and is kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ckpt_ema.io import FileNote

# names trainers give to a copy of one of their checkpoints; Lightning adds -vN when the name is taken
_ALIAS_NAME = re.compile(r"(last|latest|best|model_best|final)(-v\d+)?", re.IGNORECASE)

T = TypeVar("T")


def is_alias_name(path: Path) -> bool:
    """``last.ckpt``, ``last-v1.ckpt``, ``last.pth.tar``, ``model_best.pth.tar``, ``best.pt``, ..."""
    return bool(_ALIAS_NAME.fullmatch(path.name.split(".", 1)[0]))


def skip_aliases(
    items: Sequence[T], key: Callable[[T], object], path: Callable[[T], Path], why: Callable[[T, T], str]
) -> tuple[list[T], list[FileNote]]:
    """Drop the alias-named items that share ``key`` (an inode, a step) with an item of another name.

    Returns the items kept, in their order, and a note for each item dropped (``why(dropped, kept)``).
    Items sharing a key where none is alias-named are all kept (the caller reports them).
    """
    groups: dict[object, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    dropped: dict[int, FileNote] = {}
    for group in groups.values():
        plain = [i for i in group if not is_alias_name(path(i))]
        if len(group) < 2 or not plain:
            continue
        for item in group:
            if is_alias_name(path(item)):
                dropped[id(item)] = FileNote(str(path(item)), why(item, plain[0]))
    kept = [i for i in items if id(i) not in dropped]
    return kept, list(dropped.values())


def same_content(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    """Whether two files hold the same bytes (a copy made where hard links are not possible: timm falls back
    to ``shutil.copy2``); stops at the first difference."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block = fa.read(chunk)
            if block != fb.read(chunk):
                return False
            if not block:
                return True


def copy_of(path: Path, others: Sequence[Path]) -> Path | None:
    """The non-alias file among ``others`` that an alias-named ``path`` is a byte-for-byte copy of, if any."""
    if not is_alias_name(path) or not path.is_file():
        return None
    size = os.stat(path).st_size
    for other in others:
        if other != path and not is_alias_name(other) and other.is_file() and other.stat().st_size == size:
            if same_content(path, other):
                return other
    return None
