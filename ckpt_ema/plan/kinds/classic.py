"""Classic EMA targets: ``--decay BETA`` (per optimizer step) and ``--half-life STEPS`` (spec §2)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ckpt_ema.errors import TargetError
from ckpt_ema.math import ema
from ckpt_ema.math.reconstruct import truncated_exp_sigma_rel
from ckpt_ema.plan.kinds.base import TargetKind, TargetOption
from ckpt_ema.series.lengths import Length, parse_length

if TYPE_CHECKING:
    from ckpt_ema.plan.model import OutputPlan, Plan
    from ckpt_ema.plan.targets import Target


class Classic(TargetKind):
    method = "classic"
    options = (
        TargetOption("decay", "BETA", "Classic EMA decay per optimizer step, e.g. 0.999."),
        TargetOption("half_life", "STEPS", "Classic EMA by its half-life in steps (or tokens, samples: 50Mtokens)."),
    )

    def parse(self, key: str, text: str) -> float:
        option = "--" + key.replace("_", "-")
        if key == "half_life":
            length = parse_length(option, text)
            return length.amount if not length.in_steps else self.to_steps(key, length.amount, text)
        value = _finite(option, text)
        if key == "decay" and not 0.0 < value < 1.0:
            raise TargetError(f"{option} {text}: the decay per step must be in (0, 1), e.g. 0.999")
        return value

    def length(self, key: str, text: str) -> Length | None:
        return parse_length("--half-life", text) if key == "half_life" else None

    def to_steps(self, key: str, steps: float, text: str = "") -> float:
        """A half-life in steps, checked: it must give a per-step decay below 1."""
        if not steps > 0.0:
            raise TargetError(f"--half-life {text or steps}: the half-life in steps must be > 0")
        if ema.half_life_to_decay(steps) >= 1.0:
            raise TargetError(f"--half-life {text or steps}: half-life too long to represent as a per-step decay")
        return steps

    @staticmethod
    def decay(target: Target) -> float:
        return target.value if target.kind == "decay" else ema.half_life_to_decay(target.value)

    def coefficients(self, target: Target, steps: Sequence[int], interp: str, per_checkpoint: bool) -> np.ndarray:
        if per_checkpoint:
            return ema.per_checkpoint_coefficients(len(steps), self.decay(target))
        return ema.classic_coefficients(steps, self.decay(target), interp)

    def describe(self, target: Target) -> dict[str, float]:
        decay = self.decay(target)
        return {"decay": decay, "half_life": ema.decay_to_half_life(decay)}

    def equivalents(self, params: dict[str, float], target_step: int) -> dict[str, float]:
        """Half-life, and ``sigma_rel ~ sqrt(beta) / (1 - beta) / T`` (the untruncated profile's width)."""
        decay = params["decay"]
        result = {"half_life": ema.decay_to_half_life(decay)}
        if target_step > 0:
            result["sigma_rel"] = math.sqrt(decay) / (1.0 - decay) / target_step
        return result

    def summary(self, output: OutputPlan, eq: dict[str, float], target_step: int) -> list[str]:
        from ckpt_ema.plan.kinds import describe_half_life

        parts = [f"classic EMA, decay {output.params['decay']:.6g} per step", describe_half_life(eq)]
        if eq.get("sigma_rel", 1.0) < ema.SIGMA_REL_MAX:
            parts.append(f"~ sigma_rel {eq['sigma_rel']:.3g}")
        return parts

    def warnings(self, target: Target, output: OutputPlan, plan: Plan) -> list[str]:
        if plan.per_checkpoint or len(plan.checkpoints) < 2:
            return []
        half_life = target.value if target.kind == "half_life" else ema.decay_to_half_life(self.decay(target))
        if half_life >= plan.spacing:
            return []
        return [
            f"{output.name}: the half-life ({half_life:.3g} steps) is shorter than the spacing of the "
            f"checkpoints ({plan.spacing:g} steps); the last checkpoint gets {output.coefficients[-1]:.0%} "
            "and the result rests on interpolation"
        ]

    def reconstruction_profile(self, target: Target) -> tuple[str, float]:
        return "decay", self.decay(target)

    def relative_width(self, target: Target, target_step: int) -> float:
        return truncated_exp_sigma_rel(target_step, self.decay(target))


def _finite(option: str, text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise TargetError(f"{option} {text}: not a number") from None
    if not math.isfinite(value):
        raise TargetError(f"{option} {text}: must be finite")
    return value
