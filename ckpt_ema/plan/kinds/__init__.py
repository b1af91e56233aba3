"""The registry of target kinds: one module per family of options (a new kind is one module here).

``KINDS`` maps each option key (``decay``, ``half_life``, ``sigma_rel``, ``gamma``, ``last``, ``window``,
``lr_decay``) to the kind that parses
it, in the order the options are listed; ``METHODS`` maps an output's ``method`` to its kind.
"""

from __future__ import annotations

from ckpt_ema.plan.kinds.base import TargetKind, TargetOption
from ckpt_ema.plan.kinds.classic import Classic
from ckpt_ema.plan.kinds.last import Last
from ckpt_ema.plan.kinds.lr_decay import LrDecay
from ckpt_ema.plan.kinds.power import Power
from ckpt_ema.plan.kinds.window import Window

FAMILIES: tuple[TargetKind, ...] = (Classic(), Power(), Last(), Window(), LrDecay())
KINDS: dict[str, TargetKind] = {option.key: family for family in FAMILIES for option in family.options}
METHODS: dict[str, TargetKind] = {family.method: family for family in FAMILIES}
OPTIONS: tuple[TargetOption, ...] = tuple(option for family in FAMILIES for option in family.options)


def target_flags() -> str:
    """``--decay, --half-life, --sigma-rel or --gamma``: the target options, for messages."""
    flags = [option.flag for option in OPTIONS]
    return f"{', '.join(flags[:-1])} or {flags[-1]}" if len(flags) > 1 else flags[0]


def describe_half_life(eq: dict[str, float]) -> str:
    """``half-life 500 steps = 2.5 x checkpoint spacing`` from ``Plan.equivalents``."""
    from ckpt_ema.series.lengths import format_si

    text = f"half-life {eq['half_life']:.4g} steps"
    for unit in ("tokens", "samples"):
        if f"half_life_{unit}" in eq:
            text += f" = {format_si(eq[f'half_life_{unit}'])} {unit}"
    if "half_life_checkpoints" in eq:
        text += f" = {eq['half_life_checkpoints']:.3g} x checkpoint spacing"
    return text


__all__ = [
    "FAMILIES",
    "KINDS",
    "METHODS",
    "OPTIONS",
    "TargetKind",
    "TargetOption",
    "describe_half_life",
    "target_flags",
]
