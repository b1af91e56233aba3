"""Coefficient math against brute-force per-step loops, hand-computed cases and published numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ckpt_ema.math import ema as kernels

from .reference import gamma_by_bisection


def brute_force(steps, step_weight, first_weight, interp):
    """Loop over every step: spread each step's weight over the checkpoints around it."""
    coefs = np.zeros(len(steps))
    coefs[0] = first_weight
    for j in range(1, len(steps)):
        a, b = steps[j - 1], steps[j]
        for t in range(a + 1, b + 1):
            w = step_weight(t)
            share_b = 1.0 if interp == "hold" else (t - a) / (b - a)
            coefs[j] += w * share_b
            coefs[j - 1] += w * (1.0 - share_b)
    return coefs


SERIES = [[0, 1, 2, 3, 4, 5], [100, 200, 300, 700, 1000], [5, 6, 1000, 1001, 5000], [0, 3000, 20000], [7]]


@pytest.mark.parametrize("interp", ["linear", "hold"])
@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999, 0.99999])
@pytest.mark.parametrize("steps", SERIES)
def test_classic_matches_per_step_loop(steps, decay, interp):
    total = steps[-1]
    expected = brute_force(steps, lambda t: (1 - decay) * decay ** (total - t), decay ** (total - steps[0]), interp)
    got = kernels.classic_coefficients(steps, decay, interp)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13)
    assert math.isclose(got.sum(), 1.0, abs_tol=1e-14)


@pytest.mark.parametrize("interp", ["linear", "hold"])
@pytest.mark.parametrize("gamma", [0.5, 6.94, 16.97, 200.0])
@pytest.mark.parametrize("steps", SERIES)
def test_power_matches_per_step_loop(steps, gamma, interp):
    total = steps[-1]

    def cumulative(u):
        return (u / total) ** (gamma + 1)

    expected = brute_force(steps, lambda t: cumulative(t) - cumulative(t - 1), cumulative(steps[0]), interp)
    got = kernels.power_coefficients(steps, gamma, interp)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13)
    assert math.isclose(got.sum(), 1.0, abs_tol=1e-14)


def test_long_gaps_use_euler_maclaurin_accurately():
    # 200k steps in one gap: the power sum is not looped over; compare with an exact fsum.
    steps, gamma = [0, 1000, 200_000], 6.94
    total = steps[-1]
    u = np.arange(1000, 200_000, dtype=np.float64)
    power_sum = math.fsum((u / total) ** (gamma + 1))
    to_last = 1.0 - power_sum / (200_000 - 1000)  # F(b) - mean F over the gap, F(b) = 1
    got = kernels.power_coefficients(steps, gamma, "linear")
    assert math.isclose(got[2], to_last, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("function", "args", "expected"),
    [
        (kernels.classic_coefficients, ([0, 1, 2], 0.5, "linear"), [0.25, 0.25, 0.5]),
        (kernels.classic_coefficients, ([0, 2], 0.5, "linear"), [0.375, 0.625]),
        (kernels.classic_coefficients, ([0, 2], 0.5, "hold"), [0.25, 0.75]),
        (kernels.power_coefficients, ([0, 2], 1.0, "linear"), [0.125, 0.875]),
        (kernels.power_coefficients, ([0, 2], 1.0, "hold"), [0.0, 1.0]),
        (kernels.power_coefficients, ([1, 2], 1.0, "linear"), [0.25, 0.75]),
        (kernels.per_checkpoint_coefficients, (3, 0.5), [0.25, 0.25, 0.5]),
        (kernels.per_checkpoint_power_coefficients, (2, 1.0), [0.25, 0.75]),
    ],
)
def test_hand_computed(function, args, expected):
    np.testing.assert_allclose(function(*args), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("sigma_rel", "gamma"), [(0.05, 16.97), (0.10, 6.94)])
def test_published_sigma_rel_gamma_pairs(sigma_rel, gamma):
    assert round(kernels.sigma_rel_to_gamma(sigma_rel), 2) == gamma
    assert round(kernels.gamma_to_sigma_rel(gamma), 3) == sigma_rel


@pytest.mark.parametrize("sigma_rel", [0.001, 0.02, 0.05, 0.1, 0.2, 0.28, 0.2886])
def test_sigma_rel_to_gamma_matches_bisection(sigma_rel):
    assert math.isclose(kernels.sigma_rel_to_gamma(sigma_rel), gamma_by_bisection(sigma_rel), rel_tol=1e-9)


def test_half_life_and_decay_are_inverse():
    assert math.isclose(kernels.decay_to_half_life(0.999), math.log(0.5) / math.log(0.999))
    assert math.isclose(kernels.half_life_to_decay(kernels.decay_to_half_life(0.999)), 0.999, rel_tol=1e-15)
    assert kernels.half_life_to_decay(1.0) == 0.5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kernels.classic_coefficients([0, 1], 1.0), "decay"),
        (lambda: kernels.classic_coefficients([0, 1], 0.9, "cubic"), "interp"),
        (lambda: kernels.classic_coefficients([2, 1], 0.9), "increasing"),
        (lambda: kernels.power_coefficients([0, 1], 0.0), "gamma"),
        (lambda: kernels.sigma_rel_to_gamma(0.3), "sigma_rel"),
        (lambda: kernels.classic_coefficients([], 0.9), "checkpoint"),
    ],
)
def test_invalid_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
