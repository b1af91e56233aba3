"""``--last N``: equal weights on the last N checkpoints at or before T (timm, fairseq, LAWA; spec §8)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ckpt_ema.errors import TargetError
from ckpt_ema.math import windows
from ckpt_ema.plan.kinds.base import TargetKind, TargetOption

if TYPE_CHECKING:
    from ckpt_ema.plan.model import OutputPlan, Plan
    from ckpt_ema.plan.targets import Target

# Warn when the largest gap between the averaged checkpoints exceeds the smallest by this factor.
UNEVEN_RATIO = 1.5


class Last(TargetKind):
    method = "last"
    options = (
        TargetOption("last", "N", "Equal weights on the last N checkpoints (as timm's avg_checkpoints, fairseq)."),
    )
    warns_first_share = False

    def parse(self, key: str, text: str) -> float:
        try:
            count = int(text)
        except (TypeError, ValueError):
            raise TargetError(f"--last {text}: not a whole number of checkpoints") from None
        if count < 1:
            raise TargetError(f"--last {text}: must be at least 1 checkpoint")
        return float(count)

    def coefficients(self, target: Target, steps: Sequence[int], interp: str, per_checkpoint: bool) -> np.ndarray:
        try:
            return windows.last_n_coefficients(len(steps), int(target.value))
        except ValueError as exc:
            raise TargetError(str(exc)) from None

    def describe(self, target: Target) -> dict[str, float]:
        return {"count": target.value}

    def summary(self, output: OutputPlan, eq: dict[str, float], target_step: int) -> list[str]:
        count = int(output.params["count"])
        return [f"equal weights (1/{count}) on the last {count} checkpoints"]

    def warnings(self, target: Target, output: OutputPlan, plan: Plan) -> list[str]:
        chosen = [c for c, coef in zip(plan.checkpoints, output.coefficients) if coef > 0.0]
        steps = [c.step for c in chosen]
        gaps = [b - a for a, b in zip(steps, steps[1:])]
        result = []
        if chosen[0].is_init:
            result.append(f"{output.name}: the average includes the base model (--init) as one of its checkpoints")
        if gaps and max(gaps) > UNEVEN_RATIO * min(gaps):
            result.append(
                f"{output.name}: the {len(chosen)} checkpoints (steps {steps[0]} to {steps[-1]}) are unevenly spaced, "
                f"gaps of {min(gaps)} to {max(gaps)} steps ({max(gaps) / min(gaps):.3g}x): --last weights checkpoints, "
                f"not steps; --window {plan.target_step - steps[0]} weights the steps of that span equally"
            )
        return result
