"""Finding the optimizer step a checkpoint stands for, from its name and its trainer's record (spec §1).

Order of precedence: ``--steps``/``--every`` (handled by the caller), the trainer's record (metadata such as
``step``, ``global_step``, kohya's ``ss_steps``; ``trainer_state.json``, OneTrainer's ``meta.json``, Lightning's
``global_step``, a ``step`` saved in a torch file, accelerate's optimizer state, passed in by the readers), a
number the name labels as a step, the step of the checkpoint folder a file sits in (``checkpoint-500/model.
safetensors``), and last a bare trailing number (ambiguous: kohya names epoch saves ``name-000005``), which is
flagged so the user is told. Numbers that count something else are never steps: one the name labels as an
epoch, one the file records as its epoch, and ``checkpoint_N`` (accelerate's automatic checkpoint naming counts
saves; hand-written loops put the epoch there). A record and a labelled name that disagree is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ckpt_ema.errors import StepError

# Metadata keys that hold the global optimizer step at save time, most specific first.
METADATA_STEP_KEYS = ("global_step", "step", "ss_steps")

_LABELLED_PATTERNS = (
    # OneTrainer: {name}-backup-{step}-{epoch}-{epoch_step}, {name}-save-{step}-{epoch}-{epoch_step}
    ("OneTrainer name", re.compile(r"(?:^|[-_])(?:backup|save)-(\d+)-\d+-\d+(?:$|[^0-9])")),
    # step-001000, step=1000, step_1000, step00001000, global_step1000, epoch=3-step=1000
    ("name", re.compile(r"(?:^|[^a-z0-9])(?:global_)?steps?[-_=]?(\d+)(?![0-9])", re.IGNORECASE)),
    # Hugging Face Trainer: checkpoint-1000 (not checkpoint_3: see _COUNT_NAME)
    ("name", re.compile(r"(?:^|[^a-z0-9])checkpoint-(\d+)(?![0-9])", re.IGNORECASE)),
    # Megatron / mmengine: iter_1000, iter-1000, iter1000
    ("name", re.compile(r"(?:^|[^a-z0-9])iter(?:ation)?[-_=]?(\d+)(?![0-9])", re.IGNORECASE)),
)
# accelerate's automatic_checkpoint_naming (checkpoint_0, checkpoint_1: a save count) and hand-written loops
# checkpoint_{epoch}.pt: a number that counts something other than steps.
_COUNT_NAME = re.compile(r"(?:^|[^a-z0-9])checkpoint_(\d+)$", re.IGNORECASE)
_EPOCH_LABEL = re.compile(r"(?:^|[^a-z0-9])epoch[-_=]?\d+$", re.IGNORECASE)
# A bare trailing number: not the decimals of a number such as the sigma_rel in "ema-0001000-0.050".
_BARE_TRAILING = re.compile(r"(?:^|[-_]|(?<![0-9])\.)(\d+)$")
# EDM2 snapshot names end in the snapshot's sigma_rel (network-snapshot-0001000-0.050): the rest, then sigma.
SIGMA_IN_NAME = re.compile(r"(?P<rest>.*)-(?P<sigma>\d*\.\d+)")
# ema-pytorch PostHocEMA snapshot file: {index into sigma_rels}.{step}.pt
EMA_PYTORCH_NAME = re.compile(r"(?P<index>\d+)\.(?P<step>\d+)\.pt")


def is_snapshot_stem(stem: str) -> bool:
    """``NAME-STEP-SIGMA`` (EDM2 style, e.g. ``ema-0001000-0.050``)."""
    named = SIGMA_IN_NAME.fullmatch(stem)
    return bool(named and re.search(r"-\d+$", named["rest"]))


def looks_like_snapshot(path: Path) -> bool:
    """An EMA snapshot file by its name: ``NAME-STEP-SIGMA.safetensors`` or ema-pytorch's ``INDEX.STEP.pt``."""
    return bool(EMA_PYTORCH_NAME.fullmatch(path.name)) or (
        path.suffix == ".safetensors" and is_snapshot_stem(path.stem)
    )


@dataclass(frozen=True)
class StepInfo:
    """A checkpoint's step and where it came from; ``ambiguous`` when taken from a bare trailing number."""

    step: int
    source: str
    ambiguous: bool = False


def step_from_metadata(metadata: Mapping[str, str]) -> tuple[int, str] | None:
    """The step recorded by the trainer in safetensors metadata, as ``(step, "metadata 'key'")``."""
    for key in METADATA_STEP_KEYS:
        value = metadata.get(key)
        if value is not None and str(value).strip().isdigit():
            return int(str(value).strip()), f"metadata {key!r}"
    return None


