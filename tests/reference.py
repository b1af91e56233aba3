"""Independent references shared by the tests, written without any ckpt-ema code (float64 throughout):
per-step EMA loops, the sigma_rel <-> gamma relation by bisection, the power-profile inner product of
spec §4 written directly, Simpson's rule, and the command line run through click's CliRunner."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from click.testing import CliRunner, Result

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


def invoke(*args: object) -> Result:
    """``ckpt-ema ARGS...`` in this process; the result's exit code and output are the caller's to check."""
    return CliRunner().invoke(main, [str(a) for a in args])


def run(*args: object, expect: int = 0) -> Result:
    """``ckpt-ema ARGS...``, asserting the exit code."""
    result = invoke(*args)
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    return result


def sigma_rel_of(gamma: float) -> float:
    """spec §3: sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3)))."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_by_bisection(sigma_rel: float) -> float:
    """The inverse of :func:`sigma_rel_of` (decreasing in gamma > 0) by geometric bisection."""
    lo, hi = 1e-12, 1e7
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if sigma_rel_of(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def power_inner(ta: float, ga: float, tb: float, gb: float) -> float:
    """spec §4: <p_a, p_b> = (ga+1)(gb+1)/(ga+gb+1) * ta^gb / tb^(gb+1), profile a ending first."""
    if ta > tb:
        ta, ga, tb, gb = tb, gb, ta, ga
    return (ga + 1.0) * (gb + 1.0) / (ga + gb + 1.0) * ta**gb / tb ** (gb + 1.0)


def simpson_samples(y: np.ndarray, h: float) -> float:
    """Composite Simpson's rule over samples ``y`` (an odd count) spaced ``h`` apart."""
    return float(h / 3.0 * (y[0] + y[-1] + 4.0 * y[1:-1:2].sum() + 2.0 * y[2:-1:2].sum()))


def simpson(f: Callable[[np.ndarray], np.ndarray], a: float, b: float, n: int = 200_000) -> float:
    """Composite Simpson's rule for ``f`` on [a, b] with ``n`` (even) intervals."""
    if b <= a:
        return 0.0
    return simpson_samples(f(np.linspace(a, b, n + 1)), (b - a) / n)


def run_one_rank(module: str, *args: object) -> None:
    """``python -m MODULE ARGS`` as rank 0 of a 1-process gloo world (a free port), from the repository root."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    command = [sys.executable, "-W", "ignore", "-m", module, *map(str, args)]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
