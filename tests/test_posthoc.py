"""EDM2 post-hoc EMA from saved EMA snapshots (spec §4), through the command line.

The truth is a tiny float64 training run whose power EMAs (sigma_rel 0.05 and 0.10, and the targets) are
updated at every step with the per-step EDM2 rule ``beta_t = (1 - 1/t)^(gamma+1)`` while it trains.
Snapshots of the two tracked EMAs are saved every N steps as ``ema-{step}-{sigma}.safetensors`` files and
as an ema-pytorch ``PostHocEMA`` folder (``{index}.{step}.pt``); ``ckpt-ema merge`` must rebuild the
other EMAs from them. Coefficients are checked against a least-squares solver written here from the SPEC
formulas (and brute-force quadrature for the exponential target), never against the module's output.
"""

from __future__ import annotations

import fractions
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckpt_ema import merge_to_state_dict
from ckpt_ema.cli import main

from .reference import gamma_by_bisection as ref_gamma
from .reference import power_inner as ref_power_dot
from .reference import simpson_samples as ref_simpson
from .training import make_model

TRACKED = (0.05, 0.10)
TARGETS = (0.06, 0.07, 0.085)  # between the tracked profiles
NARROW = 0.03  # narrower than both
HALF_LIFE = 40.0  # a classic target, reconstructed from the power snapshots
TOTAL = 400  # steps of the run
EVERY = 10  # snapshot spacing of the main fixtures

State = dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------


def ref_exp_power_dot(t: float, decay: float, ts: float, gs: float, n: int = 400_000) -> float:
    """<e, p> by Simpson's rule on [0, min(t, ts)] of the two densities (truncated exponential, power)."""
    lam = -math.log(decay)
    m = min(t, ts)
    u = np.linspace(0.0, m, n + 1)
    e = lam * np.exp(-lam * (t - u)) / (1 - math.exp(-lam * t))
    p = (gs + 1) * u**gs / ts ** (gs + 1)
    return ref_simpson(e * p, m / n)


def ref_exp_norm2(t: float, decay: float) -> float:
    lam = -math.log(decay)
    u = np.linspace(0.0, t, 400_001)
    e = lam * np.exp(-lam * (t - u)) / (1 - math.exp(-lam * t))
    return ref_simpson(e * e, t / 400_000)


def ref_solve(steps, gammas, a_target, target_norm2):
    """Normal equations from loops; coefficients normalised to sum 1, and the relative L2 fit error."""
    n = len(steps)
    a = np.array([[ref_power_dot(steps[i], gammas[i], steps[j], gammas[j]) for j in range(n)] for i in range(n)])
    b = np.array([a_target(steps[i], gammas[i]) for i in range(n)])
    x = np.linalg.solve(a, b)
    x /= x.sum()
    return x, math.sqrt(max(0.0, x @ a @ x - 2 * x @ b + target_norm2) / target_norm2)


def errors(result: State, truth: State, last: State) -> tuple[float, float]:
    """spec §7: rel = |a - truth| / |truth| and sig = |a - truth| / |truth - theta(T)|, float tensors."""
    diff = sum(float(((result[k].double() - truth[k]) ** 2).sum()) for k in truth)
    norm = sum(float((truth[k] ** 2).sum()) for k in truth)
    dist = sum(float(((truth[k] - last[k]) ** 2).sum()) for k in truth)
    return math.sqrt(diff / norm), math.sqrt(diff / dist)


# ----------------------------------------------------------------------------------------------
# the training run and its snapshots
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    states: list[State]  # raw weights after each step 0..TOTAL
    power: dict[float, list[State]]  # sigma_rel -> per-step power EMA after each step 1..TOTAL (index t)
    classic: State  # bias-corrected classic EMA at TOTAL, half-life HALF_LIFE

    def floats(self, state: State) -> State:
        return {k: v for k, v in state.items() if v.is_floating_point()}


@pytest.fixture(scope="module")
def run() -> Run:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend
    try:
        return _train()
    finally:
        torch.set_num_threads(threads)


