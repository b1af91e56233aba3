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
Python overhead. Tensors whose bytes a reader can locate in a file (safetensors) are read with ``pread``
by :class:`~ckpt_ema.engine.readahead.ReadAhead`, a few chunks ahead of the kernel in background threads
(the disk and the kernel work at the same time; a truncated file is an error, not a SIGBUS); the others
(torch pickles) come as numpy arrays from the reader's ``flat``. Every array is in its dtype's storage type
(BF16 as uint16): no torch on this path. Two kernels compute a chunk:

- ``fused`` (numba; see ``fused.py``): one pass over the inputs per chunk that upcasts, applies every
  coefficient while the data is in cache and rounds, on all cores;
- ``torch``: the fallback, for other dtypes (FP16, FP64, FP8, mixed) or without numba: per checkpoint one
  upcast copy and one ``add_(x, alpha=c)`` per output (intra-op threads). It imports torch when it runs.

``CKPT_EMA_KERNEL=torch`` (or ``kernel="torch"``) forces the fallback. Memory is bounded whatever the
number or size of the checkpoints: the read-ahead buffers (``READ_BUDGET``) and ``outputs x chunk`` elements.

No printing here: the pass is an iterable yielding progress; warnings go to a callback.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np

from ckpt_ema.engine import fused
from ckpt_ema.engine.readahead import OnRead, ReadAhead, SpanSchedule, read_exactly
from ckpt_ema.engine.writebehind import DEPTH as WRITE_DEPTH
from ckpt_ema.engine.writebehind import WORKERS as WRITE_WORKERS
from ckpt_ema.engine.writebehind import WriteBehind, one_by_one
from ckpt_ema.errors import SettingError
from ckpt_ema.io.identity import FileIdentity
from ckpt_ema.io.safetensors_format import DTYPES, all_finite
from ckpt_ema.plan.model import Plan, TensorPlan
from ckpt_ema.plan.pieces import Piece, plan_pieces, used_inputs

DEFAULT_CHUNK_ELEMENTS = 1 << 18  # torch kernel: 1 MB FP32 chunks stay in L2 (measured best of 2^14..2^20)
FUSED_CHUNK_ELEMENTS = 1 << 20  # fused kernel: blocks of fused.BLOCK inside, spread over the cores
MIN_CHUNK_ELEMENTS = 1 << 12  # a floor when there are very many checkpoints or outputs
READ_BUDGET = 64 << 20  # bytes of read-ahead buffers: depth x checkpoints x chunk
OUTPUT_BUDGET = 48 << 20  # bytes of output chunks: buffers x outputs x chunk
OUTPUT_BUFFERS = WRITE_DEPTH + 1  # one being computed, the others being written (engine/writebehind.py)
READ_DEPTH = 3  # buffer sets: one being computed, two being read
COPY_PIECE = 8 << 20  # bytes per read when a non-float tensor is copied
KERNELS = ("auto", "fused", "torch")
SPAN_LIMIT = 1 << 24  # elements: tensors are grouped up to this size (progress stays smooth)


def choose_kernel(kernel: str | None = None) -> str:
    """``fused`` when numba is installed (unless ``CKPT_EMA_KERNEL=torch``), else ``torch``."""
    where = "kernel" if kernel else "CKPT_EMA_KERNEL"
    kernel = kernel or os.environ.get("CKPT_EMA_KERNEL", "auto")
    if kernel not in KERNELS:
        raise SettingError(f"{where}={kernel!r}: must be one of {', '.join(KERNELS)}")
    if kernel == "fused" and not fused.AVAILABLE:
        raise SettingError(f"{where}=fused: the fused kernel needs numba: pip install numba")
    if kernel == "auto":
        return "fused" if fused.AVAILABLE else "torch"
    return kernel


class ReadObserver(Protocol):
    """Sees each piece of a file the pass reads, right after it was read, in the thread that read it; for
    each file in the plan's order, which follows the newest checkpoint's bytes (the input hasher hashes the very
    bytes that are merged)."""

    def after_read(self, file: tuple[int, int], offset: int, data: memoryview) -> None:
        """``data`` holds bytes ``[offset, offset + len(data))`` of file ``(checkpoint, file number)``."""
        ...


