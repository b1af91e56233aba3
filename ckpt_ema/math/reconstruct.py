"""Post-hoc EMA reconstruction from snapshots of power-function EMAs (pure float64 math).

Implements the post-hoc EMA of Karras et al., "Analyzing and Improving the Training Dynamics of
Diffusion Models" (EDM2, CVPR 2024), as fixed by spec §3 (power profiles, sigma_rel <-> gamma) and
spec §4 (least-squares reconstruction). Written from the formulas only.

Every EMA is described by its *profile*: a probability density over training time ``tau`` that says how
much the averaged weights owe to the raw weights at ``tau``.

* power profile ending at ``t`` with exponent ``gamma`` (spec §3):
  ``p(tau) = (gamma+1) tau^gamma / t^(gamma+1)`` on ``[0, t]``;
* exponential profile ending at ``t`` with per-step decay ``beta`` (classic EMA, spec §2), truncated to
  ``[0, t]`` and renormalised: ``e(tau) = lam exp(-lam (t - tau)) / (1 - exp(-lam t))``, ``lam = -ln beta``.

A target profile is approximated by ``sum_i x_i p_i`` with ``x`` the L2 least-squares solution of
``A x = b`` (``A_ij = <p_i, p_j>``, ``b_i = <p_i, target>``), then normalised to ``sum x = 1`` (spec §4).
Time is continuous; steps are used as given (floats). Inner products are L2 over ``[0, max(t_a, t_b)]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ckpt_ema.errors import TargetError
from ckpt_ema.math.ema import SIGMA_REL_MAX, sigma_rel_to_gamma

__all__ = [
    "Reconstruction",
    "exp_exp_inner",
    "exp_power_inner",
    "power_inner",
    "solve_reconstruction",
    "solve_reconstructions",
    "tracked_gammas",
    "truncated_exp_sigma_rel",
]

# Above this condition number of A the plain solve is replaced by an SVD least-squares solve with cutoff.
_PLAIN_SOLVE_MAX_COND = 1e8

# exp_power_inner: below this c = lam * overlap the Poisson series is used, above it Gauss-Legendre.
_SERIES_MAX_C = 1e3
# Gauss-Legendre rule: panels of length <= _GL_PANEL, _GL_NODES nodes each (exact to ~1e-16 for e^-s).
_GL_PANEL = 10.0
_GL_NODES = 24
_GL_X, _GL_W = np.polynomial.legendre.leggauss(_GL_NODES)


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _real(name: str, value: object) -> float:
    """``value`` as a finite float, or TargetError."""
    if isinstance(value, (bool, np.bool_)):
        raise TargetError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TargetError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise TargetError(f"{name} must be finite, got {value!r}")
    return out


def _time(name: str, value: object) -> float:
    """A profile's end time: finite and > 0 (a profile ending at step 0 has no support)."""
    t = _real(name, value)
    if t <= 0.0:
        raise TargetError(f"{name} must be > 0 (a profile ending at step 0 averages nothing), got {t:g}")
    return t


def _gamma(name: str, value: object) -> float:
    """A power exponent: gamma > -1, else the profile tau^gamma is not integrable."""
    g = _real(name, value)
    if g <= -1.0:
        raise TargetError(f"{name} must be > -1, got {g:g}")
    return g


def _rate(name: str, decay: object) -> float:
    """lam = -ln(beta) for a per-step decay 0 < beta < 1 (log1p keeps beta near 1 exact)."""
    d = _real(name, decay)
    if not 0.0 < d < 1.0:
        raise TargetError(f"{name} must be strictly between 0 and 1, got {d!r}")
    lam = -math.log1p(d - 1.0) if d > 0.5 else -math.log(d)
    if lam <= 0.0:
        raise TargetError(f"{name} is too close to 1 to be represented, got {d!r}")
    return lam


# --------------------------------------------------------------------------------------------------
# tracked profiles given by the user (spec §3; the sigma_rel <-> gamma conversion lives in kernels)
# --------------------------------------------------------------------------------------------------


