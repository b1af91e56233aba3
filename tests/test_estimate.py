"""The error estimate (ckpt_ema.math.estimate, docs/estimate.md) against independent computations:
brute-force covariance matrices, simulated random walks and a real tiny training run with per-step float64
EMAs (tests/training.py). Never against the estimator's own output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ckpt_ema.math import ema as kernels
from ckpt_ema.math import estimate as est
from tests.training import classic_truth, power_truth, train_tiny


def _per_step_classic(total: int, decay: float) -> np.ndarray:
    """Per-step weights of the classic EMA from step 0, as the recurrence gives them (spec §2)."""
    w = np.array([(1 - decay) * decay ** (total - t) for t in range(total + 1)])
    w[0] = decay**total
    return w


def _brute_force_variance(steps, coefs, w, diffusion, tau_s, nugget, tau_n) -> float:
    """``a' Cov a`` with the per-step covariance of theta built as a (T+1) x (T+1) matrix.

    Updates u -> u+1 (u = 0..T-1) are AR(1) correlated, ``Cov = s_u s_u' r^|u-u'|``, with ``s_u^2 =
    D_u (1 - r) / (1 + r)``; theta_t sums the updates before t; fluctuations add ``(N/2) r_n^|t-t'|``."""
    total = steps[-1]
    gap = np.searchsorted(steps, np.arange(total), side="right") - 1
    r = math.exp(-1 / tau_s) if tau_s > 0 else 0.0
    s = np.sqrt(np.asarray(diffusion)[gap] * (1 - r) / (1 + r))
    u = np.arange(total)
    cov_updates = np.outer(s, s) * (r ** np.abs(u[:, None] - u[None, :]) if r else np.eye(total))
    lower = np.tril(np.ones((total + 1, total)), -1)  # theta_t = sum_{u < t} xi_u
    cov = lower @ cov_updates @ lower.T
    t = np.arange(total + 1)
    rn = math.exp(-1 / tau_n) if tau_n > 0 else 0.0
    cov += nugget / 2 * (rn ** np.abs(t[:, None] - t[None, :]) if rn else np.eye(total + 1))
    a = w.copy()
    a[list(steps)] -= coefs
    return float(a @ cov @ a)


@pytest.mark.parametrize("tau_s", [0.0, 2.5])
@pytest.mark.parametrize(("nugget", "tau_n"), [(0.0, 0.0), (0.3, 0.0), (0.3, 3.0)])
def test_error_parts_equal_the_brute_force_covariance(tau_s, nugget, tau_n):
    steps = [0, 3, 7, 12, 20, 26]
    decay = 0.85
    coefs = kernels.classic_coefficients(steps, decay, "linear")
    diffusion = np.array([1.0, 0.5, 2.0, 1.5, 0.7])
    gaps = len(steps) - 1
    model = est.Variogram(tuple(steps), diffusion, np.full(gaps, nugget), np.full(gaps, tau_n), np.full(gaps, tau_s))
    got = sum(est.error_parts(steps, coefs, est.classic_cumulative(decay, steps[-1]), model))
    expected = _brute_force_variance(steps, coefs, _per_step_classic(steps[-1], decay), diffusion, tau_s, nugget, tau_n)
    assert got == pytest.approx(expected, rel=1e-9)


def test_every_step_checkpoints_have_no_error():
    steps = list(range(0, 41))
    rng = np.random.default_rng(0)
    thetas = np.cumsum(rng.normal(size=(41, 50)), axis=0)
    model = est.fit_variogram(est.IncrementStats.from_array(steps, thetas))
    coefs = kernels.classic_coefficients(steps, 0.9, "linear")
    e = est.estimate(
        steps, coefs, est.classic_cumulative(0.9, 40), model, float(((coefs @ thetas - thetas[-1]) ** 2).sum())
    )
    assert e.sig < 1e-6