def _train() -> Run:
    model = make_model(3).double()
    generator = torch.Generator().manual_seed(4)
    target_map = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = [state]
    gammas = {s: ref_gamma(s) for s in (*TRACKED, *TARGETS, NARROW)}
    power: dict[float, list[State]] = {s: [{}] for s in gammas}
    decay = 0.5 ** (1 / HALF_LIFE)
    classic = {k: torch.zeros_like(v) for k, v in state.items() if v.is_floating_point()}
    for t in range(1, TOTAL + 1):
        x = torch.randn(32, 6, generator=generator, dtype=torch.float64)
        y = torch.tanh(x @ target_map) + 0.3 * torch.randn(32, 3, generator=generator, dtype=torch.float64)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        states.append(state)
        for sigma, gamma in gammas.items():
            beta = (1 - 1 / t) ** (gamma + 1)  # EDM2 per-step power EMA; beta_1 = 0
            previous = power[sigma][-1]
            power[sigma].append({k: _ema(beta, previous.get(k), v) for k, v in state.items()})
        for k in classic:
            classic[k] = decay * classic[k] + (1 - decay) * state[k]
    classic = {k: v / (1 - decay**TOTAL) for k, v in classic.items()}  # bias-corrected: init gets nothing
    return Run(states, power, classic)