def tracked_gammas(sigma_rels: Sequence[object] = (), gammas: Sequence[object] = ()) -> tuple[float, ...]:
    """The exponents of the tracked power EMAs, from ``--tracked-sigma-rel`` or ``--tracked-gamma``.

    The order is the user's (an ema-pytorch folder's file ``{index}.{step}.pt`` belongs to entry
    ``index``). Raises TargetError naming the option when both or neither list is given, a value is out
    of range (0 < sigma_rel < 1/sqrt(12), gamma > 0) or a profile is listed twice.
    """
    if bool(sigma_rels) == bool(gammas):
        raise TargetError("give the tracked EMA profiles once: --tracked-sigma-rel or --tracked-gamma")
    option = "--tracked-sigma-rel" if sigma_rels else "--tracked-gamma"
    result = []
    for value in sigma_rels or gammas:
        number = _real(f"{option} {value}", value)
        if sigma_rels:
            try:
                result.append(sigma_rel_to_gamma(number))
            except ValueError:
                raise TargetError(
                    f"{option} {value}: sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) (1/sqrt(12))"
                ) from None
        elif number > 0.0:
            result.append(number)
        else:
            raise TargetError(f"{option} {value}: gamma must be > 0")
    if len(set(result)) != len(result):
        raise TargetError(f"{option}: a tracked profile is listed twice")
    return tuple(result)


def truncated_exp_sigma_rel(t: float, decay: float) -> float:
    """Relative standard deviation (std / t) of the exponential profile truncated to ``[0, t]``.

    ``t - tau`` is exponential with rate ``lam = -ln decay`` truncated to ``[0, t]``; its variance is
    ``1/lam^2 - t^2 / (4 sinh^2(lam t / 2))`` (``-> t^2/12``, the uniform profile, as ``lam t -> 0``,
    where the series ``1/12 - x^2/240 + x^4/6048`` replaces the cancelling difference).
    """
    x = _rate("decay", decay) * _time("t", t)
    if x < 1e-2:
        x2 = x * x
        return math.sqrt(1.0 / 12.0 - x2 / 240.0 + x2 * x2 / 6048.0)
    return math.sqrt(max(1.0 / (x * x) - 1.0 / (4.0 * math.sinh(0.5 * x) ** 2), 0.0)) if x < 700.0 else 1.0 / x


# --------------------------------------------------------------------------------------------------
# inner products of profiles (spec §4), L2 over time
# --------------------------------------------------------------------------------------------------


