"""The one streaming pass: apply a plan's coefficient matrix to the checkpoints, chunk by chunk.

For every floating-point tensor and every chunk of its elements, each checkpoint's chunk is read from the
memory-mapped file, upcast once to the accumulator dtype (FP32; FP64 for FP64 outputs) and added into
every output's accumulator with that output's coefficient. Additions run in step order, oldest first
(``acc = c_0 x_0``, then ``acc += c_j x_j``). Each output chunk is rounded to its output dtype once and
handed to the output's sink. Memory is bounded by ``outputs x chunk`` elements, whatever the number or the
size of the checkpoints. Non-float tensors are copied from the newest checkpoint.

No printing here: the pass is an iterable yielding progress; warnings go to a callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from .plan import Plan, TensorPlan
from .safetensors_format import DTYPES

DEFAULT_CHUNK_ELEMENTS = 1 << 20


class TensorSink(Protocol):
    """Receives an output's tensors in plan order, each as consecutive 1-D chunks in the output dtype."""

    def write(self, name: str, data: torch.Tensor) -> None: ...


class MemorySink:
    """Collects an output in memory as a state dict (for the Python API and small models)."""

    def __init__(self, tensors: Sequence[TensorPlan]) -> None:
        self.state_dict: dict[str, torch.Tensor] = {}
        self._plans = {t.name: t for t in tensors}
        self._filled: dict[str, int] = {}

    def write(self, name: str, data: torch.Tensor) -> None:
        plan = self._plans[name]
        if name not in self.state_dict:
            self.state_dict[name] = torch.empty(plan.shape, dtype=DTYPES[plan.out_dtype][0])
            self._filled[name] = 0
        start = self._filled[name]
        self.state_dict[name].view(-1)[start : start + data.numel()].copy_(data)
        self._filled[name] = start + data.numel()


class MergePass:
    """Iterating runs the pass; each item is the number of input bytes read for one tensor.

    ``len()`` is the number of tensors and ``total_bytes`` the bytes the pass reads, for progress bars.
    """

    def __init__(
        self,
        plan: Plan,
        sinks: Sequence[TensorSink],
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        if len(sinks) != len(plan.outputs):
            raise ValueError("one sink per output is needed")
        self.plan = plan
        self.sinks = list(sinks)
        self.chunk_elements = chunk_elements
        self.on_warning = on_warning or (lambda message: None)
        self._warned: set[tuple[str, int]] = set()
        self.coefficients = plan.coefficient_matrix()  # (outputs, checkpoints) float64
        self.used_inputs = [j for j in range(len(plan.checkpoints)) if self.coefficients[:, j].any()]
        self.total_bytes = sum(self._bytes_read(t) for t in plan.tensors)

    def __len__(self) -> int:
        return len(self.plan.tensors)

    def __iter__(self) -> Iterator[int]:
        for tensor in self.plan.tensors:
            if math.prod(tensor.shape) > 0:
                if tensor.is_float:
                    self._merge_float(tensor)
                else:
                    self._copy_newest(tensor)
            yield self._bytes_read(tensor)

    def _bytes_read(self, tensor: TensorPlan) -> int:
        readers = self.used_inputs if tensor.is_float else [len(self.plan.checkpoints) - 1]
        return sum(self.plan.checkpoints[j].source.tensors[tensor.name].nbytes for j in readers)

    def _copy_newest(self, tensor: TensorPlan) -> None:
        data = self.plan.newest.source.flat(tensor.name)
        for sink in self.sinks:
            sink.write(tensor.name, data)

    def _merge_float(self, tensor: TensorPlan) -> None:
        acc_dtype = torch.float64 if tensor.out_dtype == "F64" else torch.float32
        out_dtype = DTYPES[tensor.out_dtype][0]
        numel = math.prod(tensor.shape)
        chunk = min(self.chunk_elements, numel)
        n_out = len(self.sinks)
        accumulators = torch.empty((n_out, chunk), dtype=acc_dtype)
        upcast = torch.empty(chunk, dtype=acc_dtype)
        rounded = torch.empty(chunk, dtype=out_dtype) if out_dtype != acc_dtype else None
        views = {j: self.plan.checkpoints[j].source.flat(tensor.name) for j in self.used_inputs}
        rows = [
            [(k, float(self.coefficients[k, j])) for k in range(n_out) if self.coefficients[k, j] != 0.0]
            for j in range(len(self.plan.checkpoints))
        ]
        for start in range(0, numel, chunk):
            stop = min(numel, start + chunk)
            size = stop - start
            started = [False] * n_out
            for j in self.used_inputs:
                source = views[j][start:stop]
                if source.dtype != acc_dtype:
                    source = upcast[:size].copy_(source)
                for k, coef in rows[j]:
                    if started[k]:
                        accumulators[k, :size].add_(source, alpha=coef)
                    else:
                        torch.mul(source, coef, out=accumulators[k, :size])
                        started[k] = True
            self._check_finite(tensor.name, accumulators[:, :size], views, start, stop)
            for k, sink in enumerate(self.sinks):
                if rounded is None:
                    sink.write(tensor.name, accumulators[k, :size])
                else:
                    sink.write(tensor.name, rounded[:size].copy_(accumulators[k, :size]))

    def _check_finite(
        self, name: str, accumulators: torch.Tensor, views: dict[int, torch.Tensor], start: int, stop: int
    ) -> None:
        # A non-finite input value with a non-zero coefficient makes some accumulator non-finite;
        # one reduction per chunk finds that cheaply, and only then are the inputs searched.
        if math.isfinite(float(accumulators.sum())):
            return
        for j in self.used_inputs:
            if not bool(torch.isfinite(views[j][start:stop]).all()):
                key = (name, j)
                if key not in self._warned:
                    self._warned.add(key)
                    ckpt = self.plan.checkpoints[j]
                    self.on_warning(f"{ckpt.path}: tensor {name!r} (step {ckpt.step}) has NaN or Inf values")
