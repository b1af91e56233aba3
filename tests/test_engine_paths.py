"""The engine's paths (fused and torch kernels, spans of small tensors, chunk sizes, several targets) all
compute the same weighted sums: each checked against an independent float64 numpy computation, and
against each other where the result must not depend on how the work is split.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckpt_ema import plan_merge
from ckpt_ema.engine import fused
from ckpt_ema.engine.merge_pass import MemorySink, MergePass

KERNELS = ["torch"] + (["fused"] if fused.AVAILABLE else [])
# Odd sizes on purpose: 1 element, vector-width remainders, spans longer than a fused block (16384 elements).
SHAPES = {"a.bias": (1,), "a.weight": (7, 3), "b.norm": (33,), "b.weight": (130, 37), "c.big": (40_000,)}
MANTISSA_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}
TARGETS = {"decay": [0.9, 0.99], "sigma_rel": [0.1], "gamma": [3.0]}


def write_series(folder, dtype, count=6, nan_at=None):
    """``count`` checkpoints of SHAPES in ``dtype`` (+ an int64 counter); returns float64 copies of the data."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = []
    for i in range(count):
        step = 100 * (i + 1)
        tensors = {name: torch.tensor(rng.normal(0, 1, shape), dtype=dtype) for name, shape in SHAPES.items()}
        if nan_at == i:
            tensors["b.weight"][3, 4] = float("nan")
        tensors["step_counter"] = torch.tensor([step])
        save_file(tensors, str(folder / f"step-{step}.safetensors"))
        data.append({name: t.double().numpy() for name, t in tensors.items() if t.is_floating_point()})
    return data


def reference(plan, data):
    """float64: out[k][name] = sum_j c[k, j] * x_j[name], with c the plan's coefficients."""
    coefs = plan.coefficient_matrix()
    return [
        {name: sum(coefs[k, j] * data[j][name] for j in range(len(data))) for name in SHAPES}
        for k in range(coefs.shape[0])
    ]


def run(plan, kernel, chunk=None):
    sinks = [MemorySink(plan.tensors) for _ in plan.outputs]
    total = sum(MergePass(plan, sinks, chunk, kernel=kernel))
    assert total == MergePass(plan, sinks, kernel=kernel).total_bytes
    return [sink.state_dict for sink in sinks]


def assert_close_to_reference(got, want, data, coefs, out_dtype):
    """Within one rounding to the output dtype plus FP32 accumulation error (n additions)."""
    for k, (state, expected) in enumerate(zip(got, want)):
        magnitude = {name: sum(abs(coefs[k, j]) * np.abs(data[j][name]) for j in range(len(data))) for name in SHAPES}
        for name in SHAPES:
            value = state[name].double().numpy()
            assert state[name].dtype == out_dtype and value.shape == SHAPES[name]
            bound = (
                np.abs(expected[name]) * 2.0 ** -MANTISSA_BITS[out_dtype]
                + len(data) * 2.0**-23 * magnitude[name]
                + 1e-7
            )
            assert np.all(np.abs(value - expected[name]) <= bound), (k, name)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_path_matches_float64(tmp_path, kernel, dtype):
    data = write_series(tmp_path / "series", dtype)
    plan = plan_merge([tmp_path / "series"], **TARGETS)
    want = reference(plan, data)
    coefs = plan.coefficient_matrix()
    whole = run(plan, kernel)
    assert_close_to_reference(whole, want, data, coefs, dtype)
    for state in whole:
        assert state["step_counter"].tolist() == [600]  # copied from the newest checkpoint
    for chunk in (7, 4097):
        chunked = run(plan, kernel, chunk)
        for a, b in zip(whole, chunked):  # the sums do not depend on the chunking
            for name in SHAPES:
                assert torch.equal(a[name], b[name]), (chunk, name)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("out", ["fp32", "bf16", "fp16"])
def test_output_dtype_and_single_target(tmp_path, kernel, out):
    data = write_series(tmp_path / "series", torch.bfloat16)
    plan = plan_merge([tmp_path / "series"], dtype=out, **TARGETS)
    out_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[out]
    together = run(plan, kernel)
    assert_close_to_reference(together, reference(plan, data), data, plan.coefficient_matrix(), out_dtype)
    for k, sigma in enumerate([None, None, 0.1, None]):
        if sigma is None:
            continue
        alone = run(plan_merge([tmp_path / "series"], dtype=out, sigma_rel=[sigma]), kernel)[0]
        for name in SHAPES:  # one target alone gives the same bytes as in a multi-target pass
            assert torch.equal(alone[name], together[k][name]), name


