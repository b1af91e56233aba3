"""Averages over the end of training (spec §8): --last, --window, --lr-decay coefficients.

Checked against (1) per-step definitions, written here from the spec: a per-step coefficient vector over every
step, spread over the checkpoints by the interpolation rule; (2) closed forms computed here (trapezoids for a
window on an even grid, integrals of -f' against hat functions for long decays); (3) a real tiny training run
with a checkpoint every step, where the merge must equal the per-step mean and the per-step decayed update sum.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ckpt_ema.math import windows
from tests.training import train_tiny

SHAPES = ("linear", "cosine", "sqrt")
SERIES = [[0, 1, 2, 3, 4, 5], [100, 200, 300, 700, 1000], [5, 6, 1000, 1001, 5000], [0, 3000, 20000], [7]]


def f(shape, x):
    """The learning-rate factor at fraction x of the decay, from spec §8."""
    return {"linear": 1 - x, "cosine": (1 + math.cos(math.pi * x)) / 2, "sqrt": 1 - math.sqrt(x)}[shape]


def per_step_window(total, length):
    """c_t = 1/L for t in (T - L, T], over steps 0..T."""
    c = np.zeros(total + 1)
    c[total - length + 1 :] = 1.0 / length
    return c


def per_step_lr_decay(total, shape, length):
    """c_t = w_t - w_{t+1}, w_t = f((t - 1 - (T - L)) / L) on (T - L, T], 1 before, w_{T+1} = 0."""
    start = total - length
    x = np.clip((np.arange(total + 2) - 1 - start) / length, 0.0, 1.0)  # w_{T+1}: x = 1, f(1) = 0
    w = {"linear": 1 - x, "cosine": (1 + np.cos(np.pi * x)) / 2, "sqrt": 1 - np.sqrt(x)}[shape]
    return w[:-1] - w[1:]


def spread(steps, per_step, interp):
    """sum_t c_t theta(t) with theta(t) between checkpoints from interp -> a coefficient per checkpoint."""
    coefs = np.zeros(len(steps))
    assert not per_step[: steps[0]].any(), "the per-step weights reach before the first checkpoint"
    coefs[0] = per_step[steps[0]]
    for j in range(1, len(steps)):
        a, b = steps[j - 1], steps[j]
        t = np.arange(a + 1, b + 1)
        share_b = np.ones(len(t)) if interp == "hold" else (t - a) / (b - a)
        coefs[j] += math.fsum(per_step[t] * share_b)
        coefs[j - 1] += math.fsum(per_step[t] * (1 - share_b))
    return coefs


def lengths(steps):
    """Window lengths: one step, mid-gap starts, a start on a checkpoint, the longest (s_0 included)."""
    total, span = steps[-1], steps[-1] - steps[0]
    return sorted({1, max(1, span // 3), max(1, span // 2 + 1), max(1, total - steps[len(steps) // 2]), span + 1})


@pytest.mark.parametrize("interp", ["linear", "hold"])
@pytest.mark.parametrize("steps", SERIES)
def test_window_matches_per_step_mean(steps, interp):
    for length in lengths(steps):
        got = windows.window_coefficients(steps, length, interp)
        expected = spread(steps, per_step_window(steps[-1], length), interp)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14, err_msg=f"L={length}")
        assert math.isclose(got.sum(), 1.0, abs_tol=1e-14)


@pytest.mark.parametrize("interp", ["linear", "hold"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("steps", SERIES)
def test_lr_decay_matches_per_step_definition(steps, shape, interp):
    for length in lengths(steps):
        got = windows.lr_decay_coefficients(steps, shape, length, interp)
        expected = spread(steps, per_step_lr_decay(steps[-1], shape, length), interp)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14, err_msg=f"L={length}")
        assert math.isclose(got.sum(), 1.0, abs_tol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
def test_lr_decay_over_a_million_steps_matches_per_step_sums(shape):
    # Long gaps (the sqrt shape's Euler-Maclaurin tail, the cosine's Dirichlet kernel) against per-step sums.
    steps = [0, 1_000, 250_000, 250_001, 600_000, 999_999, 1_000_000]
    for length in (1_000_000, 750_001, 123_457):
        expected = spread(steps, per_step_lr_decay(steps[-1], shape, length), "linear")
        got = windows.lr_decay_coefficients(steps, shape, length, "linear")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13, err_msg=f"L={length}")


@pytest.mark.parametrize("interp", ["linear", "hold"])
def test_linear_decay_is_the_window(interp):
    # w_t = (T - t + 1)/L gives c_t = 1/L on (T - L, T]: WSM's observation that linear decay = uniform average.
    for steps in SERIES:
        for length in lengths(steps):
            np.testing.assert_allclose(
                windows.lr_decay_coefficients(steps, "linear", length, interp),
                windows.window_coefficients(steps, length, interp),
                rtol=0,
                atol=1e-14,
            )


def test_window_on_an_even_grid_is_a_trapezoid():
    # Checkpoints every g steps, a window of m gaps starting on a checkpoint. Linear: a gap's steps give the later
    # checkpoint sum_{k=1}^{g} k/g = (g+1)/2 and the earlier (g-1)/2. Hold: g to the later one.
    g, m = 50, 4
    steps = list(range(0, 10 * g + 1, g))
    length = m * g
    linear = windows.window_coefficients(steps, length, "linear")
    expected = np.zeros(len(steps))
    expected[-m - 1] = (g - 1) / 2 / length
    expected[-m:-1] = g / length
    expected[-1] = (g + 1) / 2 / length
    np.testing.assert_allclose(linear, expected, rtol=0, atol=1e-15)
    hold = windows.window_coefficients(steps, length, "hold")
    expected = np.zeros(len(steps))
    expected[-m:] = 1 / m
    np.testing.assert_allclose(hold, expected, rtol=0, atol=1e-15)
    # A window starting 10 steps into a gap: hold gives the later checkpoint the 10 steps that are in it.
    hold = windows.window_coefficients(steps, length - 10, "hold")
    assert math.isclose(hold[-m], (g - 10) / (length - 10), rel_tol=1e-14)


def antiderivatives(shape):
    """G1 = integral of -f'(x), G2 = integral of x * (-f'(x)), in closed form."""
    pi = math.pi
    return {
        "linear": (lambda x: x, lambda x: x * x / 2),
        "cosine": (lambda x: -math.cos(pi * x) / 2, lambda x: (-x * math.cos(pi * x) + math.sin(pi * x) / pi) / 2),
        "sqrt": (math.sqrt, lambda x: x**1.5 / 3),
    }[shape]


@pytest.mark.parametrize("shape", SHAPES)
def test_long_decay_tends_to_integrals_of_the_rate_against_hat_functions(shape):
    # For L >> 1 the per-step sum c_j = sum_t (w_t - w_{t+1}) hat_j(t) tends to the integral of -f'(x) hat_j(x)
    # over the decay, x = fraction of the decay; checkpoints at x = 0, 0.1, 0.3, 0.35, 0.7, 1 (uneven).
    length = 200_000
    fractions = [0.0, 0.1, 0.3, 0.35, 0.7, 1.0]
    steps = [1_000_000 - length + round(x * length) for x in fractions]
    g1, g2 = antiderivatives(shape)

    def rising(a, b):  # integral of (x - a)/(b - a) (-f'(x)) over [a, b]
        return (g2(b) - g2(a) - a * (g1(b) - g1(a))) / (b - a)

    expected = np.zeros(len(fractions))
    for j in range(1, len(fractions)):
        a, b = fractions[j - 1], fractions[j]
        to_b = rising(a, b)
        expected[j] += to_b
        expected[j - 1] += g1(b) - g1(a) - to_b
    got = windows.lr_decay_coefficients(steps, shape, length, "linear")
    np.testing.assert_allclose(got, expected, rtol=0, atol=5 / length)
    hold = windows.lr_decay_coefficients(steps, shape, length, "hold")  # hold: f(x_a) - f(x_b) on the later one
    held = [0.0] + [f(shape, a) - f(shape, b) for a, b in zip(fractions, fractions[1:])]
    np.testing.assert_allclose(hold, held, rtol=0, atol=5 / length)


def test_last_n():
    np.testing.assert_array_equal(windows.last_n_coefficients(5, 2), [0, 0, 0, 0.5, 0.5])
    np.testing.assert_array_equal(windows.last_n_coefficients(3, 3), [1 / 3] * 3)
    for bad in (0, 6):
        with pytest.raises(ValueError, match="--last"):
            windows.last_n_coefficients(5, bad)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: windows.window_coefficients([100, 200], 102), "before the first checkpoint.*longest is 101"),
        (lambda: windows.lr_decay_coefficients([100, 200], "cosine", 150), "before the first checkpoint"),
        (lambda: windows.window_coefficients([100, 200], 0), "at least 1 step"),
        (lambda: windows.window_coefficients([100, 200], 2.5), "whole number"),
        (lambda: windows.lr_decay_coefficients([100, 200], "step", 10), "linear, cosine, sqrt"),
        (lambda: windows.window_coefficients([100, 200], 10, "cubic"), "interp"),
        (lambda: windows.window_coefficients([200, 100], 10), "increasing"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# The real tiny training run, a checkpoint at every step: the merge against the definitions applied to theta.

STEPS = 120


@pytest.fixture(scope="module")
def states():
    return [{k: v.double() for k, v in s.items() if v.is_floating_point()} for s in train_tiny(STEPS)]


def combine(states, steps, coefs):
    return {k: sum(c * states[s][k] for s, c in zip(steps, coefs)) for k in states[0]}


def rel(a, b):
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b)
    return (num / sum(float((b[k] ** 2).sum()) for k in b)) ** 0.5


@pytest.mark.parametrize("interp", ["linear", "hold"])
@pytest.mark.parametrize("length", [1, 7, 60, STEPS, STEPS + 1])
def test_every_step_window_is_the_mean_of_the_weights(states, length, interp):
    steps = list(range(STEPS + 1))
    mean = {k: torch.stack([states[t][k] for t in range(STEPS - length + 1, STEPS + 1)]).mean(0) for k in states[0]}
    assert rel(combine(states, steps, windows.window_coefficients(steps, length, interp)), mean) < 1e-14


@pytest.mark.parametrize("interp", ["linear", "hold"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("length", [1, 30, STEPS])
def test_every_step_lr_decay_is_the_decayed_update_sum(states, shape, length, interp):
    # theta(T - L) + sum_{t=T-L+1}^{T} f((t - 1 - (T - L)) / L) * (theta(t) - theta(t - 1)), accumulated as updates.
    start = STEPS - length
    decayed = {k: v.clone() for k, v in states[start].items()}
    for t in range(start + 1, STEPS + 1):
        for k in decayed:
            decayed[k] += f(shape, (t - 1 - start) / length) * (states[t][k] - states[t - 1][k])
    steps = list(range(STEPS + 1))
    assert rel(combine(states, steps, windows.lr_decay_coefficients(steps, shape, length, interp)), decayed) < 1e-13
