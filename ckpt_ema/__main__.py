"""``python -m ckpt_ema`` and the installed ``ckpt-ema`` command: both run :func:`run`.

``run`` catches Ctrl-C and SIGTERM from its first line, before the second or so that importing torch
takes: a signal at any moment gives one line and exit code 130 (SIGINT) or 143 (SIGTERM), never a
traceback or a silent death.

On the way out it freezes the garbage collector's objects: the interpreter's last collection at exit
then skips them instead of walking numba's hundreds of thousands of objects (0.3 s of every merge
here, after the work is done and the outputs are in place). Atexit handlers and stream flushes still run.
"""

from __future__ import annotations

import gc
import signal
import sys

from ckpt_ema.errors import Terminated, raise_terminated, stop_line


def run() -> None:
    """The ``ckpt-ema`` command line, with the signal handlers installed before anything is imported."""
    signal.signal(signal.SIGTERM, raise_terminated)
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