@pytest.mark.skipif(not fused.AVAILABLE, reason="numba not installed")
def test_fused_and_torch_kernels_agree(tmp_path):
    data = write_series(tmp_path / "series", torch.bfloat16, count=9)  # 9 inputs: groups of 4 and a rest
    plan = plan_merge([tmp_path / "series"], dtype="fp32", **TARGETS)
    a, b = run(plan, "fused"), run(plan, "torch")
    for sa, sb in zip(a, b):
        for name in SHAPES:
            diff = (sa[name].double() - sb[name].double()).abs()
            assert float(diff.max()) <= 2.0**-21 * float(sum(np.abs(d[name]).max() for d in data))


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_finite_input_is_reported(tmp_path, kernel):
    write_series(tmp_path / "series", torch.bfloat16, nan_at=5)
    plan = plan_merge([tmp_path / "series"], decay=[0.9])
    warnings: list[str] = []
    sinks = [MemorySink(plan.tensors)]
    for _ in MergePass(plan, sinks, 64, warnings.append, kernel=kernel):
        pass
    assert len(warnings) == 1 and "'b.weight'" in warnings[0] and "step-600" in warnings[0]
    assert math.isnan(float(sinks[0].state_dict["b.weight"][3, 4]))
    assert bool(torch.isfinite(sinks[0].state_dict["c.big"]).all())


@pytest.mark.skipif(not fused.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("n_out", [2, 3, 4, 5, 8])
def test_fused_targets_in_groups_give_the_same_bytes_as_alone(n_out):
    """Targets go four, two or one at a time through different loops: each row must not depend on that."""
    rng = np.random.default_rng(n_out)
    inputs = [torch.tensor(rng.normal(0, 1, 20_001), dtype=torch.bfloat16) for _ in range(9)]
    addresses = np.array([x.data_ptr() for x in inputs], dtype=np.int64)
    coefs = rng.dirichlet(np.ones(9), n_out).astype(np.float32)
    together = np.empty((n_out, 20_001), dtype=np.float32)
    fused.weighted_sums(addresses, "BF16", coefs, 20_001, together)
    for k in range(n_out):
        alone = np.empty((1, 20_001), dtype=np.float32)
        fused.weighted_sums(addresses, "BF16", np.ascontiguousarray(coefs[k : k + 1]), 20_001, alone)
        assert np.array_equal(alone[0], together[k]), k
        reference = sum(coefs[k, j].astype(np.float64) * inputs[j].double().numpy() for j in range(9))
        assert np.allclose(together[k], reference, rtol=0, atol=9 * 2.0**-23 * 4.0)


@pytest.mark.skipif(not fused.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("threads", [1, 3])
def test_the_estimates_sums_match_float64_split_over_threads_or_not(monkeypatch, threads):
    """fused.increment_products on a sample of 30,000 positions (split between 3 threads or not) against
    the increments' products written out in float64 numpy; a NaN and an Inf in the sample are counted."""
    monkeypatch.setattr(fused, "threads", lambda: threads)
    rng = np.random.default_rng(threads)
    n, n_in = 100_003, 6
    inputs = [torch.tensor(rng.normal(0, 1, n), dtype=torch.bfloat16) for _ in range(n_in)]
    sample = np.sort(rng.choice(n, 30_000, replace=False)).astype(np.int64)
    inputs[2][int(sample[7])] = float("nan")
    inputs[4][int(sample[-3])] = float("inf")
    outputs = rng.normal(0, 1, (3, n)).astype(np.float32)
    rows = np.array([2, 0], dtype=np.int64)
    addresses = np.array([x.data_ptr() for x in inputs], dtype=np.int64)
    sums = (np.zeros(n_in - 1), np.zeros(n_in - 1), np.zeros(n_in - 1), np.zeros(2))
    bad = fused.increment_products(addresses, "BF16", sample, outputs, rows, sums)
    assert bad == 2
    finite = np.ones(len(sample), dtype=bool)
    finite[[7, len(sample) - 3]] = False  # compare the sums over the other elements
    x = np.stack([t.double().numpy()[sample] for t in inputs])
    d = np.diff(x, axis=0)
    assert np.isnan(sums[0][1]) and np.isnan(sums[0][2])  # the gaps next to the NaN
    d, x = d[:, finite], x[:, finite]
    sums2 = (np.zeros(n_in - 1), np.zeros(n_in - 1), np.zeros(n_in - 1), np.zeros(2))
    keep = sample[finite]
    assert fused.increment_products(addresses, "BF16", keep, outputs, rows, sums2) == 0
    assert np.allclose(sums2[0], (d**2).sum(axis=1), rtol=1e-12)
    assert np.allclose(sums2[1][:-1], (d[:-1] * d[1:]).sum(axis=1), rtol=1e-12)
    assert np.allclose(sums2[2][:-2], (d[:-2] * d[2:]).sum(axis=1), rtol=1e-12)
    distance = [((outputs[r][keep].astype(np.float64) - x[-1]) ** 2).sum() for r in rows]
    assert np.allclose(sums2[3], distance, rtol=1e-12)
