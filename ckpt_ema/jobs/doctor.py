"""Why did my EMA not learn? Numbers about a run, a decay and a dtype, from the raw checkpoints.

- the run's length and spacing; for a decay, its half-life against the run and the share of the start
  (first checkpoint or base model) left in the EMA, from the plan's coefficients;
- the share of per-step updates ``u = (1 - beta)(theta - ema)`` that round to zero when the EMA is kept in
  a low-precision dtype (``|u|`` below half a unit in the last place of ``ema``), estimated at up to eight
  checkpoints ``s_j`` from ``theta(s_j)`` and the FP32 post-hoc EMA at ``s_j``;
- with the EMA the trainer saved: how far it moved from the start compared with the FP32 EMA of the same
  decay, and the share of its values that never changed;
- a recommendation: a sweep over decays whose half-lives are 2.5%, 5%, 10% and 20% of the run.

Everything is computed by one plan whose rows are ``[EMA at s_j, theta(s_j)]`` pairs (plus the start and the
trainer's EMA) and one pass of the engine into a statistics sink: no second averaging loop.
"""

from __future__ import annotations

import math
import os
import shlex
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ckpt_ema.engine.merge_pass import MergePass
from ckpt_ema.errors import InputError, SeriesError, TargetError
from ckpt_ema.io import open_checkpoint
from ckpt_ema.jobs.estimate import EstimateGatherer, not_estimated
from ckpt_ema.math import ema as kernels
from ckpt_ema.math import estimate as est
from ckpt_ema.plan.ema import plan_ema
from ckpt_ema.plan.model import OutputPlan, Plan
from ckpt_ema.plan.targets import Target, parse_target
from ckpt_ema.series.load import Checkpoint, check_compatible, load_series, normalise_keys
from ckpt_ema.series.steps import StepInfo

if TYPE_CHECKING:
    import torch

# significand bits p (with the implicit bit) and the frexp exponent of the smallest normal number
FORMATS = {"bf16": (8, -125, "BF16"), "fp16": (11, -13, "F16"), "fp32": (24, -125, "F32")}
DTYPE_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp32"}
MAX_SAMPLES = 8
TARGET_SIG = 0.05  # doctor's default for the inverse question (the spacing for the next run)
RECOMMENDED_FRACTIONS = (0.025, 0.05, 0.10, 0.20)
RECOMMENDED_SIGMA_REL = ("0.05", "0.1", "0.2")


@dataclass
class TrainerEma:
    """The trainer's EMA against the FP32 post-hoc EMA of the same decay at the same step."""

    path: str
    dtype: str
    moved: float  # ||trainer - start||
    moved_fp32: float  # ||fp32 EMA - start||
    ratio: float  # moved / moved_fp32
    unchanged_share: float  # values exactly equal to the start, in the trainer EMA's dtype
    unchanged_share_fp32: float  # the same for the FP32 EMA rounded to that dtype


