"""The inputs' hashes and weight norms, computed from the bytes the merge reads, and the diverged-checkpoint check.

The hash is BLAKE3 by default (``ckpt_ema.input.N.blake3``; about 4x SHA-256's speed per core, so that it
hides behind the disk), or SHA-256 on request (``ckpt_ema.input.N.sha256``, the ids the Hugging Face Hub
shows for LFS files; ``merge --hash-algorithm sha256``). Without the ``blake3`` package, SHA-256.

The merge's read-ahead hands every piece of a file it reads to :meth:`InputHasher.after_read`, in the thread
that read it and in the plan's order, which is the newest checkpoint's file order (``plan.model.plan_tensors``):
the piece is hashed there, from the very buffer the kernel then merges, so each input is read once and its
recorded hash is that of the bytes merged. A piece that comes before the hash's cursor (a file laid out in
another order than the newest one) was already hashed from a read of the hasher's own: correct, but that
file is read twice.
What the pass does not read (headers, non-float tensors, tensors before a piece, checkpoints with
coefficient 0, files of readers without byte ranges) is read with ``pread`` and hashed in between or when
the pass ends, by up to one thread per CPU. (``hashlib`` releases the GIL, so hashing runs beside the
kernel.) Memory: one 8 MB buffer per thread that reads what the pass did not.

While hashing a safetensors file, each floating-point tensor's sum of squares is added up too: that is
how a checkpoint whose weights are far from its neighbours' (a diverged step) is found without another
pass over the data.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckpt_ema.engine.fused import sum_of_squares
from ckpt_ema.errors import InputError
from ckpt_ema.io.identity import check_unchanged
from ckpt_ema.io.safetensors_format import TensorInfo
from ckpt_ema.plan.model import Plan

BLOCK = 8 << 20  # bytes per read of what the pass does not read; a multiple of every element size
SPIKE_FACTOR = 10.0  # a checkpoint whose weight norm jumps this much from the previous one is suspicious
HASH_WIDTH = 64  # hex digits of either hash (256 bits)
HASH_ALGORITHMS = ("blake3", "sha256")


def _blake3() -> Callable[[], Any] | None:
    try:
        from blake3 import blake3
    except ImportError:
        return None
    return lambda: blake3(max_threads=1)  # one thread per file: the files are hashed in parallel


_NEW_HASH: dict[str, Callable[[], Any] | None] = {"blake3": _blake3(), "sha256": hashlib.sha256}
DEFAULT_HASH = "blake3" if _NEW_HASH["blake3"] is not None else "sha256"


def hash_key(index: int, algorithm: str = "sha256") -> str:
    """The provenance key of input ``index``'s hash (``index`` as in ``ckpt_ema.input.N.path``)."""
    return f"ckpt_ema.input.{index}.{algorithm}"


def sha256_key(index: int) -> str:
    """The provenance key of input ``index``'s SHA-256."""
    return hash_key(index, "sha256")


def new_hash(algorithm: str) -> Any:
    """A fresh hash object (``update``, ``hexdigest``) of ``algorithm``."""
    if algorithm not in _NEW_HASH:
        raise ValueError(f"hash algorithm must be one of {', '.join(HASH_ALGORITHMS)}, got {algorithm!r}")
    make = _NEW_HASH[algorithm]
    if make is None:
        raise ValueError("the blake3 hash needs the blake3 package: pip install blake3 (or choose sha256)")
    return make()


