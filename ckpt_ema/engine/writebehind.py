"""Writing behind the kernel: the sinks' calls run in one background thread, in order, while the pass computes.

The pass hands each chunk's writes (every sink's ``write`` for every piece of the chunk) to
:class:`WriteBehind` as one task and goes on to the next chunk; the thread runs the tasks in the order
they came, so every sink still sees its tensors in plan order, one call at a time, from one thread. The
data a task writes must stay untouched until the task is done: the pass computes into a ring of output
buffers and waits for a buffer's last task (:meth:`WriteBehind.wait_for`) before reusing it.

The first error a task raises (a full disk, an output removed) stops the thread's work; it is raised in
the pass's thread by the next ``submit``, ``wait_for`` or ``drain``. ``close`` drops the tasks not yet
started and returns at once (an error or an interruption in the pass: a write stuck on a dead disk must not
hold up Ctrl-C); the task being run, if any, ends on its own and the thread with it. Its writes land in
temporary files that the abort removes.

Within a task, :meth:`WriteBehind.together` runs independent jobs (one per output) at once, on the
write thread and up to ``workers - 1`` helper threads: each job is one sink's calls for the chunk, so every
sink is still called one call at a time and in order, and the task ends when all of its jobs have.

Why: writing 16 outputs (twice the inputs' bytes) took as long as the kernel; ``write(2)`` releases the
GIL, so the copy into the page cache runs beside the kernel and the readers. With several outputs one
thread was still the limit: writing 4 outputs (2.1 GB) into fresh page-cache memory took 2.4 s of a 2.8 s
warm pass on one thread while the kernel and the readers waited for it; the copy and the page allocation
run in parallel on separate files.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future

DEPTH = 1  # tasks queued or running at most: one chunk is written while the next is computed
WORKERS = max(1, min(4, os.cpu_count() or 1))  # threads writing one task's jobs at once, at most


class WriteBehind:
    """A FIFO of write tasks run by one thread; tickets (``submit``'s result) count the tasks in order."""

    def __init__(self, depth: int = DEPTH, workers: int = 1) -> None:
        self.depth = depth
        self.workers = max(1, workers)
        self._helpers: _Helpers | None = None
        self._tasks: deque[tuple[int, Callable[[], None]]] = deque()
        self._cond = threading.Condition()
        self._submitted = 0  # tickets handed out
        self._done = 0  # tasks finished (in order)
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._running = False  # a task is being run

    def submit(self, task: Callable[[], None]) -> int:
        """Queue ``task``; returns its ticket. Blocks while ``depth`` tasks are waiting."""
        with self._cond:
            self._raise()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ckpt-ema-write", daemon=True)
                self._thread.start()
            while len(self._tasks) >= self.depth and self._error is None and not self._stop:
                self._cond.wait()
            self._raise()
            ticket = self._submitted
            self._submitted += 1
            self._tasks.append((ticket, task))
            self._cond.notify_all()
            return ticket

    def wait_for(self, ticket: int | None) -> None:
        """Block until task ``ticket`` (and every one before it) is done; None: nothing to wait for."""
        if ticket is None:
            return
        with self._cond:
            while self._done <= ticket and self._error is None and not self._stop:
                self._cond.wait()
            self._raise()

    def drain(self) -> None:
        """Block until every task submitted is done."""
        with self._cond:
            last = self._submitted - 1
        self.wait_for(last if last >= 0 else None)

    def together(self, jobs: Sequence[Callable[[], None]]) -> None:
        """Run ``jobs`` at the same time (from a task): on this thread and up to ``workers - 1`` helpers,
        dealt out in turn; returns when every job is done, raising the first error (by job order)."""
        count = min(self.workers, len(jobs))
        if count < 2:
            one_by_one(jobs)
            return
        groups = [jobs[g::count] for g in range(count)]
        with self._cond:
            if self._stop:
                raise RuntimeError("the write thread was closed")
            if self._helpers is None:
                self._helpers = _Helpers(self.workers - 1)
            helpers = self._helpers
        futures = [helpers.submit(one_by_one, group) for group in groups[1:]]
        errors: list[BaseException] = []
        try:
            one_by_one(groups[0])
        except BaseException as exc:
            errors.append(exc)
        for future in futures:
            error = future.exception()
            if error is not None:
                errors.append(error)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Drop the tasks not started; the thread ends after the one it runs, if any (safe to call twice)."""
        with self._cond:
            self._stop = True
            self._tasks.clear()
            self._cond.notify_all()
            thread, self._thread = self._thread, None
            idle = not self._running
            helpers, self._helpers = self._helpers, None
        if helpers is not None:
            helpers.close()
        if thread is not None and idle and thread is not threading.current_thread():
            thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stop:
            raise RuntimeError("the write thread was closed")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                ticket, task = self._tasks[0]
                self._running = True
            try:
                task()
            except BaseException as exc:  # raised in the pass's thread
                with self._cond:
                    self._running = False
                    self._error = self._error or exc
                    self._tasks.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._running = False
                if self._tasks and self._tasks[0][0] == ticket:
                    self._tasks.popleft()
                self._done = ticket + 1
                self._cond.notify_all()


def one_by_one(jobs: Sequence[Callable[[], None]]) -> None:
    """Run ``jobs`` in this thread, in order (``together`` with one worker)."""
    for job in jobs:
        job()


class _Helpers:
    """Daemon threads running submitted calls (not a ``ThreadPoolExecutor``: the interpreter joins those at
    exit, and a write stuck on a dead disk must not hold up the exit after Ctrl-C)."""

    def __init__(self, count: int) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[object, ...], Future[None]] | None]
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"ckpt-ema-write-{k + 1}", daemon=True) for k in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, function: Callable[..., None], *args: object) -> Future[None]:
        future: Future[None] = Future()
        with self._lock:
            if self._closed:
                future.set_exception(RuntimeError("the write thread was closed"))
            else:
                self._queue.put((function, args, future))
        return future

    def close(self) -> None:
        """The threads end after the call each runs, if any (not waited for)."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            function, args, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                function(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)