def power_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p_a, p_b> for power profiles ending at t_a and t_b (any order).

    spec §4: for ``t_1 <= t_2``, ``(g1+1)(g2+1)/(g1+g2+1) * t_1^g2 / t_2^(g2+1)``, evaluated as
    ``(t_1/t_2)^g2 / t_2`` so large gammas and steps cannot overflow. Requires ``g1 + g2 > -1``
    (otherwise the product is not integrable at 0 and the inner product is infinite).
    """
    ta, tb = _time("t_a", t_a), _time("t_b", t_b)
    ga, gb = _gamma("gamma_a", gamma_a), _gamma("gamma_b", gamma_b)
    if ga + gb <= -1.0:
        raise TargetError(f"gamma_a + gamma_b must be > -1 for a finite L2 inner product, got {ga + gb:g}")
    return _power_inner(ta, ga, tb, gb)


def _power_inner(ta: float, ga: float, tb: float, gb: float) -> float:
    # spec §4 closed form, with (t1, g1) the profile that ends first.
    if ta > tb:
        ta, ga, tb, gb = tb, gb, ta, ga
    return (ga + 1.0) * (gb + 1.0) / (ga + gb + 1.0) * (ta / tb) ** gb / tb


def exp_exp_inner(t_a: float, decay_a: float, t_b: float, decay_b: float) -> float:
    """<e_a, e_b> for two truncated, renormalised exponential profiles (closed form).

    With ``m = min(t_a, t_b)``, ``L = lam_a + lam_b`` and ``Z = 1 - exp(-lam t)``:
    ``lam_a lam_b / L * exp(-lam_a (t_a-m) - lam_b (t_b-m)) * (1 - exp(-L m)) / (Z_a Z_b)``,
    evaluated with expm1 so decays near 1 lose no precision.
    """
    ta, tb = _time("t_a", t_a), _time("t_b", t_b)
    la, lb = _rate("decay_a", decay_a), _rate("decay_b", decay_b)
    return _exp_exp_inner(ta, la, tb, lb)


def _exp_exp_inner(ta: float, la: float, tb: float, lb: float) -> float:
    # integral_0^m la e^{-la(ta-u)} lb e^{-lb(tb-u)} du / (Za Zb), m = min(ta, tb)
    m = min(ta, tb)
    big_l = la + lb
    za, zb = -math.expm1(-la * ta), -math.expm1(-lb * tb)
    shift = math.exp(-la * (ta - m) - lb * (tb - m))
    return la * lb / big_l * shift * (-math.expm1(-big_l * m)) / (za * zb)


def exp_power_inner(t_exp: float, decay: float, t_p: float, gamma_p: float) -> float:
    """<e, p> for an exponential profile ending at t_exp and a power profile ending at t_p.

    With ``m = min(t_exp, t_p)``, ``lam = -ln(decay)``, ``Z = 1 - exp(-lam t_exp)`` and ``c = lam m``,
    the integral over the overlap ``[0, m]`` reduces (substituting ``tau = m u``) to

        <e, p> = lam / Z * exp(-lam (t_exp - m)) * (m / t_p)^(gamma+1) * K(gamma, c),
        K(gamma, c) = integral_0^1 (gamma+1) u^gamma exp(-c (1-u)) du          (= 1F1(1; gamma+2; -c)).

    K is computed in float64 by one of two methods:

    * ``c <= 1e3``: the exact, all-positive series ``K = E[(gamma+1) / (gamma+1+N)]`` with
      ``N ~ Poisson(c)`` (expand ``exp(c u)``), summed over ``floor(c) +- (15 sqrt(c) + 50)`` and
      divided by the summed Poisson weights (no factorials, no cancellation). The omitted Poisson tail
      is below ``exp(-100)`` by the Chernoff bound; rounding is ~1e-14 relative.
    * ``c > 1e3``: with ``v = s / (c+gamma)``, ``K = (gamma+1)/(c+gamma) * integral_0^S
      exp(-s c/(c+gamma)) (1 - s/(c+gamma))^gamma ds``, by composite Gauss-Legendre (24 nodes per
      panel of length <= 10). The integrand is analytic on ``[0, S]`` (its branch point ``s = c+gamma``
      is > 900 away) and behaves like ``exp(-s)``, so each panel is exact to ~1e-16; ``S`` is chosen
      so the dropped tail is below ``exp(-39)`` relative (``S = 40``, plus ``ln((c+gamma)/(gamma+1))``
      when gamma < 0).

    Overall relative error: below ~1e-13 (checked against mpmath's 1F1 during development and against
    brute-force quadrature in the tests).
    """
    te, tp = _time("t_exp", t_exp), _time("t_p", t_p)
    lam = _rate("decay", decay)
    g = _gamma("gamma_p", gamma_p)
    return _exp_power_inner(te, lam, tp, g)


def _exp_power_inner(te: float, lam: float, tp: float, g: float) -> float:
    # <e,p> = lam/Z * e^{-lam(te-m)} * (m/tp)^(g+1) * K(g, lam m), m = min(te, tp) (docstring above)
    m = min(te, tp)
    z = -math.expm1(-lam * te)
    return lam / z * math.exp(-lam * (te - m)) * (m / tp) ** (g + 1.0) * _kummer_k(g, lam * m)


def _kummer_k(g: float, c: float) -> float:
    """K(g, c) = integral_0^1 (g+1) u^g e^{-c(1-u)} du = 1F1(1; g+2; -c), in (0, 1]."""
    if c <= _SERIES_MAX_C:
        return _kummer_k_series(g, c)
    return _kummer_k_quadrature(g, c)


def _kummer_k_series(g: float, c: float) -> float:
    # K = sum_n P(N=n) (g+1)/(g+1+n), N ~ Poisson(c); weights relative to the mode, renormalised.
    n0 = math.floor(c)
    h = math.ceil(15.0 * math.sqrt(c) + 50.0)
    lo, hi = max(0, n0 - h), n0 + h
    up = np.cumsum(np.log(c / np.arange(n0 + 1, hi + 1, dtype=np.float64)))
    down = np.cumsum(np.log(c / np.arange(n0, lo, -1, dtype=np.float64)))
    log_w = np.concatenate((-down[::-1], [0.0], up))
    w = np.exp(log_w)
    n = np.arange(lo, hi + 1, dtype=np.float64)
    f = (g + 1.0) / (g + 1.0 + n)
    return float(np.dot(w, f) / w.sum())


def _kummer_k_quadrature(g: float, c: float) -> float:
    # K = (g+1)/(c+g) * int_0^S exp(-s c/(c+g) + g log1p(-s/(c+g))) ds, composite Gauss-Legendre.
    r = c + g
    s_max = 40.0 + (math.log(r / (g + 1.0)) if g < 0.0 else 0.0)
    # Extreme gamma near -1: the truncation point would reach the singularity; use the exact series.
    if s_max >= 0.5 * r:
        return _kummer_k_series(g, c)
    n_panels = max(1, math.ceil(s_max / _GL_PANEL))
    edges = np.linspace(0.0, s_max, n_panels + 1)
    half = 0.5 * (edges[1:] - edges[:-1])
    mid = 0.5 * (edges[1:] + edges[:-1])
    s = (mid[:, None] + half[:, None] * _GL_X[None, :]).ravel()
    w = (half[:, None] * _GL_W[None, :]).ravel()
    vals = np.exp(-s * (c / r) + g * np.log1p(-s / r))
    return float((g + 1.0) / r * np.dot(w, vals))


# --------------------------------------------------------------------------------------------------
# reconstruction (spec §4)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reconstruction:
    """Result of :func:`solve_reconstruction`.

    coefficients: (n_snapshots,) float64 weights summing to 1 (0 for snapshots after the target).
    condition_number: 2-norm condition number of the Gram matrix A of the snapshots used.
    abs_sum: sum |x| of the normalised coefficients (1 when all are >= 0; large means cancellation).
    fit_error: ||fitted - target|| / ||target|| in L2 over time, for the normalised coefficients.
    """

    coefficients: np.ndarray
    condition_number: float
    abs_sum: float
    fit_error: float


def solve_reconstruction(
    snap_steps: ArrayLike,
    snap_gammas: ArrayLike,
    target_step: float,
    target_gamma: float | None = None,
    target_decay: float | None = None,
    rcond: float = 1e-12,
) -> Reconstruction:
    """Coefficients x with sum x_i p_i ~ target in L2 over time (spec §4, EDM2 post-hoc EMA).

    Snapshot i is a power profile with exponent ``snap_gammas[i]`` ending at ``snap_steps[i]``; the
    target is a power profile (``target_gamma``) or a truncated exponential one (``target_decay``,
    per-step) ending at ``target_step``. Snapshots after ``target_step`` get coefficient 0. ``A x = b``
    is solved in float64 with ``np.linalg.solve`` when ``cond(A) < 1e8``, otherwise by least squares
    with a cutoff (eigenvalues of the symmetric A below ``rcond`` times the largest are dropped: the
    solution ``np.linalg.lstsq(A, b, rcond=rcond)`` gives); x is then normalised to sum to 1. The fit error
    is ``sqrt(max(0, x'Ax - 2x'b + <p,p>)) / sqrt(<p,p>)`` for the normalised x; the cancellation in
    that sum puts a rounding floor of about ``1e-8 * abs_sum`` under it (an exact fit reports ~0).

    Raises TargetError when no snapshot is at or before ``target_step``, a snapshot is at step <= 0,
    not exactly one of ``target_gamma`` / ``target_decay`` is given, or a gamma is <= -1 (and, since
    the L2 norm of ``tau^gamma`` is infinite there, also for gammas <= -0.5).
    """
    if (target_gamma is None) == (target_decay is None):
        raise TargetError("give exactly one target: a power-function gamma or a classic EMA decay")
    target = ("gamma", target_gamma) if target_gamma is not None else ("decay", target_decay)
    return solve_reconstructions(snap_steps, snap_gammas, target_step, [target], rcond)[0]  # type: ignore[list-item]


def solve_reconstructions(
    snap_steps: ArrayLike,
    snap_gammas: ArrayLike,
    target_step: float,
    targets: Sequence[tuple[str, float]],
    rcond: float = 1e-12,
) -> list[Reconstruction]:
    """:func:`solve_reconstruction` for several targets at the same step, ``("gamma", g)`` or
    ``("decay", beta)`` each: A and its eigendecomposition (O(n^3)) are computed once for all of them."""
    steps = _vector("snapshot steps", snap_steps)
    gammas = _vector("snapshot gammas", snap_gammas)
    if steps.shape != gammas.shape:
        raise TargetError(f"got {steps.size} snapshot steps but {gammas.size} snapshot gammas")
    if steps.size == 0:
        raise TargetError("no EMA snapshots given")
    if np.any(steps <= 0.0):
        bad = float(steps[steps <= 0.0][0])
        raise TargetError(f"snapshot at step {bad:g}: EMA snapshots must be at steps > 0")
    if np.any(gammas <= -0.5):
        bad = float(gammas[gammas <= -0.5][0])
        raise TargetError(f"snapshot gamma {bad:g} must be > -0.5 (otherwise its profile has no finite L2 norm)")
    t_target = _time("target step", target_step)
    used = np.flatnonzero(steps <= t_target)
    if used.size == 0:
        raise TargetError(
            f"no EMA snapshot at or before the target step {t_target:g} (earliest is {float(steps.min()):g})"
        )
    rhs = [_target_inner(steps[used], gammas[used], t_target, kind, value) for kind, value in targets]

    a = _gram(steps[used], gammas[used])
    # A is symmetric, so its singular values are |eigenvalues|: one eigh gives cond(A) and, when A is
    # ill-conditioned, the least-squares solution with cutoff (what lstsq(A, b, rcond) computes by SVD).
    eigenvalues, eigenvectors = np.linalg.eigh(a)
    size = np.abs(eigenvalues)
    cond = float(size.max() / size.min()) if size.min() > 0.0 else math.inf
    keep = size > rcond * size.max()
    results = []
    for b, target_norm2 in rhs:
        x: np.ndarray | None = None
        if cond < _PLAIN_SOLVE_MAX_COND:
            try:
                x = np.linalg.solve(a, b)
            except np.linalg.LinAlgError:
                x = None
        if x is None:
            x = eigenvectors[:, keep] @ ((eigenvectors[:, keep].T @ b) / eigenvalues[keep])

        total = float(x.sum())
        if not np.all(np.isfinite(x)) or not math.isfinite(total) or abs(total) < 1e-8:
            raise TargetError(
                "the EMA snapshots cannot represent this target (coefficients do not sum to a usable value)"
            )
        x = x / total
        err2 = float(x @ a @ x - 2.0 * (x @ b) + target_norm2)

        coefficients = np.zeros(steps.size, dtype=np.float64)
        coefficients[used] = x
        coefficients.setflags(write=False)
        results.append(
            Reconstruction(
                coefficients=coefficients,
                condition_number=cond,
                abs_sum=float(np.abs(x).sum()),
                fit_error=math.sqrt(max(err2, 0.0) / target_norm2),
            )
        )
    return results


def _target_inner(t: np.ndarray, g: np.ndarray, t_target: float, kind: str, value: object) -> tuple[np.ndarray, float]:
    """b_i = <p_i, target> for the snapshots (t, g), and <target, target>."""
    if kind == "gamma":
        tg = _gamma("target gamma", value)
        if tg <= -0.5:
            raise TargetError(f"target gamma must be > -0.5 (otherwise the profile has no finite L2 norm), got {tg:g}")
        b = [_power_inner(ti, gi, t_target, tg) for ti, gi in zip(t.tolist(), g.tolist())]
        return np.array(b, dtype=np.float64), _power_inner(t_target, tg, t_target, tg)
    if kind == "decay":
        lam = _rate("target decay", value)
        b = [_exp_power_inner(t_target, lam, ti, gi) for ti, gi in zip(t.tolist(), g.tolist())]
        return np.array(b, dtype=np.float64), _exp_exp_inner(t_target, lam, t_target, lam)
    raise TargetError(f"unknown target kind {kind!r}: 'gamma' or 'decay'")


def _gram(t: np.ndarray, g: np.ndarray) -> np.ndarray:
    """A_ij = <p_i, p_j>, the spec §4 closed form of :func:`_power_inner` for all pairs at once."""
    ti, tj = t[:, None], t[None, :]
    gi, gj = g[:, None], g[None, :]
    later = np.maximum(ti, tj)
    g_later = np.where(ti <= tj, gj, gi)  # equal ends: the formula is symmetric, either will do
    return (gi + 1.0) * (gj + 1.0) / (gi + gj + 1.0) * (np.minimum(ti, tj) / later) ** g_later / later


def _vector(name: str, values: ArrayLike) -> np.ndarray:
    """A 1-D float64 array of finite values, or TargetError."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TargetError(f"{name} must be numbers") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise TargetError(f"{name} must be a flat list of numbers")
    if not np.all(np.isfinite(arr)):
        raise TargetError(f"{name} must be finite")
    return arr
