"""A series of checkpoints: finding the files, their steps, and checking that they belong together.

Only headers are read here (by the readers, one per format); tensor data is read later, chunk by chunk,
by the engine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_ema.errors import InputError, SeriesError, StepError
from ckpt_ema.io import CheckpointSource, FileNote, is_lora_alpha, is_lora_factor, open_checkpoint
from ckpt_ema.io.folder import folder_step_records, is_checkpoint_folder
from ckpt_ema.io.safetensors_format import DTYPES, to_float
from ckpt_ema.math.ema import gamma_to_sigma_rel
from ckpt_ema.series.aliases import is_alias_name, skip_aliases
from ckpt_ema.series.discover import discover_inputs, natural_key, refuse_repeats
from ckpt_ema.series.steps import (
    WAYS_OUT,
    StepInfo,
    detect_step,
    looks_like_snapshot,
    step_from_metadata,
    step_from_name,
)

NORMALISED_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel wrappers, torch.compile


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint of the series: where it is, its step, and how the step was found.

    ``tracked_gamma`` is set when the checkpoint is a snapshot of a power-function EMA (spec §4) rather
    than raw weights: the exponent of the profile it holds.
    """

    source: CheckpointSource
    step: int
    step_info: StepInfo
    is_init: bool = False
    tracked_gamma: float | None = None

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def tracked_sigma_rel(self) -> float | None:
        """The sigma_rel of the profile an EMA snapshot holds (None for raw weights)."""
        return None if self.tracked_gamma is None else gamma_to_sigma_rel(self.tracked_gamma)


def checkpoint_stem(path: Path) -> str:
    """The name a step is read from: a file's stem, a folder's whole name."""
    return path.name if path.is_dir() else path.stem


def checkpoint_step(path: Path, source: CheckpointSource) -> StepInfo:
    """A checkpoint's step from its trainer's records, its name, and the checkpoint folder it sits in (spec §1)."""
    if source.epoch_numbered and not source.step_records and not step_from_metadata(source.metadata):
        raise StepError(
            f"{path}: timm's CheckpointSaver numbers its files by epoch ({source.epoch_numbered}), not by "
            f"optimizer step; {WAYS_OUT} (--every: the steps per epoch)"
        )
    folder = None if path.is_dir() else enclosing_folder_step(path)
    return detect_step(
        str(path),
        checkpoint_stem(path),
        source.metadata,
        source.step_records,
        epoch=source.recorded_epoch,
        folder=folder,
    )


def enclosing_folder_step(path: Path) -> tuple[int, str] | None:
    """The step of the checkpoint folder a file sits in (``checkpoint-500/adapter_model.safetensors``), as
    ``(step, source)``: the folder's trainer record, else a step its name labels; None for other folders."""
    parent = path.parent
    if not is_checkpoint_folder(parent):
        return None
    records = folder_step_records(parent)
    if records:
        source, step = records[0]
        return step, f"{source} of its folder {parent.name!r}"
    named = step_from_name(parent.name)
    if named is not None and not named[2]:
        return named[0], f"its folder's {named[1]}"
    return None


def explicit_steps(
    count: int, steps: Sequence[int] | None, every: int | None, first: int | None
) -> list[StepInfo] | None:
    """The steps the user gave, one per checkpoint in name order: ``--steps`` as listed, or ``--every N``
    (``first``, ``first + N``, ...; ``first`` defaults to N). None when neither was given."""
    if steps is not None and every is not None:
        raise StepError("--steps and --every both give the steps; pass one of them")
    if first is not None and every is None:
        raise StepError("--first needs --every (the spacing of the checkpoints)")
    if steps is not None:
        if len(steps) != count:
            raise StepError(f"--steps gives {len(steps)} steps for {count} checkpoints")
        return [StepInfo(int(step), "--steps") for step in steps]
    if every is None:
        return None
    if every <= 0:
        raise StepError(f"--every must be a positive number of steps, got {every}")
    start = every if first is None else first
    label = f"--every {every}" + (f" --first {first}" if first is not None else "")
    return [StepInfo(start + i * every, label) for i in range(count)]