def test_increment_stats_from_products_equal_the_direct_norms():
    rng = np.random.default_rng(1)
    thetas = rng.normal(size=(7, 30))
    d = np.diff(thetas, axis=0)
    sq = (d**2).sum(1)
    cross1 = np.append((d[:-1] * d[1:]).sum(1), 0.0)
    cross2 = np.append((d[:-2] * d[2:]).sum(1), [0.0, 0.0])
    steps = [0, 2, 5, 9, 10, 14, 20]
    a = est.IncrementStats.from_products(steps, sq, cross1, cross2)
    b = est.IncrementStats.from_array(steps, thetas)
    for x, y in ((a.lag1, b.lag1), (a.lag2, b.lag2), (a.lag3, b.lag3)):
        assert np.allclose(x, y, rtol=1e-12)


def _walk(rng, steps: int, elements: int, drift: float, scale) -> np.ndarray:
    """A random walk with a drift: ``theta(t+1) = theta(t) + drift*e + scale(t)*noise``, float64."""
    noise = rng.normal(size=(steps, elements)) * np.asarray(scale)[:, None]
    direction = rng.normal(size=elements) / math.sqrt(elements)
    return np.vstack([np.zeros(elements), np.cumsum(noise + drift * direction, axis=0)])


def _true_sig(thetas_all, steps, result, truth):
    return float(np.linalg.norm(result - truth) / np.linalg.norm(truth - thetas_all[-1]))


def _classic_truth_array(x: np.ndarray, decay: float) -> np.ndarray:
    ema = x[0].copy()
    for theta in x[1:]:
        ema = decay * ema + (1 - decay) * theta
    return ema


@pytest.mark.parametrize("spacing", [10, 25])
def test_simulated_random_walk_with_drift_and_a_decaying_rate(spacing):
    # Data from the model itself (a drift, a diffusion that shrinks 10x along the run): the estimate must be
    # close to the realised error.
    rng = np.random.default_rng(2)
    total = 1000
    x = _walk(rng, total, 3000, drift=0.3, scale=np.linspace(1.0, 0.3, total))
    steps = list(range(0, total + 1, spacing))
    model = est.fit_variogram(est.IncrementStats.from_array(steps, x[steps]))
    for decay in (0.98, 0.995):
        coefs = kernels.classic_coefficients(steps, decay, "linear")
        result = coefs @ x[steps]
        e = est.estimate(
            steps, coefs, est.classic_cumulative(decay, total), model, float(((result - x[-1]) ** 2).sum())
        )
        true = _true_sig(x, steps, result, _classic_truth_array(x, decay))
        assert 0.8 < e.sig / true < 1.25, (decay, e.sig, true)


def test_the_model_moved_to_a_finer_grid_predicts_its_error():
    # The inverse question's basis: fitted on checkpoints every 40 steps, the model predicts the error of
    # checkpoints every 10 steps of the same walk.
    rng = np.random.default_rng(3)
    total = 1200
    x = _walk(rng, total, 3000, drift=0.2, scale=np.ones(total))
    coarse = list(range(0, total + 1, 40))
    fine = list(range(0, total + 1, 10))
    model = est.fit_variogram(est.IncrementStats.from_array(coarse, x[coarse])).at(fine)
    decay = 0.99
    coefs = kernels.classic_coefficients(fine, decay, "linear")
    result = coefs @ x[fine]
    truth = _classic_truth_array(x, decay)
    e = est.estimate(fine, coefs, est.classic_cumulative(decay, total), model, float(((result - x[-1]) ** 2).sum()))
    assert 0.75 < e.sig / _true_sig(x, fine, result, truth) < 1.33


def test_few_checkpoints_and_a_jump_are_said():
    rng = np.random.default_rng(4)
    x = np.cumsum(rng.normal(size=(5, 100)), axis=0)
    few = est.fit_variogram(est.IncrementStats.from_array([0, 10, 20, 30, 40], x))
    assert any("only 5 checkpoints" in w for w in few.warnings)
    steps = list(range(0, 201, 10))
    walk = np.cumsum(rng.normal(size=(21, 400)), axis=0)
    walk[12:] += 30.0 * rng.normal(size=400)  # a jump between steps 110 and 120
    jumped = est.fit_variogram(est.IncrementStats.from_array(steps, walk))
    assert any("jump between steps 110 and 120" in w for w in jumped.warnings)
    calm = est.fit_variogram(est.IncrementStats.from_array(steps, np.cumsum(rng.normal(size=(21, 400)), axis=0)))
    assert calm.warnings == ()


