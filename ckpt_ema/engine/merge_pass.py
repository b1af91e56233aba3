"""The one streaming pass: apply a plan's coefficient matrix to the checkpoints, chunk by chunk.

What is computed: for every floating-point tensor, every element and every output ``k``,
``out_k = round_out(acc)`` where ``acc`` is FP32 (FP64 for FP64 outputs) and the checkpoints are added in
step order, oldest first::

    acc = c[k, 0] * x_0          # x_j upcast exactly from BF16/FP16/FP32 to FP32
    acc = acc + c[k, j] * x_j    # j = 1, 2, ...: one multiply-add rounded to FP32 per checkpoint

(coefficients rounded once from float64 to FP32; checkpoints whose coefficients are all 0 are not read).
Each multiply-add is a fused multiply-add where the CPU has one, in both kernels below; either way the
result is the float64 weighted sum to within FP32 rounding, and it does not depend on how the tensors are
split into chunks or spans, so a distributed run gives the same bytes as a single process. Non-float
tensors are copied from the newest checkpoint.

How: consecutive tensors that lie back to back in every checkpoint (same dtype) are merged into one *span*
and processed as one flat run of elements, so small tensors (biases, norms) cost no per-tensor
Python overhead; the span is cut into chunks of ``chunk_elements`` and each output chunk is handed to the
outputs' sinks tensor by tensor. Two kernels compute a chunk:

- ``fused`` (numba, ``pip install ckpt-ema[fast]``; see ``fused.py``): one pass over the inputs per chunk
  that upcasts, applies every coefficient while the data is in cache and rounds, on all cores;
- ``torch``: the pure-torch fallback, used for other dtypes (FP16, FP64, FP8, mixed) or without numba:
  per checkpoint one upcast copy and one ``add_(x, alpha=c)`` per output (intra-op threads).

``CKPT_EMA_KERNEL=torch`` (or ``kernel="torch"``) forces the fallback. Memory is bounded by
``outputs x chunk`` elements whatever the number or size of the checkpoints.

No printing here: the pass is an iterable yielding progress; warnings go to a callback.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ckpt_ema.engine import fused
from ckpt_ema.io.safetensors_format import DTYPES, TORCH_TO_NAME
from ckpt_ema.plan.model import Plan, TensorPlan

DEFAULT_CHUNK_ELEMENTS = 1 << 18  # torch kernel: 1 MB FP32 chunks stay in L2 (measured best of 2^14..2^20)
FUSED_CHUNK_ELEMENTS = 1 << 20  # fused kernel: cut into blocks (_fused_numba.BLOCK) spread over the cores
KERNELS = ("auto", "fused", "torch")


def choose_kernel(kernel: str | None = None) -> str:
    """``fused`` when numba is installed (unless ``CKPT_EMA_KERNEL=torch``), else ``torch``."""
    kernel = kernel or os.environ.get("CKPT_EMA_KERNEL", "auto")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "fused" and not fused.AVAILABLE:
        raise ValueError("the fused kernel needs numba: pip install 'ckpt-ema[fast]'")
    if kernel == "auto":
        return "fused" if fused.AVAILABLE else "torch"
    return kernel


class ReadObserver(Protocol):
    """Told before the pass reads a tensor of a checkpoint (the input hasher follows the reads this way)."""

    def before_read(self, checkpoint: int, name: str) -> None: ...


class RowsSink(Protocol):
    """Receives all outputs of a piece of a floating-point tensor at once, in plan order: ``rows[k]`` holds
    output ``k``'s elements (for statistics that combine outputs, as ``doctor`` does)."""

    def write_rows(self, name: str, rows: torch.Tensor) -> None: ...


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


@dataclass
class _Span:
    """Tensors back to back in every used checkpoint: one flat run of ``numel`` elements per checkpoint."""

    tensors: list[TensorPlan] = field(default_factory=list)
    views: list[list[torch.Tensor]] = field(default_factory=list)  # per tensor, per used checkpoint
    numel: int = 0

    def extends(self, tensor: TensorPlan, views: list[torch.Tensor]) -> bool:
        if not self.tensors:
            return False
        last, previous = self.tensors[-1], self.views[-1]
        return tensor.out_dtype == last.out_dtype and all(
            v.dtype == p.dtype and v.data_ptr() == p.data_ptr() + p.numel() * p.element_size()
            for v, p in zip(views, previous)
        )

    def add(self, tensor: TensorPlan, views: list[torch.Tensor]) -> None:
        self.tensors.append(tensor)
        self.views.append(views)
        self.numel += math.prod(tensor.shape)

    def inputs(self) -> list[torch.Tensor]:
        """Each used checkpoint's whole span as one 1-D tensor (a view of its mapping, no copy)."""
        if len(self.tensors) == 1:
            return self.views[0]
        result = []
        for first in self.views[0]:
            raw = (ctypes.c_uint8 * (self.numel * first.element_size())).from_address(first.data_ptr())
            result.append(torch.frombuffer(raw, dtype=first.dtype))
        return result