def _ema(beta: float, previous: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if not value.is_floating_point():
        return value  # integer buffers are not averaged
    return value.clone() if previous is None else beta * previous + (1 - beta) * value


def write_safetensors_snapshots(run: Run, folder: Path, every: int, last: int = TOTAL, dtype=torch.float64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for step in range(every, last + 1, every):
        for sigma in TRACKED:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in run.power[sigma][step].items()}
            save_file(state, str(folder / f"ema-{step:07d}-{sigma:.3f}.safetensors"))
    return folder


def write_ema_pytorch_folder(run: Run, folder: Path, every: int, dtype=torch.float32, cast_all=False) -> Path:
    """ema-pytorch PostHocEMA layout: ``{index}.{step}.pt`` holding KarrasEMA.state_dict().

    Older versions keep ``initted`` (bool) and ``step`` (int64); newer ones cast every entry to the
    checkpoint dtype (``cast_all``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for step in range(every, TOTAL + 1, every):
        for index, sigma in enumerate(TRACKED):
            state: dict[str, torch.Tensor] = {"initted": torch.tensor(True), "step": torch.tensor(step)}
            for k, v in run.power[sigma][step].items():
                state[f"ema_model.{k}"] = v.to(dtype) if v.is_floating_point() else v
            if cast_all:
                state = {k: v.to(dtype) for k, v in state.items()}
            torch.save(state, folder / f"{index}.{step}.pt")
    return folder


@pytest.fixture(scope="module")
def snaps(run: Run, tmp_path_factory) -> Path:
    return write_safetensors_snapshots(run, tmp_path_factory.mktemp("snaps"), EVERY)


@pytest.fixture(scope="module")
def ema_pytorch(run: Run, tmp_path_factory) -> Path:
    return write_ema_pytorch_folder(run, tmp_path_factory.mktemp("ema") / "post-hoc-ema-checkpoints", EVERY)


def cli(*args) -> CliRunner.Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def merge_ok(*args) -> None:
    result = cli("merge", *args, "-q")
    assert result.exit_code == 0, result.output


def plan_json(*args) -> dict:
    result = cli("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# ----------------------------------------------------------------------------------------------
# accuracy against the per-step truth
# ----------------------------------------------------------------------------------------------


def test_reconstruction_matches_per_step_truth(run, snaps, tmp_path):
    targets = [a for s in TARGETS for a in ("--sigma-rel", s)]
    merge_ok(snaps, "--tracked-sigma-rel", "0.05,0.10", *targets, "-o", tmp_path)
    for sigma in TARGETS:
        result = load_file(tmp_path / f"sigma_rel-{sigma}.safetensors")
        rel, sig = errors(result, run.floats(run.power[sigma][TOTAL]), run.floats(run.states[TOTAL]))
        # measured (sigma_rel 0.07, every 10 steps to 400): rel 1.3e-6, sig 4.1e-5
        assert rel < 1e-4 and sig < 1e-3, (sigma, rel, sig)
        assert torch.equal(result["1.num_batches_tracked"], run.states[TOTAL]["1.num_batches_tracked"])
        assert result["0.weight"].dtype == torch.float64


def test_ema_pytorch_folder_matches_per_step_truth(run, ema_pytorch, tmp_path):
    out = tmp_path / "ema.safetensors"
    merge_ok(ema_pytorch, "--tracked-sigma-rel", "0.05,0.10", "--sigma-rel", 0.07, "-o", out)
    result = load_file(out)
    assert set(result) == set(run.states[0])  # no 'initted'/'step', no 'ema_model.' prefix
    assert result["0.weight"].dtype == torch.float32
    rel, sig = errors(result, run.floats(run.power[0.07][TOTAL]), run.floats(run.states[TOTAL]))
    assert rel < 1e-4 and sig < 1e-3, (rel, sig)


def test_classic_target_from_power_snapshots(run, snaps):
    # The truncated exponential profile = the bias-corrected EMA (zero start, divided by 1 - beta^T).
    result = merge_to_state_dict([snaps], half_life=[HALF_LIFE], tracked_sigma_rel=TRACKED)[f"half_life-{HALF_LIFE:g}"]
    rel, sig = errors(result, run.classic, run.floats(run.states[TOTAL]))
    assert rel < 1e-3 and sig < 1e-2, (rel, sig)  # measured: rel 1.1e-4, sig 2.6e-3


def test_every_step_limit_is_exact(run, tmp_path):
    # Snapshots at every step 1..200 (400 files): cond(A) > 1e8, so also the "hundreds of snapshots" case.
    every1 = write_safetensors_snapshots(run, tmp_path / "every1", 1, last=200)
    out = tmp_path / "out"
    args = ("--tracked-sigma-rel", "0.05,0.1", "--sigma-rel", 0.07, "--sigma-rel", 0.05, "-o", out, "--json")
    result = cli("merge", every1, *args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    last = run.floats(run.states[200])
    rel, sig = errors(load_file(out / "sigma_rel-0.07.safetensors"), run.floats(run.power[0.07][200]), last)
    assert rel < 1e-9 and sig < 1e-8, (rel, sig)  # measured 3e-11, 9e-10
    rel, _ = errors(load_file(out / "sigma_rel-0.05.safetensors"), run.floats(run.power[0.05][200]), last)
    assert rel < 1e-12  # a tracked target: the snapshot at T itself
    output = summary["outputs"][0]
    assert output["condition_number"] > 1e8 and output["fit_error"] < 1e-3
    assert any("ill-conditioned" in w for w in summary["warnings"])


def test_narrow_target_reports_fit_error_without_blowing_up(run, snaps, tmp_path):
    out = tmp_path / "narrow.safetensors"
    result = cli("merge", snaps, "--tracked-sigma-rel", "0.05,0.10", "--sigma-rel", NARROW, "-o", out)
    assert result.exit_code == 0, result.output
    assert "narrower than every tracked profile" in result.output
    summary = plan_json(snaps, "--tracked-sigma-rel", "0.05,0.10", "--sigma-rel", NARROW)["outputs"][0]
    assert 1e-3 < summary["fit_error"] < 0.1 and summary["abs_sum"] > 5
    rel, sig = errors(load_file(out), run.floats(run.power[NARROW][TOTAL]), run.floats(run.states[TOTAL]))
    assert rel < 1e-3 and sig < 2e-2, (rel, sig)  # measured: rel 3.1e-5, sig 1.0e-3


def test_snapshots_after_at_are_not_used(run, snaps, tmp_path):
    out = tmp_path / "at.safetensors"
    merge_ok(snaps, "--tracked-sigma-rel", "0.05,0.10", "--sigma-rel", 0.07, "--at", 200, "-o", out)
    rel, sig = errors(load_file(out), run.floats(run.power[0.07][200]), run.floats(run.states[200]))
    assert rel < 1e-4 and sig < 1e-3, (rel, sig)
    summary = plan_json(snaps, "--tracked-sigma-rel", "0.05,0.10", "--sigma-rel", 0.07, "--at", 200)
    assert summary["target_step"] == 200
    assert {c["step"] for c in summary["ignored"]} == set(range(210, TOTAL + 1, EVERY))
    assert max(c["step"] for c in summary["checkpoints"]) == 200


def test_fp16_ema_pytorch_snapshots_are_upcast(run, tmp_path):
    # Newer ema-pytorch casts everything, 'step' and 'initted' included, to FP16.
    folder = write_ema_pytorch_folder(run, tmp_path / "fp16", 50, dtype=torch.float16, cast_all=True)
    out = tmp_path / "fp32.safetensors"
    merge_ok(folder, "--tracked-sigma-rel", "0.05,0.10", "--sigma-rel", 0.07, "--dtype", "fp32", "-o", out)
    result = load_file(out)
    summary = plan_json(folder, "--tracked-sigma-rel", "0.05,0.10", "--sigma-rel", 0.07)
    expected = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in result.items() if v.is_floating_point()}
    for entry in summary["outputs"][0]["inputs"]:
        stored = torch.load(entry["path"], weights_only=True)
        for k in expected:
            expected[k] += entry["coefficient"] * stored[f"ema_model.{k}"].double()
    # FP32 accumulation of the FP16 values: no FP16 arithmetic
    diff = sum(float(((result[k].double() - expected[k]) ** 2).sum()) for k in expected)
    assert math.sqrt(diff / sum(float((v**2).sum()) for v in expected.values())) < 1e-6


# ----------------------------------------------------------------------------------------------
# coefficients of a documented configuration, against a solver written here
# ----------------------------------------------------------------------------------------------

DOC_STEPS = (500, 1000, 1500, 2000)


@pytest.fixture
def doc_snaps(tmp_path) -> Path:
    for step in DOC_STEPS:
        for sigma in TRACKED:
            save_file({"w": torch.full((2,), float(step))}, str(tmp_path / f"ema-{step:07d}-{sigma:.3f}.safetensors"))
    return tmp_path


def test_documented_coefficients_match_independent_solver(doc_snaps):
    summary = plan_json(doc_snaps, "--tracked-sigma-rel", "0.05,0.10", "--sigma-rel", 0.07, "--decay", 0.999)
    by_name = {o["name"]: o for o in summary["outputs"]}
    inputs = by_name["sigma_rel-0.07"]["inputs"]
    steps = [float(i["step"]) for i in inputs]
    gammas = [ref_gamma(round(i["sigma_rel"], 12)) for i in inputs]
    assert [(i["step"], round(i["sigma_rel"], 12)) for i in inputs] == [(s, g) for s in DOC_STEPS for g in TRACKED]

    g07 = ref_gamma(0.07)
    x, fit = ref_solve(
        steps, gammas, lambda t, g: ref_power_dot(t, g, 2000.0, g07), ref_power_dot(2000, g07, 2000, g07)
    )
    got = [i["coefficient"] for i in inputs]
    np.testing.assert_allclose(got, x, rtol=1e-9, atol=1e-12)
    assert by_name["sigma_rel-0.07"]["fit_error"] == pytest.approx(fit, rel=1e-6)

    x, fit = ref_solve(steps, gammas, lambda t, g: ref_exp_power_dot(2000.0, 0.999, t, g), ref_exp_norm2(2000.0, 0.999))
    got = [i["coefficient"] for i in by_name["decay-0.999"]["inputs"]]
    np.testing.assert_allclose(got, x, rtol=1e-6, atol=1e-9)
    assert by_name["decay-0.999"]["fit_error"] == pytest.approx(fit, rel=1e-4)


def test_plan_text_shows_coefficients_and_diagnostics(doc_snaps):
    result = cli("plan", doc_snaps, "--tracked-sigma-rel", "0.05,0.10", "--sigma-rel", 0.07, "--sigma-rel", 0.02)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "8 EMA snapshots of sigma_rel 0.05, 0.1, steps 500 to 2000 (every 500 steps)" in text
    assert "step 2000 s0.05" in text and "step 500 s0.1" in text
    line = next(row for row in text.splitlines() if row.startswith("sigma_rel-0.07:"))
    assert "reconstructed from 8 snapshots; condition number" in line and "Σ|x|" in line and "fit error" in line
    assert "warning: sigma_rel-0.02: the target (sigma_rel 0.02) is narrower than every tracked profile" in text


def test_json_lists_each_inputs_profile_and_the_fit(doc_snaps):
    summary = plan_json(doc_snaps, "--tracked-gamma", "16.97,6.94", "--gamma", 11)
    output = summary["outputs"][0]
    assert output["target"]["method"] == "reconstruction"
    assert {"condition_number", "abs_sum", "fit_error"} <= set(output)
    assert sum(i["coefficient"] for i in output["inputs"]) == pytest.approx(1.0, abs=1e-12)
    assert {round(i["sigma_rel"], 3) for i in output["inputs"]} == {0.05, 0.1}
    assert set(output["inputs"][0]) == {"path", "step", "sigma_rel", "gamma", "coefficient"}


def test_provenance_records_the_fit_and_each_inputs_profile(doc_snaps, tmp_path):
    out = tmp_path / "out.safetensors"
    merge_ok(doc_snaps, "--tracked-sigma-rel", "0.05,0.10", "--sigma-rel", 0.07, "-o", out)
    with open(out, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = header["__metadata__"]
    assert meta["ckpt_ema.method"] == "reconstruction" and meta["format"] == "pt"
    assert float(meta["ckpt_ema.fit_error"]) < 0.05 and "ckpt_ema.condition_number" in meta
    assert float(meta["ckpt_ema.input.0.sigma_rel"]) == pytest.approx(0.05)


# ----------------------------------------------------------------------------------------------
# refusals: one line, exit 1, naming the file or option
# ----------------------------------------------------------------------------------------------


def _pt(folder: Path, name: str, payload: dict) -> None:
    folder.mkdir(exist_ok=True)
    torch.save(payload, folder / name)


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda d: _pt(d, "2.100.pt", {"ema_model.w": torch.zeros(2)}), ("--tracked-sigma-rel", "0.05,0.1"),
         "ema-pytorch snapshot of profile 2, but only 2 tracked profile(s)"),
        (lambda d: _pt(d, "0.100.pt", {"initted": torch.tensor(True)}), ("--tracked-sigma-rel", "0.05"),
         "no 'ema_model.' tensors"),
        (lambda d: _pt(d, "0.100.pt", {"ema_model.w": torch.zeros(2), "x": fractions.Fraction(1, 3)}),
         ("--tracked-sigma-rel", "0.05"), "refused: loading it would run code from the file"),
        (lambda d: save_file({"w": torch.zeros(2)}, str(d / "ema-0000100-0.200.safetensors")),
         ("--tracked-sigma-rel", "0.05,0.1"), "snapshot of sigma_rel 0.200, which is not a tracked profile"),
        (lambda d: save_file({"w": torch.zeros(2)}, str(d / "ema-step-100.safetensors")),
         ("--tracked-sigma-rel", "0.05,0.1"), "cannot be matched to one of the tracked profiles"),
        (lambda d: [save_file({"w": torch.zeros(2)}, str(d / f"{p}-0000100-0.050.safetensors")) for p in "ab"],
         ("--tracked-sigma-rel", "0.05,0.1"), "are both the sigma_rel 0.05 snapshot at step 100"),
        (lambda d: save_file({"w": torch.zeros(2)}, str(d / "ema-0000100-0.050.safetensors")),
         ("--tracked-sigma-rel", "0.05", "--tracked-gamma", "7"), "--tracked-sigma-rel or --tracked-gamma"),
        (lambda d: save_file({"w": torch.zeros(2)}, str(d / "ema-0000100-0.050.safetensors")),
         ("--tracked-sigma-rel", "0.05,0.3"), "--tracked-sigma-rel 0.3: sigma_rel must be in"),
        (lambda d: save_file({"w": torch.zeros(2)}, str(d / "ema-0000100-0.050.safetensors")),
         ("--tracked-sigma-rel", "0.05", "--at", "50"), "--at 50 is not the step of a snapshot"),
        (lambda d: save_file({"w": torch.zeros(2)}, str(d / "ema-0000100-0.050.safetensors")),
         ("--tracked-sigma-rel", "0.05", "--per-checkpoint"), "--per-checkpoint does not apply"),
        (lambda d: save_file({"w": torch.zeros(2)}, str(d / "ema-0000100-0.050.safetensors"), {"step": "200"}),
         ("--tracked-sigma-rel", "0.05"), "metadata 'step' says step 200 but the name says 100"),
    ],
)  # fmt: skip
def test_refusals(tmp_path, setup, args, message):
    folder = tmp_path / "in"
    folder.mkdir()
    setup(folder)
    result = cli("plan", folder, *args, "--sigma-rel", 0.07)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert message in result.output


def test_steps_option_and_single_tracked_profile(run, tmp_path):
    # Names without step or sigma_rel: one tracked profile, steps given with --steps (in the order given).
    paths = []
    for step in (300, 100, 200, 400):
        path = tmp_path / f"ema_at_{step // 100}x.safetensors"
        save_file({k: v for k, v in run.power[0.05][step].items()}, str(path))
        paths.append(path)
    summary = plan_json(*paths, "--steps", "300,100,200,400", "--tracked-sigma-rel", 0.05, "--sigma-rel", 0.05)
    output = summary["outputs"][0]
    assert [i["step"] for i in output["inputs"]] == [100, 200, 300, 400]
    assert output["inputs"][-1]["coefficient"] == pytest.approx(1.0, abs=1e-9)  # the target is the snapshot at T
    assert summary["checkpoints"][0]["step_source"] == "--steps"
