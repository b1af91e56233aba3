"""The exceptions ckpt-ema raises; every message is written for the user and fits on one line."""

from __future__ import annotations


class CkptEmaError(Exception):
    """Base of every error the command line turns into a one-line message and exit code 1."""


class InputError(CkptEmaError):
    """A checkpoint cannot be read, or is not what it claims to be."""


class SeriesError(CkptEmaError):
    """The checkpoints do not form one consistent series (keys, shapes, steps)."""


class StepError(SeriesError):
    """A checkpoint's step cannot be found, or its sources disagree."""


class TargetError(CkptEmaError):
    """A target (decay, half-life, sigma_rel, gamma, --at) is out of range or malformed."""


class OutputError(CkptEmaError):
    """The output cannot be written where it was asked for."""


class StrictError(CkptEmaError):
    """A warning (NaN/Inf, a diverged checkpoint, a doubtful step or decay), made an error by --strict."""


class SettingError(CkptEmaError):
    """A setting from the environment (``CKPT_EMA_KERNEL``) has a value ckpt-ema does not know."""


class Terminated(BaseException):
    """SIGTERM arrived: raised by the command line's handler so that it unwinds like Ctrl-C
    (``KeyboardInterrupt``) and every temporary file is removed. Not an ``Exception``: nothing catches it
    by accident."""


def raise_terminated(signum: int, frame: object) -> None:
    """The command line's SIGTERM handler: unwind like Ctrl-C."""
    raise Terminated()


def stop_line(exc: BaseException) -> tuple[str, int]:
    """The one line printed and the exit code for Ctrl-C (130) or SIGTERM (143), whenever they arrive."""
    word, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
    return f"ckpt-ema: {word}; no output written, temporary files removed", code
