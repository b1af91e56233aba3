"""EDM2 post-hoc EMA: plan the reconstruction of any EMA from saved snapshots of power-function EMAs.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (CVPR 2024), §3.2
and Appendix C.2; SPEC §4. The trainer tracked a few power EMAs (say sigma_rel 0.05 and 0.10) and saved
all of them every N steps. Each snapshot's profile is known, so the target profile (a power EMA, or a
classic exponential one) is fitted by a linear combination of the snapshots' profiles
(:func:`ckpt_ema.math.reconstruct.solve_reconstructions`); that combination is the coefficient row of an
ordinary :class:`~ckpt_ema.plan.model.Plan`, applied by the one streaming pass like every other method.

Snapshots are found in two layouts:

* safetensors files whose names end in ``-{step}-{sigma_rel}``, e.g. ``ema-0001000-0.050.safetensors``
  (EDM2's naming); the step may also come from the file's metadata (``step``, ``global_step``);
* ema-pytorch ``PostHocEMA`` folders of ``{index}.{step}.pt`` files, where ``index`` is the position of the
  profile in the trainer's ``sigma_rels`` (the order of ``--tracked-sigma-rel``). They are read with
  ``torch.load(weights_only=True, mmap=True)`` only; the tensors under ``ema_model.`` are the weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ckpt_ema.errors import InputError, StepError, TargetError
from ckpt_ema.io import CheckpointSource, Part, TensorMeta, WeightFile, open_checkpoint
from ckpt_ema.io.source import dtype_name
from ckpt_ema.io.torch_pickle import load_pickle
from ckpt_ema.math.ema import gamma_to_sigma_rel
from ckpt_ema.math.reconstruct import solve_reconstructions, tracked_gammas, truncated_exp_sigma_rel
from ckpt_ema.plan.model import OutputPlan, Plan, plan_tensors
from ckpt_ema.plan.targets import Target
from ckpt_ema.series.load import Checkpoint, check_compatible, discover_inputs, natural_key
from ckpt_ema.series.steps import StepInfo, step_from_metadata, step_from_name

# ema-pytorch PostHocEMA snapshot file: {index into sigma_rels}.{step}.pt
EMA_PYTORCH_NAME = re.compile(r"(?P<index>\d+)\.(?P<step>\d+)\.pt")
EMA_PYTORCH_PREFIX = "ema_model."
# A name ending in the snapshot's sigma_rel (EDM2: network-snapshot-0001000-0.050): the rest, then sigma.
SIGMA_IN_NAME = re.compile(r"(?P<rest>.*)-(?P<sigma>\d*\.\d+)")
# Names round sigma_rel (EDM2 writes 3 decimals); a name matches a tracked profile within this distance.
NAME_SIGMA_TOLERANCE = 5.01e-4

# Warn when the fitted profile is this far (relative L2) from the target ...
LARGE_FIT_ERROR = 0.01
# ... or when the coefficients cancel this much (sum |x|): noise and rounding in the snapshots grow by it.
LARGE_ABS_SUM = 10.0
# Above this condition number solve_reconstruction uses a least-squares solve with a cutoff.
LARGE_CONDITION = 1e8


def open_ema_pytorch(path: Path) -> CheckpointSource:
    """One ema-pytorch ``PostHocEMA`` snapshot file as a checkpoint source (tensors named without prefix).

    Loaded only with ``torch.load(weights_only=True, mmap=True)`` (``readers.torch_pickle.load_pickle``):
    no code from the file runs, and tensor data stays in the page cache until the engine reads it. The
    weights are the entries under ``ema_model.``; ``initted`` and ``step`` (bool/int64, or FP16 in newer
    versions) are the EMA's own bookkeeping and are left out.
    """
    state = load_pickle(path)
    if not isinstance(state, Mapping):
        raise InputError(f"{path}: not an ema-pytorch snapshot (holds a {type(state).__name__}, not a state dict)")
    tensors: dict[str, TensorMeta] = {}
    for key, value in state.items():
        if isinstance(key, str) and key.startswith(EMA_PYTORCH_PREFIX) and isinstance(value, torch.Tensor):
            dtype = dtype_name(value.dtype)
            if dtype is None:
                raise InputError(f"{path}: tensor {key!r} has unsupported dtype {value.dtype}")
            tensors[key] = TensorMeta(dtype, tuple(value.shape))
    if not tensors:
        raise InputError(f"{path}: no {EMA_PYTORCH_PREFIX!r} tensors; not an ema-pytorch PostHocEMA snapshot")
    del state  # reopened lazily, when the engine reads the data
    weight_file = WeightFile(
        path.name, path, tensors, {}, lambda: _StateDictFile(load_pickle(path)), path.stat().st_size
    )
    source = CheckpointSource(path, "ema-pytorch PostHocEMA snapshot (weights_only)", [Part("", [weight_file])])
    source.rename({key: key[len(EMA_PYTORCH_PREFIX) :] for key in tensors})
    return source


class _StateDictFile:
    """``flat(stored_name)`` over a loaded state dict (views into the memory-mapped file)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state

    def flat(self, name: str) -> torch.Tensor:
        return self.state[name].contiguous().reshape(-1)


