"""The estimate's statistics gathered in the merge's own pass (ckpt_ema.jobs.estimate), against the same
statistics computed directly from the training run's states; the estimate against per-step truth, through
the API and through merge / plan --estimate on the command line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckpt_ema.engine.merge_pass import MemorySink, MergePass
from ckpt_ema.jobs import estimate as gather
from ckpt_ema.jobs.merge import plan_merge
from ckpt_ema.math import estimate as est
from tests.reference import gamma_by_bisection
from tests.reference import run as cli
from tests.training import classic_truth, power_truth, save_series, sig_error, train_tiny

STEPS = 600
SPACING = 25


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend
    try:
        states = train_tiny(STEPS, seed=7)
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("estimate")
    save_series(states, folder / "init", [0])
    save_series(states, folder / "run", range(SPACING, STEPS + 1, SPACING))
    return states, folder


@pytest.fixture(scope="module")
def series(run):
    states, folder = run
    return states, folder / "run", folder / "init" / "step-000000.safetensors"


def _flat(state) -> np.ndarray:
    return np.concatenate([v.double().reshape(-1).numpy() for k, v in state.items() if v.is_floating_point()])


def _pass(plan, stride=None, run=None):
    gatherer = gather.EstimateGatherer(plan)
    if stride is not None:
        gatherer.stride = stride
    if run is not None:
        gatherer.run = run
    sinks = [MemorySink(plan.tensors) for _ in plan.outputs]
    for _ in MergePass(plan, sinks, chunk_elements=37, chunk_sink=gatherer):  # chunks cut tensors anywhere
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
    sampled, _ = _pass(plan, stride=3, run=1)  # single elements: the tiny model holds too few runs of 32
    assert np.allclose(sampled.sq * 3, full.sq, rtol=0.35)
    assert sampled.sq.sum() * 3 == pytest.approx(full.sq.sum(), rel=0.15)


@pytest.mark.parametrize("stride, run", [(1, 32), (3, 1), (3, 32), (7, 5), (2, 64)])
def test_the_sample_is_runs_placed_over_the_whole_pass(stride, run):
    """Chunks of any size (smaller than a run too), one after another: their positions together are the
    elements i with (i // run) % stride == 0, written out by brute force."""
    rng = np.random.default_rng(stride * 100 + run)
    sizes = [int(n) for n in rng.integers(1, 200, size=60)]
    got, seen = [], 0
    for size in sizes:
        positions = gather.sample_positions(seen, size, stride, run)
        assert positions.dtype == np.int64 and np.all(np.diff(positions) > 0)
        assert positions.size == 0 or (positions[0] >= 0 and positions[-1] < size)
        got.extend(int(i) + seen for i in positions)
        seen += size
    assert got == [i for i in range(seen) if (i // run) % stride == 0]


def _random_walk(tmp_path, checkpoints=8):
    """A series of FP32 checkpoints whose tensors move at very different scales (so a sample that
    favoured one tensor would show), with drift and noise (so the increments are correlated)."""
    rng = np.random.default_rng(5)
    shapes = {"a.weight": ((300, 200), 1.0), "b.bias": ((5000,), 0.05), "c.weight": ((90, 110), 4.0)}
    theta = {k: rng.normal(size=shape) for k, (shape, _) in shapes.items()}
    drift = {k: rng.normal(size=shape) * scale for k, (shape, scale) in shapes.items()}
    states = []
    for _ in range(checkpoints + 1):
        states.append({k: torch.from_numpy(v.astype(np.float32)) for k, v in theta.items()})
        theta = {k: v + drift[k] * 0.3 + rng.normal(size=v.shape) * shapes[k][1] for k, v in theta.items()}
    save_series(states, tmp_path / "run", range(1, checkpoints + 1))
    return states, tmp_path / "run"


@pytest.mark.parametrize("compiled", [True, False])
def test_a_subsample_in_runs_holds_exactly_its_elements_and_nearly_the_whole(tmp_path, monkeypatch, compiled):
    """The runs' sums against float64 numpy over the brute-force sample positions (exact), and against
    the sums over every element (close: ~2000 runs of 32 over tensors of very different scales); in the
    numba kernel and in the numpy batches."""
    if not compiled:
        monkeypatch.setattr(gather.fused, "AVAILABLE", False)
    elif not gather.fused.AVAILABLE:
        pytest.skip("numba not installed")
    states, folder = _random_walk(tmp_path)
    plan = plan_merge([folder], decay=[0.9])
    names = [t.name for t in plan.tensors]  # the pass's order, which places the sample
    thetas = np.stack(
        [np.concatenate([states[c.step][n].double().reshape(-1).numpy() for n in names]) for c in plan.checkpoints]
    )
    stride, run = 4, 32
    chosen = np.array([i for i in range(thetas.shape[1]) if (i // run) % stride == 0])
    d = np.diff(thetas[:, chosen], axis=0)
    sampled, sinks = _pass(plan, stride=stride, run=run)
    assert np.allclose(sampled.sq, (d**2).sum(axis=1), rtol=1e-9)
    assert np.allclose(sampled.cross1[:-1], (d[:-1] * d[1:]).sum(axis=1), rtol=1e-9)  # per gap j: <d_j, d_j+1>
    assert np.allclose(sampled.cross2[:-2], (d[:-2] * d[2:]).sum(axis=1), rtol=1e-9)
    result = np.concatenate([sinks[0].state_dict[n].double().reshape(-1).numpy() for n in names])
    distance = ((result[chosen] - thetas[-1, chosen]) ** 2).sum()
    assert sampled.distance_sq[0] == pytest.approx(distance, rel=1e-4)  # the result is FP32
    full_d = np.diff(thetas, axis=0)
    full_sq = (full_d**2).sum(axis=1)
    assert np.allclose(sampled.sq * stride, full_sq, rtol=0.05)
    # the cross products are small beside the squares (mostly noise): close on the squares' scale
    full_cross1 = (full_d[:-1] * full_d[1:]).sum(axis=1)
    assert np.allclose(sampled.cross1[:-1] * stride, full_cross1, rtol=0, atol=0.05 * full_sq.mean())


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


def test_merge_json_estimates_each_output_near_the_truth(series, tmp_path):
    states, folder, init = series
    out = tmp_path / "out"
    result = cli("merge", folder, "--init", init, "--decay", 0.99, "--sigma-rel", 0.1, "-o", out, "--json")
    summary = json.loads(result.stdout)
    truths = {"decay-0.99": classic_truth(states, 0.99), "sigma_rel-0.1": power_truth(states, gamma_by_bisection(0.1))}
    for entry in summary["outputs"]:
        estimate = entry["estimate"]
        assert isinstance(estimate["sig"], float)
        true = sig_error(load_file(entry["path"]), truths[entry["name"]], states[-1])
        assert 0.5 <= estimate["sig"] / true <= 2.0, (entry["name"], estimate["sig"], true)
        assert estimate["error"] > 0 and estimate["warnings"] == []


def test_merge_summary_line_and_no_estimate(series, tmp_path):
    states, folder, init = series
    text = cli("merge", folder, "--decay", 0.99, "-o", tmp_path / "a.safetensors").stdout
    assert "estimated sig " in text and "against the per-step EMA" in text
    quiet = cli("merge", folder, "--decay", 0.99, "-o", tmp_path / "b.safetensors", "--no-estimate", "--json")
    assert "estimate" not in json.loads(quiet.stdout)["outputs"][0]


def test_plan_estimate_reads_the_data_and_writes_nothing(series, tmp_path):
    states, folder, init = series
    before = sorted(p.name for p in folder.iterdir())
    result = cli("plan", folder, "--decay", 0.99, "--decay", 0.995, "--estimate", "--json")
    summary = json.loads(result.stdout)
    merged = cli("merge", folder, "--decay", 0.99, "--decay", 0.995, "-o", tmp_path / "m", "--json")
    for planned, done in zip(summary["outputs"], json.loads(merged.stdout)["outputs"]):
        assert planned["estimate"]["sig"] == pytest.approx(done["estimate"]["sig"], rel=1e-6)
    assert sorted(p.name for p in folder.iterdir()) == before
    text = cli("plan", folder, "--decay", 0.99, "--estimate").stdout
    assert "decay-0.99: estimated sig" in text


def test_a_run_that_jumps_is_said(series, tmp_path):
    states, folder, init = series
    jumped = [
        {k: v + 0.5 if v.is_floating_point() and t > 300 else v for k, v in s.items()} for t, s in enumerate(states)
    ]  # every weight jumps between steps 300 and 301
    save_series(jumped, tmp_path / "run", range(SPACING, STEPS + 1, SPACING))
    result = cli("merge", tmp_path / "run", "--decay", 0.99, "-o", tmp_path / "x.safetensors")
    assert "the weights jump between steps 300 and 325" in result.stdout  # in the output's summary line


def test_per_checkpoint_and_snapshots_say_why_not(series, tmp_path):
    states, folder, init = series
    result = cli("merge", folder, "--decay", 0.9, "--per-checkpoint", "-o", tmp_path / "p.safetensors", "--json")
    estimate = json.loads(result.stdout)["outputs"][0]["estimate"]
    assert estimate["sig"] is None and "per-checkpoint" in estimate["reason"]
    snapshots = SimpleNamespace(per_checkpoint=False, checkpoints=[SimpleNamespace(tracked_gamma=6.94)] * 4)
    assert "EMA snapshots" in gather.not_estimated(snapshots, "reconstruction")  # type: ignore[arg-type]


def test_nan_in_a_checkpoint_gives_no_estimate_and_says_why(series, tmp_path):
    states, folder, init = series
    broken = [dict(s) for s in states]
    name = next(k for k, v in states[0].items() if v.is_floating_point())
    broken[300] = {**broken[300], name: broken[300][name].clone().fill_(float("nan"))}
    save_series(broken, tmp_path / "run", range(SPACING, STEPS + 1, SPACING))
    result = cli("merge", tmp_path / "run", "--decay", 0.99, "-o", tmp_path / "x.safetensors", "--json")
    estimate = json.loads(result.stdout)["outputs"][0]["estimate"]
    assert estimate == {"sig": None, "reason": "the checkpoints hold NaN or Inf values"}


def test_doctor_answers_the_spacing_for_a_wanted_sig_and_it_holds_on_the_run(series, tmp_path):
    # The inverse question: doctor, on checkpoints every 25 steps, names a spacing for sig <= 0.1 at decay 0.99;
    # checkpoints of the same run at that spacing, merged, must land within the estimate's factor of 0.1.
    states, folder, init = series
    result = cli("doctor", folder, "--init", init, "--decay", 0.99, "--target-sig", 0.1, "--json")
    d = json.loads(result.stdout)
    assert isinstance(d["estimate"]["sig"], float) and d["target_sig"] == 0.1
    every = d["save_every"]
    assert every is not None and every < SPACING and d["save_every_sig"] <= 0.1
    truth = classic_truth(states, 0.99)
    save_series(states, tmp_path / "finer", range(every, STEPS + 1, every))
    out = tmp_path / "finer.safetensors"
    cli("merge", tmp_path / "finer", "--init", init, "--decay", 0.99, "-o", out, "--no-estimate", "-q")
    assert sig_error(load_file(out), truth, states[-1]) <= 0.2
    text = cli("doctor", folder, "--init", init, "--decay", 0.99, "--target-sig", 0.1).stdout
    assert f"save a checkpoint every {every} steps" in text


def test_window_and_lr_decay_estimates_against_per_step_truth(series, tmp_path):
    # spec §8's per-step definitions, computed from the states: the mean over (T-L, T], and
    # theta(T-L) + sum_t w_t (theta(t) - theta(t-1)) with w_t = f((t-1-(T-L))/L).
    states, folder, init = series
    result = cli("merge", folder, "--init", init, "--window", 200, "--lr-decay", "cosine:300", "-o", tmp_path, "--json")
    floats = [k for k, v in states[0].items() if v.is_floating_point()]
    x = np.stack([np.concatenate([s[k].double().reshape(-1).numpy() for k in floats]) for s in states])
    window = x[STEPS - 200 + 1 :].mean(axis=0)
    start = STEPS - 300
    w = np.array([np.cos(np.pi * (t - 1 - start) / 300 / 2) ** 2 for t in range(start + 1, STEPS + 1)])
    lr_decay = x[start] + (w[:, None] * np.diff(x[start:], axis=0)).sum(axis=0)
    for entry, truth in zip(json.loads(result.stdout)["outputs"], (window, lr_decay)):
        got = load_file(entry["path"])
        merged = np.concatenate([got[k].double().reshape(-1).numpy() for k in floats])
        true = np.linalg.norm(merged - truth) / np.linalg.norm(truth - x[-1])
        assert true > 0.005
        assert 0.5 <= entry["estimate"]["sig"] / true <= 2.0, (entry["name"], entry["estimate"]["sig"], true)
    last = cli("merge", folder, "--last", 4, "-o", tmp_path / "l.safetensors", "--json")
    assert "--last averages checkpoints" in json.loads(last.stdout)["outputs"][0]["estimate"]["reason"]
