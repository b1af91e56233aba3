"""EDM2 post-hoc EMA: plan the reconstruction of any EMA from saved snapshots of power-function EMAs.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (CVPR 2024), §3.2
and Appendix C.2; spec §4. The trainer tracked a few power EMAs (say sigma_rel 0.05 and 0.10) and saved
all of them every N steps (found by :mod:`ckpt_ema.series.snapshots`). Each snapshot's profile is known, so
the target profile (a power EMA, or a classic exponential one) is fitted by a linear combination of the
snapshots' profiles (:func:`ckpt_ema.math.reconstruct.solve_reconstructions`); that combination is the
coefficient row of an ordinary :class:`~ckpt_ema.plan.model.Plan`, applied by the one streaming pass like
every other method.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from ckpt_ema.errors import TargetError
from ckpt_ema.math.reconstruct import solve_reconstructions, tracked_gammas
from ckpt_ema.plan.model import OutputPlan, Plan, TensorPlan, plan_tensors
from ckpt_ema.plan.targets import Target
from ckpt_ema.series.load import Checkpoint
from ckpt_ema.series.snapshots import load_snapshots

# Warn when the fitted profile is this far (relative L2) from the target ...
LARGE_FIT_ERROR = 0.01
# ... or when the coefficients cancel this much (sum |x|): noise and rounding in the snapshots grow by it.
LARGE_ABS_SUM = 10.0
# Above this condition number solve_reconstruction uses a least-squares solve with a cutoff.
LARGE_CONDITION = 1e8


def plan_posthoc(
    inputs: Sequence[str | os.PathLike],
    targets: Sequence[Target],
    tracked_sigma_rel: Sequence[float | str] = (),
    tracked_gamma: Sequence[float | str] = (),
    at: int | None = None,
    steps: Sequence[int] | None = None,
    init: str | os.PathLike | None = None,
    per_checkpoint: bool = False,
    dtype: str = "auto",
) -> Plan:
    """Find the snapshots and plan the reconstruction of each target (what ``plan_merge`` does with
    ``tracked_sigma_rel``/``tracked_gamma``). ``init`` and ``per_checkpoint`` do not apply and are refused."""
    gammas = tracked_gammas(tracked_sigma_rel, tracked_gamma)
    if init is not None:
        raise TargetError(
            "--init does not apply to EMA snapshots: a power-function EMA gives the step-0 weights nothing"
        )
    if per_checkpoint:
        raise TargetError("--per-checkpoint does not apply to EMA snapshots (their profiles are known exactly)")
    if not targets:
        raise TargetError("no target given: add --sigma-rel, --gamma, --decay or --half-life")
    return plan_reconstruction(load_snapshots(inputs, gammas, steps), targets, at=at, dtype=dtype)


def plan_reconstruction(
    snapshots: Sequence[Checkpoint],
    targets: Sequence[Target],
    at: int | None = None,
    dtype: str = "auto",
) -> Plan:
    """Plan each target as a combination of the power-EMA snapshots at or before step ``at`` (spec §4).

    Power targets (sigma_rel, gamma) are fitted with the closed-form inner products of power profiles;
    classic targets (decay, half-life) as the exponential profile truncated to ``[0, T]`` and
    renormalised, i.e. the bias-corrected EMA that gives the weights before step 1 nothing, like the power
    EMAs. Each output's ``params`` hold the target and the fit's ``condition_number``, ``abs_sum`` and
    ``fit_error``; its method is ``"reconstruction"``.

    Raises:
        TargetError: no target, ``at`` not a snapshot's step, a target the snapshots cannot represent.
    """
    if not targets:
        raise TargetError("no target given: add --sigma-rel, --gamma, --decay or --half-life")
    all_steps = sorted({c.step for c in snapshots})
    target_step = all_steps[-1] if at is None else at
    if at is not None and at not in all_steps:
        raise TargetError(
            f"--at {at} is not the step of a snapshot (snapshots from step {all_steps[0]} to {all_steps[-1]})"
        )
    used = [c for c in snapshots if c.step <= target_step]
    ignored = [c for c in snapshots if c.step > target_step]
    snap_steps = [float(c.step) for c in used]
    snap_gammas = [float(c.tracked_gamma) for c in used]  # type: ignore[arg-type]
    outputs = []
    kinds = [t.family.reconstruction_profile(t) for t in targets]
    fits = solve_reconstructions(snap_steps, snap_gammas, target_step, kinds)  # one factorisation for all
    for target, fit in zip(targets, fits):
        params = {
            **target.describe(),
            "condition_number": fit.condition_number,
            "abs_sum": fit.abs_sum,
            "fit_error": fit.fit_error,
        }
        outputs.append(OutputPlan(target.name, "reconstruction", params, tuple(float(x) for x in fit.coefficients)))
    plan = Plan(
        checkpoints=tuple(used),
        ignored=tuple(ignored),
        target_step=target_step,
        interp="snapshots",
        per_checkpoint=False,
        outputs=tuple(outputs),
        tensors=_at_least_fp32(plan_tensors(used, dtype)) if dtype == "auto" else plan_tensors(used, dtype),
    )
    notes: tuple[str, ...] = ()
    stored = sorted({info.dtype for info in used[-1].source.tensors.values() if info.is_float})
    if dtype == "auto" and set(stored) - {"F32", "F64"}:
        notes = (
            f"output dtype F32 (the snapshots are {', '.join(stored)}): a reconstruction's coefficients can cancel, "
            "so it is written in full precision; --dtype same keeps the snapshots' dtype",
        )
    return replace(plan, warnings=tuple(_warnings(plan, targets)), notes=notes)


def _at_least_fp32(tensors: tuple[TensorPlan, ...]) -> tuple[TensorPlan, ...]:
    """A reconstruction's default dtype: FP16/BF16 (ema-pytorch's default snapshots) written as FP32."""
    return tuple(
        replace(t, out_dtype="F32") if t.is_float and t.out_dtype not in ("F32", "F64") else t for t in tensors
    )


def target_sigma_rel(target: Target, target_step: int) -> float:
    """The target profile's width relative to T: sigma_rel itself, or that of the truncated exponential."""
    return target.family.relative_width(target, target_step)


def _warnings(plan: Plan, targets: Sequence[Target]) -> list[str]:
    warnings = []
    tracked = sorted({float(c.tracked_sigma_rel or 0.0) for c in plan.checkpoints})
    for target, output in zip(targets, plan.outputs):
        p = output.params
        width = target_sigma_rel(target, plan.target_step)
        if width < tracked[0]:
            warnings.append(
                f"{output.name}: the target (sigma_rel {width:.3g}) is narrower than every tracked profile "
                f"(narrowest {tracked[0]:.3g}); it can only be approximated (fit error {p['fit_error']:.2%})"
            )
        elif p["fit_error"] > LARGE_FIT_ERROR:
            warnings.append(
                f"{output.name}: the snapshots fit the target profile only to {p['fit_error']:.2%} "
                "(relative L2 error); more frequent snapshots or a tracked profile closer to the target help"
            )
        if p["abs_sum"] > LARGE_ABS_SUM:
            warnings.append(
                f"{output.name}: the coefficients cancel (sum |x| = {p['abs_sum']:.3g}): rounding and noise in "
                f"the snapshots are amplified up to {p['abs_sum']:.3g}x"
            )
        if p["condition_number"] > LARGE_CONDITION:
            warnings.append(
                f"{output.name}: the system is ill-conditioned (condition number {p['condition_number']:.2g}, "
                f"{len(plan.checkpoints)} snapshots); solved by least squares with a cutoff"
            )
    return warnings
