"""The estimate's statistics gathered in the merge's own pass (ckpt_ema.jobs.estimate), against the same
statistics computed directly from the training run's states, and the estimate against per-step truth."""

from __future__ import annotations

import numpy as np
import pytest

from ckpt_ema.engine.merge_pass import MemorySink, MergePass
from ckpt_ema.jobs import estimate as gather
from ckpt_ema.jobs.merge import plan_merge
from ckpt_ema.math import estimate as est
from tests.training import classic_truth, power_truth, save_series, train_tiny

STEPS = 600
SPACING = 25


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    states = train_tiny(STEPS, seed=7)
    folder = tmp_path_factory.mktemp("estimate")
    save_series(states, folder / "init", [0])
    save_series(states, folder / "run", range(SPACING, STEPS + 1, SPACING))
    return states, folder


def _flat(state) -> np.ndarray:
    return np.concatenate([v.double().reshape(-1).numpy() for k, v in state.items() if v.is_floating_point()])


def _pass(plan, stride=None):
    gatherer = gather.EstimateGatherer(plan)
    if stride is not None:
        gatherer.stride = stride
    sinks = [MemorySink(plan.tensors) for _ in plan.outputs]
    for _ in MergePass(plan, gatherer.wrap(sinks), chunk_elements=37):  # chunks cut tensors anywhere
        pass
    return gatherer, sinks


@pytest.mark.parametrize("interp", ["linear", "hold"])
def test_statistics_gathered_in_the_pass_equal_the_direct_ones(run, interp):
    states, folder = run
    plan = plan_merge(
        [folder / "run"], decay=[0.99], sigma_rel=[0.1], init=folder / "init" / "step-000000.safetensors", interp=interp
    )
    gatherer, sinks = _pass(plan)
    steps = [c.step for c in plan.checkpoints]
    thetas = np.stack([_flat(states[s]) for s in steps])
    direct = est.IncrementStats.from_array(steps, thetas)
    got = est.IncrementStats.from_products(steps, gatherer.sq, gatherer.cross1, gatherer.cross2)
    for a, b in ((got.lag1, direct.lag1), (got.lag2, direct.lag2), (got.lag3, direct.lag3)):
        assert np.allclose(a, b, rtol=1e-9)
    for k, output in enumerate(plan.outputs):
        c = np.array(output.coefficients)
        distance = ((c @ thetas - thetas[-1]) ** 2).sum()
        assert gatherer.distance_sq[k] == pytest.approx(distance, rel=1e-4)  # the result is FP32
    if interp == "hold":
        assert all(gatherer.bias_sq > 0)
    # the sinks still receive the merge itself
    assert set(sinks[0].state_dict) == {t.name for t in plan.tensors}


def test_a_subsample_of_the_elements_gives_nearly_the_same_statistics(run):
    states, folder = run
    plan = plan_merge([folder / "run"], decay=[0.99], init=folder / "init" / "step-000000.safetensors")
    full, _ = _pass(plan)
    sampled, _ = _pass(plan, stride=3)
    assert np.allclose(sampled.sq * 3, full.sq, rtol=0.35)
    assert sampled.sq.sum() * 3 == pytest.approx(full.sq.sum(), rel=0.15)


def test_estimates_after_the_pass_against_per_step_truth(run):
    states, folder = run
    plan = plan_merge(
        [folder / "run"], decay=[0.99, 0.995], sigma_rel=[0.1, 0.15], init=folder / "init" / "step-000000.safetensors"
    )
    gatherer, sinks = _pass(plan)
    estimates = gatherer.estimates()
    last = _flat(states[-1])
    truths = [
        classic_truth(states, 0.99),
        classic_truth(states, 0.995),
        power_truth(states, plan.outputs[2].params["gamma"]),
        power_truth(states, plan.outputs[3].params["gamma"]),
    ]
    for e, sink, truth in zip(estimates, sinks, truths):
        truth_flat = _flat(truth)
        result = _flat({k: sink.state_dict[k] for k in truth})
        true = np.linalg.norm(result - truth_flat) / np.linalg.norm(truth_flat - last)
        assert e is not None
        assert true > 0.005
        assert 0.5 <= e.sig / true <= 2.0, (e.sig, true)


def test_what_is_not_estimated_says_why(run, tmp_path):
    states, folder = run
    plan = plan_merge([folder / "run"], decay=[0.9], per_checkpoint=True)
    assert "per-checkpoint" in gather.not_estimated(plan, "classic")
    two = plan_merge(
        [folder / "run" / "step-000025.safetensors", folder / "run" / "step-000050.safetensors"], decay=[0.9]
    )
    assert "fewer than three" in gather.not_estimated(two, "classic")
    assert gather.EstimateGatherer(two).estimates() == [None]


def test_power_weight_before_the_first_checkpoint_is_said(run):
    states, folder = run
    late = [folder / "run" / f"step-{s:06d}.safetensors" for s in range(300, STEPS + 1, SPACING)]
    plan = plan_merge(late, sigma_rel=[0.2])  # (300/600)^(gamma+1) = 14% of the weight is on steps 1-299
    gatherer, _ = _pass(plan)
    (e,) = gatherer.estimates()
    assert e is not None
    assert any(
        "14% of the power EMA's weight is on steps before the first checkpoint (step 300)" in w for w in e.warnings
    )
