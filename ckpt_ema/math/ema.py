"""Pure float64 math: how much each checkpoint weighs in a post-hoc EMA. No files, no tensors.

Conventions (docs/spec.md §1-3):
- time is counted in optimizer steps; ``steps`` is a strictly increasing sequence ``s_0 < ... < s_n`` and the
  target time is ``T = s_n``;
- ``decay`` is the EMA decay per optimizer step (beta); ``gamma`` the exponent of a power-function EMA
  (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024);
- the weights between two checkpoints are unknown: ``"linear"`` assumes they move linearly from one
  checkpoint to the next, ``"hold"`` that they sit at the later checkpoint's value for the whole gap.

Every function returns coefficients ``c_j`` (float64, summing to 1) such that the EMA at ``T`` is
``sum_j c_j * theta(s_j)``. The per-step kernel is summed over each gap in closed form; the derivations
are in docs/math.md ("Coefficients in closed form").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

INTERPOLATIONS = ("linear", "hold")
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)

# Bernoulli numbers B_2, B_4, ..., B_16 for the Euler-Maclaurin correction terms.
_BERNOULLI_EVEN = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730, 7 / 6, -3617 / 510)
_DIRECT_SUM_MAX_TERMS = 64


def half_life_to_decay(half_life: float) -> float:
    """Per-step decay whose weights halve every ``half_life`` steps: ``beta = 0.5 ** (1 / h)``."""
    return 0.5 ** (1.0 / half_life)


def decay_to_half_life(decay: float) -> float:
    """Half-life in steps of a per-step decay: ``h = ln(1/2) / ln(beta)``."""
    return math.log(0.5) / math.log(decay)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power profile ``tau**gamma`` on ``[0, T]`` (EDM2 Eq. 3)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent gamma of the power profile with relative width ``sigma_rel`` (inverse of EDM2 Eq. 3).

    The largest real root of ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0``; valid for
    ``0 < sigma_rel < 1/sqrt(12)``, where gamma > 0.
    """
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel}")
    inv2 = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv2, 12.0 - inv2])
    real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots.real))].real
    gamma = float(real.max())
    # One Newton step on the cubic polishes the root to full float64 precision.
    value = ((gamma + 7.0) * gamma + 16.0 - inv2) * gamma + 12.0 - inv2
    slope = (3.0 * gamma + 14.0) * gamma + 16.0 - inv2
    return gamma - value / slope if slope != 0.0 else gamma


def classic_coefficients(steps: Sequence[int], decay: float, interp: str = "linear") -> np.ndarray:
    """Coefficients of the classic EMA ``ema(t) = beta*ema(t-1) + (1-beta)*theta(t)`` at ``T = steps[-1]``.

    The EMA starts at the first checkpoint, ``ema(s_0) = theta(s_0)`` (spec §2), so ``theta(s_0)`` keeps
    ``beta**(T - s_0)`` and step ``t`` in ``(s_0, T]`` weighs ``(1 - beta) * beta**(T - t)``.
    """
    s = check_steps(steps)
    check_interp(interp)
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    rate = -math.log(decay)  # lambda: beta = exp(-lambda)
    total = s[-1]
    coefs = np.zeros(len(s))
    coefs[0] = math.exp(-rate * (total - s[0]))
    for j in range(1, len(s)):
        a, b = s[j - 1], s[j]
        length = b - a
        # Sum of the per-step weights over the gap (a, b]: beta^(T-b) * (1 - beta^L).
        gap_weight = math.exp(-rate * (total - b)) * -math.expm1(-rate * length)
        if interp == "hold":
            coefs[j] += gap_weight
            continue
        # Step a+k is theta_a + k/L (theta_b - theta_a); m = L - k has geometric weights beta^m.
        mean_m = (
            (length - 1) / 2.0 + _geometric_mean_correction(rate) - length * _geometric_mean_correction(rate * length)
        )
        to_b = gap_weight * (1.0 - mean_m / length)
        coefs[j] += to_b
        coefs[j - 1] += gap_weight - to_b
    return coefs / coefs.sum()