def load_series(
    inputs: Sequence[str | os.PathLike],
    steps: Sequence[int] | None = None,
    init: str | os.PathLike | None = None,
    per_checkpoint: bool = False,
    key: str | None = None,
    component: Sequence[str] | None = None,
    allow_mixed_runs: bool = False,
    every: int | None = None,
    first: int | None = None,
    skipped: list[FileNote] | None = None,
) -> list[Checkpoint]:
    """Read the headers of the inputs, find each one's step and return the series sorted by step.

    Args:
        inputs: files, checkpoint folders, or folders holding the series.
        steps: explicit steps, one per input checkpoint in the order given (overrides detection).
        init: the weights at step 0 (e.g. the base model a fine-tune started from), placed first.
        per_checkpoint: each checkpoint is one update; files without a step are then ordered by name.
        key: for torch files, the key of the state dict (``--key``).
        component: for component folders (diffusers, OneTrainer), the components to average.
        allow_mixed_runs: accept kohya files from different training sessions (``ss_session_id``).
        every, first: the checkpoints are ``every`` steps apart in name order, the first at ``first``
            (default ``every``): the short way to give ``steps``.
        skipped: receives a note for each input left out (aliases such as ``last.ckpt``, files beside
            ``checkpoint-N/`` folders), shown by ``inspect``.

    Raises:
        InputError, StepError, SeriesError: with a one-line message naming the file.
    """
    notes: list[FileNote] = [] if skipped is None else skipped
    paths = discover_inputs(inputs, notes)
    given = explicit_steps(len(paths), steps, every, first)
    if given is not None and len(paths) > 1:
        named = [p for p in paths if is_alias_name(p)]
        if named:
            raise StepError(
                f"{named[0]}: a name for the newest or best checkpoint (an alias), among inputs given their steps "
                f"by {given[0].source.split()[0]}: its step is not its place in name order; pass the numbered "
                "checkpoints only"
            )
    sources = [open_checkpoint(path, key=key, component=component) for path in paths]
    if given is not None:
        infos = given
    else:
        try:
            infos = [checkpoint_step(p, src) for p, src in zip(paths, sources)]
        except StepError:
            if not per_checkpoint:
                raise
            # Each file is one update: without steps, only their order matters; take it from the names.
            start = 1 if init is not None else 0
            ranks = sorted(range(len(paths)), key=lambda i: natural_key(paths[i]))
            infos = [StepInfo(0, "")] * len(paths)
            for rank, i in enumerate(ranks):
                infos[i] = StepInfo(start + rank, "position in name order (--per-checkpoint)")
    checkpoints = [Checkpoint(src, info.step, info) for src, info in zip(sources, infos)]
    checkpoints, aliases = skip_aliases(
        checkpoints,
        key=lambda c: c.step,
        path=lambda c: c.path,
        why=lambda c, kept: f"a copy of {kept.path.name} (the same step {c.step}); skipped",
    )
    notes.extend(aliases)
    if init is not None:
        checkpoints.append(_init_checkpoint(Path(init), paths, checkpoints[-1].source, key, component))
    checkpoints.sort(key=lambda c: c.step)
    for a, b in zip(checkpoints, checkpoints[1:]):
        if a.step == b.step:
            hint = ""
            if all(looks_like_snapshot(c.path) for c in (a, b)):
                hint = "; if these are EMA snapshots of several profiles, pass --tracked-sigma-rel S0,S1,..."
            raise StepError(
                f"{a.path} and {b.path} both have step {a.step} ({a.step_info.source}; {b.step_info.source}){hint}"
            )
    if checkpoints[0].step < 0:
        raise StepError(f"{checkpoints[0].path}: negative step {checkpoints[0].step}")
    if not allow_mixed_runs:
        check_one_run([c for c in checkpoints if not c.is_init])
    normalise_keys(checkpoints)
    check_compatible(checkpoints)
    return checkpoints


def _init_checkpoint(
    init: Path, paths: Sequence[Path], newest: CheckpointSource, key: str | None, component: Sequence[str] | None
) -> Checkpoint:
    """``--init``: the weights at step 0, matched to the series' components.

    A base pipeline folder given for a series of component checkpoints (``unet/`` only) is read for those
    components; a component folder or file given alone (``base/unet``) takes the series' component prefix.
    """
    if not init.exists():
        raise InputError(f"{init}: --init: no such file or folder")
    refuse_repeats([init, *paths])
    named = [p.name for p in newest.parts if p.name and not p.in_root]
    wanted = component
    if wanted is None and named and init.is_dir() and all((init / c).is_dir() for c in named):
        wanted = named  # a base pipeline: the components the series has
    source = open_checkpoint(init, key=key, component=wanted if init.is_dir() else None)
    if paths[0].is_dir() and len(named) == 1 and [p.name for p in source.parts] == [""]:
        source.rename({n: f"{named[0]}/{n}" for n in source.tensors})  # base/unet for a series of unet/ folders
        source.notes.append(f"tensors named as the series' {named[0]}/ component")
    elif init.is_dir() != paths[0].is_dir():
        kind = "a folder" if init.is_dir() else "a file"
        raise InputError(f"{init}: --init is {kind} but the checkpoints are not; give the same kind")
    return Checkpoint(source, 0, StepInfo(0, "--init"), is_init=True)


