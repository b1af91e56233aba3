"""``--lr-decay SHAPE:LENGTH``: the merge that emulates decaying the learning rate to 0 over the last LENGTH steps.

WSM (Tian et al. 2025): update ``t`` of the constant-rate run is scaled by ``w_t = f((t - 1 - (T - L)) / L)``,
so the checkpoints get ``c_t = w_t - w_{t+1}`` (spec §8; derivation in docs/averaging.md). SHAPE is
``linear`` (= ``--window``), ``cosine`` or ``sqrt`` (``1 - sqrt(x)``); LENGTH in steps, tokens or samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ckpt_ema.errors import TargetError
from ckpt_ema.math import windows
from ckpt_ema.plan.kinds.base import TargetKind, TargetOption
from ckpt_ema.plan.kinds.window import (
    describe_length,
    refuse_per_checkpoint,
    span,
    too_long_hint,
    whole,
    window_warnings,
)
from ckpt_ema.series.lengths import Length, parse_length

if TYPE_CHECKING:
    from ckpt_ema.plan.model import OutputPlan, Plan
    from ckpt_ema.plan.targets import Target


class LrDecay(TargetKind):
    method = "lr_decay"
    options = (
        TargetOption(
            "lr_decay",
            "SHAPE:LENGTH",
            "As if the learning rate had decayed to 0 over the last LENGTH steps (WSM): SHAPE linear, cosine or "
            "sqrt, e.g. cosine:2000 or sqrt:2Btokens.",
        ),
    )
    warns_first_share = False

    def parse(self, key: str, text: str) -> float:
        _, length = self._split(text)
        return length.amount if not length.in_steps else self.to_steps(key, whole(length, "--lr-decay"))

    def length(self, key: str, text: str) -> Length | None:
        return self._split(text)[1]

    def to_steps(self, key: str, steps: float) -> float:
        return float(max(1, round(steps)))

    def name(self, target: Target) -> str:
        shape, length = self._split(target.text)
        return f"lr_decay-{shape}-{length.label}"

    def labels(self, target: Target) -> dict[str, str]:
        return {"shape": self._split(target.text)[0]}

    def coefficients(self, target: Target, steps: Sequence[int], interp: str, per_checkpoint: bool) -> np.ndarray:
        refuse_per_checkpoint(target, per_checkpoint)
        try:
            return windows.lr_decay_coefficients(steps, self._split(target.text)[0], target.value, interp)
        except ValueError as exc:
            raise TargetError(f"--lr-decay {target.text}: {exc}{too_long_hint(steps)}") from None

    def describe(self, target: Target) -> dict[str, float]:
        return {"length": target.value}

    def equivalents(self, params: dict[str, float], target_step: int) -> dict[str, float]:
        return {"length": params["length"], "start_step": target_step - params["length"]}

    def summary(self, output: OutputPlan, eq: dict[str, float], target_step: int) -> list[str]:
        shape = output.labels.get("shape", "?")
        return [
            f"as if the learning rate had decayed to 0 ({shape}) over the last {describe_length(eq)} "
            f"(steps {span(eq, target_step)})"
        ]

    def warnings(self, target: Target, output: OutputPlan, plan: Plan) -> list[str]:
        return window_warnings("decay", target, output, plan)

    @staticmethod
    def _split(text: str) -> tuple[str, Length]:
        shape, sep, length = str(text).partition(":")
        shape = shape.strip().lower()
        if not sep or shape not in windows.SHAPES:
            raise TargetError(
                f"--lr-decay {text}: write SHAPE:LENGTH, SHAPE one of {', '.join(windows.SHAPES)}, e.g. cosine:2000"
            )
        return shape, parse_length("--lr-decay", length)
