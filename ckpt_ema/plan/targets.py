"""What the user asks for: an EMA target (decay, half-life, sigma_rel or gamma), validated and named."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ckpt_ema.errors import TargetError
from ckpt_ema.math import ema as kernels

KINDS = ("decay", "half_life", "sigma_rel", "gamma")


@dataclass(frozen=True)
class Target:
    """One EMA profile to compute.

    ``decay`` is per optimizer step; ``half_life`` is in steps; ``sigma_rel`` and ``gamma`` name a
    power-function EMA (EDM2). ``text`` is the value as the user wrote it.
    """

    kind: str
    value: float
    text: str = ""

    @property
    def name(self) -> str:
        """Output name, e.g. ``decay-0.999``, ``sigma_rel-0.1``, ``half_life-500``."""
        return f"{self.kind}-{format_number(self.value)}"

    @property
    def is_power(self) -> bool:
        return self.kind in ("sigma_rel", "gamma")

    @property
    def decay(self) -> float:
        """Per-step decay of a classic target."""
        return self.value if self.kind == "decay" else kernels.half_life_to_decay(self.value)

    @property
    def gamma(self) -> float:
        """Exponent of a power-function target."""
        return self.value if self.kind == "gamma" else kernels.sigma_rel_to_gamma(self.value)

    def coefficients(self, steps: Sequence[int], interp: str, per_checkpoint: bool) -> np.ndarray:
        """Coefficient of each checkpoint (steps sorted, last = target time), float64, summing to 1."""
        if per_checkpoint:
            if self.is_power:
                return kernels.per_checkpoint_power_coefficients(len(steps), self.gamma)
            return kernels.per_checkpoint_coefficients(len(steps), self.decay)
        if self.is_power:
            return kernels.power_coefficients(steps, self.gamma, interp)
        return kernels.classic_coefficients(steps, self.decay, interp)

    def describe(self) -> dict[str, float]:
        """Equivalent parameters: decay and half-life for classic targets, gamma and sigma_rel for power."""
        if self.is_power:
            return {"gamma": self.gamma, "sigma_rel": kernels.gamma_to_sigma_rel(self.gamma)}
        return {"decay": self.decay, "half_life": kernels.decay_to_half_life(self.decay)}


def parse_target(kind: str, text: str | float) -> Target:
    """Validate one target option; raise ``TargetError`` with a message naming the option."""
    if kind not in KINDS:
        raise TargetError(f"unknown target kind {kind!r}")
    option = "--" + kind.replace("_", "-")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise TargetError(f"{option} {text}: not a number") from None
    if not math.isfinite(value):
        raise TargetError(f"{option} {text}: must be finite")
    if kind == "decay" and not 0.0 < value < 1.0:
        raise TargetError(f"{option} {text}: the decay per step must be in (0, 1), e.g. 0.999")
    if kind == "half_life" and not value > 0.0:
        raise TargetError(f"{option} {text}: the half-life in steps must be > 0")
    if kind == "sigma_rel" and not 0.0 < value < kernels.SIGMA_REL_MAX:
        raise TargetError(f"{option} {text}: sigma_rel must be in (0, {kernels.SIGMA_REL_MAX:.4f}) (1/sqrt(12))")
    if kind == "gamma" and not value > 0.0:
        raise TargetError(f"{option} {text}: gamma must be > 0")
    if kind == "half_life" and kernels.half_life_to_decay(value) >= 1.0:
        raise TargetError(f"{option} {text}: half-life too long to represent as a per-step decay")
    return Target(kind, value, str(text))


def parse_targets(**options: Sequence[str | float]) -> list[Target]:
    """Targets from repeatable options, e.g. ``parse_targets(decay=["0.99"], sigma_rel=["0.1"])``."""
    targets = [parse_target(kind, text) for kind in KINDS for text in options.get(kind, ()) or ()]
    names = [t.name for t in targets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TargetError(f"target given twice: {', '.join(duplicates)}")
    return targets


def format_number(value: float) -> str:
    """Shortest text that reads back as ``value`` (``0.10`` -> ``0.1``, ``500.0`` -> ``500``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text