@dataclass
class Diagnosis:
    """All the numbers ``doctor`` reports (``--json`` prints them as they are)."""

    inputs: list[str]
    steps: list[int]
    init: str | None
    run_length: int  # steps from the start (first checkpoint or --init) to the last checkpoint
    spacing: float  # median gap between checkpoints, in steps
    gaps: tuple[int, int] | None  # smallest and largest gap
    decay: float | None = None
    half_life: float | None = None  # steps
    half_life_share: float | None = None  # half-life / run length
    start_share: float | None = None  # coefficient of the start in the EMA at the last step
    dtype: str | None = None
    rounding_share: float | None = None  # of the non-zero per-step updates, those that round to zero
    rounding_samples: list[dict[str, float]] = field(default_factory=list)  # {"step", "share", "updates"}
    trainer_ema: TrainerEma | None = None
    recommended_half_lives: list[float] = field(default_factory=list)
    recommended_decays: list[str] = field(default_factory=list)
    recommended_sigma_rel: list[str] = field(default_factory=list)
    command: str | None = None
    estimate: dict[str, object] | None = None  # the error estimate of the EMA of --decay (docs/estimate.md)
    target_sig: float | None = None  # the inverse question: the sig wanted for the next run
    save_every: int | None = None  # the largest spacing (steps) predicted to reach it
    save_every_sig: float | None = None  # the sig predicted at that spacing
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class Checkup:
    """Plan the diagnosis from headers; iterate to run the one pass (bytes read); then ``result()``."""

    def __init__(
        self,
        inputs: Sequence[str | os.PathLike],
        decay: float | str | None = None,
        dtype: str | None = None,
        ema: str | os.PathLike | None = None,
        init: str | os.PathLike | None = None,
        steps: Sequence[int] | None = None,
        key: str | None = None,
        component: Sequence[str] | None = None,
        target_sig: float = TARGET_SIG,
    ) -> None:
        if not 0.0 < target_sig < 1.0:
            raise TargetError(f"--target-sig must be in (0, 1), got {target_sig}")
        self.target_sig = target_sig
        self.gatherer: EstimateGatherer | None = None
        if dtype is not None and dtype not in FORMATS:
            raise TargetError(f"--dtype must be one of {', '.join(FORMATS)}, got {dtype!r}")
        if ema is not None and decay is None:
            raise TargetError("--ema needs --decay: the decay the trainer used")
        target = parse_target("decay", decay) if decay is not None else None
        checkpoints = load_series(inputs, steps=steps, init=init, key=key, component=component)
        self.inputs = [str(i) for i in inputs]
        self.init = str(init) if init is not None else None
        self.checkpoints = checkpoints
        if ema is not None and len(checkpoints) < 2:
            raise SeriesError(f"--ema {ema}: comparing with the trainer's EMA needs at least two checkpoints")
        self.trainer = _open_trainer_ema(ema, checkpoints, key, component) if ema is not None else None
        self.decay = target.value if target is not None else None
        self.dtype = dtype or _default_dtype(self.trainer or checkpoints[-1])
        self.pass_: MergePass | None = None
        self.base: Plan | None = None
        if target is not None:
            self.base = plan_ema(checkpoints, [target], dtype="fp32")
            if len(checkpoints) > 1:
                self._plan_pass(target)

    def _plan_pass(self, target: Target) -> None:
        steps = [c.step for c in self.checkpoints]
        n = len(steps)
        self.samples = sorted({int(round(x)) for x in np.linspace(1, n - 1, min(MAX_SAMPLES, n - 1))})
        columns = ([self.trainer] if self.trainer else []) + list(self.checkpoints)
        shift = 1 if self.trainer else 0

        def row(name: str, values: dict[int, float]) -> OutputPlan:
            coefs = [0.0] * len(columns)
            for j, value in values.items():
                coefs[j] = float(value)
            return OutputPlan(name, "diagnostic", {}, tuple(coefs))

        rows, roles = [], []
        for i, j in enumerate(self.samples):
            ema = kernels.classic_coefficients(steps[: j + 1], target.decay, "linear")
            rows.append(row(f"ema@{steps[j]}", {shift + k: c for k, c in enumerate(ema)}))
            rows.append(row(f"theta@{steps[j]}", {shift + j: 1.0}))
            roles += [("ema", i), ("theta", i)]
        if self.trainer:
            rows += [row("start", {shift: 1.0}), row("trainer", {0: 1.0})]
            roles += [("start", 0), ("trainer", 0)]
        assert self.base is not None
        plan = replace(self.base, checkpoints=tuple(columns), outputs=tuple(rows))
        ema_dtype = FORMATS[self.trainer_dtype][2] if self.trainer else "F32"
        self.stats = _Stats(plan, roles, len(self.samples), target.decay, self.dtype, ema_dtype)
        if not_estimated(self.base, "classic") is None:  # the EMA at T is the last sample's "ema" row
            self.gatherer = EstimateGatherer(self.base, pass_plan=plan, result_rows=[2 * (len(self.samples) - 1)])
        self.pass_ = MergePass(plan, [], rows_sink=self.stats, chunk_sink=self.gatherer)

    @property
    def trainer_dtype(self) -> str:
        assert self.trainer is not None
        return _default_dtype(self.trainer)

    @property
    def total_bytes(self) -> int:
        return self.pass_.total_bytes if self.pass_ else 0

    def __iter__(self) -> Iterator[int]:
        return iter(self.pass_) if self.pass_ else iter(())

    def result(self) -> Diagnosis:
        steps = [c.step for c in self.checkpoints]
        gaps = [b - a for a, b in zip(steps, steps[1:])]
        run_length = steps[-1] - steps[0]
        d = Diagnosis(
            inputs=self.inputs,
            steps=steps,
            init=self.init,
            run_length=run_length,
            spacing=float(statistics.median(gaps)) if gaps else 0.0,
            gaps=(min(gaps), max(gaps)) if gaps else None,
            dtype=self.dtype,
        )
        if self.decay is not None and self.base is not None:
            d.decay = self.decay
            d.half_life = kernels.decay_to_half_life(self.decay)
            d.half_life_share = d.half_life / run_length if run_length else None
            d.start_share = self.base.outputs[0].coefficients[0]
            d.warnings = list(self.base.warnings)
        if self.pass_ is not None:
            stats = self.stats
            d.rounding_samples = [
                {"step": steps[j], "share": stats.rounded[i] / max(stats.updates[i], 1), "updates": stats.updates[i]}
                for i, j in enumerate(self.samples)
            ]
            d.rounding_share = sum(stats.rounded) / max(sum(stats.updates), 1)
            if self.trainer is not None:
                d.trainer_ema = TrainerEma(
                    path=str(self.trainer.path),
                    dtype=self.trainer_dtype,
                    moved=math.sqrt(stats.moved_sq),
                    moved_fp32=math.sqrt(stats.moved_fp32_sq),
                    ratio=math.sqrt(stats.moved_sq / stats.moved_fp32_sq) if stats.moved_fp32_sq else math.nan,
                    unchanged_share=stats.unchanged / max(stats.values, 1),
                    unchanged_share_fp32=stats.unchanged_fp32 / max(stats.values, 1),
                )
        if self.gatherer is not None and self.pass_ is not None:
            self._estimate(d)
        if run_length > 0:
            d.recommended_half_lives = [f * run_length for f in RECOMMENDED_FRACTIONS]
            d.recommended_decays = [_round_decay(h) for h in d.recommended_half_lives]
            d.recommended_sigma_rel = list(RECOMMENDED_SIGMA_REL)
            init = ["--init", self.init] if self.init else []
            d.command = shlex.join(
                ["ckpt-ema", "sweep", *self.inputs, *init, "--decay", ",".join(d.recommended_decays),
                 "--sigma-rel", ",".join(d.recommended_sigma_rel), "-o", "sweep/", "--eval", "YOUR_EVAL_COMMAND {path}"]
            )  # fmt: skip
        return d

    def _estimate(self, d: Diagnosis) -> None:
        """The error estimate of the EMA of --decay and the spacing that reaches --target-sig."""
        assert self.gatherer is not None and self.decay is not None
        (e,) = self.gatherer.estimates()
        if e is None:
            return
        decay = self.decay
        steps = [c.step for c in self.checkpoints]
        d.estimate = e.to_json()
        d.target_sig = self.target_sig
        answer = est.spacing_for(
            self.target_sig,
            self.gatherer.model(),
            lambda grid: kernels.classic_coefficients(grid, decay, "linear"),
            est.classic_cumulative(decay, steps[-1]),
            e.distance**2 + e.error**2,
            largest=int(4 * max(b - a for a, b in zip(steps, steps[1:]))),
        )
        if answer is not None:
            d.save_every, d.save_every_sig = answer


