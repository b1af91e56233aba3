"""Plain-text summaries of plans, for people (the ``--json`` output is ``Plan.to_json``)."""

from __future__ import annotations

import os

from ckpt_ema.math import ema as kernels
from ckpt_ema.math.estimate import Estimate
from ckpt_ema.plan.kinds import METHODS
from ckpt_ema.plan.model import OutputPlan, Plan
from ckpt_ema.report.escape import printable_lines
from ckpt_ema.series.lengths import StepSize
from ckpt_ema.series.load import Checkpoint


def describe_series(plan: Plan) -> list[str]:
    """The checkpoints found, their steps and where each step came from."""
    steps = [c.step for c in plan.checkpoints]
    unique = sorted(set(steps))  # EMA snapshots: several tracked profiles share a step
    gaps = sorted({b - a for a, b in zip(unique, unique[1:])})
    spacing = (
        f"every {plan.step_size.describe(gaps[0]) if plan.step_size is not None else f'{gaps[0]} steps'}"
        if len(gaps) == 1
        else f"gaps of {gaps[0]} to {gaps[-1]} steps"
        if gaps
        else "one checkpoint"
    )
    kind = "checkpoints"
    tracked = sorted(
        {kernels.gamma_to_sigma_rel(c.tracked_gamma) for c in plan.checkpoints if c.tracked_gamma is not None}
    )
    if tracked:
        kind = f"EMA snapshots of sigma_rel {', '.join(f'{s:.4g}' for s in tracked)}"
    lines = [f"{len(steps)} {kind}, steps {steps[0]} to {steps[-1]} ({spacing}); target step T = {plan.target_step}"]
    if plan.step_size is not None:
        lines.append(f"{_per_step(plan.step_size)}; T = {plan.step_size.describe(plan.target_step)}")
    width = max(len(_short(c.path)) for c in plan.checkpoints)
    for c in plan.checkpoints:
        role = "  (--init, step 0)" if c.is_init else f"  step from {c.step_info.source}"
        role += f", sigma_rel {_profile(c)}" if c.tracked_gamma is not None else ""
        lines.append(f"  {c.step:>9}  {_short(c.path):<{width}}{role}")
    for c in plan.ignored:
        lines.append(f"  {c.step:>9}  {_short(c.path):<{width}}  ignored: after T")
    return lines


def describe_step_sources(plan: Plan) -> str:
    """One line: the steps of the series and where they came from (every step-detection path says its source)."""
    counts: dict[str, int] = {}
    for c in plan.checkpoints:
        counts[c.step_info.source] = counts.get(c.step_info.source, 0) + 1
    sources = "; ".join(f"{source} ({n})" if len(counts) > 1 else source for source, n in counts.items())
    steps = [c.step for c in plan.checkpoints]
    return f"steps {steps[0]} to {steps[-1]} ({len(steps)} inputs) from {sources}"


def describe_coefficients(plan: Plan) -> list[str]:
    """A table: one row per checkpoint, one column per output."""
    names = [o.name for o in plan.outputs]
    widths = [max(10, len(n)) for n in names]
    labels = [
        "init" if c.is_init else f"step {c.step}" + (f" s{_profile(c)}" if c.tracked_gamma is not None else "")
        for c in plan.checkpoints
    ]
    label_width = max(12, *map(len, labels))
    lines = [f"{'coefficients':<{label_width + 3}}" + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for j, label in enumerate(labels):
        cells = "  ".join(f"{o.coefficients[j]:>{w}.6f}" for o, w in zip(plan.outputs, widths))
        lines.append(f"  {label:<{label_width}} {cells}")
    return lines


def describe_output(plan: Plan, output: OutputPlan) -> str:
    """One line: what the output is, its width in steps, checkpoints and sigma_rel, the first share."""
    eq = plan.equivalents(output)
    if output.method == "reconstruction":  # the first snapshot's share means nothing here
        return f"{output.name}: {_describe_reconstruction(output)}"
    family = METHODS.get(output.method)
    parts = family.summary(output, eq, plan.target_step) if family is not None else [output.method]
    first = "init" if plan.checkpoints[0].is_init else "first checkpoint"
    if family is None or family.warns_first_share or eq["first_share"] > 0.0:
        parts.append(f"{first} keeps {eq['first_share']:.2%}")
    return f"{output.name}: " + "; ".join(parts)


def describe_plan(plan: Plan) -> str:
    """Everything ``ckpt-ema plan`` prints, warnings last."""
    lines = describe_series(plan) + [""] + describe_coefficients(plan) + [""]
    lines += [describe_output(plan, o) for o in plan.outputs]
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"warning: {w}" for w in plan.warnings]
    return printable_lines(lines)  # each line escaped: names and paths come from files


def _describe_reconstruction(output: OutputPlan) -> str:
    p = output.params
    if "gamma" in p:
        target = f"power EMA, sigma_rel {p['sigma_rel']:.4g}, gamma {p['gamma']:.4g}"
    else:
        target = f"classic EMA (bias-corrected), decay {p['decay']:.6g} per step, half-life {p['half_life']:.4g} steps"
    used = sum(1 for c in output.coefficients if c != 0.0)
    return (
        f"{target}, reconstructed from {used} snapshots; condition number {p['condition_number']:.3g}, "
        f"Σ|x| {p['abs_sum']:.4g}, fit error {p['fit_error']:.3%}"
    )


def _per_step(size: StepSize) -> str:
    """``4096 tokens per step (from --tokens-per-step)``."""
    known = [f"{v:.6g} {unit} per step" for unit, v in (("tokens", size.tokens), ("samples", size.samples)) if v]
    return f"{', '.join(known)} (from {size.source})"


def _profile(c: Checkpoint) -> str:
    return f"{kernels.gamma_to_sigma_rel(c.tracked_gamma):.4g}"  # type: ignore[arg-type]


def _short(path: os.PathLike) -> str:
    text = os.fspath(path)
    try:
        relative = os.path.relpath(text)
    except ValueError:
        return text
    return relative if not relative.startswith("../..") else text


def describe_estimate(estimate: Estimate | None, reason: str | None = None) -> str:
    """The error estimate of one output against the per-step EMA (docs/estimate.md), in one phrase."""
    if estimate is None:
        return f"no error estimate: {reason}" if reason else "no error estimate"
    caveats = "".join(f"; {w}" for w in estimate.warnings)
    return f"estimated sig {estimate.sig:.2g} against the per-step EMA (error {estimate.error:.3g}{caveats})"


def estimate_json(estimate: Estimate | None, reason: str | None = None) -> dict[str, object]:
    """``outputs[k].estimate`` of the ``--json`` summaries: ``{"sig": float, ...}`` or ``{"sig": null, "reason"}``."""
    if estimate is None:
        return {"sig": None, "reason": reason or "not estimated"}
    return estimate.to_json()
