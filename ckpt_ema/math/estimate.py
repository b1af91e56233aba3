"""How far a post-hoc EMA may be from the per-step EMA the trainer would have kept (spec §7, §9).

Pure float64 math, numpy only. The derivation and its limits are in docs/estimate.md; in short:

- The tool's result is ``R = sum_j c_j theta(s_j)``, the true EMA ``E = sum_t w_t theta(t)`` over every
  step ``t`` in ``[s_0, T]``. With ``a_t = w_t - (c_j if t = s_j else 0)`` (``sum_t a_t = 0``) the error is
  ``E - R = sum_t a_t theta(t) = -sum_u A(u) xi_u`` where ``xi_u = theta(u+1) - theta(u)`` is the update of
  step ``u+1`` and ``A(u) = Phi(u) - C(u)`` the cumulative misfit: ``Phi(u) = sum_{t<=u} w_t`` (the per-step
  profile's cumulative weight), ``C(u) = sum_{s_j<=u} c_j``.
- The model (a Gaussian process fitted to the run): the weights move like a random walk whose per-step
  updates have a variance ``D`` (summed over all float elements, slowly varying along the run), may be
  correlated over ``tau_s`` steps (momentum: smoother than a random walk) and may have a drift, plus fast
  fluctuations ``N`` that decorrelate over ``tau_n`` steps (mean reversion). Its variogram
  ``gamma(h) = E||theta(t+h) - theta(t)||^2`` is fitted around each gap to the squared norms of the
  differences between checkpoints one, two and three gaps apart (``IncrementStats``, gathered by the pass).
- Then ``E||E - R||^2 = B' K_s B + (N/2) a' K_n a + bias^2`` with ``B_u = A(u) sigma_u`` and ``K`` the
  correlation matrices ``exp(-|t - t'| / tau)`` (a random walk: ``sum_u D A(u)^2``). The drift cancels for
  linear interpolation; for other interpolations the caller passes ``bias^2``, the squared norm of the
  result's difference from the linear one.
- ``sig = sqrt(V / (||R - theta(T)||^2 + V))`` with ``V = E||E - R||^2``: the denominator is the expected
  ``||E - theta(T)||^2`` under the same model.
- ``Variogram.at(steps)`` moves the fitted model to another grid of checkpoints: the inverse question
  (which spacing reaches a given sig) for the next run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

Cumulative = Callable[[np.ndarray], np.ndarray]  # Phi(u) for float steps u (vectorised)

WINDOW = 3  # gaps on each side of a gap whose increments fit its variogram
FEW_CHECKPOINTS = 6  # fewer checkpoints than this: the variogram rests on too few increments
JUMP_FACTOR = 8.0  # an increment this many times the fitted variogram of its neighbours is a jump


def classic_cumulative(decay: float, total: int) -> Cumulative:
    """``Phi(u) = decay**(T - u)``: the cumulative per-step weight of a classic EMA at ``T`` (spec §2)."""
    rate = -math.log(decay)
    return lambda u: np.exp(-rate * (total - np.asarray(u, dtype=np.float64)))


def power_cumulative(gamma: float, total: int) -> Cumulative:
    """``Phi(u) = (u / T)**(gamma + 1)``: the cumulative per-step weight of a power EMA at ``T`` (spec §3)."""
    return lambda u: (np.maximum(np.asarray(u, dtype=np.float64), 0.0) / total) ** (gamma + 1.0)


def window_cumulative(length: float, total: int) -> Cumulative:
    """``--window L`` (spec §8): the mean of the weights over steps ``(T - L, T]``, ``Phi(u) = (u - T + L) / L``."""
    start = total - length
    return lambda u: np.clip((np.asarray(u, dtype=np.float64) - start) / length, 0.0, 1.0)


def lr_decay_cumulative(shape: str, length: float, total: int) -> Cumulative:
    """``--lr-decay SHAPE:L`` (spec §8): step ``s`` weighs ``w_s - w_{s+1}``, so ``Phi(u) = 1 - w_{u+1}`` with
    ``w_t = f((t - 1 - (T - L)) / L)`` on ``(T - L, T]``, 1 before and 0 after."""
    shapes = {
        "linear": lambda x: 1.0 - x,
        "cosine": lambda x: np.cos(np.pi * x / 2.0) ** 2,
        "sqrt": lambda x: 1.0 - np.sqrt(x),
    }
    f = shapes[shape]
    start = total - length

    def cumulative(u: np.ndarray) -> np.ndarray:
        x = np.clip((np.asarray(u, dtype=np.float64) - start) / length, 0.0, 1.0)
        return np.where(np.asarray(u) >= total, 1.0, 1.0 - f(x))

    return cumulative


@dataclass(frozen=True)
class IncrementStats:
    """Squared norms of the differences between checkpoints, summed over every float element.

    ``lag1[j] = ||theta(s_{j+1}) - theta(s_j)||^2``, ``lag2[j] = ||theta(s_{j+2}) - theta(s_j)||^2``,
    ``lag3[j] = ||theta(s_{j+3}) - theta(s_j)||^2`` (steps in optimizer steps).
    """

    steps: tuple[int, ...]
    lag1: tuple[float, ...]
    lag2: tuple[float, ...]
    lag3: tuple[float, ...]

    @classmethod
    def from_products(cls, steps: Sequence[int], sq: ArrayLike, cross1: ArrayLike, cross2: ArrayLike) -> IncrementStats:
        """From ``sq[j] = ||d_j||^2``, ``cross1[j] = <d_j, d_{j+1}>``, ``cross2[j] = <d_j, d_{j+2}>``, d_j the
        increment over gap j: what a pass gathers with three multiply-adds per element and checkpoint."""
        q = np.asarray(sq, dtype=np.float64)
        p1 = np.asarray(cross1, dtype=np.float64)
        p2 = np.asarray(cross2, dtype=np.float64)
        lag2 = q[:-1] + q[1:] + 2 * p1[: len(q) - 1]
        lag3 = q[:-2] + q[1:-1] + q[2:] + 2 * (p1[: len(q) - 2] + p1[1 : len(q) - 1] + p2[: len(q) - 2])
        return cls(tuple(int(s) for s in steps), tuple(q), tuple(lag2), tuple(lag3))

    @classmethod
    def from_array(cls, steps: Sequence[int], thetas: np.ndarray) -> IncrementStats:
        """From the checkpoints themselves, ``thetas[j]`` the flattened float weights at ``steps[j]``."""
        x = np.asarray(thetas, dtype=np.float64).reshape(len(steps), -1)

        def lag(k: int) -> tuple[float, ...]:
            return tuple(float(v) for v in ((x[k:] - x[:-k]) ** 2).sum(axis=1)) if len(x) > k else ()

        return cls(tuple(int(s) for s in steps), lag(1), lag(2), lag(3))


@dataclass(frozen=True)
class Variogram:
    """The model per gap ``j`` (from ``s_j`` to ``s_{j+1}``), all in optimizer steps, summed over every element:

    ``gamma(h) = D h + N (1 - exp(-h / tau_n)) - D tau_s (1 - exp(-h / tau_s))``

    ``diffusion`` D is the variance of the updates per step at scales of a spacing and more; ``nugget`` N
    (with ``tau_n``) fast fluctuations that a spacing already averages out (mean reversion, seen as a
    variogram that grows less than linearly); ``tau_s`` the correlation time of the updates (momentum, a
    drift: a variogram that grows faster than linearly), which makes the path smoother than a random walk.
    """

    steps: tuple[int, ...]
    diffusion: np.ndarray
    nugget: np.ndarray
    tau_n: np.ndarray
    tau_s: np.ndarray
    warnings: tuple[str, ...] = ()

    def gamma(self, gap: int, h: np.ndarray) -> np.ndarray:
        """The fitted variogram of gap ``gap`` at lags ``h`` (steps)."""
        d, n, tn, ts = self.diffusion[gap], self.nugget[gap], self.tau_n[gap], self.tau_s[gap]
        return d * h + n * _saturating(h, tn) - d * ts * _saturating(h, ts)

    def at(self, steps: Sequence[int]) -> Variogram:
        """The same run on another grid of checkpoints: each new gap takes the parameters of the old gap
        holding its middle."""
        s = np.asarray(self.steps, dtype=np.float64)
        new = np.asarray(steps, dtype=np.float64)
        where = np.clip(np.searchsorted(s, (new[:-1] + new[1:]) / 2, side="right") - 1, 0, len(s) - 2)
        return Variogram(
            tuple(int(x) for x in steps),
            self.diffusion[where],
            self.nugget[where],
            self.tau_n[where],
            self.tau_s[where],
            self.warnings,
        )


def _saturating(h: np.ndarray, tau: float) -> np.ndarray:
    """``1 - exp(-h / tau)`` (1 for tau = 0)."""
    return np.ones_like(h) if tau <= 0 else -np.expm1(-h / tau)


NUGGET_TAU = 0.5  # the correlation time of the fluctuations, in spacings, where the lags cannot resolve it
_TAU_GRID = np.geomspace(0.02, 4.0, 24)
_NUGGET_GRID = np.geomspace(0.5, 2.0, 7)  # candidate tau_n, in spacings  # candidate tau_s, in spacings


def fit_variogram(stats: IncrementStats, window: int = WINDOW) -> Variogram:
    """Fit the model around each gap to the increments within ``window`` gaps of it, one, two and three gaps
    long: a line ``gamma(h) = b + D h`` first (least squares on ``gamma(h) / h``); ``b > 0`` is a nugget
    ``N = b``, ``b < 0`` a correlation time ``tau_s`` fitted by a search (docs/estimate.md)."""
    steps = np.asarray(stats.steps, dtype=np.float64)
    gaps = len(steps) - 1
    if gaps < 1:
        raise ValueError("an error estimate needs at least two checkpoints")
    observations = []  # (first gap, gaps spanned, length in steps, squared norm)
    for k, values in enumerate((stats.lag1, stats.lag2, stats.lag3), start=1):
        for j, value in enumerate(values):
            observations.append((j, k, steps[j + k] - steps[j], float(value)))
    obs = np.array(observations, dtype=np.float64)
    lengths = np.diff(steps)
    params = np.zeros((gaps, 4))
    for g in range(gaps):
        lo, hi = g - window, g + window
        inside = obs[(obs[:, 0] >= lo) & (obs[:, 0] + obs[:, 1] - 1 <= hi)]
        params[g] = _fit_one(inside[:, 2], inside[:, 3], float(lengths[g]))
    warnings = []
    if len(steps) < FEW_CHECKPOINTS:
        warnings.append(
            f"only {len(steps)} checkpoints: the model of how the weights move between them rests on "
            f"{gaps} increment{'s' if gaps != 1 else ''}; treat the estimate as a rough guide"
        )
    lag1 = np.asarray(stats.lag1, dtype=np.float64)
    typical = [_neighbours(lag1, j) for j in range(gaps)]
    jumps = [j for j in range(gaps) if gaps >= 3 and lag1[j] > JUMP_FACTOR * typical[j]]
    if jumps:
        j = max(jumps, key=lambda i: lag1[i] / typical[i])
        more = f", and {len(jumps) - 1} more" if len(jumps) > 1 else ""
        warnings.append(
            f"the weights jump between steps {int(steps[j])} and {int(steps[j + 1])} (that increment is "
            f"{lag1[j] / typical[j]:.3g}x those around it{more}): the random-walk model does not describe a "
            "jump; the estimate may be far off there"
        )
    return Variogram(
        tuple(int(s) for s in steps), params[:, 0], params[:, 1], params[:, 2], params[:, 3], tuple(warnings)
    )


def _neighbours(lag1: np.ndarray, j: int) -> float:
    """The typical squared increment around gap j: the larger of the medians of up to three gaps on each
    side (a jump stands out from both sides; the last gap is compared with those before it). The first gap
    is never a jump: training moves fastest at its start."""
    before, after = lag1[max(0, j - 3) : j], lag1[j + 1 : j + 4]
    if j == 0 or not len(before):
        return math.inf
    return max(float(np.median(before)), float(np.median(after)) if len(after) else 0.0)


def _fit_one(lengths: np.ndarray, values: np.ndarray, spacing: float) -> tuple[float, float, float, float]:
    """(D, N, tau_n, tau_s) from squared increments ``values`` over ``lengths`` steps around one gap.

    Every candidate shape (a nugget with ``tau_n`` on a grid, or updates correlated over ``tau_s``; each with a
    drift term ``v^2 h^2``) is fitted by non-negative least squares on ``gamma(h) / h``; the best fit is kept,
    and among equally good ones (the lags cannot tell them apart) the one with the roughest path inside a
    gap (largest ``gamma(spacing / 2)``): towards the larger error.
    """
    keep = np.isfinite(values)
    lengths, values = lengths[keep], values[keep]
    if not len(values):
        return 0.0, 0.0, 0.0, 0.0
    weight = 1.0 / lengths
    target = values * weight
    distinct = len(np.unique(lengths))
    half = np.array([spacing / 2.0])
    candidates = []  # (residual, gamma at half a spacing, (D, N, tau_n, tau_s))
    for tau_n in _NUGGET_GRID * spacing:
        columns = [_saturating(lengths, tau_n), lengths, lengths**2]
        for coef, residual in _nnls(columns, weight, target, distinct):
            n, d, _ = coef
            gamma_half = n * _saturating(half, tau_n)[0] + d * half[0]
            candidates.append((residual, gamma_half, (d, n, float(tau_n), 0.0)))
    for tau_s in _TAU_GRID * spacing:
        r = math.exp(-1.0 / tau_s)
        kappa = 2 * r / (1 - r * r)
        columns = [lengths - kappa * _saturating(lengths, tau_s), lengths**2]
        for coef, residual in _nnls(columns, weight, target, distinct):
            d, _ = coef
            gamma_half = d * (half[0] - kappa * _saturating(half, tau_s)[0])
            candidates.append((residual, gamma_half, (d, 0.0, 0.0, float(tau_s))))
    if not candidates:
        return float(np.mean(values / lengths)), 0.0, 0.0, 0.0
    least = min(c[0] for c in candidates)
    scale = float((target**2).sum())
    close = [c for c in candidates if c[0] <= least * FIT_TOLERANCE + 1e-12 * scale]
    return max(close, key=lambda c: c[1])[2]


FIT_TOLERANCE = 1.0 + 1e-9  # only fits as good as the best count as ties (the study: docs/estimate.md)


def _nnls(
    columns: list[np.ndarray], weight: np.ndarray, target: np.ndarray, distinct: int
) -> list[tuple[list[float], float]]:
    """Non-negative least squares by active sets (few columns): the best feasible subset's coefficients."""
    design = np.stack(columns, axis=1) * weight[:, None]
    best: tuple[list[float], float] | None = None
    k = design.shape[1]
    for size in range(1, min(k, distinct) + 1):
        for subset in _subsets(k, size):
            solution, *_ = np.linalg.lstsq(design[:, subset], target, rcond=None)
            if (solution < 0).any():
                continue
            residual = float(((design[:, subset] @ solution - target) ** 2).sum())
            if best is None or residual < best[1]:
                coef = [0.0] * k
                for i, value in zip(subset, solution):
                    coef[i] = float(value)
                best = (coef, residual)
    return [best] if best is not None else []