class _Stats:
    """The statistics of one pass: receives every output of a piece of a tensor at once (a ``RowsSink``);
    row ``k`` plays ``roles[k]`` (the EMA at a sample, the weights there, the start, the trainer's EMA)."""

    def __init__(
        self, plan: Plan, roles: list[tuple[str, int]], samples: int, decay: float, dtype: str, ema_dtype: str
    ) -> None:
        import torch  # the statistics are torch element-wise ops (imported when a checkup runs)

        from ckpt_ema.io.torch_edge import TORCH_DTYPES, to_torch

        self.torch, self.to_torch = torch, to_torch
        self.float_names = {t.name for t in plan.tensors if t.is_float}
        self.out_dtypes = {t.name: t.out_dtype for t in plan.tensors}
        self.roles = roles
        self.last = samples - 1
        self.decay = decay
        self.bits, self.min_exponent, dtype_name = FORMATS[dtype]
        self.dtype = TORCH_DTYPES[dtype_name]
        self.ema_dtype = TORCH_DTYPES[ema_dtype]
        self.rounded = [0] * samples
        self.updates = [0] * samples
        self.moved_sq = self.moved_fp32_sq = 0.0
        self.unchanged = self.unchanged_fp32 = self.values = 0

    def write_rows(self, name: str, rows: np.ndarray) -> None:
        if name not in self.float_names:
            return
        torch = self.torch
        values = self.to_torch(np.ascontiguousarray(rows), self.out_dtypes[name]).to(torch.float64)
        ema = ema_last = start = None
        for (role, i), data in zip(self.roles, values):
            if role == "ema":
                ema = data
            elif role == "theta" and ema is not None:
                self._count_rounding(i, ema, data)
                if i == self.last:
                    ema_last = ema
            elif role == "start":
                start = data
            elif role == "trainer" and ema_last is not None and start is not None:
                self._compare(data, ema_last, start)

    def _count_rounding(self, i: int, ema: torch.Tensor, theta: torch.Tensor) -> None:
        torch = self.torch
        # ulp of x in a format with p significand bits: 2^(e - p) with x = m 2^e, 0.5 <= |m| < 1 (frexp)
        stored = ema.to(self.dtype).to(torch.float64)
        _, exponent = torch.frexp(stored)
        half_ulp = torch.exp2((exponent.clamp(min=self.min_exponent) - self.bits - 1).to(torch.float64))
        update = (1.0 - self.decay) * (theta - ema)
        nonzero = update != 0
        self.updates[i] += int(nonzero.sum())
        self.rounded[i] += int((nonzero & (update.abs() < half_ulp)).sum())

    def _compare(self, trainer: torch.Tensor, fp32_ema: torch.Tensor, start: torch.Tensor) -> None:
        self.moved_sq += float(((trainer - start) ** 2).sum())
        self.moved_fp32_sq += float(((fp32_ema - start) ** 2).sum())
        start_stored = start.to(self.ema_dtype)
        self.unchanged += int((trainer.to(self.ema_dtype) == start_stored).sum())
        self.unchanged_fp32 += int((fp32_ema.to(self.ema_dtype) == start_stored).sum())
        self.values += trainer.numel()