def power_coefficients(steps: Sequence[int], gamma: float, interp: str = "linear") -> np.ndarray:
    """Coefficients of the power-function EMA with exponent ``gamma`` at ``T = steps[-1]`` (EDM2 Eq. 2).

    Per step ``beta_t = (1 - 1/t)**(gamma + 1)``, so step ``t`` weighs ``F(t) - F(t-1)`` with
    ``F(u) = (u / T)**(gamma + 1)`` and the weights at step 0 get nothing. Steps before the first
    checkpoint are taken to hold its value (pass the step-0 weights as the first checkpoint to avoid that).
    """
    s = check_steps(steps)
    check_interp(interp)
    if not gamma > 0.0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    exponent = gamma + 1.0
    total = s[-1]
    if total <= 0:
        raise ValueError("a power-function EMA needs a last step > 0")

    def cumulative(u: int) -> float:  # F(u)
        return 0.0 if u == 0 else math.exp(exponent * math.log(u / total))

    coefs = np.zeros(len(s))
    coefs[0] = cumulative(s[0])
    for j in range(1, len(s)):
        a, b = s[j - 1], s[j]
        gap_weight = cumulative(b) - cumulative(a)
        if interp == "hold":
            coefs[j] += gap_weight
            continue
        # Summation by parts: sum_{t=a+1}^{b} (t-a)/L * w(t) = F(b) - mean_{u=a}^{b-1} F(u).
        to_b = cumulative(b) - _power_sum(exponent, a, b, total) / (b - a)
        coefs[j] += to_b
        coefs[j - 1] += gap_weight - to_b
    return coefs / coefs.sum()


def per_checkpoint_coefficients(count: int, decay: float) -> np.ndarray:
    """Coefficients when each checkpoint is one EMA update: ``ema_j = beta*ema_{j-1} + (1-beta)*theta_j``."""
    if count < 1:
        raise ValueError("need at least one checkpoint")
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    powers = np.arange(count - 1, -1, -1, dtype=np.float64)
    coefs = (1.0 - decay) * decay**powers
    coefs[0] = decay ** (count - 1)
    return coefs / coefs.sum()


def per_checkpoint_power_coefficients(count: int, gamma: float) -> np.ndarray:
    """Power-function EMA with each checkpoint as one update, checkpoint ``j`` standing for update ``j+1``."""
    return power_coefficients(list(range(count + 1)), gamma, interp="hold")[1:]


def check_steps(steps: Sequence[int]) -> list[int]:
    """The steps as ints, checked: at least one, non-negative, strictly increasing."""
    s = [int(x) for x in steps]
    if not s:
        raise ValueError("need at least one checkpoint")
    if s[0] < 0 or any(b <= a for a, b in zip(s, s[1:])):
        raise ValueError(f"steps must be non-negative and strictly increasing, got {s}")
    return s


def check_interp(interp: str) -> None:
    """``interp`` is one of INTERPOLATIONS."""
    if interp not in INTERPOLATIONS:
        raise ValueError(f"interp must be one of {INTERPOLATIONS}, got {interp!r}")


def _geometric_mean_correction(x: float) -> float:
    """``f(x) = 1/expm1(x) - 1/x + 1/2``, computed without cancellation (about ``x/12`` for small x).

    The mean of ``m`` under weights ``exp(-x m)``, ``m = 0..L-1``, is ``(L-1)/2 + f(x) - L f(x L)``.
    """
    if x < 0.1:
        x2 = x * x
        return x * (1 / 12 - x2 * (1 / 720 - x2 * (1 / 30240 - x2 / 1209600)))
    if x > 40.0:
        return 0.5 - 1.0 / x  # 1/expm1(x) < 5e-18
    return 1.0 / math.expm1(x) - 1.0 / x + 0.5


def _power_sum(exponent: float, start: int, stop: int, total: int) -> float:
    """``sum_{u=start}^{stop-1} (u/total)**exponent`` without a loop over the steps of a long gap.

    Short gaps and the region ``u < 4*exponent`` (where the Euler-Maclaurin series converges slowly) are
    summed term by term, at most ``max(64, 4*exponent + 8)`` terms; the rest by Euler-Maclaurin with
    eight Bernoulli corrections, whose terms shrink like ``(exponent / (2 pi u))**2``.
    """
    head_stop = stop if stop - start <= _DIRECT_SUM_MAX_TERMS else min(stop, max(start, math.ceil(4 * exponent) + 8))
    head = 0.0
    if head_stop > start:
        u = np.arange(start, head_stop, dtype=np.float64)
        head = math.fsum(np.exp(exponent * np.log(np.maximum(u, 1e-300) / total)) * (u > 0))
    if head_stop >= stop:
        return head
    p, q = head_stop, stop

    def derivative(order: int, u: int) -> float:  # d^order/du^order of (u/total)**exponent
        factor = 1.0
        for i in range(order):
            factor *= exponent - i
        return factor * math.exp(exponent * math.log(u / total) - order * math.log(u))

    f_p, f_q = derivative(0, p), derivative(0, q)
    tail = (q * f_q - p * f_p) / (exponent + 1.0) + (f_p - f_q) / 2.0
    for k, bernoulli in enumerate(_BERNOULLI_EVEN, start=1):
        order = 2 * k - 1
        tail += bernoulli / math.factorial(2 * k) * (derivative(order, q) - derivative(order, p))
    return head + tail


def power_decay_at(step: int, gamma: float) -> float:
    """The per-step decay of a power-function EMA at step ``step``: ``(1 - 1/t)**(gamma + 1)`` (spec §3); 0 at t <= 1."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0) if step > 1 else 0.0
