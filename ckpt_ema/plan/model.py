"""What will be computed, known from headers alone: a coefficient matrix (outputs x checkpoints).

Every method (classic EMA, power EMA, per-checkpoint updates, later reconstructions and sweeps) only
builds this matrix; the engine applies it in one streaming pass over the checkpoints.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckpt_ema import __version__
from ckpt_ema.errors import TargetError
from ckpt_ema.io import is_lora_alpha
from ckpt_ema.io.safetensors_format import DTYPES
from ckpt_ema.math import ema as kernels
from ckpt_ema.plan.kinds import METHODS
from ckpt_ema.series.lengths import StepSize
from ckpt_ema.series.load import Checkpoint

# auto: the inputs' dtype for an EMA of raw weights, FP32 for a reconstruction (plan/posthoc.py)
OUTPUT_DTYPES = {"auto": None, "same": None, "fp32": "F32", "bf16": "BF16", "fp16": "F16"}
# Equivalents that are lengths in steps: Plan.equivalents adds them in tokens/samples (``half_life_tokens``).
LENGTH_KEYS = ("half_life", "length")
# Reconstruction outputs (posthoc.py) carry these in their params; to_json also shows them per output.
FIT_DIAGNOSTICS = ("condition_number", "abs_sum", "fit_error")


@dataclass(frozen=True)
class OutputPlan:
    """One output: its name, what it is, and the coefficient of each checkpoint of the plan."""

    name: str
    method: str
    params: dict[str, float]
    coefficients: tuple[float, ...]
    labels: dict[str, str] = field(default_factory=dict)  # textual parameters, e.g. an lr-decay's shape


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the outputs: averaged when floating point, copied from the newest checkpoint if not."""

    name: str
    shape: tuple[int, ...]
    is_float: bool
    out_dtype: str  # safetensors dtype name of the output

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor in the output."""
        return math.prod(self.shape) * DTYPES[self.out_dtype][1]


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
    step_size: StepSize | None = None  # tokens/samples per step, when known (lengths shown in them too)
    notes: tuple[str, ...] = field(default=())  # choices made for the user that are not warnings (output dtype)

    @property
    def newest(self) -> Checkpoint:
        return self.checkpoints[-1]

    def coefficient_matrix(self) -> np.ndarray:
        """Float64 array (outputs x checkpoints); each row sums to 1."""
        return np.array([o.coefficients for o in self.outputs], dtype=np.float64).reshape(len(self.outputs), -1)

    def provenance(self, output: OutputPlan) -> dict[str, str]:
        """``ckpt_ema.*`` metadata for one output (spec §6)."""
        meta = {
            "ckpt_ema.version": __version__,
            "ckpt_ema.method": output.method,
            "ckpt_ema.target": output.name,
            "ckpt_ema.target_step": str(self.target_step),
            "ckpt_ema.interp": "per-checkpoint" if self.per_checkpoint else self.interp,
        }
        meta.update({f"ckpt_ema.{k}": repr(float(v)) for k, v in output.params.items()})
        meta.update({f"ckpt_ema.{k}": v for k, v in output.labels.items()})
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
        """How wide the output's profile is, in every unit its kind knows (half-life in steps and in
        checkpoint spacings, sigma_rel, the decay at T), with the first and last checkpoints' shares."""
        result: dict[str, float] = {"first_share": output.coefficients[0], "last_share": output.coefficients[-1]}
        family = METHODS.get(output.method)
        if family is not None:
            result.update(family.equivalents(output.params, self.target_step))
        if "half_life" in result and self.spacing > 0:
            result["half_life_checkpoints"] = result["half_life"] / self.spacing
        for key in LENGTH_KEYS:  # lengths in steps, also in tokens/samples when the step size is known
            for unit in ("tokens", "samples"):
                per_step = self.step_size.per_step(unit) if self.step_size is not None else None
                if key in result and per_step:
                    result[f"{key}_{unit}"] = result[key] * per_step
        return result

    def to_json(self) -> dict[str, Any]:
        """Machine-readable summary: ``{"outputs": [{"name", "target", "inputs": [{path, step, coefficient}]}]}``."""
        return {
            "target_step": self.target_step,
            "interp": "per-checkpoint" if self.per_checkpoint else self.interp,
            **({"step_size": self.step_size.to_json()} if self.step_size is not None else {}),
            "checkpoints": [_checkpoint_json(c) for c in self.checkpoints],
            "ignored": [_checkpoint_json(c) for c in self.ignored],
            "outputs": [
                {
                    "name": o.name,
                    "target": {"method": o.method, **o.params, **o.labels},
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
            "notes": list(self.notes),
        }


def plan_tensors(checkpoints: Sequence[Checkpoint], dtype: str = "auto") -> tuple[TensorPlan, ...]:
    """Output tensors in the newest checkpoint's order: file by file, and within a file in the order of its
    bytes (by name where the reader knows no byte range); float ones take ``dtype`` (``same``: the newest
    checkpoint's dtype).

    The order of the bytes matters: the pass reads every file front to back, and the inputs' hash, which
    rides on that read, would otherwise read the file a second time (``jobs/integrity.py``)."""
    if dtype not in OUTPUT_DTYPES:
        raise TargetError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    source = checkpoints[-1].source
    forced = OUTPUT_DTYPES[dtype]
    plans = []

    def place(name: str) -> tuple[int, int, str]:
        where = source.locate(name)
        return (source.file_number(name), where[1] if where is not None else 0, name)

    # file by file (a sharded folder is then read one shard at a time), in file order within a file
    for name, info in sorted(source.tensors.items(), key=lambda item: place(item[0])):
        averaged = info.is_float and not is_lora_alpha(name)  # LoRA alphas are copied like integer buffers
        plans.append(TensorPlan(name, info.shape, averaged, (forced or info.dtype) if averaged else info.dtype))
    return tuple(plans)


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
