"""Reading the inputs ahead of the kernel: ``pread`` into a few reusable buffers, in background threads.

The pass knows from the plan which bytes of which files it needs, chunk after chunk (one piece per used
checkpoint per chunk). :class:`ReadAhead` walks that schedule in reader threads, each owning a fixed
subset of the checkpoints, and fills buffer *sets* (one row per checkpoint) ``depth`` chunks ahead of the
consumer: while the kernel computes chunk ``c``, the disk (or the page cache) delivers ``c + 1 ...``.

Why ``pread`` into buffers rather than a memory mapping: a file truncated under a mapping kills the
process with SIGBUS when a missing page is touched; a short read here is an error naming the file.
A tap (``on_read``) sees every piece right after it was read, in file order for each file, in the thread
that read it: the inputs' hash is computed from the very bytes that are merged.

When the pass starts, a thread asks the disk for the first ``START_WINDOW`` bytes of the schedule (in
rounds across the files, first chunks first): the disk then works while numba and the kernel load
(~0.4 s, before the first chunk is computed), which the readers, ``depth`` chunks ahead, cannot cover.

Memory: ``depth x checkpoints x stride`` bytes, fixed when the pass starts; open files: one per checkpoint
being read, at most ``MAX_OPEN`` at once (others are opened for each read).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_ema.errors import InputError
from ckpt_ema.io.identity import FileIdentity, check_unchanged

ALIGN = 64  # each row of a buffer set starts on a cache line
MAX_OPEN = 256  # files kept open by the readers (more checkpoints: opened per read), and at most a
# quarter of the process's limit on open files
_FADVISE = getattr(os, "posix_fadvise", None)  # bound once (POSIX only)
PREFETCH = 8  # chunks past the one being read whose bytes the disk is asked for (POSIX_FADV_WILLNEED)
START_WINDOW = 512 << 20  # bytes the disk is asked for as the pass starts (at most 1/8 of the free memory)
START_ROUND = 4  # chunks of every file asked for at a time within that window, first chunks first


@dataclass(frozen=True)
class Piece:
    """Bytes ``[offset, offset + nbytes)`` of file ``file`` (an index into the reader's files)."""

    file: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SpanSchedule:
    """A run of ``numel`` elements of ``itemsize`` bytes lying from ``starts[j]`` in each checkpoint ``j``'s
    file ``files[j]``, read in chunks of ``chunk`` elements."""

    files: tuple[int, ...]
    starts: tuple[int, ...]
    numel: int
    itemsize: int
    chunk: int

    @property
    def chunks(self) -> int:
        return -(-self.numel // self.chunk)

    def piece(self, j: int, c: int) -> Piece:
        lo = c * self.chunk
        n = min(self.numel, lo + self.chunk) - lo
        return Piece(self.files[j], self.starts[j] + lo * self.itemsize, n * self.itemsize)


OnRead = Callable[[int, int, memoryview], None]  # (file, offset, bytes just read)


def _max_open() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_OPEN
    return MAX_OPEN if soft == resource.RLIM_INFINITY else max(4, min(MAX_OPEN, soft // 4))


class _Files:
    """Open descriptors by file index, at most ``MAX_OPEN`` at once; each file's identity checked when opened."""

    def __init__(self, paths: Sequence[Path], identities: Sequence[FileIdentity | None]) -> None:
        self.paths = list(paths)
        self.identities = list(identities)
        self._fds: dict[int, int] = {}
        self._checked: set[int] = set()
        self._lock = threading.Lock()

    def pread_into(self, file: int, view: memoryview, offset: int) -> None:
        fd, keep = self._get(file)
        try:
            done = 0
            while done < len(view):
                count = os.preadv(fd, [view[done:]], offset + done)
                if count == 0:
                    path = self.paths[file]
                    raise InputError(
                        f"{path}: truncated while being read (byte {offset + done} is past its end, "
                        f"now {os.fstat(fd).st_size} bytes); no output written"
                    )
                done += count
        except OSError as exc:
            raise InputError(f"{self.paths[file]}: cannot read ({exc.strerror or exc})") from None
        finally:
            if not keep:
                os.close(fd)

    def prefetch(self, file: int, offset: int, nbytes: int) -> None:
        """Ask the kernel to read bytes ``[offset, offset + nbytes)`` into the page cache, without waiting:
        the disk works on the chunks ahead while the reader copies, hashes or waits for the consumer."""
        if _FADVISE is None or nbytes <= 0:
            return
        fd, keep = self._get(file)
        try:
            _FADVISE(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint
        finally:
            if not keep:
                os.close(fd)

    def _get(self, file: int) -> tuple[int, bool]:
        with self._lock:
            fd = self._fds.get(file)
            if fd is not None:
                return fd, True
        path = self.paths[file]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if file not in self._checked:
            try:
                check_unchanged(path, self.identities[file], os.fstat(fd))
            except BaseException:
                os.close(fd)
                raise
            if _FADVISE is not None:
                _FADVISE(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead window
        with self._lock:
            self._checked.add(file)
            if len(self._fds) < _max_open():
                self._fds[file] = fd
                return fd, True
        return fd, False

    def close(self, file: int | None = None) -> None:
        with self._lock:
            numbers = list(self._fds) if file is None else [file] if file in self._fds else []
            for number in numbers:
                os.close(self._fds.pop(number))


class ReadAhead:
    """Iterate to get each chunk's buffer set in order: ``(span index, chunk index, rows)``.

    ``rows[j]`` is a ``uint8`` view of checkpoint ``j``'s piece of the chunk; it stays valid until the next
    item is asked for. Reading runs ``depth`` chunks ahead in ``threads`` threads; the first error (a
    truncated file, an unreadable one) is raised by the iteration.

    Args:
        paths, identities: the files (by index, as in the schedules) and what they must still be.
        spans: the schedule; every span has one entry per checkpoint, in the same order.
        checkpoints: the number of rows of a set (checkpoints read).
        stride: bytes per row, at least the largest piece.
        on_read: called in the reading thread with each piece just read.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        identities: Sequence[FileIdentity | None],
        spans: Sequence[SpanSchedule],
        checkpoints: int,
        stride: int,
        depth: int = 3,
        threads: int | None = None,
        on_read: OnRead | None = None,
    ) -> None:
        self.files = _Files(paths, identities)
        self.spans = list(spans)
        self.checkpoints = checkpoints
        self.stride = -(-stride // ALIGN) * ALIGN
        self.depth = depth
        self.on_read = on_read
        self._order = [(s, c) for s, span in enumerate(self.spans) for c in range(span.chunks)]
        cpus = os.cpu_count() or 1
        self.threads = max(1, min(threads or cpus, checkpoints, 4))
        raw = np.empty(depth * checkpoints * self.stride + ALIGN, dtype=np.uint8)
        skip = (-raw.ctypes.data) % ALIGN
        self._sets = raw[skip : skip + depth * checkpoints * self.stride].reshape(depth, checkpoints, self.stride)
        self._cond = threading.Condition()
        self._released = 0  # chunks the consumer is done with
        self._done = [0] * self.threads  # chunks each reader has filled
        self._error: BaseException | None = None
        self._stop = False
        self._workers: list[threading.Thread] = []
        self._last_use = self._last_uses()
        self._start_positions = self._start_window()

    def _last_uses(self) -> dict[int, int]:
        """For each file, the position in the order of its last chunk (its descriptor is closed after it)."""
        last: dict[int, int] = {}
        for position, (s, _) in enumerate(self._order):
            for f in self.spans[s].files:
                last[f] = position
        return last

    def _start_window(self) -> int:
        """How many chunks, from the first, the start-up prefetch covers (0: none)."""
        if _FADVISE is None or len(self._last_use) > _max_open():  # _last_use: one entry per file read
            return 0
        budget = min(START_WINDOW, _available_memory() // 8)
        total = 0
        for position, (s, c) in enumerate(self._order):
            total += sum(self.spans[s].piece(j, c).nbytes for j in range(self.checkpoints))
            if total > budget:
                return position
        return len(self._order)

    def _prefetch_start(self) -> None:
        """Ask for the start window's bytes, ``START_ROUND`` chunks of every file at a time, each file opened
        for its round and closed again (at most one descriptor more; these are only hints: a file that
        cannot be opened is the readers' to report)."""
        for first in range(0, self._start_positions, START_ROUND):
            ranges: dict[int, list[list[int]]] = {}  # file -> its [offset, end] ranges in this round
            for position in range(first, min(first + START_ROUND, self._start_positions)):
                if self._stop:
                    return
                if min(self._done) > position:  # the readers are past it already
                    continue
                s, c = self._order[position]
                for j in range(self.checkpoints):
                    piece = self.spans[s].piece(j, c)
                    runs = ranges.setdefault(piece.file, [])
                    if runs and runs[-1][1] == piece.offset:
                        runs[-1][1] += piece.nbytes
                    else:
                        runs.append([piece.offset, piece.offset + piece.nbytes])
            for file, runs in ranges.items():
                _advise_will_need(self.files.paths[file], runs)

    def address(self, row: int, slot: int) -> int:
        return int(self._sets[slot, row].ctypes.data)

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """Yields ``(span index, chunk index, slot)``: the set ``sets[slot]`` holds the chunk's rows."""
        if self._start_positions:
            starter = threading.Thread(target=self._prefetch_start, name="ckpt-ema-prefetch", daemon=True)
            self._workers.append(starter)
            starter.start()
        for t in range(self.threads):
            worker = threading.Thread(target=self._read, args=(t,), name="ckpt-ema-read", daemon=True)
            self._workers.append(worker)
            worker.start()
        try:
            for position, (s, c) in enumerate(self._order):
                with self._cond:
                    while min(self._done) <= position and self._error is None:
                        self._cond.wait()
                    if self._error is not None:
                        raise self._error
                yield s, c, position % self.depth
                with self._cond:
                    self._released = position + 1
                    self._cond.notify_all()
        finally:
            self.close()

    def rows(self, slot: int) -> np.ndarray:
        """The ``(checkpoints, stride)`` uint8 buffer set of ``slot``."""
        return self._sets[slot]

    def close(self) -> None:
        """Stop the readers and close the files (safe to call more than once)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join()
        self._workers = []
        self.files.close()

    def _prefetch(self, mine: range, position: int) -> None:
        if self._start_positions <= position < len(self._order):
            s, c = self._order[position]
            for j in mine:
                piece = self.spans[s].piece(j, c)
                self.files.prefetch(piece.file, piece.offset, piece.nbytes)

    def _read(self, t: int) -> None:
        mine = range(t, self.checkpoints, self.threads)
        try:
            for position in range(PREFETCH):
                self._prefetch(mine, position)
            for position, (s, c) in enumerate(self._order):
                self._prefetch(mine, position + PREFETCH)
                with self._cond:
                    while self._released < position - self.depth + 1 and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                span = self.spans[s]
                rows = self._sets[position % self.depth]
                for j in mine:
                    piece = span.piece(j, c)
                    view = memoryview(rows[j])[: piece.nbytes]
                    self.files.pread_into(piece.file, view, piece.offset)
                    if self.on_read is not None:
                        self.on_read(piece.file, piece.offset, view)
                    if self._last_use[piece.file] == position:
                        self.files.close(piece.file)
                with self._cond:
                    self._done[t] = position + 1
                    self._cond.notify_all()
        except BaseException as exc:  # raised to the consumer
            with self._cond:
                self._error = self._error or exc
                self._cond.notify_all()


def _advise_will_need(path: Path, ranges: list[list[int]]) -> None:
    """``POSIX_FADV_WILLNEED`` for each ``[offset, end]`` of ``path`` (errors ignored: only a hint)."""
    if _FADVISE is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        for offset, end in ranges:
            _FADVISE(fd, offset, end - offset, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _available_memory() -> int:
    """``MemAvailable`` in bytes (Linux), else a figure that leaves ``START_WINDOW`` as it is."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 * START_WINDOW


def read_exactly(path: Path, expected: FileIdentity | None, offset: int, nbytes: int) -> np.ndarray:
    """Bytes ``[offset, offset + nbytes)`` of ``path`` as a new uint8 array (a truncated file is an error)."""
    files = _Files([path], [expected])
    buffer = np.empty(nbytes, dtype=np.uint8)
    try:
        files.pread_into(0, memoryview(buffer), offset)  # type: ignore[arg-type]
    finally:
        files.close()
    return buffer
