"""The error estimate of every output (docs/estimate.md), gathered in the merge's own pass.

``EstimateGatherer(plan).wrap(sinks)`` returns sinks that forward every chunk to the real ones and, on the
way, accumulate what ``ckpt_ema.math.estimate`` needs: for each output ``||R - theta(T)||^2``, and for the
series the products of the increments between checkpoints (``||d_j||^2``, ``<d_j, d_{j+1}>``,
``<d_j, d_{j+2}>``), read from the same memory-mapped views while the pass is at that chunk. On large
models a regular subsample of the elements (at most ``SAMPLE_ELEMENTS``, the same for every statistic)
keeps this cheap; the statistics are scaled back to all elements.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ckpt_ema.engine.merge_pass import TensorSink
from ckpt_ema.io.safetensors_format import to_float
from ckpt_ema.math import ema as kernels
from ckpt_ema.math import estimate as est
from ckpt_ema.plan.model import Plan
from ckpt_ema.series.load import Checkpoint

SAMPLE_ELEMENTS = 1 << 24  # elements of every checkpoint the statistics look at (all of them below this)


def not_estimated(plan: Plan, method: str) -> str | None:
    """Why an output of ``plan`` gets no estimate, or None when it does."""
    if plan.per_checkpoint:
        return "--per-checkpoint: each checkpoint is one update, the result is the EMA itself"
    if any(c.tracked_gamma is not None for c in plan.checkpoints):
        return "a reconstruction from EMA snapshots: the snapshots do not determine the per-step updates (docs/estimate.md)"
    if method not in ("classic", "power"):
        return f"no error model for {method!r} outputs yet"
    if len(plan.checkpoints) < 3:
        return "fewer than three checkpoints: nothing to fit the model to"
    return None


def _cumulative(plan: Plan, method: str, params: dict[str, float]) -> est.Cumulative:
    if method == "classic":
        return est.classic_cumulative(params["decay"], plan.target_step)
    return est.power_cumulative(params["gamma"], plan.target_step)


def _linear(plan: Plan, method: str, params: dict[str, float]) -> np.ndarray:
    steps = [c.step for c in plan.checkpoints]
    if method == "classic":
        return kernels.classic_coefficients(steps, params["decay"], "linear")
    return kernels.power_coefficients(steps, params["gamma"], "linear")


class EstimateGatherer:
    """Statistics for the estimates of a plan's outputs, filled by the sinks from ``wrap``."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        n = len(plan.checkpoints)
        self.reasons = [not_estimated(plan, o.method) for o in plan.outputs]
        self.float_names = {t.name for t in plan.tensors if t.is_float}
        self._out_dtypes = {t.name: t.out_dtype for t in plan.tensors}
        total = sum(int(np.prod(t.shape)) for t in plan.tensors if t.is_float)
        self.stride = max(1, -(-total // SAMPLE_ELEMENTS))
        self.sq = np.zeros(max(n - 1, 0))
        self.cross1 = np.zeros(max(n - 1, 0))
        self.cross2 = np.zeros(max(n - 1, 0))
        self.distance_sq = np.zeros(len(plan.outputs))
        self.bias_sq = np.zeros(len(plan.outputs))
        matrix = plan.coefficient_matrix()
        # hold (or any non-linear) interpolation: the difference from the linear result is a known bias
        self.bias_rows = {
            k: matrix[k] - _linear(plan, o.method, o.params)
            for k, o in enumerate(plan.outputs)
            if self.reasons[k] is None and plan.interp != "linear"
        }
        self._offsets: dict[tuple[int, str], int] = {}
        self._base: dict[str, int] = {}  # each float tensor's first element in the plan's float elements
        position = 0
        for t in plan.tensors:
            if t.is_float:
                self._base[t.name] = position
                position += int(np.prod(t.shape))

    def wrap(self, sinks: Sequence[TensorSink]) -> list[TensorSink]:
        """Sinks for the pass: each forwards its chunks to ``sinks[k]`` after taking its statistics."""
        if all(r is not None for r in self.reasons):
            return list(sinks)
        return [_GatheringSink(self, k, sink) for k, sink in enumerate(sinks)]

    def receive(self, k: int, name: str, data: np.ndarray) -> None:
        """Output ``k``'s next chunk of tensor ``name`` (chunks of a tensor arrive in order)."""
        if name not in self.float_names:
            return
        start = self._offsets.get((k, name), 0)
        self._offsets[(k, name)] = start + data.size
        first = (-(self._base[name] + start)) % self.stride  # every stride-th float element of the plan
        if first >= data.size:
            return
        index = slice(start + first, start + data.size, self.stride)
        if self.reasons[k] is None:
            last = _values(self.plan.newest, name, index)
            chunk = to_float(data[first :: self.stride], self._out_dtypes[name]).astype(np.float64)
            self.distance_sq[k] += float(((chunk - last) ** 2).sum())
        if k == 0:
            self._gather_increments(name, index)

    def _gather_increments(self, name: str, index: slice) -> None:
        previous = None
        d1 = d2 = None  # the increments of the two gaps before
        bias: dict[int, np.ndarray] = {}
        for j, checkpoint in enumerate(self.plan.checkpoints):
            x = _values(checkpoint, name, index)
            for k, row in self.bias_rows.items():
                term = x * float(row[j])
                bias[k] = bias[k] + term if k in bias else term
            if previous is not None:
                d = x - previous
                self.sq[j - 1] += float((d * d).sum())
                if d1 is not None:
                    self.cross1[j - 2] += float((d1 * d).sum())
                if d2 is not None:
                    self.cross2[j - 3] += float((d2 * d).sum())
                d2, d1 = d1, d
            previous = x
        for k, value in bias.items():
            self.bias_sq[k] += float((value * value).sum())

    def estimates(self) -> list[est.Estimate | None]:
        """Each output's estimate (None where ``reasons`` says why not), after the pass."""
        if all(r is not None for r in self.reasons):
            return [None] * len(self.plan.outputs)
        steps = [c.step for c in self.plan.checkpoints]
        s = self.stride
        stats = est.IncrementStats.from_products(steps, self.sq * s, self.cross1 * s, self.cross2 * s)
        model = est.fit_variogram(stats)
        result: list[est.Estimate | None] = []
        for k, output in enumerate(self.plan.outputs):
            if self.reasons[k] is not None:
                result.append(None)
                continue
            cumulative = _cumulative(self.plan, output.method, output.params)
            e = est.estimate(
                steps, output.coefficients, cumulative, model, self.distance_sq[k] * s, self.bias_sq[k] * s
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


def _values(checkpoint: Checkpoint, name: str, index: slice) -> np.ndarray:
    """Elements ``index`` of a float tensor of ``checkpoint`` as float64."""
    return to_float(checkpoint.source.flat(name)[index], checkpoint.source.tensors[name].dtype).astype(np.float64)


class _GatheringSink:
    def __init__(self, gatherer: EstimateGatherer, k: int, sink: TensorSink) -> None:
        self.gatherer, self.k, self.sink = gatherer, k, sink

    def write(self, name: str, data: np.ndarray) -> None:
        self.gatherer.receive(self.k, name, data)
        self.sink.write(name, data)