def _subsets(k: int, size: int) -> list[list[int]]:
    if size == 0:
        return [[]]
    return [[*rest, last] for last in range(k) for rest in _subsets(last, size - 1)]


@dataclass(frozen=True)
class Estimate:
    """The expected error of one output against the per-step EMA, under the model of docs/estimate.md.

    ``sig`` as in spec §7 (0 perfect, 1 no better than the last checkpoint); ``error`` the absolute
    ``||result - truth||`` (root of the expected square, in the weights' units, over all float elements);
    ``distance`` ``||result - theta(T)||``; the parts of the squared error: ``diffusion``, ``nugget``, ``bias``.
    """

    sig: float
    error: float
    distance: float
    diffusion: float
    nugget: float
    bias: float
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        return {
            "sig": self.sig,
            "error": self.error,
            "distance": self.distance,
            "parts": {"diffusion": self.diffusion, "nugget": self.nugget, "bias": self.bias},
            "warnings": list(self.warnings),
        }


def error_parts(
    steps: Sequence[int], coefficients: ArrayLike, cumulative: Cumulative, model: Variogram
) -> tuple[float, float]:
    """The two parts of ``E||E - R||^2`` (docs/estimate.md): the random walk's ``B' K_s B`` (``B_u = A(u)
    sigma_u``, updates correlated over ``tau_s``) and the fluctuations' ``(N/2) a' K_n a``.

    ``coefficients[j]`` weighs the checkpoint at ``steps[j]`` (summing to 1, ``T = steps[-1]``);
    ``cumulative`` is the per-step profile's ``Phi(u)`` (1 at ``T``); ``model`` is on the same steps.
    Every step of ``[s_0, T]`` is visited (``O(T - s_0)``); longer spans than ``MAX_STEPS`` are coarsened.
    """
    s = np.asarray([int(x) for x in steps], dtype=np.int64)
    c = np.asarray(coefficients, dtype=np.float64)
    if len(s) != len(c) or tuple(int(x) for x in s) != model.steps:
        raise ValueError("steps, coefficients and the model must describe the same checkpoints")
    if len(s) == 1:
        return 0.0, 0.0
    unit = max(1, math.ceil((s[-1] - s[0]) / MAX_STEPS))  # steps per grid point
    grid = s[0] + unit * np.arange((s[-1] - s[0]) // unit + 1, dtype=np.int64)
    grid[-1] = s[-1]
    where = np.clip(np.rint((s - s[0]) / unit).astype(np.int64), 0, len(grid) - 1)  # checkpoint -> grid index
    phi = cumulative(grid.astype(np.float64))
    w = np.diff(phi, prepend=0.0)  # per grid point; w[0] is the start's own weight
    a = w.copy()
    np.subtract.at(a, where, c)
    big_a = np.cumsum(a)[:-1]  # A(u) at grid points 0 .. last-1
    gap = np.clip(np.searchsorted(where, np.arange(len(grid)), side="right") - 1, 0, len(s) - 2)
    gap_of_point = np.clip(np.searchsorted(where, np.arange(len(grid)), side="left") - 1, 0, len(s) - 2)
    # The random walk with correlated updates: B' K B with B_u = A(u) sigma_u (docs/estimate.md, Eq. 4).
    tau_s = model.tau_s[gap[:-1]] / unit
    r = np.exp(-1.0 / np.maximum(tau_s, 1e-3))
    sigma_sq = model.diffusion[gap[:-1]] * unit * (1 - r) / (1 + r)
    diffusion = _filtered_form(big_a * np.sqrt(sigma_sq), tau_s)
    nugget = _filtered_form(a * np.sqrt(model.nugget[gap_of_point] / 2), model.tau_n[gap_of_point] / unit)
    return diffusion, nugget


MAX_STEPS = 1 << 22


def _filtered_form(b: np.ndarray, tau: np.ndarray) -> float:
    """``b' K b`` for the correlations ``K_tt' = prod_{k=t'+1}^{t} exp(-1/tau_k)`` (an Ornstein-Uhlenbeck
    process in warped time, so ``K`` is positive semi-definite), as ``sum_t b_t (2 f_t - b_t)`` with the
    filter ``f_t = b_t + exp(-1/tau_t) f_{t-1}``; ``tau < 0.05`` steps counts as uncorrelated."""
    if not b.any():
        return 0.0
    total = 0.0
    carry = 0.0
    bounds = np.flatnonzero(np.diff(tau) != 0) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(b)]])):
        t = float(tau[lo])
        seg = b[lo:hi]
        if t < 0.05:
            f = seg.copy()
        else:
            r = math.exp(-1.0 / t)
            block = max(1, int(600.0 * t))  # r**-block stays below 1e260
            f = np.empty_like(seg)
            for b0 in range(0, len(seg), block):
                part = seg[b0 : b0 + block]
                k = np.arange(len(part), dtype=np.float64)
                f[b0 : b0 + block] = r**k * (r * carry + np.cumsum(part * r**-k))
                carry = float(f[b0 + len(part) - 1])
        carry = float(f[-1])
        total += float((seg * (2 * f - seg)).sum())
    return max(total, 0.0)


