"""What the user asks for: targets (an EMA by decay, half-life, sigma_rel or gamma, ...), validated and named.

Each option key belongs to one kind of ``ckpt_ema.plan.kinds``, which parses it and builds its row of
coefficients; a ``Target`` is the key, the value and the text the user wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ckpt_ema.errors import TargetError
from ckpt_ema.plan.kinds import KINDS, TargetKind
from ckpt_ema.plan.kinds.classic import Classic
from ckpt_ema.plan.kinds.power import Power
from ckpt_ema.series.lengths import Length, StepSize


@dataclass(frozen=True)
class Target:
    """One output to compute.

    ``kind`` is an option key (``decay`` per optimizer step; ``half_life`` in steps; ``sigma_rel`` and
    ``gamma`` name a power-function EMA, EDM2); ``text`` is the value as the user wrote it.
    """

    kind: str
    value: float
    text: str = ""
    length: Length | None = None  # for lengths (--half-life, --window, ...): as written, in steps/tokens/samples

    @property
    def family(self) -> TargetKind:
        """The kind that parses, names and computes this target."""
        return KINDS[self.kind]

    @property
    def name(self) -> str:
        """Output name, e.g. ``decay-0.999``, ``sigma_rel-0.1``, ``half_life-500``, ``window-2Btokens``."""
        return self.family.name(self)

    @property
    def flag(self) -> str:
        return "--" + self.kind.replace("_", "-")

    def in_steps(self, size: StepSize | None) -> Target:
        """The target with a length in tokens or samples converted to steps (``size``: per step)."""
        if self.length is None or self.length.in_steps:
            return self
        return replace(self, value=self.family.to_steps(self.kind, self.length.steps(size, self.flag)))

    @property
    def method(self) -> str:
        return self.family.method

    @property
    def is_power(self) -> bool:
        return self.family.method == "power"

    @property
    def decay(self) -> float:
        """Per-step decay of a classic target."""
        return Classic.decay(self)

    @property
    def gamma(self) -> float:
        """Exponent of a power-function target."""
        return Power.gamma(self)

    def coefficients(self, steps: Sequence[int], interp: str, per_checkpoint: bool) -> np.ndarray:
        """Coefficient of each checkpoint (steps sorted, last = target time), float64, summing to 1."""
        return self.family.coefficients(self, steps, interp, per_checkpoint)

    def describe(self) -> dict[str, float]:
        """Equivalent parameters: decay and half-life for classic targets, gamma and sigma_rel for power."""
        return self.family.describe(self)


def parse_target(kind: str, text: str | float) -> Target:
    """Validate one target option; raise ``TargetError`` with a message naming the option."""
    if kind not in KINDS:
        raise TargetError(f"unknown target kind {kind!r}")
    family = KINDS[kind]
    return Target(kind, family.parse(kind, str(text)), str(text), family.length(kind, str(text)))


def parse_targets(**options: Sequence[str | float]) -> list[Target]:
    """Targets from repeatable options, e.g. ``parse_targets(decay=["0.99"], sigma_rel=["0.1"])``."""
    unknown = sorted(set(options) - set(KINDS))
    if unknown:
        raise TargetError(f"unknown target kind {unknown[0]!r}")
    targets = [parse_target(kind, text) for kind in KINDS for text in options.get(kind, ()) or ()]
    names = [t.name for t in targets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TargetError(f"target given twice: {', '.join(duplicates)}")
    return targets


def in_steps(targets: Sequence[Target], size: StepSize | None) -> list[Target]:
    """Every target with its lengths in steps; raises ``TargetError`` when tokens/samples per step are unknown."""
    return [t.in_steps(size) for t in targets]


def format_number(value: float) -> str:
    """Shortest text that reads back as ``value`` (``0.10`` -> ``0.1``, ``500.0`` -> ``500``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text
