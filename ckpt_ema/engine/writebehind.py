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

Why: writing 16 outputs (twice the inputs' bytes) took as long as the kernel; ``write(2)`` releases the
GIL, so the copy into the page cache runs beside the kernel and the readers.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

DEPTH = 1  # tasks queued or running at most: one chunk is written while the next is computed


class WriteBehind:
    """A FIFO of write tasks run by one thread; tickets (``submit``'s result) count the tasks in order."""

    def __init__(self, depth: int = DEPTH) -> None:
        self.depth = depth
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

    def close(self) -> None:
        """Drop the tasks not started; the thread ends after the one it runs, if any (safe to call twice)."""
        with self._cond:
            self._stop = True
            self._tasks.clear()
            self._cond.notify_all()
            thread, self._thread = self._thread, None
            idle = not self._running
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
