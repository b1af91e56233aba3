"""The Python API, which the command line uses too: plan, then run the one streaming pass.

>>> from ckpt_ema import plan_merge, merge, merge_to_state_dict
>>> plan = plan_merge(["runs/"], decay=[0.999], sigma_rel=[0.1])   # headers only
>>> plan.coefficient_matrix()                                       # (outputs x checkpoints)
>>> merge(["runs/"], "ema.safetensors", decay=[0.999])              # -> [Path("ema.safetensors")]
>>> merge_to_state_dict(["runs/"], decay=[0.999])["decay-0.999"]    # {name: tensor}
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ckpt_ema.engine.merge_pass import RANGE_LIMITED, MemorySink, MergePass
from ckpt_ema.errors import OutputError, StrictError, TargetError
from ckpt_ema.io.source import FileNote
from ckpt_ema.jobs.estimate import EstimateGatherer, not_estimated
from ckpt_ema.jobs.integrity import (
    HASH_WIDTH,
    InputHasher,
    check_inputs_unchanged,
    diverged_checkpoints,
    hash_key,
)
from ckpt_ema.math.estimate import Estimate
from ckpt_ema.output.layouts import open_output, output_metadata, writes_dcp, writes_export_folder
from ckpt_ema.output.lock import OutputLock
from ckpt_ema.output.paths import output_mode, output_paths
from ckpt_ema.output.shards import DEFAULT_MAX_SHARD_BYTES, parse_size
from ckpt_ema.output.writer import (
    OutputWriter,
    WriteOptions,
    check_free_space,
    output_size,
    remove_own_temp,
    remove_stale_temps,
)
from ckpt_ema.plan.ema import plan_ema
from ckpt_ema.plan.model import Plan
from ckpt_ema.plan.posthoc import plan_posthoc
from ckpt_ema.plan.targets import in_steps, parse_targets
from ckpt_ema.series.discover import discover_inputs
from ckpt_ema.series.lengths import StepSize, check_per_step, parse_length, step_size_from_record, whole_steps_of
from ckpt_ema.series.load import load_series

if TYPE_CHECKING:
    import torch

Numbers = Sequence[float | str]
DTYPE_WORDS = {"F16": "FP16", "F8_E4M3": "FP8 E4M3", "F8_E5M2": "FP8 E5M2"}


def plan_merge(
    inputs: Sequence[str | os.PathLike],
    *,
    decay: Numbers = (),
    half_life: Numbers = (),
    sigma_rel: Numbers = (),
    gamma: Numbers = (),
    at: int | str | None = None,
    steps: Sequence[int] | None = None,
    every: int | str | None = None,
    first: int | str | None = None,
    init: str | os.PathLike | None = None,
    interp: str = "linear",
    per_checkpoint: bool = False,
    dtype: str = "auto",
    key: str | None = None,
    component: Sequence[str] | None = None,
    allow_mixed_runs: bool = False,
    tracked_sigma_rel: Numbers = (),
    tracked_gamma: Numbers = (),
    tokens_per_step: float | str | None = None,
    samples_per_step: float | str | None = None,
    **other_targets: Numbers,
) -> Plan:
    """Find the series, its steps and each output's coefficients, reading only file headers.

    Args:
        inputs: checkpoint files, or folders holding them, in any order (sorted by step).
        decay, half_life, sigma_rel, gamma: targets (decay per optimizer step; half-life in steps).
        at: target step (a checkpoint's step; or a length such as ``"2Btokens"``); default the last one.
            Later checkpoints are ignored.
        steps: explicit steps, one per input file in the order given.
        every, first: the inputs are ``every`` steps apart in name order, the first at ``first`` (default
            ``every``): the short way to give ``steps``; also in tokens or samples (``"2Mtokens"``), which must
            make whole steps at ``tokens_per_step``/``samples_per_step``.
        init: the weights at step 0, e.g. the base model a fine-tune started from.
        interp: ``"linear"`` or ``"hold"``: how the weights move between checkpoints.
        per_checkpoint: each checkpoint is one EMA update (musubi-tuner style), steps ignored.
        dtype: ``"auto"`` (the checkpoints' dtype; FP32 for a reconstruction from EMA snapshots), ``"same"``
            (the checkpoints' dtype), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        key: for torch files, the key of the state dict (default: the usual nestings are searched).
        component: for component folders (diffusers, OneTrainer), the components to average (default: all).
        allow_mixed_runs: accept kohya files from different training sessions (``ss_session_id``).
        tracked_sigma_rel, tracked_gamma: the inputs are snapshots of these power-function EMAs (EDM2,
            ema-pytorch ``PostHocEMA``); each target is then reconstructed from them (see ``posthoc``).
        tokens_per_step, samples_per_step: for lengths given in tokens or samples (``--window 2Btokens``);
            default: from the trainer's record where it has one (``series.lengths.step_size_from_record``).
        other_targets: targets of the other kinds of ``ckpt_ema.plan.kinds`` (``last``, ``window``,
            ``lr_decay``), by option key.
    """
    targets = parse_targets(decay=decay, half_life=half_life, sigma_rel=sigma_rel, gamma=gamma, **other_targets)
    tokens = check_per_step("--tokens-per-step", tokens_per_step)
    samples = check_per_step("--samples-per-step", samples_per_step)
    every, first = whole_steps_of("--every", every, tokens, samples), whole_steps_of("--first", first, tokens, samples)
    if tracked_sigma_rel or tracked_gamma:
        if every is not None or first is not None:
            raise TargetError("--every does not apply to EMA snapshots (several profiles per step); use --steps")
        given = step_size_from_record([], [], tokens, samples)
        return plan_posthoc(
            inputs, in_steps(targets, given), tracked_sigma_rel, tracked_gamma, at=at_step(at, given), steps=steps,
            init=init, per_checkpoint=per_checkpoint, dtype=dtype,
        )  # fmt: skip
    skipped: list[FileNote] = []  # what a series folder holds that looks like a checkpoint but is not one
    discover_inputs(inputs, skipped)
    checkpoints = load_series(
        inputs,
        steps=steps,
        every=every,
        first=first,
        init=init,
        per_checkpoint=per_checkpoint,
        key=key,
        component=component,
        allow_mixed_runs=allow_mixed_runs,
    )
    size = step_size_from_record(checkpoints, [c.source.metadata for c in checkpoints], tokens, samples)
    plan = plan_ema(
        checkpoints, targets, at=at_step(at, size), interp=interp, per_checkpoint=per_checkpoint, dtype=dtype,
        step_size=size,
    )  # fmt: skip
    said = tuple(f"skipped {n.relpath}: {n.reason}" for n in skipped if n.suspicious)
    return replace(plan, warnings=said + plan.warnings) if said else plan


def at_step(at: int | str | None, size: StepSize | None) -> int | None:
    """``--at``: a step (``1000``, ``10k``), or a length in tokens/samples rounded to the nearest step."""
    if at is None or isinstance(at, int):
        return at
    if str(at).strip().isdigit():
        return int(str(at).strip())
    length = parse_length("--at", at)
    return length.whole_steps(size, "--at")


class MergeJob:
    """One pass writing every output of a plan to its file; iterate to run it, then ``commit()``.

    Used as a context manager, any error (or interruption) removes all temporary files; so does
    :func:`abort_live_jobs`, which the command line calls on Ctrl-C and SIGTERM, whatever moment they
    arrive at (even before the job's ``with`` block is entered). Each output is locked for the job's
    lifetime (``OutputLock``): a second run writing the same output is refused. Before writing, the
    outputs must fit in the free space. ``hash_inputs``: the inputs' hashes are computed from the bytes
    the pass reads and recorded as ``ckpt_ema.input.N.blake3`` (``hash_algorithm="sha256"``:
    ``ckpt_ema.input.N.sha256``), with the diverged-checkpoint check, which rides on the same read; off,
    the pass runs at the engine's speed. ``verify``: each file is read back and
    checked before it replaces anything. ``strict``: every warning is an error (``StrictError``) and
    nothing is written. Values beyond the output dtype's range (``--dtype fp16`` of large weights) are
    refused at commit, naming the tensors, unless ``allow_overflow`` (then a warning). ``max_shard_size``
    (``"5GB"``, bytes): the largest shard of a Hugging Face folder exported from DCP or DeepSpeed checkpoints
    (default 5GB; refused for other outputs). ``estimate``: the
    statistics of the error estimate are gathered in the same pass (docs/estimate.md); ``estimates()`` after.
    """

    def __init__(
        self,
        plan: Plan,
        paths: Sequence[Path],
        chunk_elements: int | None = None,  # None: the engine's default for its kernel
        on_warning: Callable[[str], None] | None = None,
        fmt: str | None = None,
        verify: bool = False,
        strict: bool = False,
        hash_inputs: bool = True,
        allow_overflow: bool = False,
        hash_algorithm: str | None = None,
        estimate: bool = True,
        max_shard_size: str | int | None = None,
    ) -> None:
        self.paths = list(paths)
        gatherer = EstimateGatherer(plan) if estimate else None
        self.gatherer = gatherer if gatherer is not None and gatherer.needed else None
        self.allow_overflow = allow_overflow
        self.plan = plan
        self.strict = strict
        self._on_warning = on_warning or (lambda message: None)
        self._hashes: dict[int, str] = {}
        self.hasher: InputHasher | None = None
        self.writers: list[OutputWriter] = []
        self._locks = [OutputLock(path) for path in self.paths]
        shard_bytes = DEFAULT_MAX_SHARD_BYTES if max_shard_size is None else parse_size(max_shard_size)
        if max_shard_size is not None and not any(writes_export_folder(plan, fmt, p) for p in self.paths):
            raise OutputError(
                "--max-shard-size: applies to the Hugging Face folders exported from DCP and DeepSpeed checkpoints "
                "(folder inputs keep the newest checkpoint's shards; a .safetensors output is one file)"
            )
        _LIVE.add(self)
        try:  # from here on, anything raised (an error, a signal) removes what this job created
            for warning in plan.warnings if strict else ():
                self._warn(warning)
            for folder in {p.parent for p in self.paths}:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
                remove_stale_temps(folder)
            for lock in self._locks:
                lock.acquire()
            self.hasher = InputHasher(plan, algorithm=hash_algorithm) if hash_inputs else None
            algorithm = self.hasher.algorithm if self.hasher else ""
            late = {hash_key(i, algorithm): HASH_WIDTH for i in self.hasher.hashed} if self.hasher else {}
            options = WriteOptions(
                verify=verify, late_metadata=late, late_values=self._input_hashes, mode=output_mode(plan),
                max_shard_bytes=shard_bytes,
            )  # fmt: skip
            metadata = [output_metadata(plan, output) for output in plan.outputs]
            check_free_space([(p, output_size(plan.tensors, m, options)) for p, m in zip(self.paths, metadata)])
            for path, meta in zip(self.paths, metadata):
                self.writers.append(open_output(plan, path, meta, fmt, options))
            # inside the guard: an error or Ctrl-C while the pass is laid out removes the temporary files
            self.merge_pass = MergePass(
                plan, self.writers, chunk_elements, self._warn, observer=self.hasher, chunk_sink=self.gatherer,
                chunked=writes_dcp(plan, fmt),  # a DCP output keeps the inputs' chunks (plan.pieces)
            )  # fmt: skip
        except BaseException:
            self.abort()
            raise
        self.total_bytes = self.merge_pass.total_bytes

    def __len__(self) -> int:
        return len(self.merge_pass)

    def __iter__(self) -> Iterator[int]:
        return iter(self.merge_pass)

    def commit(self) -> list[Path]:
        """Finish the inputs' hashes, check for diverged checkpoints and for inputs that changed while being
        read, then finish and rename each output."""
        try:
            if self.merge_pass.overflows:
                self._overflowed(self.merge_pass.overflows)
            if self.hasher is not None:
                self._hashes = self.hasher.finish()
                diverged_checkpoints(self.plan, self.hasher.norms, self._warn)
            check_inputs_unchanged(self.plan)
            for writer in self.writers:
                writer.commit()
        except BaseException:
            self.abort()
            raise
        self._release()
        return self.paths

    def abort(self) -> None:
        """Stop the hashers and remove every temporary file or folder of this job (safe to call twice).

        Besides the writers' own cleanup, the temporary names themselves are removed: a signal can land
        after a writer created its file but before the job knew of the writer. Those names hold this
        process's id and the job holds the outputs' locks, so they can only be this job's.
        """
        if self.hasher is not None:
            self.hasher.cancel()
        merge_pass = getattr(self, "merge_pass", None)
        if merge_pass is not None:
            merge_pass.close()  # its write thread stops before the files are closed under it
        for writer in self.writers:
            writer.abort()
        for path, lock in zip(self.paths, self._locks):
            if lock.held:
                remove_own_temp(path)
        self._release()

    def _release(self) -> None:
        for lock in self._locks:
            lock.release()
        _LIVE.discard(self)

    def estimates(self) -> list[Estimate | None]:
        """Each output's error estimate against the per-step EMA (None where there is none: ``reasons()``)."""
        return self.gatherer.estimates() if self.gatherer else [None] * len(self.plan.outputs)

    def reasons(self) -> list[str | None]:
        """Why each output has no estimate (None where it has one), after ``estimates()``."""
        if self.gatherer is None:
            return [not_estimated(self.plan, o.method) or "--no-estimate" for o in self.plan.outputs]
        return list(self.gatherer.reasons)

    def _warn(self, message: str) -> None:
        if self.strict:
            raise StrictError(f"{message} (--strict: no output written)")
        self._on_warning(message)

    def _overflowed(self, overflows: dict[str, int]) -> None:
        check_overflows(self.plan, overflows, self.allow_overflow, self._warn)

    def _input_hashes(self) -> dict[str, str]:
        algorithm = self.hasher.algorithm if self.hasher else ""
        return {hash_key(i, algorithm): digest for i, digest in self._hashes.items()}

    def __enter__(self) -> MergeJob:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


_LIVE: weakref.WeakSet[MergeJob] = weakref.WeakSet()


def check_overflows(plan: Plan, overflows: dict[str, int], allow: bool, warn: Callable[[str], None]) -> None:
    """Tensors whose FP32 sums were finite but beyond the output dtype's range: an ``OutputError`` naming
    them, or with ``allow`` (``--allow-overflow``) a warning."""
    if not overflows:
        return
    dtypes = {t.name: t.out_dtype for t in plan.tensors}
    kinds = sorted({dtypes[name] for name in overflows})
    ranges = ", ".join(f"{DTYPE_WORDS.get(k, k)} holds at most {RANGE_LIMITED[k]:g}" for k in kinds)
    listed = sorted(overflows.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{name!r} ({count} values)" for name, count in listed[:6])
    more = f" and {len(listed) - 6} more" if len(listed) > 6 else ""
    text = f"{len(listed)} tensor(s) have values beyond the output dtype's range ({ranges}): {shown}{more}"
    if not allow:
        raise OutputError(
            f"{text}; they would be written as inf: choose --dtype bf16 or fp32, or pass --allow-overflow "
            "to write them anyway (no output written)"
        )
    warn(f"{text}; written as inf (--allow-overflow)")


def abort_live_jobs() -> None:
    """Abort every job of this process that has neither committed nor aborted (on Ctrl-C or SIGTERM)."""
    for job in list(_LIVE):
        job.abort()


def merge(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    force: bool = False,
    on_warning: Callable[[str], None] | None = None,
    fmt: str | None = None,
    verify: bool = False,
    strict: bool = False,
    max_shard_size: str | int | None = None,
    **options: object,
) -> list[Path]:
    """Compute the EMA targets of a series and write them; returns the output paths.

    ``options`` are those of :func:`plan_merge`. One target writes ``output``; several write
    ``output/NAME.safetensors`` (e.g. ``decay-0.999.safetensors``). Folder checkpoints give folders
    mirroring the newest one (``fmt="safetensors"`` for a single file); DCP and DeepSpeed checkpoints a DCP
    folder or a Hugging Face folder, sharded at ``max_shard_size`` (one file when ``output`` ends in
    ``.safetensors``). ``verify``, ``strict`` and ``max_shard_size``: see :class:`MergeJob`.
    """
    plan = plan_merge(inputs, **options)  # type: ignore[arg-type]
    paths = output_paths(plan, output, force=force, fmt=fmt)
    with MergeJob(
        plan, paths, on_warning=on_warning, fmt=fmt, verify=verify, strict=strict, max_shard_size=max_shard_size
    ) as job:
        for _ in job:
            pass
        return job.commit()


def merge_to_state_dict(
    inputs: Sequence[str | os.PathLike],
    on_warning: Callable[[str], None] | None = None,
    **options: object,
) -> dict[str, dict[str, torch.Tensor]]:
    """Like :func:`merge`, but return ``{output name: state dict}`` in memory (for models that fit)."""
    plan = plan_merge(inputs, **options)  # type: ignore[arg-type]
    sinks = [MemorySink(plan.tensors) for _ in plan.outputs]
    for _ in MergePass(plan, sinks, on_warning=on_warning):
        pass
    return {o.name: sink.state_dict for o, sink in zip(plan.outputs, sinks)}