def load_snapshots(
    inputs: Sequence[str | os.PathLike],
    gammas: Sequence[float],
    steps: Sequence[int] | None = None,
) -> list[Checkpoint]:
    """Find the EMA snapshots among ``inputs``, with each one's step and tracked profile, sorted by step.

    Args:
        inputs: snapshot files, folders of safetensors snapshots, or ema-pytorch ``PostHocEMA`` folders.
        gammas: the tracked profiles' exponents in the user's order (see ``reconstruct.tracked_gammas``).
        steps: explicit steps, one per snapshot file (folders expanded in name order).

    Raises:
        InputError, StepError, SeriesError: with a one-line message naming the file.
    """
    paths = discover_inputs([p for item in inputs for p in _expand_ema_pytorch(Path(item))])
    if steps is not None and len(steps) != len(paths):
        raise StepError(f"--steps gives {len(steps)} steps for {len(paths)} snapshots")
    snapshots = []
    for position, path in enumerate(paths):
        override = None if steps is None else StepInfo(int(steps[position]), "--steps")
        snapshots.append(_snapshot(path, gammas, override))
    rank = {g: i for i, g in enumerate(gammas)}
    snapshots.sort(key=lambda c: (c.step, rank[c.tracked_gamma]))
    for a, b in zip(snapshots, snapshots[1:]):
        if (a.step, a.tracked_gamma) == (b.step, b.tracked_gamma):
            raise StepError(
                f"{a.path} and {b.path} are both the sigma_rel {_sigma(a):.4g} snapshot at step {a.step} "
                f"({a.step_info.source}; {b.step_info.source})"
            )
    if snapshots[0].step <= 0:
        raise StepError(f"{snapshots[0].path}: an EMA snapshot must be at a step > 0, got {snapshots[0].step}")
    check_compatible(snapshots)
    return snapshots


def plan_posthoc(
    inputs: Sequence[str | os.PathLike],
    targets: Sequence[Target],
    tracked_sigma_rel: Sequence[float | str] = (),
    tracked_gamma: Sequence[float | str] = (),
    at: int | None = None,
    steps: Sequence[int] | None = None,
    init: str | os.PathLike | None = None,
    per_checkpoint: bool = False,
    dtype: str = "same",
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
    dtype: str = "same",
) -> Plan:
    """Plan each target as a combination of the power-EMA snapshots at or before step ``at`` (SPEC §4).

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
    kinds = [("gamma", t.gamma) if t.is_power else ("decay", t.decay) for t in targets]
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
        tensors=plan_tensors(used, dtype),
    )
    return replace(plan, warnings=tuple(_warnings(plan, targets)))


def target_sigma_rel(target: Target, target_step: int) -> float:
    """The target profile's width relative to T: sigma_rel itself, or that of the truncated exponential."""
    if target.is_power:
        return gamma_to_sigma_rel(target.gamma)
    return truncated_exp_sigma_rel(target_step, target.decay)


