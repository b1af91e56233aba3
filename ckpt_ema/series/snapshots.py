"""A series of EMA snapshots (EDM2 post-hoc EMA, spec §4): each file's step and the profile it tracks.

Snapshots are found in two layouts:

* safetensors files whose names end in ``-{step}-{sigma_rel}``, e.g. ``ema-0001000-0.050.safetensors``
  (EDM2's naming); the step may also come from the file's metadata (``step``, ``global_step``);
* ema-pytorch ``PostHocEMA`` folders of ``{index}.{step}.pt`` files, where ``index`` is the position of the
  profile in the trainer's ``sigma_rels`` (the order of ``--tracked-sigma-rel``). They are read with
  ``torch.load(weights_only=True, mmap=True)`` only; the tensors under ``ema_model.`` are the weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from ckpt_ema.errors import InputError, StepError
from ckpt_ema.io import open_checkpoint
from ckpt_ema.io.ema_pytorch import open_ema_pytorch
from ckpt_ema.math.ema import gamma_to_sigma_rel
from ckpt_ema.series.discover import discover_inputs, natural_key
from ckpt_ema.series.load import Checkpoint, check_compatible
from ckpt_ema.series.steps import EMA_PYTORCH_NAME, SIGMA_IN_NAME, StepInfo, step_from_metadata, step_from_name

# Names round sigma_rel (EDM2 writes 3 decimals); a name matches a tracked profile within this distance.
NAME_SIGMA_TOLERANCE = 5.01e-4


def load_snapshots(
    inputs: Sequence[str | os.PathLike],
    gammas: Sequence[float],
    steps: Sequence[int] | None = None,
) -> list[Checkpoint]:
    """Find the EMA snapshots among ``inputs``, with each one's step and tracked profile, sorted by step.

    Args:
        inputs: snapshot files, folders of safetensors snapshots, or ema-pytorch ``PostHocEMA`` folders.
        gammas: the tracked profiles' exponents in the user's order (see ``reconstruct.tracked_gammas``).
        steps: explicit steps, one per snapshot file (folders expanded in name order).

    Raises:
        InputError, StepError, SeriesError: with a one-line message naming the file.
    """
    paths = discover_inputs([p for item in inputs for p in _expand_ema_pytorch(Path(item))])
    if steps is not None and len(steps) != len(paths):
        raise StepError(f"--steps gives {len(steps)} steps for {len(paths)} snapshots")
    snapshots = []
    for position, path in enumerate(paths):
        override = None if steps is None else StepInfo(int(steps[position]), "--steps")
        snapshots.append(_snapshot(path, gammas, override))
    rank: dict[float | None, int] = {g: i for i, g in enumerate(gammas)}
    snapshots.sort(key=lambda c: (c.step, rank[c.tracked_gamma]))
    for a, b in zip(snapshots, snapshots[1:]):
        if (a.step, a.tracked_gamma) == (b.step, b.tracked_gamma):
            raise StepError(
                f"{a.path} and {b.path} are both the sigma_rel {a.tracked_sigma_rel:.4g} snapshot at step {a.step} "
                f"({a.step_info.source}; {b.step_info.source})"
            )
    if snapshots[0].step <= 0:
        raise StepError(f"{snapshots[0].path}: an EMA snapshot must be at a step > 0, got {snapshots[0].step}")
    check_compatible(snapshots)
    return snapshots


def _expand_ema_pytorch(path: Path) -> list[Path]:
    """An ema-pytorch folder to its ``{index}.{step}.pt`` files; anything else unchanged."""
    if not path.is_dir():
        return [path]
    found = sorted((p for p in path.iterdir() if p.is_file() and EMA_PYTORCH_NAME.fullmatch(p.name)), key=natural_key)
    return found or [path]


def _snapshot(path: Path, gammas: Sequence[float], override: StepInfo | None) -> Checkpoint:
    ema_pytorch = EMA_PYTORCH_NAME.fullmatch(path.name)
    if ema_pytorch:
        index = int(ema_pytorch["index"])
        if index >= len(gammas):
            raise InputError(
                f"{path}: ema-pytorch snapshot of profile {index}, but only {len(gammas)} tracked profile(s) "
                "are given; list all of the trainer's sigma_rels, in order, with --tracked-sigma-rel"
            )
        step = override or StepInfo(int(ema_pytorch["step"]), f"ema-pytorch name {path.name!r}")
        return Checkpoint(open_ema_pytorch(path), step.step, step, tracked_gamma=gammas[index])
    if path.suffix != ".safetensors":
        raise InputError(
            f"{path}: not an EMA snapshot; expected NAME-STEP-SIGMA.safetensors (e.g. ema-0001000-0.050."
            "safetensors) or an ema-pytorch INDEX.STEP.pt file"
        )
    source = open_checkpoint(path)
    named = SIGMA_IN_NAME.fullmatch(path.stem)
    step = override or _safetensors_step(path, named["rest"] if named else path.stem, source.metadata)
    return Checkpoint(source, step.step, step, tracked_gamma=_tracked_gamma(path, named, gammas))


def _safetensors_step(path: Path, stem: str, metadata: dict[str, str]) -> StepInfo:
    # The number before the sigma_rel is the step by convention (EDM2), so a bare one is not ambiguous here.
    named = step_from_name(stem)
    recorded = step_from_metadata(metadata)
    if recorded is not None:
        if named is not None and named[0] != recorded[0]:
            raise StepError(
                f"{path}: the trainer's {recorded[1]} says step {recorded[0]} but the name says {named[0]}; "
                "pass --steps to say which is right"
            )
        return StepInfo(recorded[0], recorded[1])
    if named is not None:
        return StepInfo(named[0], f"name {path.name!r}")
    raise StepError(
        f"{path}: no step found (name is not NAME-STEP-SIGMA, no step metadata); pass --steps S0,S1,... "
        "(one per snapshot, in the order given)"
    )


def _tracked_gamma(path: Path, named: re.Match[str] | None, gammas: Sequence[float]) -> float:
    if named is None:
        if len(gammas) == 1:
            return gammas[0]
        raise InputError(
            f"{path}: the name does not end in the snapshot's sigma_rel (NAME-STEP-SIGMA.safetensors), so it "
            "cannot be matched to one of the tracked profiles"
        )
    sigma = float(named["sigma"])
    distance, gamma = min((abs(gamma_to_sigma_rel(g) - sigma), g) for g in gammas)
    if distance > NAME_SIGMA_TOLERANCE:
        listed = ", ".join(f"{gamma_to_sigma_rel(g):.4g}" for g in gammas)
        raise InputError(
            f"{path}: snapshot of sigma_rel {named['sigma']}, which is not a tracked profile ({listed}); "
            "add it to --tracked-sigma-rel"
        )
    return gamma
