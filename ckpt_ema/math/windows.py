"""Pure float64 math: averages over the end of training (spec §8). No files, no tensors, no project imports.

Conventions as in ``ema.py`` (spec §1-2): ``steps`` is strictly increasing, ``s_0 < ... < s_n``, counted in
optimizer steps; the target time is ``T = s_n``; ``theta(t)`` between two checkpoints is ``"linear"``
(moves linearly from one to the next) or ``"hold"`` (sits at the later one's value for the whole gap).
Lengths are in steps (positive integers).

- ``last_n_coefficients``: equal weights on the last N checkpoints (timm's ``avg_checkpoints``, fairseq).
- ``window_coefficients``: the mean of the per-step weights over ``(T - L, T]`` (SWA-style, step-aware).
- ``lr_decay_coefficients``: the merge that emulates decaying the learning rate to zero over the last L steps
  (WSM, Tian et al. 2025, "WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging"). Update ``t``
  is scaled by ``w_t = f((t - 1 - (T - L)) / L)``; summing by parts gives ``c_t = w_t - w_{t+1}``.

Every function returns coefficients ``c_j`` (float64, summing to 1) such that the average at ``T`` is
``sum_j c_j * theta(s_j)``. Gaps between checkpoints are summed in closed form (no loop over their steps);
docs/averaging.md has the derivations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ckpt_ema.math.ema import check_interp, check_steps

SHAPES = ("linear", "cosine", "sqrt")

# Bernoulli numbers B_2, B_4, ..., B_12 for the Euler-Maclaurin sum of sqrt(k).
_BERNOULLI_EVEN = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730)
_DIRECT_SUM_MAX_TERMS = 128
_EULER_MACLAURIN_FROM = 32


def lr_decay_factor(shape: str, x: float) -> float:
    """The learning-rate factor ``f(x)`` at fraction ``x`` in ``[0, 1]`` of the decay (spec §8).

    ``linear``: ``1 - x``; ``cosine``: ``(1 + cos(pi x)) / 2``; ``sqrt``: ``1 - sqrt(x)``. ``f(0) = 1``, ``f(1) = 0``.
    """
    _check_shape(shape)
    if shape == "linear":
        return 1.0 - x
    if shape == "cosine":
        return math.cos(math.pi * x / 2.0) ** 2  # = (1 + cos(pi x)) / 2
    return 1.0 - math.sqrt(x)


def last_n_coefficients(count: int, n: int) -> np.ndarray:
    """Equal weights ``1/n`` on the last ``n`` of ``count`` checkpoints, 0 on the others (by checkpoint)."""
    if count < 1:
        raise ValueError("need at least one checkpoint")
    if not 1 <= n <= count:
        raise ValueError(f"--last {n}: need 1 <= N <= {count}, the number of checkpoints at or before the target")
    coefs = np.zeros(count)
    coefs[count - n :] = 1.0 / n
    return coefs


def window_coefficients(steps: Sequence[int], length: float, interp: str = "linear") -> np.ndarray:
    """Coefficients of ``(1/L) sum_{t=T-L+1}^{T} theta(t)``, the mean of the weights over the last ``L`` steps.

    The window may start inside a gap; it may not start before the first checkpoint (``T - L + 1 >= s_0``).
    With a checkpoint at every step it is the plain per-step mean.
    """
    s = check_steps(steps)
    check_interp(interp)
    length = _check_length(s, length, "window")
    total = s[-1]
    start = total - length  # the window is (start, T]
    coefs = np.zeros(len(s))
    if start < s[0]:  # start == s_0 - 1: step s_0 itself is the first step of the window
        coefs[0] += 1.0
    for j in range(1, len(s)):
        a, b = s[j - 1], s[j]
        if b <= start:
            continue
        p = max(a, start)  # steps p+1..b of the gap (a, b] are in the window
        inside = b - p
        if interp == "hold":
            coefs[j] += inside
            continue
        gap = b - a
        # sum_{t=p+1}^{b} (t - a) / gap: theta(t) = theta_a + (t - a)/gap * (theta_b - theta_a)
        to_b = (gap * (gap + 1) - (p - a) * (p - a + 1)) / (2 * gap)
        coefs[j] += to_b
        coefs[j - 1] += inside - to_b
    return coefs / coefs.sum()


def lr_decay_coefficients(steps: Sequence[int], shape: str, length: float, interp: str = "linear") -> np.ndarray:
    """Coefficients of the merge emulating a learning-rate decay of ``shape`` over the last ``length`` steps.

    Per step (spec §8): ``theta(T-L) + sum_{t=T-L+1}^{T} w_t (theta(t) - theta(t-1)) = sum_t c_t theta(t)``
    with ``w_t = f((t - 1 - (T - L)) / L)`` and ``c_t = w_t - w_{t+1}`` (``w_{T+1} = 0``; ``f(0) = 1`` makes
    ``c_{T-L} = 0``). Between checkpoints ``theta(t)`` follows ``interp``; ``linear`` decay equals the window.
    """
    s = check_steps(steps)
    check_interp(interp)
    _check_shape(shape)
    length = _check_length(s, length, "lr-decay")
    total = s[-1]
    start = total - length
    weight_sum = _weight_sums[shape]

    def w(t: int) -> float:  # the factor applied to update t: 1 before the decay, f(k/L) during it, 0 after T
        k = t - 1 - start
        return 1.0 if k <= 0 else lr_decay_factor(shape, min(k, length) / length)

    coefs = np.zeros(len(s))
    if start < s[0]:  # step s_0 itself is the first step of the decay
        coefs[0] += w(s[0]) - w(s[0] + 1)
    for j in range(1, len(s)):
        a, b = s[j - 1], s[j]
        if b <= start:
            continue
        p = max(a, start)  # c_t for t in (p, b]; c_t = 0 for t <= T-L
        in_gap = w(p + 1) - w(b + 1)  # sum_{t=p+1}^{b} c_t, telescoped
        if interp == "hold":
            coefs[j] += in_gap
            continue
        gap = b - a
        # Summation by parts: sum_{t=p+1}^{b} c_t (t - a) = (p+1-a) w_{p+1} + sum_{t=p+2}^{b} w_t - gap w_{b+1};
        # the w_t of the middle sum are f(k/L) for k = t - 1 - (T - L) in [p+1-start, b-1-start].
        middle = weight_sum(length, p + 1 - start, b - 1 - start)
        to_b = ((p + 1 - a) * w(p + 1) + middle - gap * w(b + 1)) / gap
        coefs[j] += to_b
        coefs[j - 1] += in_gap - to_b
    return coefs / coefs.sum()


def _linear_sum(length: int, lo: int, hi: int) -> float:
    """``sum_{k=lo}^{hi} (1 - k/L)``."""
    count = hi - lo + 1
    return 0.0 if count <= 0 else count - (lo + hi) * count / (2.0 * length)


def _cosine_sum(length: int, lo: int, hi: int) -> float:
    """``sum_{k=lo}^{hi} (1 + cos(pi k / L)) / 2``, the cosines summed as a Dirichlet kernel."""
    count = hi - lo + 1
    if count <= 0:
        return 0.0
    theta = math.pi / length
    cosines = math.cos((lo + hi) * theta / 2.0) * math.sin(count * theta / 2.0) / math.sin(theta / 2.0)
    return (count + cosines) / 2.0


def _sqrt_weight_sum(length: int, lo: int, hi: int) -> float:
    """``sum_{k=lo}^{hi} (1 - sqrt(k / L))``."""
    count = hi - lo + 1
    return 0.0 if count <= 0 else count - _sqrt_sum(lo, hi) / math.sqrt(length)


def _sqrt_sum(lo: int, hi: int) -> float:
    """``sum_{k=lo}^{hi} sqrt(k)`` for ``0 <= lo <= hi``: term by term below 32 and for short ranges,
    Euler-Maclaurin above (its correction terms shrink like ``(1 / (2 pi k))**2``)."""
    if hi - lo < _DIRECT_SUM_MAX_TERMS:
        return math.fsum(np.sqrt(np.arange(lo, hi + 1, dtype=np.float64)))
    head_stop = max(lo, _EULER_MACLAURIN_FROM)
    head = math.fsum(np.sqrt(np.arange(lo, head_stop, dtype=np.float64))) if head_stop > lo else 0.0
    p, q = float(head_stop), float(hi)
    tail = (2.0 / 3.0) * (q * math.sqrt(q) - p * math.sqrt(p)) + (math.sqrt(p) + math.sqrt(q)) / 2.0
    for j, bernoulli in enumerate(_BERNOULLI_EVEN, start=1):
        order = 2 * j - 1  # d^order/dx^order x^(1/2) = (1/2)(1/2 - 1)...(1/2 - order + 1) x^(1/2 - order)
        factor = math.prod(0.5 - i for i in range(order))
        tail += bernoulli / math.factorial(2 * j) * factor * (q ** (0.5 - order) - p ** (0.5 - order))
    return head + tail


_weight_sums: dict[str, Callable[[int, int, int], float]] = {
    "linear": _linear_sum,
    "cosine": _cosine_sum,
    "sqrt": _sqrt_weight_sum,
}


def _check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"the learning-rate decay shape must be one of {', '.join(SHAPES)}, got {shape!r}")


def _check_length(s: list[int], length: float, what: str) -> int:
    """A whole number of steps ``L >= 1`` whose window ``(T - L, T]`` starts no earlier than ``s_0``."""
    if isinstance(length, float) and not length.is_integer():
        raise ValueError(f"the {what} length must be a whole number of steps, got {length}")
    steps = int(length)
    if steps < 1:
        raise ValueError(f"the {what} length must be at least 1 step, got {length}")
    if s[-1] - steps + 1 < s[0]:
        raise ValueError(
            f"the {what} of {steps} steps covers steps {s[-1] - steps + 1} to {s[-1]}, before the first checkpoint "
            f"(step {s[0]}); the longest is {s[-1] - s[0] + 1} steps"
        )
    return steps
