"""Independent float64 references for the format tests: a per-step EMA loop over linearly interpolated
weights (SPEC §2), written without any ckpt-ema code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from click.testing import CliRunner

from ckpt_ema.cli import main


def ema_reference(
    steps: Sequence[int], states: Sequence[Mapping[str, torch.Tensor]], beta: float
) -> dict[str, np.ndarray]:
    """The classic EMA at the last step: ema(s0) = theta(s0), then every step ema = b*ema + (1-b)*theta(t),
    theta linear between checkpoints. Float tensors only, in float64."""
    names = [n for n, t in states[-1].items() if t.is_floating_point()]
    result = {}
    for name in names:
        arrays = [s[name].double().numpy() for s in states]
        ema = arrays[0].copy()
        for j in range(1, len(steps)):
            a, b, gap = arrays[j - 1], arrays[j], steps[j] - steps[j - 1]
            for k in range(1, gap + 1):
                ema = beta * ema + (1.0 - beta) * (a + (b - a) * (k / gap))
        result[name] = ema
    return result


def assert_close(actual: torch.Tensor, expected: np.ndarray, rtol: float = 2e-6) -> None:
    got = actual.double().numpy()
    assert got.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-12)
    assert float(np.abs(got - expected).max()) <= rtol * scale + 1e-7, (float(np.abs(got - expected).max()), scale)


def run(*args: object, expect: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    return result
