"""``--window LENGTH``: the mean of the weights over the last LENGTH steps, ``(T - L, T]`` (SWA-style; spec §8).

LENGTH is in steps, or in tokens or samples (``2Btokens``); the window may start between checkpoints and the
gaps are integrated with ``--interp`` like the EMAs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ckpt_ema.errors import TargetError
from ckpt_ema.math import windows
from ckpt_ema.plan.kinds.base import TargetKind, TargetOption
from ckpt_ema.series.lengths import Length, format_si, parse_length

if TYPE_CHECKING:
    from ckpt_ema.plan.model import OutputPlan, Plan
    from ckpt_ema.plan.targets import Target


class Window(TargetKind):
    method = "window"
    options = (
        TargetOption(
            "window",
            "LENGTH",
            "Mean of the weights over the last LENGTH steps (SWA-style); also in tokens or samples: 2Btokens.",
        ),
    )
    warns_first_share = False

    def parse(self, key: str, text: str) -> float:
        length = parse_length("--window", text)
        return length.amount if not length.in_steps else self.to_steps(key, whole(length, "--window"))

    def length(self, key: str, text: str) -> Length | None:
        return parse_length("--window", text)

    def to_steps(self, key: str, steps: float) -> float:
        return float(max(1, round(steps)))

    def coefficients(self, target: Target, steps: Sequence[int], interp: str, per_checkpoint: bool) -> np.ndarray:
        refuse_per_checkpoint(target, per_checkpoint)
        try:
            return windows.window_coefficients(steps, target.value, interp)
        except ValueError as exc:
            raise TargetError(f"{target.flag} {target.text}: {exc}{too_long_hint(steps)}") from None

    def describe(self, target: Target) -> dict[str, float]:
        return {"length": target.value}

    def equivalents(self, params: dict[str, float], target_step: int) -> dict[str, float]:
        return {"length": params["length"], "start_step": target_step - params["length"]}

    def summary(self, output: OutputPlan, eq: dict[str, float], target_step: int) -> list[str]:
        return [f"mean of the weights over the last {describe_length(eq)} (steps {span(eq, target_step)})"]

    def warnings(self, target: Target, output: OutputPlan, plan: Plan) -> list[str]:
        return window_warnings("window", target, output, plan)


# What the averages over the end of training share (lr_decay.py uses them too).


def too_long_hint(steps: Sequence[int]) -> str:
    """What to do about a window reaching before the first checkpoint."""
    if steps[0] == 0:
        return "; shorten it"
    return "; shorten it, or pass --init (the weights at step 0) to start from the base model"


def whole(length: Length, option: str) -> float:
    """A length in steps must be whole."""
    if not float(length.amount).is_integer():
        raise TargetError(f"{option} {length.text}: must be a whole number of steps")
    return length.amount


def refuse_per_checkpoint(target: Target, per_checkpoint: bool) -> None:
    if per_checkpoint:
        raise TargetError(f"{target.flag} is a length in steps: it does not apply with --per-checkpoint (use --last N)")


def describe_length(eq: dict[str, float]) -> str:
    """``2000 steps`` or ``2000 steps = 4.1M tokens``."""
    text = f"{eq['length']:.6g} steps"
    for unit in ("tokens", "samples"):
        if f"length_{unit}" in eq:
            text += f" = {format_si(eq[f'length_{unit}'])} {unit}"
    return text


def span(eq: dict[str, float], target_step: int) -> str:
    return f"{int(eq['start_step']) + 1} to {target_step}"


def window_warnings(what: str, target: Target, output: OutputPlan, plan: Plan) -> list[str]:
    """A window shorter than the spacing of the checkpoints; a window reaching back to the base model."""
    length = target.value
    start = plan.target_step - length  # the window is (start, T]
    result = []
    if len(plan.checkpoints) > 1 and length < plan.spacing:
        result.append(
            f"{output.name}: the {what} ({length:g} steps) is shorter than the spacing of the checkpoints "
            f"({plan.spacing:g} steps); it rests on interpolation (the last checkpoint gets "
            f"{output.coefficients[-1]:.0%})"
        )
    first = plan.checkpoints[0]
    if first.is_init and len(plan.checkpoints) > 1 and start < plan.checkpoints[1].step:
        result.append(
            f"{output.name}: the {what} starts at step {start:g}, before the first checkpoint "
            f"(step {plan.checkpoints[1].step}); the base model (--init) gets {output.coefficients[0]:.1%} of the weight"
        )
    return result