def estimate(
    steps: Sequence[int],
    coefficients: ArrayLike,
    cumulative: Cumulative,
    model: Variogram,
    distance_sq: float,
    bias_sq: float = 0.0,
) -> Estimate:
    """The estimate for one output: ``distance_sq = ||R - theta(T)||^2`` (gathered by the pass), ``bias_sq`` the
    squared norm of the result's difference from linear interpolation (0 for ``--interp linear``)."""
    diffusion, nugget = error_parts(steps, coefficients, cumulative, model)
    variance = diffusion + nugget + bias_sq
    total = distance_sq + variance
    sig = math.sqrt(variance / total) if total > 0 else 0.0
    return Estimate(
        sig=sig,
        error=math.sqrt(variance),
        distance=math.sqrt(max(distance_sq, 0.0)),
        diffusion=diffusion,
        nugget=nugget,
        bias=bias_sq,
        warnings=model.warnings,
    )


NICE_SPACINGS = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 25000, 50000)


def predicted_sig(
    model: Variogram,
    steps: Sequence[int],
    coefficients: ArrayLike,
    cumulative: Cumulative,
    denominator_sq: float,
) -> float:
    """The sig the model predicts for checkpoints at ``steps`` (the model moved there with ``Variogram.at``),
    against ``denominator_sq``, this run's estimate of ``||E - theta(T)||^2`` (independent of the spacing)."""
    variance = sum(error_parts(steps, coefficients, cumulative, model.at(steps)))
    return math.sqrt(min(variance / denominator_sq, 1.0)) if denominator_sq > 0 else 0.0


def spacing_for(
    target_sig: float,
    model: Variogram,
    coefficients_for: Callable[[list[int]], np.ndarray],
    cumulative: Cumulative,
    denominator_sq: float,
    largest: int | None = None,
) -> tuple[int, float] | None:
    """The inverse question: the largest checkpoint spacing (steps, from ``NICE_SPACINGS``, at most
    ``largest``) whose predicted sig is at most ``target_sig``, with that sig; None if not even every step.

    The grid is ``s_0, s_0 + N, ..., T`` (``T`` added when it is not on it), the run's first and last steps;
    ``coefficients_for(steps)`` gives the output's coefficients on a grid (the same target).
    """
    first, total = model.steps[0], model.steps[-1]
    best: tuple[int, float] | None = None
    for spacing in NICE_SPACINGS:
        if spacing > total - first or (largest is not None and spacing > largest):
            break
        grid = list(range(first, total + 1, spacing))
        if grid[-1] != total:
            grid.append(total)
        sig = predicted_sig(model, grid, coefficients_for(grid), cumulative, denominator_sq)
        if sig <= target_sig:
            best = (spacing, sig)
        else:
            break
    return best
