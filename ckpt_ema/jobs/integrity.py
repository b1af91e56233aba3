"""The inputs' SHA-256 and weight norms, computed while the merge streams, and the diverged-checkpoint check.

Background threads read every input file once, in file order, and hash it (``hashlib`` and ``torch``
release the GIL, so this runs beside the merge). They follow the merge: when the engine asks for a
tensor, the hasher of that file is moved up to the tensor's end, so both read the same pages from the
page cache at about the same time; the rest of each file (headers, tensors the pass does not read,
checkpoints with coefficient 0) is hashed when the pass ends. Memory: one 8 MB buffer per thread.

While hashing a safetensors file, each floating-point tensor's sum of squares is added up too: that is
how a checkpoint whose weights are far from its neighbours' (a diverged step) is found without another
pass over the data.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckpt_ema.errors import InputError
from ckpt_ema.io.safetensors_format import DTYPES, TensorInfo
from ckpt_ema.plan.model import Plan

BLOCK = 8 << 20  # bytes per read; a multiple of every element size
SPIKE_FACTOR = 10.0  # a checkpoint whose weight norm jumps this much from the previous one is suspicious
HASH_WIDTH = 64
IDLE_SECONDS = 0.5


def sha256_key(index: int) -> str:
    """The provenance key of input ``index``'s SHA-256 (``index`` as in ``ckpt_ema.input.N.path``)."""
    return f"ckpt_ema.input.{index}.sha256"


@dataclass
class _FileState:
    """One weight file being hashed: where the hash is, and its floating-point tensors in file order."""

    path: Path
    size: int
    spans: list[tuple[int, int, str, str]]  # (begin, end, name, dtype) of float tensors, sorted
    layout_known: bool
    sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    cursor: int = 0
    target: int = 0
    next_span: int = 0
    fd: int | None = None
    scheduled: bool = False


