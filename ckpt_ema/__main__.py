"""``python -m ckpt_ema`` and the installed ``ckpt-ema`` command: both run :func:`run`.

``run`` catches Ctrl-C and SIGTERM from its first line, before the second or so that importing torch
takes: a signal at any moment gives one line and exit code 130 (SIGINT) or 143 (SIGTERM), never a
traceback or a silent death.

Before numpy loads, it sets ``OPENBLAS_THREAD_TIMEOUT=4`` unless the environment sets it: after each
BLAS call (the error estimate's least squares, a reconstruction's solve) numpy's OpenBLAS threads
otherwise spin for about 2^28 cycles, 0.1 s of a core that the merge's kernel and read threads need (a
300 x 300 ``lstsq``: 0.099 CPU seconds spent in the half second after it, 0.000 with the setting; in a
profile of a warm 1-target merge, 2.8 % of the samples; the merge's own time moved within its noise,
1.15 -> 1.09 user seconds in one set of 8 alternating runs, no difference in another). Large BLAS calls
still use every core; the threads just go to sleep as soon as they are idle.

On the way out it freezes the garbage collector's objects: the interpreter's last collection at exit
then skips them instead of walking numba's hundreds of thousands of objects (0.3 s of every merge
here, after the work is done and the outputs are in place). Atexit handlers and stream flushes still run.
"""

from __future__ import annotations

import gc
import os
import signal
import sys

from ckpt_ema.errors import Terminated, raise_terminated, stop_line


def run() -> None:
    """The ``ckpt-ema`` command line, with the signal handlers installed before anything is imported."""
    signal.signal(signal.SIGTERM, raise_terminated)
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # read by OpenBLAS when numpy loads
    try:
        from ckpt_ema.cli import main

        main(prog_name="ckpt-ema")
    except (KeyboardInterrupt, Terminated) as exc:
        line, code = stop_line(exc)
        print(line, file=sys.stderr)
        sys.exit(code)
    finally:
        gc.freeze()


if __name__ == "__main__":
    run()
