"""A sweep: many EMA candidates written in one pass, each scored by the user's own evaluation command.

The candidates are the outputs of one plan (``jobs.merge.plan_merge``) written by one ``jobs.merge.MergeJob``; this module
only adds what comes after: running the evaluation, picking the best, and the ``sweep.json`` record.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ckpt_ema import __version__
from ckpt_ema.math import ema as kernels
from ckpt_ema.plan.model import OutputPlan, Plan

# A number standing on its own: not glued to a word or a path (``decay-0.9.safetensors``, ``step-000100``).
_NUMBER = re.compile(
    r"(?<![\w.+\-])[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|(?:nan|inf(?:inity)?))(?![\w])",
    re.IGNORECASE,
)
STDERR_TAIL_LINES = 5


@dataclass
class Candidate:
    """One output of the sweep: what it is, where it was written, and its score (or why there is none)."""

    name: str
    path: Path
    output: OutputPlan
    half_life: float | None  # in steps, at the target step (power targets: their local decay there)
    sigma_rel: float | None  # the power target's own, or a classic target's equivalent when in range
    score: float | None = None
    error: str | None = None
    kept: bool = True

    @property
    def kind(self) -> str:
        return self.output.method


@dataclass
class SweepResult:
    """All candidates, the direction of the scores and the best candidate's index (None without scores)."""

    plan: Plan
    candidates: list[Candidate]
    eval_command: str | None = None
    maximize: bool = False
    best: int | None = None

    @property
    def direction(self) -> str:
        return "maximize" if self.maximize else "minimize"


def candidates_from_plan(plan: Plan, paths: Sequence[Path]) -> list[Candidate]:
    """One candidate per output of the plan, with its half-life and sigma_rel from ``Plan.equivalents``."""
    result = []
    for output, path in zip(plan.outputs, paths):
        eq = plan.equivalents(output)
        # a power target's (or a reconstruction's) own sigma_rel; a classic target's equivalent
        sigma_rel = output.params.get("sigma_rel", eq.get("sigma_rel"))
        if sigma_rel is not None and not 0.0 < sigma_rel < kernels.SIGMA_REL_MAX:
            sigma_rel = None
        half_life = eq.get("half_life", output.params.get("half_life"))
        if half_life is None and "gamma" in output.params and plan.target_step > 1:  # a reconstructed power EMA
            half_life = kernels.decay_to_half_life(kernels.power_decay_at(plan.target_step, output.params["gamma"]))
        result.append(Candidate(output.name, Path(path), output, half_life, sigma_rel))
    return result


def parse_score(stdout: str) -> float | None:
    """The last number printed (``None`` if there is none); ``nan``/``inf`` count, so that they are not missed."""
    numbers = _NUMBER.findall(stdout)
    return float(numbers[-1]) if numbers else None


def eval_argv(command: str, path: Path) -> list[str]:
    """The evaluation command as an argument vector: split into words as a POSIX shell splits them
    (quotes honoured, then removed), ``{path}`` replaced inside each word by the path itself.

    Nothing goes through a shell, so whatever the path holds (``$(...)``, backticks, ``;``, quotes) stays
    inside its one argument, however the user quoted ``{path}``. Raises ``ValueError`` for unbalanced quotes.
    """
    return [word.replace("{path}", str(path)) for word in shlex.split(command)]


def evaluate(command: str, path: Path) -> tuple[float | None, str | None]:
    """Run ``command`` (see :func:`eval_argv`, no shell) for one candidate; return ``(score, error)``.

    The score is the last number the command prints on stdout. A non-zero exit, no number, or a number
    that is not finite is an error whose text ends with the tail of the command's stderr.
    """
    try:
        argv = eval_argv(command, path)
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", check=False)
    except ValueError as exc:
        return None, f"could not split the command into words ({exc})"
    except OSError as exc:
        return None, f"could not run the command ({exc})"
    tail = _tail(done.stderr)
    if done.returncode != 0:
        return None, f"exit code {done.returncode}" + (f": {tail}" if tail else "")
    score = parse_score(done.stdout)
    if score is None:
        return None, "printed no number on stdout" + (f"; stderr: {tail}" if tail else "")
    if not math.isfinite(score):
        return None, f"printed a score that is not finite ({score})"
    return score, None


def pick_best(candidates: Sequence[Candidate], maximize: bool) -> int | None:
    """Index of the best scored candidate (the first one on ties), None if none has a score."""
    scored = [(c.score, i) for i, c in enumerate(candidates) if c.score is not None]
    if not scored:
        return None
    best = max(scored, key=lambda item: (item[0], -item[1])) if maximize else min(scored)
    return best[1]


def discard_others(result: SweepResult) -> list[Path]:
    """``--keep best``: delete every candidate's file (or folder) but the best one's; return the deleted paths."""
    if result.best is None:
        return []
    deleted = []
    for i, candidate in enumerate(result.candidates):
        if i != result.best and candidate.path.exists():
            if candidate.path.is_dir():
                shutil.rmtree(candidate.path)
            else:
                candidate.path.unlink()
            candidate.kept = False
            deleted.append(candidate.path)
    return deleted


def sweep_json(result: SweepResult) -> dict[str, object]:
    """``sweep.json``: the inputs, every candidate with target, coefficients and score, the best, provenance."""
    plan = result.plan
    best = result.candidates[result.best].name if result.best is not None else None
    return {
        "tool": "ckpt-ema",
        "version": __version__,
        "target_step": plan.target_step,
        "interp": "per-checkpoint" if plan.per_checkpoint else plan.interp,
        "inputs": [{"path": str(c.path), "step": c.step, "init": c.is_init} for c in plan.checkpoints],
        "eval": result.eval_command,
        "direction": result.direction,
        "best": best,
        "candidates": [
            {
                "name": c.name,
                "path": str(c.path),
                "kept": c.kept,
                "target": {"method": c.output.method, **c.output.params, **c.output.labels},
                "half_life": c.half_life,
                "sigma_rel": c.sigma_rel,
                "coefficients": list(c.output.coefficients),
                "score": c.score,
                "error": c.error,
            }
            for c in result.candidates
        ],
        "warnings": list(plan.warnings),
    }


def describe_sweep(result: SweepResult) -> list[str]:
    """The table: candidate, half-life in steps, sigma_rel equivalent, score; the best marked."""
    header = ["candidate", "half-life (steps)", "sigma_rel", "score" if result.eval_command else ""]
    rows = []
    for i, c in enumerate(result.candidates):
        half_life = f"{c.half_life:.4g}" if c.half_life is not None else "-"
        sigma_rel = f"{c.sigma_rel:.3g}" if c.sigma_rel is not None else "-"
        if result.eval_command is None:
            score = ""
        elif c.score is not None:
            score = f"{c.score:.6g}" + ("   <- best" if i == result.best else "")
        else:
            score = "failed"
        rows.append([c.name, half_life, sigma_rel, score])
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(3)]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2]), row[3]]
        lines.append("  ".join(cells).rstrip())
    return lines


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-STDERR_TAIL_LINES:])
