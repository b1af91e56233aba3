"""The tool against a per-step EMA tracked in float64 during a real tiny training run (spec §2-3, §7)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckpt_ema.cli import main

from .training import (
    classic_truth,
    make_model,
    power_truth,
    rel_error,
    save_series,
    sig_error,
    train_tiny,
)

STEPS = 120


@pytest.fixture(scope="module")
def states():
    return train_tiny(STEPS)


def _merge(args):
    result = CliRunner().invoke(main, ["merge", "-q", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("interp", ["linear", "hold"])
@pytest.mark.parametrize("decay", [0.5, 0.9, 0.97, 0.999])
def test_every_step_checkpoints_reproduce_classic_ema(tmp_path, states, decay, interp):
    save_series(states, tmp_path / "run", range(STEPS + 1))
    out = tmp_path / "ema.safetensors"
    _merge([tmp_path / "run", "--decay", decay, "--interp", interp, "--dtype", "fp32", "-o", out])
    assert rel_error(load_file(out), classic_truth(states, decay)) < 2e-6


@pytest.mark.parametrize("interp", ["linear", "hold"])
@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.25])
def test_every_step_checkpoints_reproduce_power_ema(tmp_path, states, sigma_rel, interp):
    from tests.reference import gamma_by_bisection

    save_series(states, tmp_path / "run", range(STEPS + 1))
    out = tmp_path / "ema.safetensors"
    _merge([tmp_path / "run", "--sigma-rel", sigma_rel, "--interp", interp, "--dtype", "fp32", "-o", out])
    assert rel_error(load_file(out), power_truth(states, gamma_by_bisection(sigma_rel))) < 2e-6


def test_every_step_with_gamma_and_several_targets_in_one_pass(tmp_path, states):
    save_series(states, tmp_path / "run", range(STEPS + 1))
    _merge([tmp_path / "run", "--gamma", 7, "--decay", 0.95, "--half-life", 20, "-o", tmp_path / "out"])
    assert rel_error(load_file(tmp_path / "out" / "gamma-7.safetensors"), power_truth(states, 7.0)) < 2e-6
    assert rel_error(load_file(tmp_path / "out" / "decay-0.95.safetensors"), classic_truth(states, 0.95)) < 2e-6
    half_life_decay = 0.5 ** (1 / 20)
    result = load_file(tmp_path / "out" / "half_life-20.safetensors")
    assert rel_error(result, classic_truth(states, half_life_decay)) < 2e-6


def test_bf16_checkpoints_are_accumulated_in_fp32(tmp_path, states):
    # The BF16 story: at decay 0.999 each per-step update is below BF16 precision. The tool upcasts every
    # checkpoint before any arithmetic, so its only rounding to BF16 is the final one.
    save_series(states, tmp_path / "run", range(STEPS + 1), dtype=torch.bfloat16)
    bf16_states = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in s.items()} for s in states]
    truth = classic_truth(bf16_states, 0.999)
    out = tmp_path / "ema.safetensors"
    _merge([tmp_path / "run", "--decay", 0.999, "-o", out])
    result = load_file(out)
    assert all(result[k].dtype == torch.bfloat16 for k in truth)  # same dtype as the inputs by default
    assert rel_error(result, truth) < 2**-8  # one final BF16 rounding
    # A naive per-step EMA kept in BF16 stalls: it barely moves away from the start.
    stalled = {k: v.clone() for k, v in bf16_states[0].items() if v.is_floating_point()}
    for state in bf16_states[1:]:
        for k in stalled:
            stalled[k] = (0.999 * stalled[k] + 0.001 * state[k]).to(torch.bfloat16)
    assert rel_error(stalled, truth) > 10 * rel_error(result, truth)


@pytest.mark.parametrize("decay", [0.95, 0.99])
def test_sparse_checkpoints_approximate_the_truth(tmp_path, states, decay):
    # Checkpoints every 10 steps plus the initial weights (--init): the linear interpolation between
    # checkpoints must be far better than taking the last checkpoint (sig < 1) and better than 'hold'.
    save_series(states, tmp_path / "init", [0])
    save_series(states, tmp_path / "run", range(10, STEPS + 1, 10))
    truth = classic_truth(states, decay)
    errors = {}
    for interp in ("linear", "hold"):
        out = tmp_path / f"{interp}.safetensors"
        init = tmp_path / "init" / "step-000000.safetensors"
        _merge([tmp_path / "run", "--decay", decay, "--init", init, "--interp", interp, "-o", out])
        errors[interp] = sig_error(load_file(out), truth, states[-1])
    assert errors["linear"] < 0.2
    assert errors["linear"] < errors["hold"]


def test_output_loads_into_the_same_module_with_strict(tmp_path, states):
    save_series(states, tmp_path / "run", range(0, STEPS + 1, 20))
    out = tmp_path / "ema.safetensors"
    _merge([tmp_path / "run", "--sigma-rel", 0.1, "-o", out])
    model = make_model()
    model.load_state_dict(load_file(out), strict=True)
    # Integer buffers are copied from the newest checkpoint, never averaged.
    assert int(model[1].num_batches_tracked) == STEPS


def test_at_ignores_later_checkpoints(tmp_path, states):
    save_series(states, tmp_path / "run", range(STEPS + 1))
    out = tmp_path / "ema.safetensors"
    _merge([tmp_path / "run", "--decay", 0.9, "--at", 60, "-o", out])
    assert rel_error(load_file(out), classic_truth(states[:61], 0.9)) < 2e-6


def test_per_checkpoint_treats_each_file_as_one_update(tmp_path, states):
    steps = list(range(0, STEPS + 1, 10))
    save_series(states, tmp_path / "run", steps)
    out = tmp_path / "ema.safetensors"
    _merge([tmp_path / "run", "--decay", 0.8, "--per-checkpoint", "-o", out])
    truth = classic_truth([states[s] for s in steps], 0.8)
    assert rel_error(load_file(out), truth) < 2e-6
