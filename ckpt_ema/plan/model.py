"""What will be computed, checked from headers alone: a coefficient matrix (outputs x checkpoints).

Every method (classic EMA, power EMA, per-checkpoint updates, later reconstructions and sweeps) only
builds this matrix; the engine applies it in one streaming pass over the checkpoints.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ckpt_ema import __version__
from ckpt_ema.errors import TargetError
from ckpt_ema.io import is_lora_alpha
from ckpt_ema.math import ema as kernels
from ckpt_ema.plan.targets import Target
from ckpt_ema.series.load import Checkpoint

OUTPUT_DTYPES = {"same": None, "fp32": "F32", "bf16": "BF16", "fp16": "F16"}
LARGE_FIRST_SHARE = 0.10
# Reconstruction outputs (posthoc.py) carry these in their params; to_json also shows them per output.
FIT_DIAGNOSTICS = ("condition_number", "abs_sum", "fit_error")


@dataclass(frozen=True)
class OutputPlan:
    """One output: its name, what it is, and the coefficient of each checkpoint of the plan."""

    name: str
    method: str
    params: dict[str, float]
    coefficients: tuple[float, ...]


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the outputs: averaged when floating point, copied from the newest checkpoint if not."""

    name: str
    shape: tuple[int, ...]
    is_float: bool
    out_dtype: str  # safetensors dtype name of the output


@dataclass(frozen=True)
class Plan:
    """The whole computation; ``checkpoints`` are the ones used (sorted by step, last one at ``target_step``)."""

    checkpoints: tuple[Checkpoint, ...]
    ignored: tuple[Checkpoint, ...]
    target_step: int
    interp: str
    per_checkpoint: bool
    outputs: tuple[OutputPlan, ...]
    tensors: tuple[TensorPlan, ...]
    warnings: tuple[str, ...] = field(default=())

    @property
    def newest(self) -> Checkpoint:
        return self.checkpoints[-1]

    def coefficient_matrix(self) -> np.ndarray:
        """Float64 array (outputs x checkpoints); each row sums to 1."""
        return np.array([o.coefficients for o in self.outputs], dtype=np.float64).reshape(len(self.outputs), -1)

    def provenance(self, output: OutputPlan) -> dict[str, str]:
        """``ckpt_ema.*`` metadata for one output (SPEC §6)."""
        meta = {
            "ckpt_ema.version": __version__,
            "ckpt_ema.method": output.method,
            "ckpt_ema.target": output.name,
            "ckpt_ema.target_step": str(self.target_step),
            "ckpt_ema.interp": "per-checkpoint" if self.per_checkpoint else self.interp,
        }
        meta.update({f"ckpt_ema.{k}": repr(float(v)) for k, v in output.params.items()})
        for index, (ckpt, coef) in enumerate(zip(self.checkpoints, output.coefficients)):
            meta[f"ckpt_ema.input.{index}.path"] = str(ckpt.path)
            meta[f"ckpt_ema.input.{index}.step"] = str(ckpt.step)
            for key, value in _profile_json(ckpt).items():  # EMA snapshots: the tracked profile
                meta[f"ckpt_ema.input.{index}.{key}"] = repr(value)
            meta[f"ckpt_ema.input.{index}.coefficient"] = repr(float(coef))
        return meta

    @property
    def spacing(self) -> float:
        """Median gap between consecutive checkpoints, in steps (0 for a single checkpoint)."""
        steps = [c.step for c in self.checkpoints]
        return float(statistics.median(b - a for a, b in zip(steps, steps[1:]))) if len(steps) > 1 else 0.0

    def equivalents(self, output: OutputPlan) -> dict[str, float]:
        """How wide the output's profile is, in every unit: half-life in steps and in checkpoints, sigma_rel.

        Classic targets: ``sigma_rel ~ sqrt(beta) / (1 - beta) / T`` (the untruncated profile's standard
        deviation relative to T). Power targets: the per-step decay at T, ``(1 - 1/T)**(gamma + 1)``.
        """
        total = self.target_step
        result: dict[str, float] = {"first_share": output.coefficients[0], "last_share": output.coefficients[-1]}
        if output.method == "classic":
            decay = output.params["decay"]
            result["half_life"] = kernels.decay_to_half_life(decay)
            if total > 0:
                result["sigma_rel"] = math.sqrt(decay) / (1.0 - decay) / total
        elif output.method == "power" and total > 0:
            decay = (1.0 - 1.0 / total) ** (output.params["gamma"] + 1.0) if total > 1 else 0.0
            result["decay_at_target"] = decay
            if 0.0 < decay < 1.0:
                result["half_life"] = kernels.decay_to_half_life(decay)
        if "half_life" in result and self.spacing > 0:
            result["half_life_checkpoints"] = result["half_life"] / self.spacing
        return result

    def to_json(self) -> dict[str, object]:
        """Machine-readable summary: ``{"outputs": [{"name", "target", "inputs": [{path, step, coefficient}]}]}``."""
        return {
            "target_step": self.target_step,
            "interp": "per-checkpoint" if self.per_checkpoint else self.interp,
            "checkpoints": [_checkpoint_json(c) for c in self.checkpoints],
            "ignored": [_checkpoint_json(c) for c in self.ignored],
            "outputs": [
                {
                    "name": o.name,
                    "target": {"method": o.method, **o.params},
                    "equivalents": self.equivalents(o),
                    **{k: o.params[k] for k in FIT_DIAGNOSTICS if k in o.params},
                    "inputs": [
                        {"path": str(c.path), "step": c.step, **_profile_json(c), "coefficient": coef}
                        for c, coef in zip(self.checkpoints, o.coefficients)
                    ],
                }
                for o in self.outputs
            ],
            "warnings": list(self.warnings),
        }


