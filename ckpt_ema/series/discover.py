"""From the paths a user gives to the checkpoints of a series: series folders expanded, repeats refused."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

from ckpt_ema.errors import CkptEmaError, InputError
from ckpt_ema.io import CHECKPOINT_SUFFIXES, FileNote
from ckpt_ema.io.folder import CHECKPOINT_FOLDER_NAME, is_checkpoint_folder, trainer_file_reason
from ckpt_ema.io.links import kind_of
from ckpt_ema.series.aliases import copy_of, is_alias_name, skip_aliases
from ckpt_ema.series.steps import step_from_name

# accelerate's ProjectConfiguration(automatic_checkpoint_naming=True): project_dir/checkpoints/checkpoint_N/
ACCELERATE_FOLDER = "checkpoints"
_ACCELERATE_CHECKPOINT = re.compile(r"^checkpoint_\d+$")


def discover_inputs(inputs: Sequence[str | os.PathLike], skipped: list[FileNote] | None = None) -> list[Path]:
    """Expand INPUT arguments: files and checkpoint folders as given, series folders to their checkpoints
    (what a series folder holds besides them is noted in ``skipped``)."""
    notes: list[FileNote] = [] if skipped is None else skipped
    found, aliases = skip_aliases(
        expand_inputs(inputs, notes),
        key=file_id,
        path=lambda p: p,
        why=lambda p, kept: f"the same file as {kept.name} (a hard link); skipped",
    )
    notes.extend(aliases)
    copies = {p: copy_of(p, found) for p in found if is_alias_name(p)}
    for path, original in copies.items():
        if original is not None:
            notes.append(FileNote(str(path), f"the same content as {original.name} (a copy); skipped"))
    found = [p for p in found if copies.get(p) is None]
    refuse_repeats(found)
    return found


def expand_inputs(inputs: Sequence[str | os.PathLike], skipped: list[FileNote] | None = None) -> list[Path]:
    """INPUT arguments to checkpoints: files and checkpoint folders as given; a folder holding a series
    to its checkpoint files or checkpoint folders (not both), in natural name order (``step-9`` before
    ``step-10``; ``--steps`` follows this order).

    A training output folder that holds ``checkpoint-N/`` (or OneTrainer ``-backup-``) folders is a series
    even when the final model was saved beside them; kohya's ``-state`` resume folders beside the saved
    files are skipped. What is skipped, and why, is appended to ``skipped`` (shown by ``inspect``).
    """
    notes: list[FileNote] = [] if skipped is None else skipped
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and _accelerate_project(path):
            notes.append(
                FileNote(str(path / ACCELERATE_FOLDER), "accelerate project: its checkpoint_N folders are read")
            )
            path = path / ACCELERATE_FOLDER
        if path.is_dir():
            children = sorted(path.iterdir(), key=natural_key)  # step-9 before step-10 (and for --steps)
            numbered = [p for p in children if p.is_dir() and CHECKPOINT_FOLDER_NAME.search(p.name)]
            if is_checkpoint_folder(path) and not numbered:
                found.append(path)
                continue
            files = [p for p in children if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES]
            folders = numbered or [
                p for p in children if p.is_dir() and not p.name.startswith(".") and is_checkpoint_folder(p)
            ]
            if numbered:  # the final model (save_model, save_lora_weights) beside checkpoint-N/ has no step
                stepless = [p for p in files if not _labels_step(p)]
                for p in stepless:
                    reason = (
                        "trainer state beside checkpoint folders"
                        if trainer_file_reason(p.name)
                        else "final model beside checkpoint folders (no step); pass it to include it"
                    )
                    notes.append(FileNote(str(p), reason))
                files = [p for p in files if p not in stepless]
            states = [p for p in folders if p.name.endswith("-state")]
            if files and states:
                notes.extend(
                    FileNote(str(p), "kohya resume state (the saved files beside it are read)") for p in states
                )
                folders = [p for p in folders if p not in states]
            if files and folders:
                raise InputError(
                    f"{path}: holds both checkpoint files ({len(files)}) and checkpoint folders ({len(folders)}, "
                    f"e.g. {folders[0].name}); pass the ones you mean"
                )
            if not files and not folders:
                raise InputError(f"{path}: folder holds no .safetensors files, torch files or checkpoint folders")
            chosen = set(files or folders)
            odd = []
            for p in children:
                if p in chosen or p.name.startswith(".") or any(n.relpath == str(p) for n in notes):
                    continue
                why = _unreadable_checkpoint(p)
                notes.append(FileNote(str(p), why or "not a checkpoint", suspicious=why is not None))
                if why is not None:
                    odd.append((p, why))
            newest = max(files or folders, key=natural_key)
            for p, why in odd:
                if natural_key(p) > natural_key(newest):
                    raise InputError(
                        f"{p}: the newest entry of the series {path} is {why}, so it cannot be read; merging "
                        "the others would silently leave out the newest checkpoint: fix it, or pass the ones you mean"
                    )
            found.extend(files or folders)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise InputError(f"{path}: not a file or folder")
        else:
            raise InputError(f"{path}: no such file or folder")
    if not found:
        raise InputError("no checkpoints given")
    kinds = {p.is_dir() for p in found}
    if len(kinds) > 1:
        folder = next(p for p in found if p.is_dir())
        file = next(p for p in found if not p.is_dir())
        raise InputError(f"{folder} is a folder checkpoint but {file} is a file; a series cannot mix them")
    return found


def _unreadable_checkpoint(path: Path) -> str | None:
    """Why an entry named like a checkpoint (``.safetensors``, ``.pt``, ``checkpoint-N``) is not one, or None."""
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES and not CHECKPOINT_FOLDER_NAME.search(path.name):
        return None
    try:
        if os.path.islink(path) and not path.exists():
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "a folder named like a checkpoint file, holding no checkpoint"
    if not stat.S_ISREG(mode):
        return f"{kind_of(mode)}, not a checkpoint file"
    return None


def _labels_step(path: Path) -> bool:
    """A file whose name labels a step (``step-100.safetensors``): a checkpoint, not a final model."""
    try:
        named = step_from_name(path.name.split(".", 1)[0])
    except CkptEmaError:
        return True
    return named is not None and not named[2]


def _accelerate_project(path: Path) -> bool:
    """A folder whose ``checkpoints/`` holds accelerate's ``checkpoint_N`` folders (and that is no checkpoint)."""
    folder = path / ACCELERATE_FOLDER
    if not folder.is_dir() or is_checkpoint_folder(path):
        return False
    return any(p.is_dir() and _ACCELERATE_CHECKPOINT.match(p.name) for p in folder.iterdir())


def file_id(path: Path) -> tuple[int, int]:
    """(device, inode): the same for a file, its hard links and symbolic links to it."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def refuse_repeats(paths: Sequence[Path]) -> None:
    seen: dict[tuple[int, int], Path] = {}
    for path in paths:
        key = file_id(path)
        if key in seen:
            raise InputError(f"{path}: given twice (also as {seen[key]})")
        seen[key] = path


def natural_key(path: Path) -> list[object]:
    """Sort key that compares the digit runs of a name as numbers (``step-9`` before ``step-10``)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", path.name)]
