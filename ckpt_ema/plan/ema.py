"""Plan EMAs (and every other kind of target) of a series of raw checkpoints: one row of coefficients each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ckpt_ema.errors import TargetError
from ckpt_ema.math import ema as kernels
from ckpt_ema.plan.kinds import target_flags
from ckpt_ema.plan.model import OutputPlan, Plan, plan_tensors
from ckpt_ema.plan.targets import Target, in_steps
from ckpt_ema.series.lengths import StepSize
from ckpt_ema.series.load import Checkpoint

# Warn when the first checkpoint (or the --init weights) keeps this share of an output.
LARGE_FIRST_SHARE = 0.10


def plan_ema(
    checkpoints: Sequence[Checkpoint],
    targets: Sequence[Target],
    at: int | None = None,
    interp: str = "linear",
    per_checkpoint: bool = False,
    dtype: str = "same",
    step_size: StepSize | None = None,
) -> Plan:
    """Plan classic and power-function EMAs (and every other kind) of a sorted series at step ``at``
    (default: the last step). ``step_size``: tokens/samples per step, for lengths given in them.

    Raises:
        TargetError: no target, ``at`` not the step of a checkpoint of the series, bad ``interp``/``dtype``,
        a length in tokens or samples without their number per step.
    """
    if not targets:
        raise TargetError(f"no target given: add {target_flags()}")
    if interp not in kernels.INTERPOLATIONS:
        raise TargetError(f"--interp must be one of {', '.join(kernels.INTERPOLATIONS)}, got {interp!r}")
    targets = in_steps(targets, step_size)
    used, ignored = split_at(checkpoints, at)
    steps = [c.step for c in used]
    outputs = []
    for target in targets:
        coefs = tuple(float(c) for c in target.coefficients(steps, interp, per_checkpoint))
        labels = target.family.labels(target)
        outputs.append(OutputPlan(target.name, target.method, target.describe(), coefs, labels))
    plan = Plan(
        checkpoints=tuple(used),
        ignored=tuple(ignored),
        target_step=steps[-1],
        interp=interp,
        per_checkpoint=per_checkpoint,
        outputs=tuple(outputs),
        tensors=plan_tensors(used, dtype),
        step_size=step_size,
    )
    return _with_warnings(plan, targets)


def split_at(checkpoints: Sequence[Checkpoint], at: int | None) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """The checkpoints up to the target step, and those after it (ignored)."""
    steps = [c.step for c in checkpoints]
    if at is None:
        return list(checkpoints), []
    if at not in steps:
        before = [s for s in steps if s < at]
        after = [s for s in steps if s > at]
        if not before or not after:
            raise TargetError(f"--at {at} is outside the series (steps {steps[0]} to {steps[-1]})")
        raise TargetError(f"--at {at} is not the step of a checkpoint; the nearest are {before[-1]} and {after[0]}")
    cut = steps.index(at) + 1
    return list(checkpoints[:cut]), list(checkpoints[cut:])


def _with_warnings(plan: Plan, targets: Sequence[Target]) -> Plan:
    warnings: list[str] = []
    steps = [c.step for c in plan.checkpoints]
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    if gaps and max(gaps) > 2 * min(gaps):
        warnings.append(
            f"steps are unevenly spaced (gaps of {min(gaps)} to {max(gaps)} steps): "
            "the weights between distant checkpoints are interpolated more coarsely"
        )
    guessed = [c for c in plan.checkpoints if c.source.other_keys]
    if guessed:  # a torch file holding several state dicts (e.g. timm's state_dict and state_dict_ema)
        source = guessed[0].source
        warnings.append(
            f"{len(guessed)} torch file(s) hold several state dicts; took {source.state_dict_key!r} "
            f"(also found {', '.join(map(repr, source.other_keys))} in {source.path.name}); pass --key to choose"
        )
    ambiguous = [c for c in plan.checkpoints if c.step_info.ambiguous]
    if ambiguous:
        example = ambiguous[0]
        warnings.append(
            f"{len(ambiguous)} step(s) taken from a bare trailing number ({example.path.name} -> step "
            f"{example.step}); kohya names epoch saves this way: if these are epochs, pass --steps"
        )
    first = "the base model (--init)" if plan.checkpoints[0].is_init else f"the first checkpoint (step {steps[0]})"
    for target, output in zip(targets, plan.outputs):
        share = output.coefficients[0]
        if len(steps) > 1 and share >= LARGE_FIRST_SHARE and target.family.warns_first_share:
            warnings.append(
                f"{output.name}: {first} keeps {share:.0%} of the weight; the EMA is long for this "
                f"{steps[-1] - steps[0]}-step series"
            )
        warnings.extend(target.family.warnings(target, output, plan))
    return replace(plan, warnings=tuple(warnings))