class InputHasher:
    """Hashes every file of ``plan.checkpoints`` in background threads; ``finish()`` returns the results."""

    def __init__(self, plan: Plan, threads: int | None = None) -> None:
        self.plan = plan
        self._files: dict[tuple[int, int], _FileState] = {}
        self.norms: list[dict[str, float]] = [{} for _ in plan.checkpoints]
        self.hashed: list[int] = []  # checkpoints whose files are known, so whose SHA-256 is recorded
        for j, checkpoint in enumerate(plan.checkpoints):
            source = checkpoint.source
            self.hashed.append(j)
            names = {(source.file_number(n), source.stored_name(n)): n for n in source.tensors}
            for number, weight_file in enumerate(source.files):
                infos = weight_file.tensors.values()
                known = all(isinstance(info, TensorInfo) for info in infos)  # real byte ranges (safetensors)
                spans = sorted(
                    (info.begin, info.end, names.get((number, stored), stored), info.dtype)
                    for stored, info in weight_file.tensors.items()
                    if isinstance(info, TensorInfo) and known and info.is_float and info.end > info.begin
                )
                self._files[(j, number)] = _FileState(weight_file.path, weight_file.size, spans, known)
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, int]] = queue.Queue()
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        # Threads start with work and end after IDLE_SECONDS without any, so none outlives the job.
        self._threads = threads or max(1, min(4, os.cpu_count() or 1, len(self._files)))
        self._alive = 0
        self._workers: list[threading.Thread] = []

    def before_read(self, checkpoint: int, name: str) -> None:
        """The engine is about to read ``name`` of ``checkpoint``: hash its file at least up to the tensor's end."""
        source = self.plan.checkpoints[checkpoint].source
        number = source.file_number(name)
        info = source.files[number].tensors[source.stored_name(name)]
        self.advance((checkpoint, number), info.end if isinstance(info, TensorInfo) else 0)

    def advance(self, key: tuple[int, int], end: int) -> None:
        """Ask for file ``key`` (checkpoint, file number) to be hashed at least up to byte ``end``."""
        state = self._files[key]
        with self._lock:
            state.target = max(state.target, end if state.layout_known else state.size)
            if state.scheduled or state.cursor >= state.target:
                return
            state.scheduled = True
        self._queue.put(key)
        with self._lock:
            if self._alive < self._threads:
                self._alive += 1
                worker = threading.Thread(target=self._work, name="ckpt-ema-hash", daemon=True)
                self._workers.append(worker)
                worker.start()

    def finish(self) -> dict[int, str]:
        """Hash what is left, wait, and return the SHA-256 (hex) of each checkpoint in ``hashed``.

        A checkpoint made of several files gets the SHA-256 of its ``sha256sum``-style manifest
        (``<hex>  <relative path>`` lines in file order).
        """
        for key, state in self._files.items():
            self.advance(key, state.size)
        self._queue.join()
        if self._error is not None:
            raise self._error
        digests = {}
        for j in self.hashed:
            files = self.plan.checkpoints[j].source.files
            hexes = [self._files[(j, n)].sha.hexdigest() for n in range(len(files))]
            if len(files) == 1:
                digests[j] = hexes[0]
            else:
                manifest = "".join(f"{h}  {f.relpath}\n" for h, f in zip(hexes, files))
                digests[j] = hashlib.sha256(manifest.encode("utf-8")).hexdigest()
        return digests

    def cancel(self) -> None:
        """Stop the threads at their next block (after an error or an interruption); close the files."""
        self._cancelled.set()
        with self._lock:
            for state in self._files.values():
                if not state.scheduled:  # a scheduled file is closed by its thread
                    self._close(state)
        # Wait for the threads (they stop at their next block, then idle out), so that none is still in
        # torch code while the interpreter exits after Ctrl-C/SIGTERM ("terminate called without ...").
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout=IDLE_SECONDS + 2.0)

    def _work(self) -> None:
        buffer = bytearray(BLOCK)
        while True:
            try:
                key = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:  # advance() puts before it counts threads, under this lock
                    if self._queue.empty():
                        self._alive -= 1
                        return
                continue
            state = self._files[key]
            try:
                while not self._cancelled.is_set():
                    with self._lock:
                        if state.cursor >= state.target:
                            state.scheduled = False
                            break
                    self._step(key[0], state, buffer)
            except OSError as exc:
                self._error = self._error or InputError(f"{state.path}: cannot read ({exc.strerror or exc})")
                self._cancelled.set()
            except BaseException as exc:  # reported by finish(); the merge itself stops there
                self._error = self._error or exc
                self._cancelled.set()
            finally:
                if self._cancelled.is_set() or state.cursor >= state.size:
                    with self._lock:
                        self._close(state)
                self._queue.task_done()

    def _step(self, checkpoint: int, state: _FileState, buffer: bytearray) -> None:
        """Hash one block from the cursor: a piece of a float tensor (also summed), or of what lies between."""
        if state.fd is None:
            state.fd = os.open(state.path, os.O_RDONLY)
            if os.fstat(state.fd).st_size != state.size:
                raise InputError(f"{state.path}: the file changed size while being read")
        spans = state.spans
        while state.next_span < len(spans) and spans[state.next_span][1] <= state.cursor:
            state.next_span += 1
        span = spans[state.next_span] if state.next_span < len(spans) else None
        if span is not None and span[0] <= state.cursor:
            begin, end, name, dtype = span
            stop = min(end, begin + ((state.cursor - begin) // BLOCK + 1) * BLOCK)
        else:
            stop = min(state.size, state.cursor + BLOCK, span[0] if span is not None else state.size)
            name = dtype = ""
        view = memoryview(buffer)[: stop - state.cursor]
        done = 0
        while done < len(view):
            count = os.preadv(state.fd, [view[done:]], state.cursor + done)
            if count == 0:
                raise InputError(f"{state.path}: the file changed size while being read")
            done += count
        state.sha.update(view)
        if name:
            torch_dtype, itemsize, _ = DTYPES[dtype]
            values = torch.frombuffer(buffer, dtype=torch_dtype, count=len(view) // itemsize)
            values = values.to(torch.float64 if dtype == "F64" else torch.float32)
            norms = self.norms[checkpoint]
            norms[name] = norms.get(name, 0.0) + float(torch.dot(values, values))
        with self._lock:
            state.cursor = stop

    @staticmethod
    def _close(state: _FileState) -> None:
        if state.fd is not None:
            os.close(state.fd)
            state.fd = None


def diverged_checkpoints(plan: Plan, norms: Sequence[dict[str, float]], warn: Callable[[str], None]) -> None:
    """Warn about each checkpoint whose weight norm jumps by ``SPIKE_FACTOR`` from the previous one's.

    The norm is over all floating-point tensors of the plan. A jump up is warned (a diverged step); a
    fall by the same factor too, unless it is the return from a checkpoint already warned about.
    ``--init`` weights and checkpoints without known norms (torch files) or with NaN/Inf are skipped.
    """
    names = [t.name for t in plan.tensors if t.is_float]
    previous: tuple[int, float] | None = None
    previous_warned = False
    for j, checkpoint in enumerate(plan.checkpoints):
        if checkpoint.is_init or not norms[j] or not all(n in norms[j] for n in names):
            continue
        total = math.sqrt(sum(norms[j][n] for n in names))
        if not math.isfinite(total) or total == 0.0:
            continue
        warned = False
        if previous is not None:
            k, before = previous
            ratio = total / before
            if ratio > SPIKE_FACTOR or (ratio < 1 / SPIKE_FACTOR and not previous_warned):
                tensor, change = _largest_change(names, norms[j], norms[k])
                warn(
                    f"{checkpoint.path}: the weights' norm at step {checkpoint.step} is {_times(ratio)} that at "
                    f"step {plan.checkpoints[k].step} (largest change: tensor {tensor!r}, {_times(change)}); "
                    "a diverged or damaged checkpoint?"
                )
                warned = True
        previous, previous_warned = (j, total), warned


def _largest_change(names: Sequence[str], now: dict[str, float], before: dict[str, float]) -> tuple[str, float]:
    best, best_change = names[0], 1.0
    for name in names:
        a, b = now[name], before[name]
        if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b):
            change = math.sqrt(a / b)
            if abs(math.log(change)) > abs(math.log(best_change)):
                best, best_change = name, change
    return best, best_change


def _times(ratio: float) -> str:
    return f"{ratio:.3g}x"
