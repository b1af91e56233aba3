"""PNG plots of a plan's weights and of a sweep's scores; matplotlib is an optional extra (``ckpt-ema[plot]``).

Only the object-oriented API (``matplotlib.figure.Figure``) is used: no pyplot, no global state, no GUI backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.plan.model import Plan


class PlotError(CkptEmaError):
    """matplotlib is missing, or the plot cannot be written."""


INSTALL_HINT = "pip install 'ckpt-ema[plot]'"


def require_matplotlib() -> Any:
    """Import matplotlib's ``Figure``; raise a one-line ``PlotError`` saying how to install it when missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return Figure


def plot_weights(plan: Plan, path: str | os.PathLike) -> Path:
    """The coefficient of each checkpoint against its step, one line per output of the plan."""
    figure_class = require_matplotlib()
    figure = figure_class(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    steps = [c.step for c in plan.checkpoints]
    for output in plan.outputs:
        axes.plot(steps, output.coefficients, marker="o", markersize=3, label=output.name)
    axes.axhline(0.0, color="grey", linewidth=0.5)
    axes.set_xlabel("step")
    methods = {o.method for o in plan.outputs}
    what = "EMA weights" if methods <= {"classic", "power", "reconstruction"} else "weights of each output"
    axes.set_ylabel("coefficient (weight of the checkpoint)")
    axes.set_title(f"{what} at step {plan.target_step}, {len(steps)} checkpoints")
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_scores(
    half_lives: Sequence[float | None],
    scores: Sequence[float | None],
    labels: Sequence[str],
    kinds: Sequence[str],
    best: int | None,
    path: str | os.PathLike,
    ylabel: str = "score",
) -> Path:
    """Score against the half-life in steps (log axis), classic and power-function candidates apart; the
    candidates without a half-life (``--last``, ``--window``, ``--lr-decay``) as dashed lines at their score."""
    figure_class = require_matplotlib()
    figure = figure_class(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    markers = {"classic": "o", "power": "s"}
    for kind in sorted(set(kinds)):
        points = sorted(
            (h, s) for h, s, k in zip(half_lives, scores, kinds) if k == kind and s is not None and h is not None
        )
        if points:
            axes.plot(*zip(*points), marker=markers.get(kind, "^"), label=f"{kind} EMA")
    for h, s, label in zip(half_lives, scores, labels):
        if s is not None and h is not None:
            axes.annotate(label, (h, s), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    # Averages without a half-life (--last, --window, --lr-decay): a dashed line at their score each.
    others = [(i, s) for i, (h, s) in enumerate(zip(half_lives, scores)) if h is None and s is not None]
    for n, (i, s) in enumerate(others):
        color = f"C{(n + len(set(kinds))) % 10}"
        label = labels[i] + (" (best)" if i == best else "")
        axes.axhline(s, linestyle="--", linewidth=2.0 if i == best else 0.9, color=color, label=label)
    if best is not None and scores[best] is not None and half_lives[best] is not None:
        axes.plot(
            [half_lives[best]], [scores[best]], marker="*", markersize=14, color="red", linestyle="", label="best"
        )
    if any(h is not None and s is not None for h, s in zip(half_lives, scores)):
        axes.set_xscale("log")
    axes.set_xlabel("half-life at the target step (steps, log scale); dashed: averages without a half-life")
    axes.set_ylabel(ylabel)
    axes.legend(fontsize="small")
    return _save(figure, path)


def _save(figure: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        figure.savefig(path, dpi=120)
    except (OSError, ValueError) as exc:
        raise PlotError(f"{path}: cannot write the plot ({exc})") from None
    return path