# A real tiny run (tests/training.py: SGD with momentum, BatchNorm) with per-step float64 EMAs.
RUN_STEPS = 900


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend
    try:
        states = train_tiny(RUN_STEPS, seed=5)
    finally:
        torch.set_num_threads(threads)
    names = [k for k, v in states[0].items() if v.is_floating_point()]
    flat = np.stack([np.concatenate([s[k].double().reshape(-1).numpy() for k in names]) for s in states])
    return states, names, flat


def _flatten(state, names) -> np.ndarray:
    return np.concatenate([state[k].double().reshape(-1).numpy() for k in names])


@pytest.mark.parametrize("spacing", [25, 50])
def test_estimate_against_a_real_training_run(run, spacing):
    states, names, flat = run
    steps = list(range(0, RUN_STEPS + 1, spacing))
    thetas = flat[steps]
    model = est.fit_variogram(est.IncrementStats.from_array(steps, thetas))
    cases = []
    for decay in (0.99, 0.995, 0.999):
        coefs = kernels.classic_coefficients(steps, decay, "linear")
        cases.append((coefs, est.classic_cumulative(decay, RUN_STEPS), _flatten(classic_truth(states, decay), names)))
    for sigma_rel in (0.1, 0.15):
        gamma = kernels.sigma_rel_to_gamma(sigma_rel)
        coefs = kernels.power_coefficients(steps, gamma, "linear")
        cases.append((coefs, est.power_cumulative(gamma, RUN_STEPS), _flatten(power_truth(states, gamma), names)))
    for coefs, cumulative, truth in cases:
        result = coefs @ thetas
        true = float(np.linalg.norm(result - truth) / np.linalg.norm(truth - flat[-1]))
        e = est.estimate(steps, coefs, cumulative, model, float(((result - flat[-1]) ** 2).sum()))
        assert true > 0.005
        assert 0.5 <= e.sig / true <= 2.0, (spacing, e.sig, true)
        assert e.error == pytest.approx(e.sig * math.sqrt(e.distance**2 + e.error**2))


def test_spacing_for_a_wanted_sig_is_checked_on_the_walk_itself():
    # The inverse question on a simulated walk: the spacing it answers, applied to the same walk, must give a
    # realised sig near the wanted one (at most 1.5x), and the next coarser spacing must not reach it.
    rng = np.random.default_rng(5)
    total = 2000
    x = _walk(rng, total, 2000, drift=0.2, scale=np.ones(total))
    steps = list(range(0, total + 1, 50))
    model = est.fit_variogram(est.IncrementStats.from_array(steps, x[steps]))
    decay = 0.995
    coefs = kernels.classic_coefficients(steps, decay, "linear")
    cumulative = est.classic_cumulative(decay, total)
    e = est.estimate(steps, coefs, cumulative, model, float(((coefs @ x[steps] - x[-1]) ** 2).sum()))
    denominator = e.distance**2 + e.error**2
    answer = est.spacing_for(
        0.02, model, lambda grid: kernels.classic_coefficients(grid, decay, "linear"), cumulative, denominator
    )
    assert answer is not None
    spacing, predicted = answer
    assert predicted <= 0.02
    truth = _classic_truth_array(x, decay)
    grid = list(range(0, total + 1, spacing))
    c = kernels.classic_coefficients(grid, decay, "linear")
    realised = _true_sig(x, grid, c @ x[grid], truth)
    assert realised < 0.03
    coarser = est.NICE_SPACINGS[est.NICE_SPACINGS.index(spacing) + 1]
    grid = list(range(0, total + 1, coarser))
    c = kernels.classic_coefficients(grid, decay, "linear")
    assert _true_sig(x, grid, c @ x[grid], truth) > 0.02 * 0.8
