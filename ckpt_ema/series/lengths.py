"""Lengths in steps, tokens or samples: ``500``, ``10k``, ``2Btokens``, ``1.5Msamples`` (docs/averaging.md).

A length option (``--half-life``, ``--window``, ``--lr-decay SHAPE:L``, ``--at``, ``--every``) is a number with
an optional multiplier (``k`` 1e3, ``M`` 1e6, ``B``/``G`` 1e9, ``T`` 1e12) and an optional unit: ``steps`` (the
default), ``tokens`` (``tok``) or ``samples`` (``img``, ``images``). Tokens and samples become optimizer steps
through the tokens or samples per step (``StepSize``), from ``--tokens-per-step``/``--samples-per-step`` or the
trainer's record (``step_size_from_record``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from ckpt_ema.errors import TargetError

UNITS = ("steps", "tokens", "samples")
MULTIPLIERS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_UNIT_ALIASES = {
    "": "steps",
    "step": "steps",
    "steps": "steps",
    "tok": "tokens",
    "token": "tokens",
    "tokens": "tokens",
    "sample": "samples",
    "samples": "samples",
    "img": "samples",
    "image": "samples",
    "images": "samples",
}
_LENGTH = re.compile(r"^\s*(?P<number>(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)\s*(?P<mult>[kKMBGT]?)\s*(?P<unit>[a-z]*)\s*$")


@dataclass(frozen=True)
class Length:
    """A length as the user wrote it: ``amount`` of ``unit`` (``steps``, ``tokens`` or ``samples``)."""

    amount: float
    unit: str = "steps"
    text: str = ""

    @property
    def in_steps(self) -> bool:
        return self.unit == "steps"

    @property
    def label(self) -> str:
        """The length for output names: ``500`` (steps), ``2Btokens``, ``1.5Msamples`` (shortest multiplier)."""
        if self.in_steps:
            return _number(self.amount)
        for mult, factor in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if self.amount >= factor:
                return f"{_number(self.amount / factor)}{mult}{self.unit}"
        return f"{_number(self.amount)}{self.unit}"

    def steps(self, size: StepSize | None, option: str) -> float:
        """The length in optimizer steps; raises ``TargetError`` when the tokens/samples per step are unknown."""
        if self.in_steps:
            return self.amount
        per_step = None if size is None else size.per_step(self.unit)
        if per_step is None:
            raise TargetError(
                f"{option} {self.text}: the {self.unit} per optimizer step are unknown; pass --{self.unit}-per-step N"
                + (" (the trainer's record has none)" if self.unit == "tokens" else "")
            )
        return self.amount / per_step

    def whole_steps(self, size: StepSize | None, option: str) -> int:
        """The length rounded to a whole number of steps (at least 1)."""
        steps = self.steps(size, option)
        if self.in_steps and not float(steps).is_integer():
            raise TargetError(f"{option} {self.text}: must be a whole number of steps")
        return max(1, round(steps))


@dataclass(frozen=True)
class StepSize:
    """How much data one optimizer step consumes: ``tokens`` and/or ``samples`` per step, and where from."""

    tokens: float | None = None
    samples: float | None = None
    source: str = ""

    def per_step(self, unit: str) -> float | None:
        return {"steps": 1.0, "tokens": self.tokens, "samples": self.samples}[unit]

    def describe(self, steps: float) -> str:
        """``2,000 steps = 4.1M tokens`` or ``2,000 steps`` when nothing is known."""
        text = f"{_number(steps)} steps"
        for unit in ("tokens", "samples"):
            per_step = self.per_step(unit)
            if per_step:
                text += f" = {format_si(steps * per_step)} {unit}"
        return text

    def to_json(self) -> dict[str, object]:
        return {"tokens_per_step": self.tokens, "samples_per_step": self.samples, "source": self.source}


def parse_length(option: str, text: str | float) -> Length:
    """``--window 2Btokens`` -> ``Length(2e9, "tokens")``; raises ``TargetError`` naming the option."""
    raw = str(text)
    match = _LENGTH.match(raw)
    unit = _UNIT_ALIASES.get(match.group("unit")) if match else None
    if match is None or unit is None:
        raise TargetError(
            f"{option} {raw}: not a length; write steps (500, 10k), tokens (2Btokens, 50Mtok) or samples (1.5Msamples)"
        )
    amount = float(Decimal(match.group("number")) * Decimal(MULTIPLIERS[match.group("mult")]))  # 40.96k = 40960
    if not (math.isfinite(amount) and amount > 0):
        raise TargetError(f"{option} {raw}: must be > 0")
    return Length(amount, unit, raw.strip())


def check_per_step(option: str, value: float | str | None) -> float | None:
    """``--tokens-per-step``/``--samples-per-step``: a number > 0, with a multiplier if wanted (``1M``)."""
    if value is None:
        return None
    match = _LENGTH.match(str(value))
    if match is None or match.group("unit"):
        raise TargetError(f"{option} {value}: not a number (e.g. 4096 or 1M)")
    amount = float(Decimal(match.group("number")) * Decimal(MULTIPLIERS[match.group("mult")]))
    if not (math.isfinite(amount) and amount > 0):
        raise TargetError(f"{option} {value}: must be > 0")
    return amount


def whole_steps_of(
    option: str, value: int | str | None, tokens_per_step: float | None = None, samples_per_step: float | None = None
) -> int | None:
    """``--every``/``--first``: a whole number of steps (``500``, ``10k``) or a length in tokens/samples that is
    one (``2Mtokens`` with 4096 tokens per step is 488.28 steps: refused, the steps must be exact)."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    size = StepSize(tokens_per_step, samples_per_step) if tokens_per_step or samples_per_step else None
    length = parse_length(option, text)
    steps = length.steps(size, option)
    if abs(steps - round(steps)) > 1e-9 * max(1.0, steps):
        raise TargetError(f"{option} {text}: is {steps:.6g} steps; it must be a whole number of steps")
    return round(steps)


