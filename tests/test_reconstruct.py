"""Tests for ckpt_ema.math.reconstruct (spec §3, §4).

Every expected value comes from an independent computation written here: published numbers, bisection on
the sigma_rel formula, brute-force composite Simpson integration of the profile densities, and a
least-squares solver built from the SPEC formula with plain loops. Nothing is compared with the module's
own output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ckpt_ema.errors import TargetError
from ckpt_ema.math.ema import gamma_to_sigma_rel, sigma_rel_to_gamma
from ckpt_ema.math.reconstruct import (
    Reconstruction,
    exp_exp_inner,
    exp_power_inner,
    power_inner,
    solve_reconstruction,
    solve_reconstructions,
    tracked_gammas,
    truncated_exp_sigma_rel,
)

from .reference import gamma_by_bisection as ref_gamma_bisect
from .reference import power_inner as ref_power_inner_closed
from .reference import sigma_rel_of as ref_sigma_rel
from .reference import simpson as ref_simpson

# ----------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------


def ref_power_density(t: float, g: float):
    return lambda u: (g + 1.0) * u**g / t ** (g + 1.0)


def ref_exp_density(t: float, decay: float):
    lam = -math.log(decay)
    norm = 1.0 - math.exp(-lam * t)
    return lambda u: lam * np.exp(-lam * (t - u)) / norm


def ref_integrate(f, m: float, lam: float | None = None) -> float:
    """Integral of f over [0, m]; with an exponential factor of rate lam, resolve its last 60/lam steps."""
    if lam is None or 60.0 / lam >= m:
        return ref_simpson(f, 0.0, m)
    cut = m - 60.0 / lam
    return ref_simpson(f, 0.0, cut) + ref_simpson(f, cut, m)


def ref_solve(steps, gammas, target_step, target_inner, target_norm2):
    """Plain float64 normal equations from loops; returns full-length x (normalised) and fit error."""
    used = [i for i, t in enumerate(steps) if t <= target_step]
    n = len(used)
    a = np.zeros((n, n))
    b = np.zeros(n)
    for r, i in enumerate(used):
        b[r] = target_inner(steps[i], gammas[i])
        for c, j in enumerate(used):
            a[r, c] = ref_power_inner_closed(steps[i], gammas[i], steps[j], gammas[j])
    x = np.linalg.solve(a, b)
    x = x / x.sum()
    err = math.sqrt(max(0.0, x @ a @ x - 2 * x @ b + target_norm2) / target_norm2)
    full = np.zeros(len(steps))
    full[used] = x
    return full, err, np.linalg.cond(a)


G05, G10 = 16.97, 6.94  # published gammas for sigma_rel 0.05 and 0.10 (EDM2)

# ----------------------------------------------------------------------------------------------
# sigma_rel <-> gamma
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma", "gamma"), [(0.05, 16.97), (0.10, 6.94)])
def test_published_pairs(sigma, gamma):
    assert round(sigma_rel_to_gamma(sigma), 2) == gamma
    assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-13)


@pytest.mark.parametrize("sigma", [1e-3, 0.01, 0.02, 0.05, 0.07, 0.10, 0.2, 0.28, 0.2886])
def test_sigma_rel_to_gamma_matches_bisection_and_cubic(sigma):
    g = sigma_rel_to_gamma(sigma)
    assert g == pytest.approx(ref_gamma_bisect(sigma), rel=1e-10)
    k = sigma**-2
    residual = g**3 + 7 * g**2 + (16 - k) * g + (12 - k)
    assert abs(residual) <= 1e-10 * (g**3 + 7 * g**2 + (16 + k) * g + 12 + k)
    assert ref_sigma_rel(g) == pytest.approx(sigma, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.1, 1.0, 6.94, 16.97, 100.0])
def test_gamma_round_trip(gamma):
    assert gamma_to_sigma_rel(gamma) == pytest.approx(ref_sigma_rel(gamma), rel=1e-15)
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-10)


@pytest.mark.parametrize("sigma", [0.0, -0.1, 1 / math.sqrt(12), 0.3, float("nan"), float("inf")])
def test_sigma_rel_out_of_range(sigma):
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(sigma)
    with pytest.raises(TargetError, match="--tracked-sigma-rel"):
        tracked_gammas(sigma_rels=[0.05, sigma])


def test_tracked_gammas_in_the_users_order():
    g05, g10 = tracked_gammas(sigma_rels=["0.05", 0.10])
    assert (round(g05, 2), round(g10, 2)) == (16.97, 6.94)
    assert tracked_gammas(gammas=[6.94, "16.97"]) == (6.94, 16.97)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "--tracked-sigma-rel or --tracked-gamma"),
        ({"sigma_rels": [0.05], "gammas": [6.94]}, "--tracked-sigma-rel or --tracked-gamma"),
        ({"gammas": [0.0]}, "--tracked-gamma 0.0: gamma must be > 0"),
        ({"gammas": ["x"]}, "--tracked-gamma x"),
        ({"sigma_rels": [0.05, 0.05]}, "listed twice"),
    ],
)
def test_tracked_gammas_reject(kwargs, message):
    with pytest.raises(TargetError, match=message):
        tracked_gammas(**kwargs)


@pytest.mark.parametrize(("t", "decay"), [(1000.0, 0.999), (1000.0, 0.99), (50.0, 0.9999999), (2000.0, 0.5)])
def test_truncated_exp_sigma_rel_matches_quadrature(t, decay):
    lam = -math.log(decay)
    dens = ref_exp_density(t, decay)
    mean = ref_integrate(lambda u: u * dens(u), t, lam)
    var = ref_integrate(lambda u: (u - mean) ** 2 * dens(u), t, lam)
    assert truncated_exp_sigma_rel(t, decay) == pytest.approx(math.sqrt(var) / t, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# inner products vs brute-force integration
# ----------------------------------------------------------------------------------------------

POWER_CASES = [
    (1000.0, G05, 1000.0, G05),
    (1000.0, G05, 2000.0, G10),
    (2000.0, G05, 1000.0, G10),  # t_a > t_b
    (1500.0, 0.5, 2000.0, 2.0),
    (2000.0, 0.0, 700.0, 0.5),
    (1900.0, G10, 2000.0, G10),
]


@pytest.mark.parametrize(("ta", "ga", "tb", "gb"), POWER_CASES)
def test_power_inner_vs_quadrature(ta, ga, tb, gb):
    pa, pb = ref_power_density(ta, ga), ref_power_density(tb, gb)
    ref = ref_integrate(lambda u: pa(u) * pb(u), min(ta, tb))
    assert power_inner(ta, ga, tb, gb) == pytest.approx(ref, rel=1e-6)
    assert power_inner(tb, gb, ta, ga) == pytest.approx(ref, rel=1e-6)


def test_power_inner_large_values_do_not_overflow():
    ref = ref_power_inner_closed(1.0, 300.0, 1.001, 300.0) * 1e-7  # scale: inner ~ 1/t
    assert power_inner(1e7, 300.0, 1.001e7, 300.0) == pytest.approx(ref, rel=1e-10)


EXP_POWER_CASES = [
    # t_exp, decay, t_p, gamma  (c = lam * min(t_exp, t_p) spans series and quadrature branches)
    (1000.0, 0.999, 1000.0, G10),
    (2000.0, 0.9999, 2000.0, G05),
    (2000.0, 0.9999, 1500.0, 0.5),  # exponential ends after the power profile
    (1500.0, 0.9999, 2000.0, 2.0),
    (1000.0, 0.9, 1000.0, G05),  # c ~ 105
    (2000.0, 0.9, 1990.0, G10),
    (20000.0, 0.9, 20000.0, G10),  # c ~ 2100
    (50000.0, 0.9, 49950.0, 0.5),  # c ~ 5300, power ends 50 steps first
    (100.0, 0.99, 50.0, 0.0),
]


@pytest.mark.parametrize(("te", "decay", "tp", "gp"), EXP_POWER_CASES)
def test_exp_power_inner_vs_quadrature(te, decay, tp, gp):
    e, p = ref_exp_density(te, decay), ref_power_density(tp, gp)
    ref = ref_integrate(lambda u: e(u) * p(u), min(te, tp), -math.log(decay))
    assert exp_power_inner(te, decay, tp, gp) == pytest.approx(ref, rel=1e-6)


EXP_EXP_CASES = [
    (1000.0, 0.999, 1000.0, 0.999),
    (1000.0, 0.9, 2000.0, 0.9999),
    (2000.0, 0.9999, 1000.0, 0.9),  # t_a > t_b
    (2000.0, 0.9999, 1990.0, 0.9),
    (1500.0, 0.99, 1600.0, 0.999),
    (300.0, 0.9999, 300.0, 0.9999),
]


@pytest.mark.parametrize(("ta", "da", "tb", "db"), EXP_EXP_CASES)
def test_exp_exp_inner_vs_quadrature(ta, da, tb, db):
    ea, eb = ref_exp_density(ta, da), ref_exp_density(tb, db)
    lam = max(-math.log(da), -math.log(db))
    ref = ref_integrate(lambda u: ea(u) * eb(u), min(ta, tb), lam)
    assert exp_exp_inner(ta, da, tb, db) == pytest.approx(ref, rel=1e-6)
    assert exp_exp_inner(tb, db, ta, da) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize(
    ("func", "args"),
    [
        (power_inner, (0.0, 1.0, 10.0, 1.0)),
        (power_inner, (10.0, -1.0, 10.0, 1.0)),
        (power_inner, (10.0, -0.6, 10.0, -0.6)),
        (exp_power_inner, (10.0, 1.0, 10.0, 1.0)),
        (exp_power_inner, (10.0, 0.0, 10.0, 1.0)),
        (exp_power_inner, (10.0, 0.9, -5.0, 1.0)),
        (exp_exp_inner, (10.0, 1.5, 10.0, 0.9)),
        (exp_exp_inner, (float("nan"), 0.9, 10.0, 0.9)),
    ],
)
def test_inner_products_reject_invalid(func, args):
    with pytest.raises(TargetError):
        func(*args)


# ----------------------------------------------------------------------------------------------
# solve_reconstruction
# ----------------------------------------------------------------------------------------------

# Documented, well-conditioned configuration: two tracked profiles saved at 500, 1000, 1500, 2000.
DOC_STEPS = [500.0, 1000.0, 1500.0, 2000.0] * 2
DOC_GAMMAS = [G05] * 4 + [G10] * 4


def test_coefficients_match_independent_solver_power_target():
    tg = 11.0
    x_ref, err_ref, cond_ref = ref_solve(
        DOC_STEPS,
        DOC_GAMMAS,
        2000.0,
        lambda t, g: ref_power_inner_closed(t, g, 2000.0, tg),
        ref_power_inner_closed(2000.0, tg, 2000.0, tg),
    )
    rec = solve_reconstruction(DOC_STEPS, DOC_GAMMAS, 2000.0, target_gamma=tg)
    assert isinstance(rec, Reconstruction)
    assert rec.coefficients.dtype == np.float64 and rec.coefficients.shape == (8,)
    np.testing.assert_allclose(rec.coefficients, x_ref, rtol=1e-9, atol=1e-12)
    assert rec.coefficients.sum() == pytest.approx(1.0, abs=1e-12)
    assert rec.condition_number == pytest.approx(cond_ref, rel=1e-6)
    assert rec.abs_sum == pytest.approx(np.abs(x_ref).sum(), rel=1e-9)
    assert rec.fit_error == pytest.approx(err_ref, rel=1e-6)


def test_coefficients_match_independent_solver_exp_target():
    decay, t = 0.999, 2000.0
    e = ref_exp_density(t, decay)
    lam = -math.log(decay)

    def b(ts, g):
        p = ref_power_density(ts, g)
        return ref_integrate(lambda u: e(u) * p(u), ts, lam)

    norm2 = ref_integrate(lambda u: e(u) ** 2, t, lam)
    x_ref, err_ref, _ = ref_solve(DOC_STEPS, DOC_GAMMAS, t, b, norm2)
    rec = solve_reconstruction(DOC_STEPS, DOC_GAMMAS, t, target_decay=decay)
    np.testing.assert_allclose(rec.coefficients, x_ref, rtol=1e-5, atol=1e-8)
    assert rec.fit_error == pytest.approx(err_ref, rel=1e-4)


def test_snapshots_after_target_get_zero():
    steps = [500.0, 1000.0, 1500.0, 2000.0, 2500.0] * 2
    gammas = [G05] * 5 + [G10] * 5
    tg = 9.0
    x_ref, _, _ = ref_solve(
        steps,
        gammas,
        1500.0,
        lambda t, g: ref_power_inner_closed(t, g, 1500.0, tg),
        ref_power_inner_closed(1500.0, tg, 1500.0, tg),
    )
    rec = solve_reconstruction(steps, gammas, 1500.0, target_gamma=tg)
    assert rec.coefficients.shape == (10,)
    assert np.all(rec.coefficients[[3, 4, 8, 9]] == 0.0)
    np.testing.assert_allclose(rec.coefficients, x_ref, rtol=1e-9, atol=1e-12)


SERIES_STEPS = list(np.arange(100.0, 2001.0, 100.0)) * 2
SERIES_GAMMAS = [ref_gamma_bisect(0.05)] * 20 + [ref_gamma_bisect(0.10)] * 20


@pytest.mark.parametrize(("target_step", "gamma", "index"), [(2000.0, G10, 39), (1000.0, G05, 9), (2000.0, G05, 19)])
def test_exact_when_target_is_a_snapshot(target_step, gamma, index):
    steps = list(np.arange(100.0, 2001.0, 100.0)) * 2
    gammas = [G05] * 20 + [G10] * 20
    rec = solve_reconstruction(steps, gammas, target_step, target_gamma=gamma)
    unit = np.zeros(40)
    unit[index] = 1.0
    np.testing.assert_allclose(rec.coefficients, unit, atol=1e-8)
    assert rec.fit_error < 1e-6
    assert rec.abs_sum == pytest.approx(1.0, abs=1e-7)


def test_target_between_tracked_profiles():
    # Brief's configuration: sigma_rel 0.05 and 0.10 tracked, saved every 100 steps to 2000, target 0.07.
    gt = ref_gamma_bisect(0.07)
    x_ref, err_ref, _ = ref_solve(
        SERIES_STEPS,
        SERIES_GAMMAS,
        2000.0,
        lambda t, g: ref_power_inner_closed(t, g, 2000.0, gt),
        ref_power_inner_closed(2000.0, gt, 2000.0, gt),
    )
    rec = solve_reconstruction(SERIES_STEPS, SERIES_GAMMAS, 2000.0, target_gamma=gt)
    assert rec.coefficients.sum() == pytest.approx(1.0, abs=1e-12)
    # The L2-optimal fit here has a relative error of 2.459e-3 (confirmed with 50-digit arithmetic).
    assert rec.fit_error == pytest.approx(err_ref, rel=1e-3)
    assert rec.fit_error < 3e-3
    np.testing.assert_allclose(rec.coefficients, x_ref, rtol=1e-6, atol=1e-9)


def test_target_between_tracked_profiles_dense_snapshots():
    # Saving every 50 steps brings the same target below 1e-3 (50-digit optimum: 6.27e-4).
    steps = list(np.arange(50.0, 2001.0, 50.0)) * 2
    gammas = [ref_gamma_bisect(0.05)] * 40 + [ref_gamma_bisect(0.10)] * 40
    rec = solve_reconstruction(steps, gammas, 2000.0, target_gamma=ref_gamma_bisect(0.07))
    assert rec.fit_error < 1e-3
    assert rec.coefficients.sum() == pytest.approx(1.0, abs=1e-12)


def test_ill_conditioned_is_finite_and_reported():
    steps = list(np.arange(10.0, 2001.0, 10.0)) * 2  # 400 snapshots
    gammas = [ref_gamma_bisect(0.05)] * 200 + [ref_gamma_bisect(0.10)] * 200
    rec = solve_reconstruction(steps, gammas, 2000.0, target_gamma=ref_gamma_bisect(0.02))
    assert np.all(np.isfinite(rec.coefficients))
    assert rec.coefficients.sum() == pytest.approx(1.0, abs=1e-9)
    assert rec.condition_number > 1e8
    assert math.isfinite(rec.fit_error) and rec.fit_error >= 0.0
    assert rec.abs_sum >= 1.0 and math.isfinite(rec.abs_sum)
    assert rec.abs_sum == pytest.approx(np.abs(rec.coefficients).sum(), rel=1e-12)


def test_duplicate_snapshots_do_not_crash():
    steps, gammas = [1000.0, 1000.0, 2000.0], [G10, G10, G10]
    rec = solve_reconstruction(steps, gammas, 2000.0, target_gamma=G10)
    assert np.all(np.isfinite(rec.coefficients))
    assert rec.coefficients.sum() == pytest.approx(1.0, abs=1e-9)
    assert rec.fit_error < 1e-6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"snap_steps": [1000.0, 2000.0], "snap_gammas": [G05, G10], "target_step": 500.0, "target_gamma": G10},
        {"snap_steps": [1000.0], "snap_gammas": [G05], "target_step": 1000.0},
        {
            "snap_steps": [1000.0],
            "snap_gammas": [G05],
            "target_step": 1000.0,
            "target_gamma": G05,
            "target_decay": 0.999,
        },
        {"snap_steps": [1000.0], "snap_gammas": [G05], "target_step": 1000.0, "target_gamma": -1.0},
        {"snap_steps": [1000.0], "snap_gammas": [G05], "target_step": 1000.0, "target_gamma": -2.0},
        {"snap_steps": [1000.0], "snap_gammas": [-1.0], "target_step": 1000.0, "target_gamma": G05},
        {"snap_steps": [0.0, 1000.0], "snap_gammas": [G05, G05], "target_step": 1000.0, "target_gamma": G05},
        {"snap_steps": [1000.0, 2000.0], "snap_gammas": [G05], "target_step": 2000.0, "target_gamma": G05},
        {"snap_steps": [], "snap_gammas": [], "target_step": 2000.0, "target_gamma": G05},
        {"snap_steps": [1000.0], "snap_gammas": [G05], "target_step": 1000.0, "target_decay": 1.0},
        {"snap_steps": [1000.0], "snap_gammas": [G05], "target_step": 0.0, "target_gamma": G05},
    ],
)
def test_invalid_inputs_raise_target_error(kwargs):
    with pytest.raises(TargetError) as info:
        solve_reconstruction(**kwargs)
    assert "\n" not in str(info.value)


def test_several_targets_share_one_factorisation():
    steps, gammas = DOC_STEPS, DOC_GAMMAS
    both = solve_reconstructions(steps, gammas, 2000.0, [("gamma", 11.0), ("decay", 0.999)])
    one = [solve_reconstruction(steps, gammas, 2000.0, target_gamma=11.0),
           solve_reconstruction(steps, gammas, 2000.0, target_decay=0.999)]  # fmt: skip
    for a, b in zip(both, one):
        np.testing.assert_array_equal(a.coefficients, b.coefficients)
        assert (a.fit_error, a.abs_sum, a.condition_number) == (b.fit_error, b.abs_sum, b.condition_number)
    with pytest.raises(TargetError, match="unknown target kind"):
        solve_reconstructions(steps, gammas, 2000.0, [("half_life", 5.0)])