class ChunkSink(Protocol):
    """Sees each chunk of floating-point elements the pass merges, with its inputs and its outputs (the error
    estimate's statistics ride on it: no second read). Chunks come in plan order; valid only during the call."""

    def write_chunk(
        self, inputs: Sequence[np.ndarray], in_dtypes: Sequence[str], outputs: np.ndarray, out_dtype: str, size: int
    ) -> None:
        """``inputs[n][:size]``: the chunk of checkpoint ``used_inputs(plan)[n]`` in its stored dtype
        ``in_dtypes[n]``; ``outputs[k, :size]``: output ``k``'s in the storage type of ``out_dtype``."""
        ...


class RowsSink(Protocol):
    """Receives all outputs of a piece of a floating-point tensor at once, in plan order: ``rows[k]`` holds
    output ``k``'s elements in the output dtype's storage type (for statistics that combine outputs, as
    ``doctor`` does), valid only during the call."""

    def write_rows(self, name: str, rows: np.ndarray) -> None: ...


class TensorSink(Protocol):
    """Receives an output's tensors in plan order, each as consecutive 1-D chunks in the output dtype's
    storage type (a numpy array; BF16 as uint16), valid only during the call."""

    def write(self, name: str, data: np.ndarray) -> None: ...


class MemorySink:
    """Collects an output in memory (for the Python API and small models); ``state_dict`` has torch tensors."""

    def __init__(self, tensors: Sequence[TensorPlan]) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self._plans = {t.name: t for t in tensors}
        self._filled: dict[str, int] = {}
        self._state_dict: dict[str, Any] | None = None

    def write(self, name: str, data: np.ndarray) -> None:
        plan = self._plans[name]
        if name not in self.arrays:
            self.arrays[name] = np.empty(math.prod(plan.shape), dtype=DTYPES[plan.out_dtype][0])
            self._filled[name] = 0
        start = self._filled[name]
        self.arrays[name][start : start + data.size] = data
        self._filled[name] = start + data.size
        self._state_dict = None

    @property
    def state_dict(self) -> dict[str, Any]:
        """``{name: torch.Tensor}`` in the output dtypes and shapes (imports torch)."""
        if self._state_dict is None:
            from ckpt_ema.io.torch_edge import to_torch

            self._state_dict = {
                name: to_torch(array, self._plans[name].out_dtype).reshape(self._plans[name].shape)
                for name, array in self.arrays.items()
            }
        return self._state_dict


@dataclass
class _Located:
    """Tensors back to back in every used checkpoint's file: read by the read-ahead, chunk by chunk."""

    tensors: list[TensorPlan]
    in_dtypes: list[str]  # per used checkpoint
    files: list[int]  # per used checkpoint: index into the pass's file table
    starts: list[int]  # per used checkpoint: first byte in its file
    ends: list[int]
    numel: int = 0


@dataclass
class _Span:
    """Tensors back to back in memory in every used checkpoint (readers without byte ranges)."""

    tensors: list[TensorPlan] = field(default_factory=list)
    views: list[list[np.ndarray]] = field(default_factory=list)  # per tensor, per used checkpoint
    numel: int = 0

    def extends(self, tensor: TensorPlan, views: list[np.ndarray]) -> bool:
        if not self.tensors:
            return False
        last, previous = self.tensors[-1], self.views[-1]
        return tensor.out_dtype == last.out_dtype and all(
            v.dtype == p.dtype and v.ctypes.data == p.ctypes.data + p.nbytes for v, p in zip(views, previous)
        )

    def add(self, tensor: TensorPlan, views: list[np.ndarray]) -> None:
        self.tensors.append(tensor)
        self.views.append(views)
        self.numel += math.prod(tensor.shape)

    def inputs(self) -> list[np.ndarray]:
        """Each used checkpoint's whole span as one 1-D array (a view of the reader's memory, no copy)."""
        if len(self.tensors) == 1:
            return self.views[0]
        result = []
        for first in self.views[0]:
            raw = (ctypes.c_uint8 * (self.numel * first.itemsize)).from_address(first.ctypes.data)
            result.append(np.ctypeslib.as_array(raw).view(first.dtype))
        return result


# Output dtypes narrower in range than the FP32 sums: largest finite value (FP16 and both FP8 formats)
RANGE_LIMITED = {"F16": 65504.0, "F8_E4M3": 448.0, "F8_E5M2": 57344.0}