def plan_ema(
    checkpoints: Sequence[Checkpoint],
    targets: Sequence[Target],
    at: int | None = None,
    interp: str = "linear",
    per_checkpoint: bool = False,
    dtype: str = "same",
) -> Plan:
    """Plan classic and power-function EMAs of a sorted series at step ``at`` (default: the last step).

    Raises:
        TargetError: no target, ``at`` not the step of a checkpoint of the series, bad ``interp``/``dtype``.
    """
    if not targets:
        raise TargetError("no target given: add --decay, --half-life, --sigma-rel or --gamma")
    if interp not in kernels.INTERPOLATIONS:
        raise TargetError(f"--interp must be one of {', '.join(kernels.INTERPOLATIONS)}, got {interp!r}")
    used, ignored = split_at(checkpoints, at)
    steps = [c.step for c in used]
    if any(t.is_power for t in targets) and steps[-1] == 0:
        raise TargetError("a power-function EMA (--sigma-rel/--gamma) needs a target step > 0")
    outputs = []
    for target in targets:
        coefs = target.coefficients(steps, interp, per_checkpoint)
        method = "power" if target.is_power else "classic"
        outputs.append(OutputPlan(target.name, method, target.describe(), tuple(float(c) for c in coefs)))
    plan = Plan(
        checkpoints=tuple(used),
        ignored=tuple(ignored),
        target_step=steps[-1],
        interp=interp,
        per_checkpoint=per_checkpoint,
        outputs=tuple(outputs),
        tensors=plan_tensors(used, dtype),
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


def plan_tensors(checkpoints: Sequence[Checkpoint], dtype: str = "same") -> tuple[TensorPlan, ...]:
    """Output tensors in name order within each weight file of the newest checkpoint; float ones take
    ``dtype`` (``same``: the newest checkpoint's dtype)."""
    if dtype not in OUTPUT_DTYPES:
        raise TargetError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    source = checkpoints[-1].source
    forced = OUTPUT_DTYPES[dtype]
    plans = []
    # file by file (a sharded folder is then read one shard at a time), by name within a file
    for name, info in sorted(source.tensors.items(), key=lambda item: (source.file_number(item[0]), item[0])):
        averaged = info.is_float and not is_lora_alpha(name)  # LoRA alphas are copied like integer buffers
        plans.append(TensorPlan(name, info.shape, averaged, (forced or info.dtype) if averaged else info.dtype))
    return tuple(plans)


def _with_warnings(plan: Plan, targets: Sequence[Target]) -> Plan:
    warnings: list[str] = []
    steps = [c.step for c in plan.checkpoints]
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    spacing = plan.spacing
    if gaps and max(gaps) > 2 * min(gaps):
        warnings.append(
            f"steps are unevenly spaced (gaps of {min(gaps)} to {max(gaps)} steps): "
            "the weights between distant checkpoints are interpolated more coarsely"
        )
    guessed = [c for c in plan.checkpoints if getattr(c.source, "other_keys", None)]
    if guessed:  # a torch file holding several state dicts (e.g. timm's state_dict and state_dict_ema)
        source = guessed[0].source
        warnings.append(
            f"{len(guessed)} torch file(s) hold several state dicts; took {source.state_dict_key!r} "  # type: ignore[attr-defined]
            f"(also found {', '.join(map(repr, source.other_keys))} in {source.path.name}); pass --key to choose"  # type: ignore[attr-defined]
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
        if len(steps) > 1 and share >= LARGE_FIRST_SHARE:
            warnings.append(
                f"{output.name}: {first} keeps {share:.0%} of the weight; the EMA is long for this "
                f"{steps[-1] - steps[0]}-step series"
            )
        if not target.is_power and not plan.per_checkpoint and gaps:
            half_life = kernels.decay_to_half_life(target.decay)
            if half_life < spacing:
                warnings.append(
                    f"{output.name}: the half-life ({half_life:.3g} steps) is shorter than the spacing of "
                    f"the checkpoints ({spacing:g} steps); the last checkpoint gets "
                    f"{output.coefficients[-1]:.0%} and the result rests on interpolation"
                )
    return replace(plan, warnings=tuple(warnings))


def _checkpoint_json(c: Checkpoint) -> dict[str, object]:
    return {
        "path": str(c.path),
        "step": c.step,
        "step_source": c.step_info.source,
        "ambiguous_step": c.step_info.ambiguous,
        "init": c.is_init,
        **_profile_json(c),
        **_reader_json(c),
    }


def _reader_json(c: Checkpoint) -> dict[str, object]:
    """What the reader understood: the format, its choices (``--key``, prefixes) and the files not read."""
    source = c.source
    if not hasattr(source, "format"):
        return {}
    return {
        "format": source.format,
        "notes": list(source.notes),
        "ignored": [{"path": n.relpath, "reason": n.reason} for n in source.ignored],
    }


def _profile_json(c: Checkpoint) -> dict[str, float]:
    """For a snapshot of a power-function EMA (reconstruction), its tracked profile."""
    if c.tracked_gamma is None:
        return {}
    return {"sigma_rel": kernels.gamma_to_sigma_rel(c.tracked_gamma), "gamma": c.tracked_gamma}