class _Recorded(Protocol):
    @property
    def path(self) -> Path: ...
    @property
    def step(self) -> int: ...


def step_size_from_record(
    checkpoints: Sequence[_Recorded],
    metadata: Sequence[dict[str, str]],
    tokens_per_step: float | None = None,
    samples_per_step: float | None = None,
) -> StepSize | None:
    """Tokens/samples per step: the options first, else the newest checkpoint's trainer record.

    Records read: a Hugging Face ``checkpoint-N/trainer_state.json`` (``num_input_tokens_seen / global_step``,
    the run's average, when the Trainer counted tokens), kohya's ``ss_total_batch_size`` in safetensors metadata
    (samples per step: per-device batch x processes x gradient accumulation).
    """
    tokens, samples = tokens_per_step, samples_per_step
    sources = [f"--{u}-per-step" for u, v in (("tokens", tokens), ("samples", samples)) if v is not None]
    for ckpt, meta in reversed(list(zip(checkpoints, metadata))):
        if tokens is None:
            state = _trainer_state(ckpt.path)
            seen, step = state.get("num_input_tokens_seen"), state.get("global_step")
            if isinstance(seen, (int, float)) and isinstance(step, int) and seen > 0 and step > 0:
                tokens = seen / step
                sources.append(f"{ckpt.path.name}/trainer_state.json (num_input_tokens_seen / global_step)")
        if samples is None:
            batch = meta.get("ss_total_batch_size")
            if batch is not None and str(batch).strip().isdigit() and int(batch) > 0:
                samples = float(int(batch))
                sources.append(f"{ckpt.path.name} metadata 'ss_total_batch_size'")
        if tokens is not None and samples is not None:
            break
    if tokens is None and samples is None:
        return None
    return StepSize(tokens, samples, "; ".join(sources))


def _trainer_state(path: Path) -> dict[str, object]:
    candidate = path / "trainer_state.json"  # a Hugging Face checkpoint-N/ folder
    if not path.is_dir() or not candidate.is_file():
        return {}
    try:
        state = json.loads(candidate.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _number(value: float) -> str:
    """Shortest text that reads back as ``value`` (``500.0`` -> ``500``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def format_si(value: float) -> str:
    """``4.1M``, ``2.05B``, ``512``: three significant digits with a multiplier."""
    for mult, factor in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{mult}"
    return f"{value:.3g}"