class MergePass:
    """Iterating runs the pass; each item is the number of input bytes read for one tensor.

    ``len()`` is the number of tensors and ``total_bytes`` the bytes the pass reads, for progress bars.

    Args:
        plan: what to compute.
        sinks: one per output, receiving its tensors in order.
        chunk_elements: elements per chunk (default: 2^18 for the torch kernel, 2^20 for the fused one,
            fewer when many checkpoints or outputs would make the buffers exceed their budgets).
        on_warning: called with a message for each input tensor holding NaN or Inf.
        kernel: ``"auto"``, ``"fused"`` or ``"torch"`` (default: ``CKPT_EMA_KERNEL`` or ``"auto"``).
        tensors: the tensors to compute (default: all of ``plan.tensors``; a distributed rank's share).
        pieces: the blocks to compute, in order (default: every piece of ``tensors``, ``plan.pieces``); a
            tensor stored in chunks (DCP) is merged block by block, never held whole.
        chunked: the sinks take a tensor's blocks in chunk order (DCP outputs), see ``plan.pieces``.
        observer: shown each piece of a file read (``ReadObserver``; the inputs' hash rides on it).
        rows_sink: also receives every floating-point piece of all outputs at once (``RowsSink``); with it,
            ``sinks`` may be empty.
        chunk_sink: sees every chunk with its inputs and outputs (``ChunkSink``).
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
        chunk_sink: ChunkSink | None = None,
        pieces: Sequence[Piece] | None = None,
        chunked: bool = False,
    ) -> None:
        if len(sinks) != len(plan.outputs) and not ((rows_sink is not None or chunk_sink is not None) and not sinks):
            raise ValueError("one sink per output is needed")
        if chunk_elements is not None and chunk_elements < 1:
            raise ValueError("chunk_elements must be >= 1")
        self.plan = plan
        self.sinks = list(sinks)
        self.output_count = len(plan.outputs)
        self.rows_sink = rows_sink
        self.chunk_sink = chunk_sink
        self.kernel = choose_kernel(kernel)
        self.chunk_elements = chunk_elements
        self.on_warning = on_warning or (lambda message: None)
        self.tensors = tuple(plan.tensors if tensors is None else tensors)
        self.pieces = tuple(plan_pieces(plan, self.tensors, chunked) if pieces is None else pieces)
        if pieces is not None:
            self.tensors = tuple({p.name: p.tensor for p in self.pieces}.values())
        self._warned: set[tuple[str, int]] = set()
        # tensor name -> values (over all outputs) beyond the output dtype's range, written as inf
        self.overflows: dict[str, int] = {}
        self.coefficients = plan.coefficient_matrix()  # (outputs, checkpoints) float64
        self.used_inputs = used_inputs(plan)
        self._coefs32 = np.ascontiguousarray(self.coefficients[:, self.used_inputs], dtype=np.float32)
        self.total_bytes = sum(_tensor_bytes_read(plan, p.flat, self.used_inputs) for p in self.pieces)
        self._file_keys: list[tuple[int, int]] = []
        self._file_index: dict[tuple[int, int], int] = {}
        self._paths: list[Any] = []
        self._identities: list[FileIdentity | None] = []
        self._segments = self._layout()
        self.observer = observer
        self._torch_kernel: _TorchKernel | None = None
        self._writes = WriteBehind()
        self._rings: dict[str, _Ring] = {}
        self._torch_ticket: int | None = None  # the write of the torch kernel's last result

    def __len__(self) -> int:
        return len(self.pieces)

    # -- the layout: which tensors are read by the read-ahead, as which spans --------------------------------

    def _file(self, j: int, number: int) -> int:
        key = (j, number)
        index = self._file_index.get(key)
        if index is None:
            weight_file = self.plan.checkpoints[j].source.files[number]
            index = self._file_index[key] = len(self._file_keys)
            self._file_keys.append(key)
            self._paths.append(weight_file.path)
            self._identities.append(weight_file.identity)
        return index

    def _locate(self, j: int, piece: Piece) -> tuple[int, int, int, str] | None:
        """(file index, begin, end, dtype) of ``piece`` in checkpoint ``j``, if it is one byte range of a file."""
        source = self.plan.checkpoints[j].source
        where = source.locate(piece.name) if piece.whole else source.locate_region(piece.name, piece.region)
        if where is None:
            return None
        number, begin, end, dtype = where
        return self._file(j, number), begin, end, dtype

    def _layout(self) -> list[tuple[str, Piece | _Located]]:
        """The pass in order: ("empty"|"copy"|"flat", Piece) and ("located", _Located) items."""
        segments: list[tuple[str, Piece | _Located]] = []
        span: _Located | None = None
        for piece in self.pieces:
            tensor, numel = piece.flat, piece.numel
            found = [self._locate(j, piece) for j in self.used_inputs] if tensor.is_float and numel else []
            where = [w for w in found if w is not None]
            if where and len(where) == len(found):
                files = [w[0] for w in where]
                begins = [w[1] for w in where]
                ends = [w[2] for w in where]
                dtypes = [w[3] for w in where]
                if (
                    span is not None
                    and span.files == files
                    and span.ends == begins
                    and span.in_dtypes == dtypes
                    and span.tensors[-1].out_dtype == tensor.out_dtype
                    and span.numel + numel <= SPAN_LIMIT
                ):
                    span.tensors.append(tensor)
                    span.ends = ends
                    span.numel += numel
                    continue
                span = _Located([tensor], dtypes, files, begins, ends, numel)
                segments.append(("located", span))
                continue
            span = None
            kind = "empty" if numel == 0 else "flat" if tensor.is_float else "copy"
            segments.append((kind, piece))
        return segments

    def _located(self) -> list[_Located]:
        return [item for _, item in self._segments if isinstance(item, _Located)]

    def _chunk(self, fused_kernel: bool) -> int:
        """Elements per chunk within the buffers' budgets."""
        chunk = self.chunk_elements or (FUSED_CHUNK_ELEMENTS if fused_kernel else DEFAULT_CHUNK_ELEMENTS)
        if self.chunk_elements:
            return chunk
        itemsize = max((DTYPES[d][1] for s in self._located() for d in s.in_dtypes), default=4)
        out_size = max((DTYPES[p.tensor.out_dtype][1] for p in self.pieces if p.tensor.is_float), default=4)
        readers = max(1, len(self.used_inputs))
        chunk = min(chunk, READ_BUDGET // (READ_DEPTH * readers * itemsize))
        chunk = min(chunk, OUTPUT_BUDGET // (OUTPUT_BUFFERS * max(1, self.output_count) * max(out_size, 4)))
        return max(MIN_CHUNK_ELEMENTS, chunk)

    # -- the pass ---------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[int]:
        located = self._located()
        chunk = self._chunk(self.kernel == "fused")
        schedules = [
            SpanSchedule(tuple(s.files), tuple(s.starts), s.numel, max(DTYPES[d][1] for d in s.in_dtypes), chunk)
            for s in located
        ]
        reader: ReadAhead | None = None
        if located:
            tap: OnRead | None = None
            if self.observer is not None:
                keys, callback = self._file_keys, self.observer.after_read
                tap = lambda file, offset, view: callback(keys[file], offset, view)  # noqa: E731
            stride = chunk * max(DTYPES[d][1] for s in located for d in s.in_dtypes)
            reader = ReadAhead(
                self._paths, self._identities, schedules, len(self.used_inputs), stride, depth=READ_DEPTH, on_read=tap
            )
        chunks = iter(reader) if reader is not None else iter(())
        span = _Span()
        self._writes = WriteBehind(workers=min(WRITE_WORKERS, len(self.sinks) + (self.rows_sink is not None)))
        try:
            index = 0
            for kind, item in self._segments:
                if isinstance(item, _Located):
                    assert reader is not None
                    yield from self._flush(span)
                    span = _Span()
                    self._merge_located(item, schedules[index], reader, chunks)
                    index += 1
                    for tensor in item.tensors:
                        yield self._bytes_read(tensor)
                    continue
                piece = item
                if kind == "flat":
                    views = [self._view(j, piece) for j in self.used_inputs]
                    if not span.extends(piece.flat, views) or span.numel + piece.numel > SPAN_LIMIT:
                        yield from self._flush(span)
                        span = _Span()
                    span.add(piece.flat, views)
                    continue
                yield from self._flush(span)
                span = _Span()
                if kind == "copy":
                    self._copy_newest(piece)
                yield self._bytes_read(piece.flat)
            yield from self._flush(span)
            self._writes.drain()
        finally:
            self._writes.close()
            if reader is not None:
                reader.close()

    def close(self) -> None:
        """Stop writing: the write thread ends after its current call (an abort; safe at any time)."""
        self._writes.close()

    def _write(self, pieces: _Pieces, outputs: np.ndarray, start: int, size: int) -> int:
        """Hand ``outputs[:, :size]`` (elements ``start:`` of the span) to the sinks, in the write thread."""
        writes = self._writes
        return writes.submit(lambda: pieces.write(outputs, start, size, writes.together))

    def _ring(self, out_name: str, chunk: int) -> _Ring:
        ring = self._rings.get(out_name)
        if ring is None or ring.chunk < chunk:
            if ring is not None:
                ring.wait_all(self._writes)
            ring = self._rings[out_name] = _Ring(self.output_count, chunk, DTYPES[out_name][0])
        return ring

    def _torch_run(
        self, kernel: _TorchKernel, inputs: Sequence[np.ndarray], dtypes: Sequence[str]
    ) -> tuple[np.ndarray, bool, np.ndarray | None]:
        self._writes.wait_for(self._torch_ticket)  # the kernel reuses its result buffer
        return kernel.run(inputs, dtypes)

    def input_files(self) -> list[tuple[Any, FileIdentity | None]]:
        """(path, identity when planned) of every file the pass reads with the read-ahead."""
        return list(zip(self._paths, self._identities))

    def _flush(self, span: _Span) -> Iterator[int]:
        if span.tensors:
            self._merge_span(span)
            for tensor in span.tensors:
                yield self._bytes_read(tensor)

    def _bytes_read(self, tensor: TensorPlan) -> int:
        return _tensor_bytes_read(self.plan, tensor, self.used_inputs)

    def _view(self, j: int, piece: Piece) -> np.ndarray:
        """``piece`` of checkpoint ``j`` as 1-D (a view where the reader can; a block spanning several
        stored chunks is copied together, bounded by the block)."""
        source = self.plan.checkpoints[j].source
        return source.flat(piece.name) if piece.whole else source.region(piece.name, piece.region)

    def _copy_newest(self, piece: Piece) -> None:
        newest = len(self.plan.checkpoints) - 1
        tensor = piece.tensor
        where = self._locate(newest, piece)
        if where is None:
            self._write_all(tensor.name, self._view(newest, piece))
            return
        file, begin, end, dtype = where
        storage, itemsize, _ = DTYPES[dtype]
        step = max(itemsize, COPY_PIECE // itemsize * itemsize)
        for start in range(begin, end, step):
            raw = read_exactly(self._paths[file], self._identities[file], start, min(step, end - start))
            self._write_all(tensor.name, raw.view(storage))

    def _write_all(self, name: str, data: np.ndarray) -> None:
        """Every sink's ``write(name, data)`` in the write thread, waited for (``data`` may be a reader's
        memory, valid only now; these are non-float tensors, few bytes)."""
        sinks = self.sinks

        def task() -> None:
            for sink in sinks:
                sink.write(name, data)

        self._writes.wait_for(self._writes.submit(task))

    def _merge_located(
        self, span: _Located, schedule: SpanSchedule, reader: ReadAhead, chunks: Iterator[tuple[int, int, int]]
    ) -> None:
        in_names = set(span.in_dtypes)
        in_name = in_names.pop() if len(in_names) == 1 else None
        out_name = span.tensors[0].out_dtype
        use_fused = self.kernel == "fused" and in_name in fused.INPUT_KINDS and out_name in fused.OUTPUT_KINDS
        pieces = _Pieces(span.tensors, self.sinks, self.rows_sink)
        ring = self._ring(out_name, schedule.chunk) if use_fused else None
        for c in range(schedule.chunks):
            _, _, slot = next(chunks)
            rows = reader.rows(slot)
            start = c * schedule.chunk
            size = min(span.numel, start + schedule.chunk) - start
            inputs = [rows[j, : size * DTYPES[d][1]].view(DTYPES[d][0]) for j, d in enumerate(span.in_dtypes)]
            if ring is not None and in_name is not None:
                out = ring.next(self._writes)
                addresses = np.array([x.ctypes.data for x in inputs], dtype=np.int64)
                bad = fused.weighted_sums(addresses, in_name, self._coefs32, size, out)
                if bad:
                    self._find_non_finite(span.tensors, [[x] for x in inputs], start, start + size, chunk_start=start)
                ring.used(self._write(pieces, out, start, size))
                if self.chunk_sink is not None:
                    self.chunk_sink.write_chunk(inputs, span.in_dtypes, out, out_name, size)
            else:
                result, finite, lost = self._torch_run(self._torch(out_name, schedule.chunk), inputs, span.in_dtypes)
                if not finite:
                    self._find_non_finite(span.tensors, [[x] for x in inputs], start, start + size, chunk_start=start)
                if lost is not None:
                    self._count_overflow(span.tensors, start, lost)
                self._torch_ticket = self._write(pieces, result, start, size)
                if self.chunk_sink is not None:
                    self.chunk_sink.write_chunk(inputs, span.in_dtypes, result, out_name, size)

    def _merge_span(self, span: _Span) -> None:
        inputs = span.inputs()
        out_name = span.tensors[0].out_dtype
        j0 = self.used_inputs
        in_dtypes = [self.plan.checkpoints[j].source.tensors[span.tensors[0].name].dtype for j in j0]
        in_names = set(in_dtypes)
        in_name = in_names.pop() if len(in_names) == 1 else None
        use_fused = self.kernel == "fused" and in_name in fused.INPUT_KINDS and out_name in fused.OUTPUT_KINDS
        chunk = min(self.chunk_elements or (FUSED_CHUNK_ELEMENTS if use_fused else DEFAULT_CHUNK_ELEMENTS), span.numel)
        chunk = min(chunk, max(MIN_CHUNK_ELEMENTS, OUTPUT_BUDGET // (OUTPUT_BUFFERS * max(1, self.output_count) * 4)))
        pieces = _Pieces(span.tensors, self.sinks, self.rows_sink)
        views = [list(v) for v in span.views]
        if use_fused and in_name is not None:
            ring = self._ring(out_name, chunk)
            bases = np.array([x.ctypes.data for x in inputs], dtype=np.int64)
            step = inputs[0].itemsize
            for start in range(0, span.numel, chunk):
                size = min(span.numel, start + chunk) - start
                out = ring.next(self._writes)
                bad = fused.weighted_sums(bases + step * start, in_name, self._coefs32, size, out)
                if bad:
                    self._find_non_finite(span.tensors, views, start, start + size)
                ring.used(self._write(pieces, out, start, size))
                if self.chunk_sink is not None:
                    self.chunk_sink.write_chunk(
                        [x[start : start + size] for x in inputs], in_dtypes, out, out_name, size
                    )
            return
        kernel = self._torch(out_name, chunk)
        for start in range(0, span.numel, chunk):
            stop = min(span.numel, start + chunk)
            chunk_inputs = [x[start:stop] for x in inputs]
            result, finite, lost = self._torch_run(kernel, chunk_inputs, in_dtypes)
            if not finite:
                self._find_non_finite(span.tensors, views, start, stop)
            if lost is not None:
                self._count_overflow(span.tensors, start, lost)
            self._torch_ticket = self._write(pieces, result, start, stop - start)
            if self.chunk_sink is not None:
                self.chunk_sink.write_chunk(chunk_inputs, in_dtypes, result, out_name, stop - start)

    def _count_overflow(self, tensors: Sequence[TensorPlan], start: int, lost: np.ndarray) -> None:
        """Add up, per tensor, the values (over all outputs) whose finite sum overflowed the output dtype;
        ``lost`` counts them per element of the chunk starting at element ``start`` of the span."""
        offset = 0
        for tensor in tensors:
            numel = math.prod(tensor.shape)
            lo, hi = max(start, offset) - start, min(start + lost.size, offset + numel) - start
            offset += numel
            if lo < hi:
                count = int(lost[lo:hi].sum())
                if count:
                    self.overflows[tensor.name] = self.overflows.get(tensor.name, 0) + count

    def _torch(self, out_name: str, chunk: int) -> _TorchKernel:
        kernel = self._torch_kernel
        if kernel is None or kernel.out_name != out_name or kernel.chunk < chunk:
            kernel = self._torch_kernel = _TorchKernel(self.coefficients[:, self.used_inputs], out_name, chunk)
        return kernel

    def _find_non_finite(
        self, tensors: Sequence[TensorPlan], views: Sequence[Sequence[np.ndarray]], start: int, stop: int,
        chunk_start: int | None = None,
    ) -> None:  # fmt: skip
        """Warn once per (tensor, checkpoint) holding NaN or Inf in elements ``start:stop`` of the span.

        ``views``: per tensor per checkpoint its whole data; or, with ``chunk_start``, one entry holding
        per checkpoint the chunk's data (elements ``chunk_start:...`` of the span).
        """
        offset = 0
        for t, tensor in enumerate(tensors):
            numel = math.prod(tensor.shape)
            lo, hi = max(start, offset), min(stop, offset + numel)
            base = offset
            offset += numel
            if lo >= hi:
                continue
            for n, j in enumerate(self.used_inputs):
                key = (tensor.name, j)
                if key in self._warned:
                    continue
                if chunk_start is None:
                    data = views[t][n][lo - base : hi - base]
                else:
                    data = views[n][0][lo - chunk_start : hi - chunk_start]
                dtype = self.plan.checkpoints[j].source.tensors[tensor.name].dtype
                if not all_finite(data, dtype):
                    self._warned.add(key)
                    ckpt = self.plan.checkpoints[j]
                    self.on_warning(f"{ckpt.path}: tensor {tensor.name!r} (step {ckpt.step}) has NaN or Inf values")


def bytes_read(plan: Plan, tensors: Sequence[TensorPlan] | None = None) -> int:
    """The input bytes a pass over ``tensors`` (default: all of the plan's) reads, for progress bars."""
    used = used_inputs(plan)
    return sum(_tensor_bytes_read(plan, t, used) for t in (plan.tensors if tensors is None else tensors))


def _tensor_bytes_read(plan: Plan, tensor: TensorPlan, used: Sequence[int]) -> int:
    """Bytes read for ``tensor`` (or a block of it, given as a 1-D tensor of its name and size)."""
    readers = used if tensor.is_float else [len(plan.checkpoints) - 1]  # non-float: copied from the newest
    numel = math.prod(tensor.shape)
    return sum(numel * DTYPES[plan.checkpoints[j].source.tensors[tensor.name].dtype][1] for j in readers)


class _TorchKernel:
    """The fallback kernel on one chunk: torch element-wise ops over numpy buffers (imports torch)."""

    def __init__(self, coefficients: np.ndarray, out_name: str, chunk: int) -> None:
        import torch

        from ckpt_ema.io.torch_edge import TORCH_DTYPES, to_numpy, to_torch

        self.torch, self.to_torch, self.to_numpy = torch, to_torch, to_numpy
        self.out_name, self.chunk = out_name, chunk
        outputs = coefficients.shape[0]
        self.acc_dtype = torch.float64 if out_name == "F64" else torch.float32
        self.out_dtype = TORCH_DTYPES[out_name]
        self.accumulators = torch.empty((outputs, chunk), dtype=self.acc_dtype)
        self.upcast = torch.empty(chunk, dtype=self.acc_dtype)
        self.rounded = torch.empty((outputs, chunk), dtype=self.out_dtype) if self.out_dtype != self.acc_dtype else None
        self.rows = [
            [(k, float(coefficients[k, j])) for k in range(outputs) if coefficients[k, j] != 0.0]
            for j in range(coefficients.shape[1])
        ]
        self.storage = DTYPES[out_name][0]

    def run(self, inputs: Sequence[np.ndarray], dtypes: Sequence[str]) -> tuple[np.ndarray, bool, np.ndarray | None]:
        """(outputs x size) results in the output storage type, whether every sum is finite, and per element
        how many outputs' finite sums overflowed the output dtype (None when none did)."""
        torch = self.torch
        size = inputs[0].size
        outputs = self.accumulators.shape[0]
        started = [False] * outputs
        for x, dtype, row in zip(inputs, dtypes, self.rows):
            source = self.to_torch(x, dtype)
            if source.dtype != self.acc_dtype:
                source = self.upcast[:size].copy_(source)
            for k, coef in row:
                if started[k]:
                    self.accumulators[k, :size].add_(source, alpha=coef)
                else:
                    torch.mul(source, coef, out=self.accumulators[k, :size])
                    started[k] = True
        # A non-finite input with a non-zero coefficient makes some accumulator non-finite; one
        # reduction per chunk finds that cheaply, and only then are the inputs searched.
        finite = math.isfinite(float(self.accumulators[:, :size].sum()))
        full = self.accumulators
        lost = None
        if self.rounded is not None:
            self.rounded[:, :size].copy_(self.accumulators[:, :size])
            full = self.rounded
            if self.out_name in RANGE_LIMITED:  # a finite sum beyond FP16's (or FP8's) range becomes inf/NaN
                rounded = self.rounded[:, :size]
                rounded = rounded.to(torch.float16) if rounded.element_size() == 1 else rounded
                overflowed = torch.isfinite(self.accumulators[:, :size]) & ~torch.isfinite(rounded)
                if bool(overflowed.any()):
                    lost = overflowed.sum(dim=0).numpy()
        return self.to_numpy(full).reshape(outputs, self.chunk)[:, :size], finite, lost


class _Ring:
    """Output buffers used in turn: a buffer is computed into again only once its last write is done."""

    def __init__(self, outputs: int, chunk: int, storage: type) -> None:
        self.chunk = chunk
        self.buffers: list[np.ndarray] = [np.empty((outputs, chunk), dtype=storage) for _ in range(OUTPUT_BUFFERS)]
        self.tickets: list[int | None] = [None] * len(self.buffers)
        self.turn = 0

    def next(self, writes: WriteBehind) -> np.ndarray:
        """The next buffer, once free."""
        self.turn = (self.turn + 1) % len(self.buffers)
        writes.wait_for(self.tickets[self.turn])
        return self.buffers[self.turn]

    def used(self, ticket: int) -> None:
        """The buffer ``next`` returned is being written by task ``ticket``."""
        self.tickets[self.turn] = ticket

    def wait_all(self, writes: WriteBehind) -> None:
        for ticket in self.tickets:
            writes.wait_for(ticket)


Together = Callable[[Sequence[Callable[[], None]]], None]


def _write_cuts(sink: TensorSink, output: np.ndarray, cuts: Sequence[tuple[str, int, int]]) -> None:
    for name, lo, hi in cuts:
        sink.write(name, output[lo:hi])


def _write_rows(sink: RowsSink, outputs: np.ndarray, cuts: Sequence[tuple[str, int, int]]) -> None:
    for name, lo, hi in cuts:
        sink.write_rows(name, outputs[:, lo:hi])


class _Pieces:
    """Hands each chunk of a span's outputs to the sinks, cut at the tensors' boundaries."""

    def __init__(self, tensors: Sequence[TensorPlan], sinks: Sequence[TensorSink], rows_sink: RowsSink | None) -> None:
        self.sinks = sinks
        self.rows_sink = rows_sink
        self.bounds = []
        offset = 0
        for tensor in tensors:
            numel = math.prod(tensor.shape)
            self.bounds.append((offset, offset + numel, tensor.name))
            offset += numel
        self.index = 0

    def write(self, outputs: np.ndarray, start: int, size: int, together: Together = one_by_one) -> None:
        """``outputs[k, :size]`` holds elements ``start:start+size`` of the span for output ``k``; each sink's
        calls (and the rows sink's) are one job of ``together``, which may run the jobs at the same time."""
        cuts = self._cuts(start, size)
        jobs: list[Callable[[], None]] = [
            partial(_write_cuts, sink, outputs[k], cuts) for k, sink in enumerate(self.sinks)
        ]
        if self.rows_sink is not None:
            jobs.append(partial(_write_rows, self.rows_sink, outputs, cuts))
        together(jobs)

    def _cuts(self, start: int, size: int) -> list[tuple[str, int, int]]:
        """(tensor, lo, hi) of the chunk's pieces, ``lo:hi`` counted from the chunk's start."""
        stop, cuts = start + size, []
        while self.index < len(self.bounds):
            lo, hi, name = self.bounds[self.index]
            if lo >= stop:
                break
            cuts.append((name, max(lo, start) - start, min(hi, stop) - start))
            if hi > stop:
                break
            self.index += 1
        return cuts
