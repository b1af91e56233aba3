"""Power-function EMA targets (EDM2): ``--sigma-rel SIGMA`` and ``--gamma GAMMA`` (spec §3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ckpt_ema.errors import TargetError
from ckpt_ema.math import ema
from ckpt_ema.plan.kinds.base import TargetKind, TargetOption
from ckpt_ema.plan.kinds.classic import _finite

if TYPE_CHECKING:
    from ckpt_ema.plan.model import OutputPlan
    from ckpt_ema.plan.targets import Target


class Power(TargetKind):
    method = "power"
    options = (
        TargetOption("sigma_rel", "SIGMA", "Power-function EMA (EDM2) by relative width, 0 < SIGMA < 0.2887."),
        TargetOption("gamma", "GAMMA", "Power-function EMA by its exponent (> 0)."),
    )

    def parse(self, key: str, text: str) -> float:
        option = "--" + key.replace("_", "-")
        value = _finite(option, text)
        if key == "sigma_rel" and not 0.0 < value < ema.SIGMA_REL_MAX:
            raise TargetError(f"{option} {text}: sigma_rel must be in (0, {ema.SIGMA_REL_MAX:.4f}) (1/sqrt(12))")
        if key == "gamma" and not value > 0.0:
            raise TargetError(f"{option} {text}: gamma must be > 0")
        return value

    @staticmethod
    def gamma(target: Target) -> float:
        return target.value if target.kind == "gamma" else ema.sigma_rel_to_gamma(target.value)

    def coefficients(self, target: Target, steps: Sequence[int], interp: str, per_checkpoint: bool) -> np.ndarray:
        if steps[-1] == 0:
            raise TargetError("a power-function EMA (--sigma-rel/--gamma) needs a target step > 0")
        if per_checkpoint:
            return ema.per_checkpoint_power_coefficients(len(steps), self.gamma(target))
        return ema.power_coefficients(steps, self.gamma(target), interp)

    def describe(self, target: Target) -> dict[str, float]:
        gamma = self.gamma(target)
        return {"gamma": gamma, "sigma_rel": ema.gamma_to_sigma_rel(gamma)}

    def equivalents(self, params: dict[str, float], target_step: int) -> dict[str, float]:
        """The per-step decay at T, ``(1 - 1/T)**(gamma + 1)``, and its half-life."""
        result: dict[str, float] = {}
        if target_step > 0:
            decay = ema.power_decay_at(target_step, params["gamma"])
            result["decay_at_target"] = decay
            if 0.0 < decay < 1.0:
                result["half_life"] = ema.decay_to_half_life(decay)
        return result

    def summary(self, output: OutputPlan, eq: dict[str, float], target_step: int) -> list[str]:
        from ckpt_ema.plan.kinds import describe_half_life

        p = output.params
        parts = [f"power EMA, sigma_rel {p['sigma_rel']:.4g}, gamma {p['gamma']:.4g}"]
        if "half_life" in eq:
            parts.append(f"at step {target_step} like decay {eq['decay_at_target']:.6g} ({describe_half_life(eq)})")
        return parts

    def reconstruction_profile(self, target: Target) -> tuple[str, float]:
        return "gamma", self.gamma(target)

    def relative_width(self, target: Target, target_step: int) -> float:
        return ema.gamma_to_sigma_rel(self.gamma(target))