SPAN_LIMIT = 1 << 24  # elements: tensors are grouped up to this size (progress stays smooth)


class MergePass:
    """Iterating runs the pass; each item is the number of input bytes read for one tensor.

    ``len()`` is the number of tensors and ``total_bytes`` the bytes the pass reads, for progress bars.

    Args:
        plan: what to compute.
        sinks: one per output, receiving its tensors in order.
        chunk_elements: elements per chunk (default: 2^18 for the torch kernel, 2^20 for the fused one).
        on_warning: called with a message for each input tensor holding NaN or Inf.
        kernel: ``"auto"``, ``"fused"`` or ``"torch"`` (default: ``CKPT_EMA_KERNEL`` or ``"auto"``).
        tensors: the tensors to compute (default: all of ``plan.tensors``; a distributed rank's share).
        observer: told before each read of a checkpoint's tensor (``ReadObserver``).
        rows_sink: also receives every floating-point piece of all outputs at once (``RowsSink``); with it,
            ``sinks`` may be empty.
    """

    def __init__(
        self,
        plan: Plan,
        sinks: Sequence[TensorSink],
        chunk_elements: int | None = None,
        on_warning: Callable[[str], None] | None = None,
        kernel: str | None = None,
        tensors: Sequence[TensorPlan] | None = None,
        observer: ReadObserver | None = None,
        rows_sink: RowsSink | None = None,
    ) -> None:
        if len(sinks) != len(plan.outputs) and not (rows_sink is not None and not sinks):
            raise ValueError("one sink per output is needed")
        if chunk_elements is not None and chunk_elements < 1:
            raise ValueError("chunk_elements must be >= 1")
        self.plan = plan
        self.sinks = list(sinks)
        self.output_count = len(plan.outputs)
        self.kernel = choose_kernel(kernel)
        self.chunk_elements = chunk_elements
        self.on_warning = on_warning or (lambda message: None)
        self.tensors = tuple(plan.tensors if tensors is None else tensors)
        self.observer = observer
        self.rows_sink = rows_sink
        self._warned: set[tuple[str, int]] = set()
        self.coefficients = plan.coefficient_matrix()  # (outputs, checkpoints) float64
        self.used_inputs = used_inputs(plan)
        self._coefs32 = np.ascontiguousarray(self.coefficients[:, self.used_inputs], dtype=np.float32)
        self.total_bytes = bytes_read(plan, self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[int]:
        span = _Span()
        for tensor in self.tensors:
            if math.prod(tensor.shape) == 0:
                yield from self._flush(span)
                span = _Span()
                yield self._bytes_read(tensor)
            elif not tensor.is_float:
                yield from self._flush(span)
                span = _Span()
                self._copy_newest(tensor)
                yield self._bytes_read(tensor)
            else:
                views = [self._read(j, tensor.name) for j in self.used_inputs]
                if not span.extends(tensor, views) or span.numel + math.prod(tensor.shape) > SPAN_LIMIT:
                    yield from self._flush(span)
                    span = _Span()
                span.add(tensor, views)
        yield from self._flush(span)

    def _flush(self, span: _Span) -> Iterator[int]:
        if span.tensors:
            self._merge_span(span)
            for tensor in span.tensors:
                yield self._bytes_read(tensor)

    def _bytes_read(self, tensor: TensorPlan) -> int:
        return _tensor_bytes_read(self.plan, tensor, self.used_inputs)

    def _read(self, checkpoint: int, name: str) -> torch.Tensor:
        if self.observer is not None:
            self.observer.before_read(checkpoint, name)
        return self.plan.checkpoints[checkpoint].source.flat(name)

    def _copy_newest(self, tensor: TensorPlan) -> None:
        data = self._read(len(self.plan.checkpoints) - 1, tensor.name)
        for sink in self.sinks:
            sink.write(tensor.name, data)

    def _merge_span(self, span: _Span) -> None:
        inputs = span.inputs()
        out_name = span.tensors[0].out_dtype
        in_names = {TORCH_TO_NAME.get(x.dtype) for x in inputs}
        in_name = in_names.pop() if len(in_names) == 1 else None
        use_fused = self.kernel == "fused" and in_name in fused.INPUT_KINDS and out_name in fused.OUTPUT_KINDS
        chunk = min(self.chunk_elements or (FUSED_CHUNK_ELEMENTS if use_fused else DEFAULT_CHUNK_ELEMENTS), span.numel)
        pieces = _Pieces(span, self.sinks, self.rows_sink)
        if use_fused and in_name is not None:
            out = np.empty((self.output_count, chunk), dtype=fused.OUTPUT_KINDS[out_name])
            out_torch = torch.from_numpy(out)
            if out_name == "BF16":
                out_torch = out_torch.view(torch.bfloat16)
            bases = np.array([x.data_ptr() for x in inputs], dtype=np.int64)
            step = inputs[0].element_size()
            for start in range(0, span.numel, chunk):
                size = min(span.numel, start + chunk) - start
                bad = fused.weighted_sums(bases + step * start, in_name, self._coefs32, size, out)
                if bad:
                    self._find_non_finite(span, start, start + size)
                pieces.write(out_torch, start, size)
            return
        acc_dtype = torch.float64 if out_name == "F64" else torch.float32
        out_dtype = DTYPES[out_name][0]
        accumulators = torch.empty((self.output_count, chunk), dtype=acc_dtype)
        upcast = torch.empty(chunk, dtype=acc_dtype)
        rounded = torch.empty((self.output_count, chunk), dtype=out_dtype) if out_dtype != acc_dtype else None
        rows = [
            [(k, float(self.coefficients[k, j])) for k in range(self.output_count) if self.coefficients[k, j] != 0.0]
            for j in self.used_inputs
        ]
        for start in range(0, span.numel, chunk):
            stop = min(span.numel, start + chunk)
            size = stop - start
            started = [False] * self.output_count
            for x, row in zip(inputs, rows):
                source = x[start:stop]
                if source.dtype != acc_dtype:
                    source = upcast[:size].copy_(source)
                for k, coef in row:
                    if started[k]:
                        accumulators[k, :size].add_(source, alpha=coef)
                    else:
                        torch.mul(source, coef, out=accumulators[k, :size])
                        started[k] = True
            # A non-finite input with a non-zero coefficient makes some accumulator non-finite; one
            # reduction per chunk finds that cheaply, and only then are the inputs searched.
            if not math.isfinite(float(accumulators[:, :size].sum())):
                self._find_non_finite(span, start, stop)
            if rounded is None:
                pieces.write(accumulators, start, size)
            else:
                pieces.write(rounded[:, :size].copy_(accumulators[:, :size]), start, size)

    def _find_non_finite(self, span: _Span, start: int, stop: int) -> None:
        """Warn once per (tensor, checkpoint) holding NaN or Inf in elements ``start:stop`` of the span."""
        offset = 0
        for tensor, views in zip(span.tensors, span.views):
            numel = math.prod(tensor.shape)
            lo, hi = max(start, offset) - offset, min(stop, offset + numel) - offset
            offset += numel
            if lo >= hi:
                continue
            for j, view in zip(self.used_inputs, views):
                key = (tensor.name, j)
                if key not in self._warned and not bool(torch.isfinite(view[lo:hi]).all()):
                    self._warned.add(key)
                    ckpt = self.plan.checkpoints[j]
                    self.on_warning(f"{ckpt.path}: tensor {tensor.name!r} (step {ckpt.step}) has NaN or Inf values")


def used_inputs(plan: Plan) -> list[int]:
    """The checkpoints the pass reads: those with a non-zero coefficient in some output."""
    coefficients = plan.coefficient_matrix()
    return [j for j in range(len(plan.checkpoints)) if coefficients[:, j].any()]


def bytes_read(plan: Plan, tensors: Sequence[TensorPlan] | None = None) -> int:
    """The input bytes a pass over ``tensors`` (default: all of the plan's) reads, for progress bars."""
    used = used_inputs(plan)
    return sum(_tensor_bytes_read(plan, t, used) for t in (plan.tensors if tensors is None else tensors))


def _tensor_bytes_read(plan: Plan, tensor: TensorPlan, used: Sequence[int]) -> int:
    readers = used if tensor.is_float else [len(plan.checkpoints) - 1]  # non-float: copied from the newest
    return sum(plan.checkpoints[j].source.tensors[tensor.name].nbytes for j in readers)


class _Pieces:
    """Hands each chunk of a span's outputs to the sinks, cut at the tensors' boundaries."""

    def __init__(self, span: _Span, sinks: Sequence[TensorSink], rows_sink: RowsSink | None) -> None:
        self.sinks = sinks
        self.rows_sink = rows_sink
        self.bounds = []
        offset = 0
        for tensor in span.tensors:
            numel = math.prod(tensor.shape)
            self.bounds.append((offset, offset + numel, tensor.name))
            offset += numel
        self.index = 0

    def write(self, outputs: torch.Tensor, start: int, size: int) -> None:
        """``outputs[k, :size]`` holds elements ``start:start+size`` of the span for output ``k``."""
        stop = start + size
        while self.index < len(self.bounds):
            lo, hi, name = self.bounds[self.index]
            if lo >= stop:
                return
            a, b = max(lo, start), min(hi, stop)
            for k, sink in enumerate(self.sinks):
                sink.write(name, outputs[k, a - start : b - start])
            if self.rows_sink is not None:
                self.rows_sink.write_rows(name, outputs[:, a - start : b - start])
            if hi > stop:
                return
            self.index += 1