@dataclass
class _FileState:
    """One weight file being hashed: how far, and its floating-point tensors in file order."""

    path: Path
    size: int
    spans: list[tuple[int, int, str, str]]  # (begin, end, name, dtype) of float tensors, sorted
    sha: Any  # the hash object (BLAKE3 or SHA-256)
    cursor: int = 0
    next_span: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class InputHasher:
    """Hashes every file of ``plan.checkpoints``; the pass feeds it (``after_read``), ``finish()`` returns the results.

    ``algorithm``: ``"blake3"`` or ``"sha256"`` (default: :data:`DEFAULT_HASH`).
    """

    def __init__(self, plan: Plan, threads: int | None = None, algorithm: str | None = None) -> None:
        self.plan = plan
        self.algorithm = algorithm or DEFAULT_HASH
        new_hash(self.algorithm)  # refuses an unknown or unavailable algorithm now
        self._files: dict[tuple[int, int], _FileState] = {}
        self.norms: list[dict[str, float]] = [{} for _ in plan.checkpoints]
        self.hashed: list[int] = []  # checkpoints whose files are known, so whose SHA-256 is recorded
        for j, checkpoint in enumerate(plan.checkpoints):
            source = checkpoint.source
            self.hashed.append(j)
            names = {(source.file_number(n), source.stored_name(n)): n for n in source.tensors}
            for number, weight_file in enumerate(source.files):
                spans = sorted(
                    (info.begin, info.end, names.get((number, stored), stored), info.dtype)
                    for stored, info in weight_file.tensors.items()
                    if isinstance(info, TensorInfo) and info.is_float and info.end > info.begin  # safetensors
                )
                self._files[(j, number)] = _FileState(
                    weight_file.path, weight_file.size, spans, new_hash(self.algorithm)
                )
        self._threads = threads or max(1, min(4, os.cpu_count() or 1, len(self._files)))
        self._cancelled = threading.Event()

    def after_read(self, key: tuple[int, int], offset: int, view: memoryview) -> None:
        """Bytes ``[offset, offset + len(view))`` of file ``key`` (checkpoint, file number), just read."""
        state = self._files.get(key)
        if state is None:
            return
        with state.lock:
            end = offset + len(view)
            if end <= state.cursor:
                return  # read again out of file order: hashed already
            if offset > state.cursor:
                self._hash_range(key[0], state, offset)  # what lies before it, read here
            self._consume(key[0], state, view[state.cursor - offset :])

    def finish(self) -> dict[int, str]:
        """Hash what is left of every file, and return the SHA-256 (hex) of each checkpoint in ``hashed``.

        A checkpoint made of several files gets the hash of its ``sha256sum``-style manifest
        (``<hex>  <relative path>`` lines in file order), with the same algorithm.
        """

        def rest(key: tuple[int, int]) -> None:
            state = self._files[key]
            with state.lock:
                self._hash_range(key[0], state, state.size)

        with ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="ckpt-ema-hash") as pool:
            for future in [pool.submit(rest, key) for key in self._files]:
                future.result()
        digests = {}
        for j in self.hashed:
            files = self.plan.checkpoints[j].source.files
            hexes = [self._files[(j, n)].sha.hexdigest() for n in range(len(files))]
            if len(files) == 1:
                digests[j] = hexes[0]
            else:
                manifest = "".join(f"{h}  {f.relpath}\n" for h, f in zip(hexes, files))
                digest = new_hash(self.algorithm)
                digest.update(manifest.encode("utf-8"))
                digests[j] = digest.hexdigest()
        return digests

    def cancel(self) -> None:
        """Make a running ``finish()`` stop at its next block (after an error or an interruption)."""
        self._cancelled.set()

    def _hash_range(self, checkpoint: int, state: _FileState, stop: int) -> None:
        """Read and hash the file from its cursor up to ``stop`` (blocks cut at float tensors' boundaries)."""
        if state.cursor >= stop:
            return
        buffer = np.empty(min(BLOCK, stop - state.cursor), dtype=np.uint8)
        try:
            fd = os.open(state.path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"{state.path}: cannot read ({exc.strerror or exc})") from None
        try:
            while state.cursor < stop:
                if self._cancelled.is_set():
                    raise InputError(f"{state.path}: hashing cancelled")
                spans = state.spans
                while state.next_span < len(spans) and spans[state.next_span][1] <= state.cursor:
                    state.next_span += 1
                span = spans[state.next_span] if state.next_span < len(spans) else None
                if span is not None and span[0] <= state.cursor:
                    begin = span[0]
                    piece_end = min(span[1], begin + ((state.cursor - begin) // BLOCK + 1) * BLOCK)
                else:
                    piece_end = min(state.size, state.cursor + BLOCK, span[0] if span is not None else state.size)
                piece_end = min(piece_end, stop, state.cursor + len(buffer))
                view = memoryview(buffer)[: piece_end - state.cursor]  # type: ignore[arg-type]
                done = 0
                while done < len(view):
                    count = os.preadv(fd, [view[done:]], state.cursor + done)
                    if count == 0:
                        raise InputError(f"{state.path}: truncated while being read; no output written")
                    done += count
                self._consume(checkpoint, state, view)
        except OSError as exc:
            raise InputError(f"{state.path}: cannot read ({exc.strerror or exc})") from None
        finally:
            os.close(fd)

    def _consume(self, checkpoint: int, state: _FileState, view: memoryview) -> None:
        """Hash bytes starting at the cursor and add the float tensors' sums of squares over them."""
        start, stop = state.cursor, state.cursor + len(view)
        state.sha.update(view)
        spans = state.spans
        index = state.next_span
        while index < len(spans) and spans[index][1] <= start:
            index += 1
        state.next_span = index
        norms = self.norms[checkpoint]
        while index < len(spans) and spans[index][0] < stop:
            begin, end, name, dtype = spans[index]
            lo, hi = max(begin, start), min(end, stop)
            if lo < hi:
                norms[name] = norms.get(name, 0.0) + sum_of_squares(view[lo - start : hi - start], dtype)
            if end > stop:
                break
            index += 1
        state.cursor = stop


def check_inputs_unchanged(plan: Plan) -> None:
    """Raise ``InputError`` naming the first input file that changed since its header was read."""
    for checkpoint in plan.checkpoints:
        for weight_file in checkpoint.source.files:
            check_unchanged(weight_file.path, weight_file.identity)


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