def step_from_name(stem: str) -> tuple[int, str, bool] | None:
    """The step a file or folder name states, as ``(step, source, ambiguous)``, or None.

    Raises ``StepError`` when the name carries two different labelled steps.
    """
    found: dict[int, str] = {}
    for source, pattern in _LABELLED_PATTERNS:
        for match in pattern.finditer(stem):
            found.setdefault(int(match.group(1)), f"{source} {match.group(0).strip('-_.=')!r}")
    if len(found) > 1:
        raise StepError(f"{stem}: the name labels several different steps ({', '.join(map(str, sorted(found)))})")
    if found:
        step, source = next(iter(found.items()))
        return step, source, False
    bare = _BARE_TRAILING.search(stem)
    if bare and not _EPOCH_LABEL.search(stem) and not _COUNT_NAME.search(stem):
        return int(bare.group(1)), f"bare trailing number {bare.group(1)!r} in the name", True
    return None


def counted_name(stem: str) -> str | None:
    """What the number of a ``checkpoint_N`` name counts instead of steps, or None for other names."""
    match = _COUNT_NAME.search(stem)
    if match is None:
        return None
    return (
        f"the name's number ({match.group(0).strip('-_.')!r}) counts saves (accelerate's automatic checkpoint "
        "naming) or epochs (hand-written loops), not steps"
    )


WAYS_OUT = (
    "pass --every N (checkpoints N steps apart, in name order) or --steps S0,S1,... (one per input, in the order given)"
)


def detect_step(
    label: str,
    stem: str,
    metadata: Mapping[str, str],
    records: Sequence[tuple[str, int]] = (),
    *,
    epoch: int | None = None,
    folder: tuple[int, str] | None = None,
) -> StepInfo:
    """Combine the sources for one checkpoint (``label`` names it in messages, ``stem`` is its name).

    ``records`` are steps the trainer recorded outside the metadata, as ``(source, step)``: a Hugging Face
    ``trainer_state.json``, OneTrainer's ``meta.json``, Lightning's ``global_step``, a torch file's ``step``.
    ``epoch`` is an epoch the file records: a number in the name equal to it is that epoch, not a step.
    ``folder`` is ``(step, source)`` of the checkpoint folder a file sits in, used before a bare number.
    """
    recorded = [*records]
    from_metadata = step_from_metadata(metadata)
    if from_metadata is not None:
        recorded.append((from_metadata[1], from_metadata[0]))
    if len({step for _, step in recorded}) > 1:
        found = "; ".join(f"{source} says {step}" for source, step in recorded)
        raise StepError(f"{label}: the trainer's records disagree ({found}); pass --steps to say which is right")
    named = step_from_name(stem)
    if named is not None and epoch is not None and named[0] == epoch and not _labels_a_step(stem):
        named = None  # the number is the epoch the file records (checkpoint-3.pt with 'epoch': 3)
    if recorded:
        source, step = recorded[0]
        if named is not None and not named[2] and named[0] != step:
            raise StepError(
                f"{label}: the trainer's {source} says step {step} but the {named[1]} says {named[0]}; "
                "pass --steps to say which is right, or --per-checkpoint"
            )
        return StepInfo(step, source)
    if named is not None and not named[2]:
        return StepInfo(named[0], named[1])
    if folder is not None:
        return StepInfo(folder[0], folder[1])
    counted = counted_name(stem)
    if counted is not None:
        raise StepError(f"{label}: no step found: {counted}; {WAYS_OUT}")
    if named is not None and (epoch is None or named[0] != epoch):
        return StepInfo(named[0], named[1], named[2])
    if epoch is not None:
        raise StepError(f"{label}: no step found: the file records only its epoch ({epoch}), not a step; {WAYS_OUT}")
    if is_snapshot_stem(stem) or EMA_PYTORCH_NAME.fullmatch(label.rsplit("/", 1)[-1]):
        raise StepError(
            f"{label}: no step found; it looks like an EMA snapshot: pass the trainer's tracked profiles with "
            "--tracked-sigma-rel S0,S1,... (in the trainer's order)"
        )
    raise StepError(
        f"{label}: no step found (no step metadata, no step in the name); {WAYS_OUT}; or --per-checkpoint "
        "to make each checkpoint one EMA update"
    )


def _labels_a_step(stem: str) -> bool:
    """The name says 'step' (step=, step-, global_step): its number is a step even if it equals the epoch."""
    return bool(_LABELLED_PATTERNS[1][1].search(stem))