def _open_trainer_ema(
    path: str | os.PathLike, checkpoints: list[Checkpoint], key: str | None, component: Sequence[str] | None
) -> Checkpoint:
    """The trainer's EMA as a column of the plan (its step is the last checkpoint's); same tensors required."""
    path = Path(path)
    for c in checkpoints:
        if c.path.exists() and path.exists() and os.path.samefile(c.path, path):
            raise InputError(
                f"{path}: --ema is also one of the checkpoints; give the trainer's EMA apart from the series"
            )
    source = open_checkpoint(path, key=key, component=component)
    trainer = Checkpoint(source, checkpoints[-1].step, StepInfo(checkpoints[-1].step, "--ema"))
    normalise_keys([*checkpoints, trainer])
    check_compatible([trainer, checkpoints[-1]])
    return trainer


def _default_dtype(checkpoint: Checkpoint) -> str:
    """The most common float dtype of a checkpoint, as bf16/fp16/fp32."""
    kinds = [t.dtype for t in checkpoint.source.tensors.values() if t.is_float]
    return DTYPE_NAMES.get(max(set(kinds), key=kinds.count), "fp32") if kinds else "fp32"


def _round_decay(half_life: float) -> str:
    """The decay of a half-life, with 1 - decay to two significant digits: 40 steps -> ``0.983``."""
    one_minus = Decimal(f"{1.0 - kernels.half_life_to_decay(half_life):.2g}")
    return format(Decimal(1) - one_minus, "f")


