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