def check_one_run(checkpoints: Sequence[Checkpoint]) -> None:
    """kohya files name their training session (``ss_session_id``, new at every launch and every resume)."""
    sessions: dict[str, Checkpoint] = {}
    for ckpt in checkpoints:
        session = ckpt.source.metadata.get("ss_session_id")
        if session is not None:
            sessions.setdefault(session, ckpt)
    if len(sessions) > 1:
        (id_a, a), (id_b, b) = list(sessions.items())[:2]
        raise SeriesError(
            f"{a.path} (ss_session_id {id_a}) and {b.path} (ss_session_id {id_b}) come from different training "
            f"sessions ({len(sessions)} in all): a resumed kohya run may restart its step count; check the steps "
            "and pass --allow-mixed-runs (and --steps if needed) to merge them anyway"
        )


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in NORMALISED_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def normalise_keys(checkpoints: Sequence[Checkpoint]) -> None:
    """Strip ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) where only some checkpoints have them.

    When every checkpoint has the same keys nothing changes (a prefix all of them share is kept).
    """
    key_sets = [frozenset(c.source.tensors) for c in checkpoints]
    if len(set(key_sets)) == 1:
        return
    stripped = [frozenset(_strip(n) for n in keys) for keys in key_sets]
    if len(set(stripped)) != 1 or any(len(s) != len(k) for s, k in zip(stripped, key_sets)):
        return  # not a matter of prefixes: check_compatible reports the difference
    for ckpt, keys in zip(checkpoints, key_sets):
        mapping = {n: _strip(n) for n in keys if _strip(n) != n}
        if mapping:
            ckpt.source.rename(mapping)
            prefixes = sorted({n[: len(n) - len(_strip(n))] for n in mapping})
            ckpt.source.notes.append(f"prefix {', '.join(map(repr, prefixes))} removed from tensor names")


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
                if is_lora_factor(name):
                    raise SeriesError(
                        f"LoRA ranks differ: {name!r} is {tuple(ref.shape)} in {reference.path} but "
                        f"{tuple(info.shape)} in {other.path}; a series must keep one rank (network_dim)"
                    )
                raise SeriesError(
                    f"{name!r} is {tuple(ref.shape)} in {reference.path} but {tuple(info.shape)} in {other.path}"
                )
            if info.is_float != ref.is_float:
                raise SeriesError(
                    f"{name!r} is {ref.dtype} in {reference.path} but {info.dtype} in {other.path} "
                    "(floating point and integer tensors cannot be mixed)"
                )
    _check_lora_alphas(checkpoints)


def _check_lora_alphas(checkpoints: Sequence[Checkpoint]) -> None:
    """LoRA ``.alpha`` scales are copied from the newest checkpoint, so they must agree across the series."""
    reference = checkpoints[-1]
    for name in sorted(n for n in reference.source.tensors if is_lora_alpha(n)):
        ref_value = _float64(reference, name)
        for other in checkpoints[:-1]:
            value = _float64(other, name)
            same = (value == ref_value) | (np.isnan(value) & np.isnan(ref_value))  # NaN in both: the same alpha
            if not bool(same.all()):
                raise SeriesError(
                    f"LoRA alpha {name!r} is {ref_value.tolist()} in {reference.path} but {value.tolist()} in "
                    f"{other.path}; alphas are copied, not averaged, so a series must keep one alpha"
                )
    for ckpt in checkpoints:
        ckpt.source.close()


def _float64(checkpoint: Checkpoint, name: str) -> np.ndarray:
    """A (small) tensor's values as float64, whatever its dtype."""
    data = checkpoint.source.flat(name)
    dtype = checkpoint.source.tensors[name].dtype
    return (to_float(data, dtype) if DTYPES[dtype][2] else data).astype(np.float64)


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({shown}{more})"
