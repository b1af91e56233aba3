"""A series of checkpoints: finding the files, their steps, and checking that they belong together.

Only headers are read here; tensor data is read later, chunk by chunk, by the engine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, SeriesError, StepError
from .safetensors_format import SafetensorsReader, TensorInfo, read_header
from .steps import StepInfo, detect_step

CHECKPOINT_SUFFIXES = (".safetensors",)


class CheckpointSource:
    """One checkpoint's tensors, read lazily: names, dtypes and shapes from headers; data on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader = SafetensorsReader(read_header(path))

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self._reader.header.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self._reader.header.metadata

    @property
    def nbytes(self) -> int:
        return self._reader.header.file_size

    def flat(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a 1-D view in its stored dtype."""
        return self._reader.flat(name)

    def raw_bytes(self, name: str) -> memoryview:
        return self._reader.raw_bytes(name)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint of the series: where it is, its step, and how the step was found."""

    source: CheckpointSource
    step: int
    step_info: StepInfo
    is_init: bool = False

    @property
    def path(self) -> Path:
        return self.source.path


def discover_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand INPUT arguments: files as given, folders to the checkpoint files they hold (name order)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
            if not files:
                raise InputError(f"{path}: folder holds no {'/'.join(CHECKPOINT_SUFFIXES)} files")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise InputError(f"{path}: not a file or folder")
        else:
            raise InputError(f"{path}: no such file or folder")
    if not found:
        raise InputError("no checkpoints given")
    _refuse_repeats(found)
    return found


def load_series(
    inputs: Sequence[str | os.PathLike],
    steps: Sequence[int] | None = None,
    init: str | os.PathLike | None = None,
    per_checkpoint: bool = False,
) -> list[Checkpoint]:
    """Read the headers of the inputs, find each one's step and return the series sorted by step.

    Args:
        inputs: files, or folders holding the series.
        steps: explicit steps, one per input file in the order given (overrides detection).
        init: the weights at step 0 (e.g. the base model a fine-tune started from), placed first.
        per_checkpoint: each checkpoint is one update; files without a step are then ordered by name.

    Raises:
        InputError, StepError, SeriesError: with a one-line message naming the file.
    """
    paths = discover_inputs(inputs)
    if steps is not None and len(steps) != len(paths):
        raise StepError(f"--steps gives {len(steps)} steps for {len(paths)} checkpoints")
    sources = [CheckpointSource(path) for path in paths]
    if steps is not None:
        infos = [StepInfo(int(step), "--steps") for step in steps]
    else:
        try:
            infos = [detect_step(str(p), p.stem, src.metadata) for p, src in zip(paths, sources)]
        except StepError:
            if not per_checkpoint:
                raise
            # Each file is one update: without steps, only their order matters; take it from the names.
            first = 1 if init is not None else 0
            ranks = sorted(range(len(paths)), key=lambda i: natural_key(paths[i]))
            infos = [StepInfo(0, "")] * len(paths)
            for rank, i in enumerate(ranks):
                infos[i] = StepInfo(first + rank, "position in name order (--per-checkpoint)")
    checkpoints = [Checkpoint(src, info.step, info) for src, info in zip(sources, infos)]
    if init is not None:
        init_path = Path(init)
        if not init_path.is_file():
            raise InputError(f"{init_path}: --init: no such file")
        _refuse_repeats([init_path, *paths])
        checkpoints.append(Checkpoint(CheckpointSource(init_path), 0, StepInfo(0, "--init"), is_init=True))
    checkpoints.sort(key=lambda c: c.step)
    for a, b in zip(checkpoints, checkpoints[1:]):
        if a.step == b.step:
            raise StepError(
                f"{a.path} and {b.path} both have step {a.step} ({a.step_info.source}; {b.step_info.source})"
            )
    if checkpoints[0].step < 0:
        raise StepError(f"{checkpoints[0].path}: negative step {checkpoints[0].step}")
    check_compatible(checkpoints)
    return checkpoints


def check_compatible(checkpoints: Sequence[Checkpoint]) -> None:
    """Every checkpoint must have the newest one's keys, shapes and dtype kinds (float or not)."""
    reference = checkpoints[-1]
    ref_tensors = reference.source.tensors
    for other in checkpoints[:-1]:
        tensors = other.source.tensors
        missing = sorted(set(ref_tensors) - set(tensors))
        extra = sorted(set(tensors) - set(ref_tensors))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {_names(missing)}")
            if extra:
                parts.append(f"has extra {_names(extra)}")
            raise SeriesError(f"{other.path} {' and '.join(parts)} compared with {reference.path}")
        for name, ref in ref_tensors.items():
            info = tensors[name]
            if info.shape != ref.shape:
                raise SeriesError(
                    f"{name!r} is {tuple(ref.shape)} in {reference.path} but {tuple(info.shape)} in {other.path}"
                )
            if info.is_float != ref.is_float:
                raise SeriesError(
                    f"{name!r} is {ref.dtype} in {reference.path} but {info.dtype} in {other.path} "
                    "(floating point and integer tensors cannot be mixed)"
                )


def _refuse_repeats(paths: Sequence[Path]) -> None:
    seen: dict[tuple[int, int], Path] = {}
    for path in paths:
        stat = path.stat()
        key = (stat.st_dev, stat.st_ino)
        if key in seen:
            raise InputError(f"{path}: given twice (also as {seen[key]})")
        seen[key] = path


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({shown}{more})"


def natural_key(path: Path) -> list[object]:
    """Sort key that compares the digit runs of a name as numbers (``step-9`` before ``step-10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]
