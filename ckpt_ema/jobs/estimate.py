"""The error estimate of every output (docs/estimate.md), gathered in the merge's own pass.

``EstimateGatherer(plan)`` is the pass's rows sink (it sees every output's piece of each tensor) and
accumulates what ``ckpt_ema.math.estimate`` needs: for each output ``||R - theta(T)||^2``, and for the
series the products of the increments between checkpoints (``||d_j||^2``, ``<d_j, d_{j+1}>``,
``<d_j, d_{j+2}>``), read from the same memory-mapped views while the pass is at that chunk. On large
models a regular subsample of the elements (at most ``SAMPLE_ELEMENTS``, the same for every statistic)
keeps this cheap; the statistics are scaled back to all elements. The subsample is made of runs of ``RUN``
consecutive elements, one run in every ``stride``: single elements every ``stride``-th would touch
every cache line of the chunk again (64 bytes hold 32 BF16 values), which cost as much memory traffic as
the merge itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ckpt_ema.engine import fused
from ckpt_ema.engine.merge_pass import MergePass, used_inputs
from ckpt_ema.io.safetensors_format import to_float
from ckpt_ema.math import ema as kernels
from ckpt_ema.math import estimate as est
from ckpt_ema.math import windows
from ckpt_ema.plan.model import OutputPlan, Plan

SAMPLE_ELEMENTS = 1 << 22  # elements of every checkpoint the statistics look at (all of them below this)
BATCH = 1 << 18  # sampled elements gathered (per checkpoint and output) before the statistics run on them
RUN = 32  # consecutive elements sampled together (a cache line of BF16 values)


def sample_positions(seen: int, size: int, stride: int, run: int = RUN) -> np.ndarray:
    """The positions in a chunk of ``size`` elements, after ``seen`` elements of the pass, of the sample:
    the elements ``i`` (counted over the whole pass) with ``(i // run) % stride == 0``, a fraction
    ``1 / stride`` of them; int64, ascending (empty when the chunk holds none)."""
    if stride == 1:
        return np.arange(size, dtype=np.int64)
    period = run * stride
    first, end = -(-(seen - run + 1) // period), -(-(seen + size) // period)  # the runs that reach the chunk
    positions = (np.arange(first, end, dtype=np.int64)[:, None] * period - seen + np.arange(run)).ravel()
    return positions[(positions >= 0) & (positions < size)]


def not_estimated(plan: Plan, method: str) -> str | None:
    """Why an output of ``plan`` gets no estimate, or None when it does."""
    if plan.per_checkpoint:
        return "--per-checkpoint: each checkpoint is one update, the result is the EMA itself"
    if any(c.tracked_gamma is not None for c in plan.checkpoints):
        return "a reconstruction from EMA snapshots: the snapshots do not determine the per-step updates (docs/estimate.md)"
    if method == "last":
        return "--last averages checkpoints, not steps: there is nothing between them to estimate"
    if method not in ESTIMATED:
        return f"no error model for {method!r} outputs yet"
    if len(plan.checkpoints) < 3:
        return "fewer than three checkpoints: nothing to fit the model to"
    return None


ESTIMATED = ("classic", "power", "window", "lr_decay")  # outputs with a per-step profile to compare with


def _cumulative(plan: Plan, output: OutputPlan) -> est.Cumulative:
    p, total = output.params, plan.target_step
    if output.method == "classic":
        return est.classic_cumulative(p["decay"], total)
    if output.method == "window":
        return est.window_cumulative(p["length"], total)
    if output.method == "lr_decay":
        return est.lr_decay_cumulative(output.labels["shape"], p["length"], total)
    return est.power_cumulative(p["gamma"], total)


def _linear(plan: Plan, output: OutputPlan) -> np.ndarray:
    steps, p = [c.step for c in plan.checkpoints], output.params
    if output.method == "classic":
        return kernels.classic_coefficients(steps, p["decay"], "linear")
    if output.method == "window":
        return windows.window_coefficients(steps, p["length"], "linear")
    if output.method == "lr_decay":
        return windows.lr_decay_coefficients(steps, output.labels["shape"], p["length"], "linear")
    return kernels.power_coefficients(steps, p["gamma"], "linear")


class EstimateGatherer:
    """Statistics for the estimates of a plan's outputs: the pass's ``chunk_sink``.

    ``plan`` is the series and its outputs; the pass may run another plan over the same checkpoints
    (``pass_plan``: doctor's rows), whose row ``result_rows[k]`` is output ``k``'s result.
    """

    def __init__(self, plan: Plan, pass_plan: Plan | None = None, result_rows: Sequence[int] | None = None) -> None:
        self.plan = plan
        n = len(plan.checkpoints)
        self.reasons = [not_estimated(plan, o.method) for o in plan.outputs]
        pass_plan = pass_plan or plan
        used = used_inputs(pass_plan)
        columns = [
            next(i for i, c in enumerate(pass_plan.checkpoints) if c is checkpoint) for checkpoint in plan.checkpoints
        ]
        # where each checkpoint of the series is among the pass's inputs (None: not read, all its coefficients 0)
        self._position = [used.index(c) if c in used else None for c in columns]
        self._rows = list(result_rows) if result_rows is not None else list(range(len(plan.outputs)))
        total = sum(int(np.prod(t.shape)) for t in plan.tensors if t.is_float)
        self.stride = max(1, -(-total // SAMPLE_ELEMENTS))
        self.run = RUN  # the sample: runs of this many elements, one in every ``stride``
        self._sq = np.zeros(max(n - 1, 0))
        self._cross1 = np.zeros(max(n - 1, 0))
        self._cross2 = np.zeros(max(n - 1, 0))
        # a checkpoint the pass does not read (coefficient 0 everywhere): its increments are unknown
        for j in range(n - 1):
            if self._position[j] is None or self._position[j + 1] is None:
                self._sq[j] = np.nan
                self._cross1[max(j - 1, 0) : j + 1] = np.nan
                self._cross2[max(j - 2, 0) : j + 1] = np.nan
        self._distance_sq = np.zeros(len(plan.outputs))
        self._bias_sq = np.zeros(len(plan.outputs))
        matrix = plan.coefficient_matrix()
        # hold (or any non-linear) interpolation: the difference from the linear result is a known bias
        self.bias_rows = {
            k: matrix[k] - _linear(plan, o)
            for k, o in enumerate(plan.outputs)
            if self.reasons[k] is None and plan.interp != "linear"
        }
        if self._position[-1] is None:
            self.reasons = [r or "the last checkpoint is not read" for r in self.reasons]
        self._seen = 0  # float elements passed so far (the sample is placed by it: sample_positions)
        self._bad = False  # a sampled value was NaN or Inf
        # the sampled values waiting for the statistics, copied from the chunks (one dtype per batch)
        self._batch_inputs: list[np.ndarray | None] = []
        self._batch_outputs: list[np.ndarray] = []
        self._batch_kinds: tuple[tuple[str, ...], str] | None = None
        self._filled = 0

    @property
    def sq(self) -> np.ndarray:
        """Per gap j the sampled sum of ||d_j||^2 (after the batch waiting is added)."""
        self.flush()
        return self._sq

    @property
    def cross1(self) -> np.ndarray:
        """Per gap the sampled sum of <d_j, d_{j+1}> (after the batch waiting is added)."""
        self.flush()
        return self._cross1

    @property
    def cross2(self) -> np.ndarray:
        """Per gap the sampled sum of <d_j, d_{j+2}> (after the batch waiting is added)."""
        self.flush()
        return self._cross2

    @property
    def distance_sq(self) -> np.ndarray:
        """Per output the sampled ||R - theta(T)||^2 (after the batch waiting is added)."""
        self.flush()
        return self._distance_sq

    @property
    def bias_sq(self) -> np.ndarray:
        """Per output the sampled squared bias of a non-linear interpolation (after the batch waiting is added)."""
        self.flush()
        return self._bias_sq

    @property
    def needed(self) -> bool:
        """Whether any output gets an estimate (else the pass need not feed this)."""
        return any(r is None for r in self.reasons)

    def write_chunk(
        self, inputs: Sequence[np.ndarray], in_dtypes: Sequence[str], outputs: np.ndarray, out_dtype: str, size: int
    ) -> None:
        """A chunk of the pass (a ``ChunkSink``): its sampled elements are copied into the batch; the
        statistics (increments, distances, bias) run on a full batch, a few numpy calls per batch instead of
        per chunk (they cost as much as the kernel when run per chunk)."""
        index = sample_positions(self._seen, size, self.stride, self.run)
        self._seen += size
        count = len(index)
        if not count:
            return
        kinds = (tuple(in_dtypes), out_dtype)
        if self._compiled(in_dtypes, outputs, out_dtype):
            self.flush()
            addresses = np.array([inputs[p].ctypes.data for p in self._position if p is not None], dtype=np.int64)
            rows = np.array([r for k, r in enumerate(self._rows) if self.reasons[k] is None], dtype=np.int64)
            distance = np.zeros(len(rows))
            sums = (self._sq, self._cross1, self._cross2, distance)
            bad = fused.increment_products(addresses, in_dtypes[0], index, outputs, rows, sums)
            self._bad = self._bad or bad > 0
            self._distance_sq[[k for k, _ in enumerate(self._rows) if self.reasons[k] is None]] += distance
            return
        if self._filled and (kinds != self._batch_kinds or self._filled + count > BATCH):
            self.flush()
        if count > BATCH:  # a sample larger than a batch: straight to the statistics
            self._statistics([inputs[p][index] if p is not None else None for p in self._position], in_dtypes,
                             [outputs[row, :size][index] for row in self._rows], out_dtype)  # fmt: skip
            return
        if not self._filled:
            self._batch_kinds = kinds
            self._batch_inputs = [
                np.empty(BATCH, dtype=inputs[p].dtype) if p is not None else None for p in self._position
            ]
            self._batch_outputs = [np.empty(BATCH, dtype=outputs.dtype) for _ in self._rows]
        lo, hi = self._filled, self._filled + count
        for p, batch in zip(self._position, self._batch_inputs):
            if p is not None and batch is not None:
                batch[lo:hi] = inputs[p][index]
        for row, batch in zip(self._rows, self._batch_outputs):
            batch[lo:hi] = outputs[row, :size][index]
        self._filled = hi

    def _compiled(self, in_dtypes: Sequence[str], outputs: np.ndarray, out_dtype: str) -> bool:
        """Whether the numba kernel computes this chunk's sums: one input dtype it knows, every checkpoint
        read, no interpolation bias to add (else numpy, in batches)."""
        return (
            fused.AVAILABLE
            and not self.bias_rows
            and None not in self._position
            and len(set(in_dtypes)) == 1
            and in_dtypes[0] in fused.INPUT_KINDS
            and out_dtype in fused.OUTPUT_KINDS
            and outputs.dtype == fused.OUTPUT_KINDS[out_dtype]
        )

    def flush(self) -> None:
        """Run the statistics on the sampled values gathered so far (the pass's end calls it via ``model``)."""
        if not self._filled or self._batch_kinds is None:
            return
        n, (in_dtypes, out_dtype) = self._filled, self._batch_kinds
        self._filled = 0
        self._statistics(
            [b[:n] if b is not None else None for b in self._batch_inputs],
            in_dtypes,
            [b[:n] for b in self._batch_outputs],
            out_dtype,
        )

    def _statistics(
        self,
        samples: Sequence[np.ndarray | None],
        in_dtypes: Sequence[str],
        results: Sequence[np.ndarray],
        out_dtype: str,
    ) -> None:
        """Add the sampled values' products: ``samples`` per checkpoint of the series (None: not read), in
        the pass's input dtypes; ``results[k]`` those of row ``self._rows[k]``."""
        x = [
            to_float(value, in_dtypes[p]).astype(np.float64) if value is not None and p is not None else None
            for value, p in zip(samples, self._position)
        ]
        self._bad = self._bad or not all(np.isfinite(v).all() for v in x if v is not None)
        previous: np.ndarray | None = None
        d1 = d2 = None  # the increments of the two gaps before
        for j, value in enumerate(x):
            d = value - previous if value is not None and previous is not None else None
            if j >= 1 and d is not None:
                self._sq[j - 1] += float((d * d).sum())
                if d1 is not None:
                    self._cross1[j - 2] += float((d1 * d).sum())
                if d2 is not None:
                    self._cross2[j - 3] += float((d2 * d).sum())
            if j >= 1:
                d2, d1 = d1, d
            previous = value
        last = x[-1]
        if last is None:
            return
        for k, _row in enumerate(self._rows):
            if self.reasons[k] is None:
                result = to_float(results[k], out_dtype).astype(np.float64)
                self._distance_sq[k] += float(((result - last) ** 2).sum())
        for k, coefficients in self.bias_rows.items():
            bias = sum(float(c) * v for c, v in zip(coefficients, x) if v is not None and c != 0.0)
            self._bias_sq[k] += float((np.asarray(bias) ** 2).sum())

    def model(self) -> est.Variogram:
        """The variogram of the series fitted to the gathered increments (after the pass)."""
        self.flush()
        steps = [c.step for c in self.plan.checkpoints]
        s = self.stride
        return est.fit_variogram(
            est.IncrementStats.from_products(steps, self._sq * s, self._cross1 * s, self._cross2 * s)
        )

    def estimates(self) -> list[est.Estimate | None]:
        """Each output's estimate (None where ``reasons`` says why not), after the pass."""
        self.flush()
        if all(r is not None for r in self.reasons):
            return [None] * len(self.plan.outputs)
        steps = [c.step for c in self.plan.checkpoints]
        s = self.stride
        if self._bad or not (np.isfinite(self._distance_sq).all() and np.isfinite(self._bias_sq).all()):
            self.reasons = [r or "the checkpoints hold NaN or Inf values" for r in self.reasons]
            return [None] * len(self.plan.outputs)
        model = self.model()
        result: list[est.Estimate | None] = []
        for k, output in enumerate(self.plan.outputs):
            if self.reasons[k] is not None:
                result.append(None)
                continue
            cumulative = _cumulative(self.plan, output)
            e = est.estimate(
                steps, output.coefficients, cumulative, model, self._distance_sq[k] * s, self._bias_sq[k] * s
            )
            before = float(cumulative(np.array([float(steps[0])]))[0])
            if output.method == "power" and steps[0] > 0 and before > 0.01:
                warning = (
                    f"{before:.0%} of the power EMA's weight is on steps before the first checkpoint "
                    f"(step {steps[0]}): the estimate does not cover them"
                )
                e = est.Estimate(**{**e.__dict__, "warnings": (*e.warnings, warning)})
            result.append(e)
        return result


class EstimateJob:
    """``plan --estimate``: the merge's pass with no output written, for the estimates alone.

    Iterate to run it (bytes read, for a progress bar; ``total_bytes``), then ``estimates()``.
    """

    def __init__(self, plan: Plan, on_warning: Callable[[str], None] | None = None) -> None:
        self.plan = plan
        self.gatherer = EstimateGatherer(plan)
        self.merge_pass = MergePass(plan, [], on_warning=on_warning, chunk_sink=self.gatherer)
        self.total_bytes = self.merge_pass.total_bytes

    def __len__(self) -> int:
        return len(self.merge_pass)

    def __iter__(self) -> Iterator[int]:
        return iter(self.merge_pass)

    def estimates(self) -> list[est.Estimate | None]:
        return self.gatherer.estimates()

    def reasons(self) -> list[str | None]:
        """Why each output has no estimate (None where it has one), after ``estimates()``."""
        return list(self.gatherer.reasons)
