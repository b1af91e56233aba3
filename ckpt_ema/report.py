"""Plain-text summaries of plans, for people (the ``--json`` output is ``Plan.to_json``)."""

from __future__ import annotations

import os

from . import kernels
from .plan import OutputPlan, Plan


def describe_series(plan: Plan) -> list[str]:
    """The checkpoints found, their steps and where each step came from."""
    steps = [c.step for c in plan.checkpoints]
    gaps = sorted({b - a for a, b in zip(steps, steps[1:])})
    spacing = (
        f"every {gaps[0]} steps"
        if len(gaps) == 1
        else f"gaps of {gaps[0]} to {gaps[-1]} steps"
        if gaps
        else "one checkpoint"
    )
    lines = [
        f"{len(steps)} checkpoints, steps {steps[0]} to {steps[-1]} ({spacing}); target step T = {plan.target_step}"
    ]
    width = max(len(_short(c.path)) for c in plan.checkpoints)
    for c in plan.checkpoints:
        role = "  (--init, step 0)" if c.is_init else f"  step from {c.step_info.source}"
        lines.append(f"  {c.step:>9}  {_short(c.path):<{width}}{role}")
    for c in plan.ignored:
        lines.append(f"  {c.step:>9}  {_short(c.path):<{width}}  ignored: after T")
    return lines


def describe_coefficients(plan: Plan) -> list[str]:
    """A table: one row per checkpoint, one column per output."""
    names = [o.name for o in plan.outputs]
    widths = [max(10, len(n)) for n in names]
    lines = ["coefficients   " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for j, c in enumerate(plan.checkpoints):
        label = "init" if c.is_init else f"step {c.step}"
        cells = "  ".join(f"{o.coefficients[j]:>{w}.6f}" for o, w in zip(plan.outputs, widths))
        lines.append(f"  {label:<12} {cells}")
    return lines


def describe_output(plan: Plan, output: OutputPlan) -> str:
    """One line: what the output is, its width in steps, checkpoints and sigma_rel, the first share."""
    eq = plan.equivalents(output)
    parts = []
    if output.method == "classic":
        parts.append(f"classic EMA, decay {output.params['decay']:.6g} per step")
        parts.append(f"half-life {eq['half_life']:.4g} steps")
    elif output.method == "power":
        parts.append(f"power EMA, sigma_rel {output.params['sigma_rel']:.4g}, gamma {output.params['gamma']:.4g}")
        if "half_life" in eq:
            parts.append(
                f"at step {plan.target_step} like decay {eq['decay_at_target']:.6g} (half-life {eq['half_life']:.4g} steps)"
            )
    else:
        parts.append(output.method)
    if "half_life_checkpoints" in eq:
        parts.append(f"{eq['half_life_checkpoints']:.3g} checkpoints")
    if output.method == "classic" and eq.get("sigma_rel", 1.0) < kernels.SIGMA_REL_MAX:
        parts.append(f"~ sigma_rel {eq['sigma_rel']:.3g}")
    first = "init" if plan.checkpoints[0].is_init else "first checkpoint"
    parts.append(f"{first} keeps {eq['first_share']:.2%}")
    return f"{output.name}: " + "; ".join(parts)


def describe_plan(plan: Plan) -> str:
    """Everything ``ckpt-ema plan`` prints, warnings last."""
    lines = describe_series(plan) + [""] + describe_coefficients(plan) + [""]
    lines += [describe_output(plan, o) for o in plan.outputs]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _short(path: os.PathLike) -> str:
    text = os.fspath(path)
    try:
        relative = os.path.relpath(text)
    except ValueError:
        return text
    return relative if not relative.startswith("../..") else text
