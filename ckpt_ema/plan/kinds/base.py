"""What every kind of target provides: one class per family of options, registered in ``kinds``.

A kind parses and validates its options, names its outputs, builds its row of the coefficient matrix
(float64, summing to 1) and describes it; everything else (the pass, the writers, the reports) is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ckpt_ema.errors import TargetError

if TYPE_CHECKING:
    from ckpt_ema.plan.model import OutputPlan, Plan
    from ckpt_ema.plan.targets import Target
    from ckpt_ema.series.lengths import Length


@dataclass(frozen=True)
class TargetOption:
    """One command-line option of a kind: ``--{key with dashes} METAVAR`` (repeatable)."""

    key: str  # "half_life": the option --half-life, the output name half_life-500
    metavar: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


class TargetKind:
    """A family of targets sharing one method (``OutputPlan.method``), e.g. classic EMAs by decay or half-life."""

    method: str = ""
    options: tuple[TargetOption, ...] = ()
    # plan warns when the first checkpoint keeps a large share (an EMA too long for the series); averages of
    # the end of training (windows) say what reaches before the first checkpoint themselves
    warns_first_share: bool = True

    def parse(self, key: str, text: str) -> float:
        """The option's value, validated; raises ``TargetError`` naming the option.

        For a length given in tokens or samples (see ``length``) the value is provisional until ``to_steps``.
        """
        raise NotImplementedError

    def length(self, key: str, text: str) -> Length | None:
        """The length the option gives (``--half-life``, ``--window``: in steps, tokens or samples), if any."""
        return None

    def to_steps(self, key: str, steps: float) -> float:
        """The target's value for a length converted to ``steps`` (e.g. rounded to whole steps)."""
        return steps

    def name(self, target: Target) -> str:
        """Output name, e.g. ``decay-0.999``, ``half_life-500``, ``window-2Btokens``."""
        from ckpt_ema.plan.targets import format_number

        if target.length is not None and not target.length.in_steps:
            return f"{target.kind}-{target.length.label}"
        return f"{target.kind}-{format_number(target.value)}"

    def labels(self, target: Target) -> dict[str, str]:
        """Textual parameters of the output (``OutputPlan.labels``), e.g. an lr-decay's shape."""
        return {}

    def coefficients(self, target: Target, steps: Sequence[int], interp: str, per_checkpoint: bool) -> np.ndarray:
        """Coefficient of each checkpoint (steps sorted, the last one is T), float64, summing to 1."""
        raise NotImplementedError

    def describe(self, target: Target) -> dict[str, float]:
        """The target's parameters in every form it has (e.g. decay and half-life): ``OutputPlan.params``."""
        raise NotImplementedError

    def equivalents(self, params: dict[str, float], target_step: int) -> dict[str, float]:
        """How wide an output of this method is in other units (``half_life``, ``sigma_rel``, ...)."""
        return {}

    def summary(self, output: OutputPlan, eq: dict[str, float], target_step: int) -> list[str]:
        """Phrases for the output's line in ``plan`` and ``merge`` (the first checkpoint's share is added)."""
        return [output.method]

    def warnings(self, target: Target, output: OutputPlan, plan: Plan) -> list[str]:
        """Warnings specific to this kind (the shared ones, e.g. the first checkpoint's share, are in plan)."""
        return []

    def reconstruction_profile(self, target: Target) -> tuple[str, float]:
        """For EDM2 reconstruction: the target profile as ``("gamma", g)`` or ``("decay", beta)``."""
        raise TargetError(f"{target.name}: cannot be reconstructed from EMA snapshots")

    def relative_width(self, target: Target, target_step: int) -> float:
        """The target profile's standard deviation relative to T (to compare with the tracked profiles)."""
        raise TargetError(f"{target.name}: cannot be reconstructed from EMA snapshots")