def describe_diagnosis(d: Diagnosis) -> list[str]:
    """The report in plain words and numbers."""
    start = "the base model (--init)" if d.init else f"the first checkpoint (step {d.steps[0]})"
    spacing = (
        "one checkpoint"
        if d.gaps is None
        else ("every step" if d.gaps[0] == 1 else f"every {d.gaps[0]} steps")
        if d.gaps[0] == d.gaps[1]
        else f"gaps of {d.gaps[0]} to {d.gaps[1]} steps (median {d.spacing:g})"
    )
    lines = [
        f"run        {len(d.steps) - 1} checkpoints, steps {d.steps[1]} to {d.steps[-1]} ({spacing}), and the base model "
        "(--init) at step 0"
        if d.init and len(d.steps) > 1
        else f"run        {len(d.steps)} checkpoints, steps {d.steps[0]} to {d.steps[-1]} ({spacing})",
        f"           run length {d.run_length} steps",
    ]
    if d.decay is not None and d.half_life is not None:
        verdict = ""
        if d.half_life_share is not None and d.half_life_share > 0.5:
            verdict = ": too long for this run"
        elif d.spacing and d.half_life < d.spacing:
            verdict = ": shorter than the spacing of the checkpoints; the EMA is mostly the last checkpoint"
        of_run = f" = {d.half_life_share:.1%} of the run" if d.half_life_share is not None else ""
        lines.append(f"decay      {d.decay:g}: half-life {d.half_life:.4g} steps{of_run}{verdict}")
        lines.append(f"           {start} keeps {d.start_share:.1%} of the EMA at step {d.steps[-1]}")
    if d.rounding_share is not None:
        shares = [s["share"] for s in d.rounding_samples]
        lines.append(
            f"{d.dtype:<10} {d.rounding_share:.1%} of the per-step updates (1 - decay)(theta - ema) would round to "
            f"zero in an EMA kept in {d.dtype} (below half a unit in the last place of the EMA)"
        )
        lines.append(
            f"           ({len(shares)} checkpoints sampled, steps {d.rounding_samples[0]['step']} to "
            f"{d.rounding_samples[-1]['step']}: {min(shares):.1%} to {max(shares):.1%})"
        )
        if d.rounding_share > 0.5:
            lines.append(f"           most updates are lost: an EMA kept in {d.dtype} at this decay barely learns")
        elif d.rounding_share > 0.1:
            lines.append(f"           many updates are lost: an EMA kept in {d.dtype} at this decay lags behind")
    if d.trainer_ema is not None:
        t = d.trainer_ema
        lines.append(f"trainer    {t.path} ({t.dtype})")
        lines.append(
            f"           moved {t.ratio:.1%} as far from {start} as the FP32 EMA of the same decay "
            f"(norms {t.moved:.4g} and {t.moved_fp32:.4g})"
        )
        lines.append(
            f"           {t.unchanged_share:.1%} of its values never changed (the FP32 EMA rounded to {t.dtype}: "
            f"{t.unchanged_share_fp32:.1%})"
        )
    if d.estimate is not None and d.decay is not None:
        lines.append(
            f"estimate   sig ~{d.estimate['sig']:.2g} against the per-step EMA of decay {d.decay:g} with these "
            "checkpoints (docs/estimate.md)"
        )
        for warning in d.estimate["warnings"]:  # type: ignore[attr-defined]
            lines.append(f"           {warning}")
        if d.save_every is not None and d.target_sig is not None:
            beyond = " (more than this run's spacing: extrapolated)" if d.gaps and d.save_every > d.gaps[1] else ""
            lines.append(
                f"next run   to reach sig <= {d.target_sig:g} at decay {d.decay:g}, save a checkpoint every "
                f"{d.save_every} steps{beyond} (predicted sig {d.save_every_sig:.2g}, from this run's statistics)"
            )
    if d.command:
        halves = ", ".join(f"{h:.3g}" for h in d.recommended_half_lives)
        lines.append(
            f"try        post-hoc EMAs with half-lives of 2.5%, 5%, 10% and 20% of the run ({halves} steps) "
            f"and power EMAs of sigma_rel {', '.join(d.recommended_sigma_rel)}:"
        )
        lines.append(f"           {d.command}")
    return lines