def _warnings(plan: Plan, targets: Sequence[Target]) -> list[str]:
    warnings = []
    tracked = sorted({_sigma(c) for c in plan.checkpoints})
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


def _expand_ema_pytorch(path: Path) -> list[Path]:
    """An ema-pytorch folder to its ``{index}.{step}.pt`` files; anything else unchanged."""
    if not path.is_dir():
        return [path]
    found = sorted((p for p in path.iterdir() if p.is_file() and EMA_PYTORCH_NAME.fullmatch(p.name)), key=natural_key)
    return found or [path]


def _snapshot(path: Path, gammas: Sequence[float], override: StepInfo | None) -> Checkpoint:
    ema_pytorch = EMA_PYTORCH_NAME.fullmatch(path.name)
    if ema_pytorch:
        index = int(ema_pytorch["index"])
        if index >= len(gammas):
            raise InputError(
                f"{path}: ema-pytorch snapshot of profile {index}, but only {len(gammas)} tracked profile(s) "
                "are given; list all of the trainer's sigma_rels, in order, with --tracked-sigma-rel"
            )
        step = override or StepInfo(int(ema_pytorch["step"]), f"ema-pytorch name {path.name!r}")
        return Checkpoint(open_ema_pytorch(path), step.step, step, tracked_gamma=gammas[index])
    if path.suffix != ".safetensors":
        raise InputError(
            f"{path}: not an EMA snapshot; expected NAME-STEP-SIGMA.safetensors (e.g. ema-0001000-0.050."
            "safetensors) or an ema-pytorch INDEX.STEP.pt file"
        )
    source = open_checkpoint(path)
    named = SIGMA_IN_NAME.fullmatch(path.stem)
    step = override or _safetensors_step(path, named["rest"] if named else path.stem, source.metadata)
    return Checkpoint(source, step.step, step, tracked_gamma=_tracked_gamma(path, named, gammas))


def _safetensors_step(path: Path, stem: str, metadata: dict[str, str]) -> StepInfo:
    # The number before the sigma_rel is the step by convention (EDM2), so a bare one is not ambiguous here.
    named = step_from_name(stem)
    recorded = step_from_metadata(metadata)
    if recorded is not None:
        if named is not None and named[0] != recorded[0]:
            raise StepError(
                f"{path}: the trainer's {recorded[1]} says step {recorded[0]} but the name says {named[0]}; "
                "pass --steps to say which is right"
            )
        return StepInfo(recorded[0], recorded[1])
    if named is not None:
        return StepInfo(named[0], f"name {path.name!r}")
    raise StepError(
        f"{path}: no step found (name is not NAME-STEP-SIGMA, no step metadata); pass --steps S0,S1,... "
        "(one per snapshot, in the order given)"
    )


def _tracked_gamma(path: Path, named: re.Match[str] | None, gammas: Sequence[float]) -> float:
    if named is None:
        if len(gammas) == 1:
            return gammas[0]
        raise InputError(
            f"{path}: the name does not end in the snapshot's sigma_rel (NAME-STEP-SIGMA.safetensors), so it "
            "cannot be matched to one of the tracked profiles"
        )
    sigma = float(named["sigma"])
    distance, gamma = min((abs(gamma_to_sigma_rel(g) - sigma), g) for g in gammas)
    if distance > NAME_SIGMA_TOLERANCE:
        listed = ", ".join(f"{gamma_to_sigma_rel(g):.4g}" for g in gammas)
        raise InputError(
            f"{path}: snapshot of sigma_rel {named['sigma']}, which is not a tracked profile ({listed}); "
            "add it to --tracked-sigma-rel"
        )
    return gamma


def _sigma(checkpoint: Checkpoint) -> float:
    return gamma_to_sigma_rel(float(checkpoint.tracked_gamma))  # type: ignore[arg-type]
