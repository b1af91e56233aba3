"""``ckpt-ema doctor`` against a run whose truth is known: a per-step BF16 EMA tracked while the weights move.

The checkpoints hold the weights at every step (so the post-hoc EMA is the per-step EMA exactly); the trainer's
EMA is updated each step in FP32 arithmetic and stored in BF16, as ``ema.lerp_(param, 1 - beta)`` does on BF16
weights. Every expected number is recomputed here in float64 / by a brute-force BF16 simulation.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckpt_ema.cli import main

BF16 = torch.bfloat16
T, BETA, DRIFT, SIZE = 100, 0.999, 0.01, 2048


@pytest.fixture(scope="module")
def stalled_run(tmp_path_factory) -> dict:
    """Checkpoints at steps 1..T, the base model at step 0, the trainer's BF16 EMA at T, and the truth."""
    root = tmp_path_factory.mktemp("stalled")
    (root / "run").mkdir()
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(SIZE, generator=generator)
    bias = torch.randn(64, generator=generator)
    thetas = [torch.cat([theta, bias]).to(BF16)]  # what each checkpoint stores (BF16), steps 0..T
    save_file({"w": theta.to(BF16), "b": bias.to(BF16), "n": torch.tensor([0])}, str(root / "base.safetensors"))
    trainer = thetas[0].clone()
    for step in range(1, T + 1):
        theta = theta + DRIFT * (1 + torch.randn(SIZE, generator=generator))
        bias = bias + 0.1 * torch.randn(64, generator=generator)
        stored = torch.cat([theta, bias]).to(BF16)
        thetas.append(stored)
        trainer = (BETA * trainer.float() + (1 - BETA) * stored.float()).to(BF16)
        save_file(
            {"w": stored[:SIZE], "b": stored[SIZE:], "n": torch.tensor([step])},
            str(root / "run" / f"step-{step:04d}.safetensors"),
        )
    save_file({"w": trainer[:SIZE], "b": trainer[SIZE:], "n": torch.tensor([T])}, str(root / "ema.safetensors"))
    # the FP32-or-better EMA, per step in float64, of the stored weights
    emas = [thetas[0].double()]
    for step in range(1, T + 1):
        emas.append(BETA * emas[-1] + (1 - BETA) * thetas[step].double())
    return {"root": root, "thetas": thetas, "emas": emas, "trainer": trainer}


def doctor_json(*args) -> dict:
    result = CliRunner().invoke(main, ["doctor", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def brute_force_rounding_share(theta: torch.Tensor, ema: torch.Tensor, beta: float) -> float:
    """Add the update to the BF16 EMA and see whether the BF16 value changes (non-zero updates only)."""
    stored = ema.to(BF16)
    update = (1 - beta) * (theta.double() - ema)
    moved = (stored.double() + update).to(BF16) != stored
    nonzero = update != 0
    return float((~moved & nonzero).sum()) / float(nonzero.sum())


def test_a_stalled_bf16_ema_is_diagnosed(stalled_run):
    root = stalled_run["root"]
    d = doctor_json("--ema", root / "ema.safetensors", root / "run", "--init", root / "base.safetensors",
                    "--decay", BETA, "--dtype", "bf16")  # fmt: skip
    assert d["steps"] == list(range(T + 1)) and d["run_length"] == T and d["spacing"] == 1
    assert d["half_life"] == pytest.approx(math.log(0.5) / math.log(BETA))
    assert d["half_life_share"] == pytest.approx(d["half_life"] / T)
    assert d["start_share"] == pytest.approx(BETA**T, rel=1e-9)  # the base model's weight, per-step EMA

    # the rounding share at each sampled step, against adding the update in BF16 for real
    samples = d["rounding_samples"]
    assert 2 <= len(samples) <= 8 and samples[-1]["step"] == T
    for sample in samples:
        s = sample["step"]
        truth = brute_force_rounding_share(stalled_run["thetas"][s], stalled_run["emas"][s], BETA)
        assert sample["share"] == pytest.approx(truth, abs=0.003)  # ties and binade edges differ
    assert 0.5 < d["rounding_share"] < 1.0  # this EMA mostly stalls

    trainer, start, fp64 = stalled_run["trainer"].double(), stalled_run["thetas"][0].double(), stalled_run["emas"][T]
    t = d["trainer_ema"]
    assert t["dtype"] == "bf16"
    assert t["ratio"] == pytest.approx(float((trainer - start).norm() / (fp64 - start).norm()), rel=1e-4)
    assert t["ratio"] < 0.7
    assert t["unchanged_share"] == float((stalled_run["trainer"] == stalled_run["thetas"][0]).double().mean())
    assert t["unchanged_share"] > 0.3
    assert t["unchanged_share_fp32"] == pytest.approx(float((fp64.to(BF16) == stalled_run["thetas"][0]).double().mean()), abs=1e-3)  # fmt: skip

    # the recommended decays have half-lives of 2.5%, 5%, 10%, 20% of the run, to two digits of 1 - decay
    half_lives = [math.log(0.5) / math.log(float(b)) for b in d["recommended_decays"]]
    for h, fraction in zip(half_lives, (0.025, 0.05, 0.10, 0.20)):
        assert h == pytest.approx(fraction * T, rel=0.06)
    assert d["command"].startswith(f"ckpt-ema sweep {root / 'run'} --init {root / 'base.safetensors'} --decay ")
    assert "--sigma-rel 0.05,0.1,0.2" in d["command"]


def test_fp32_updates_do_not_round_away(stalled_run):
    root = stalled_run["root"]
    d = doctor_json(root / "run", "--init", root / "base.safetensors", "--decay", BETA, "--dtype", "fp32")
    assert d["rounding_share"] < 0.01 and d["trainer_ema"] is None
    d = doctor_json(root / "run", "--decay", "0.9")  # default dtype: the checkpoints' (BF16); start: step 1
    assert d["dtype"] == "bf16" and d["run_length"] == T - 1
    assert d["start_share"] == pytest.approx(0.9 ** (T - 1), rel=1e-6)


def test_without_a_decay_the_run_and_a_recommendation(stalled_run):
    root = stalled_run["root"]
    result = CliRunner().invoke(main, ["doctor", str(root / "run")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"run        {T} checkpoints, steps 1 to {T} (every step)"
    assert lines[1] == f"           run length {T - 1} steps"
    assert lines[-1].strip().startswith("ckpt-ema sweep")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ema", "EMA"], "--ema needs --decay"),
        (["--decay", "1.2"], "--decay 1.2: the decay per step must be in (0, 1)"),
        (["--decay", "0.9", "--ema", "RUN/step-0100.safetensors"], "--ema is also one of the checkpoints"),
        (["--decay", "0.9", "--ema", "MISSING"], "no such file"),
        (["--decay", "0.9", "--ema", "EMA", "--at-one"], "needs at least two checkpoints"),
    ],
)
def test_bad_input(stalled_run, args, message):
    root = stalled_run["root"]
    names = {"EMA": root / "ema.safetensors", "MISSING": root / "nope.safetensors"}
    inputs = [root / "run" / "step-0100.safetensors"] if "--at-one" in args else [root / "run"]
    args = [str(names.get(a, a)).replace("RUN", str(root / "run")) for a in args if a != "--at-one"]
    result = CliRunner().invoke(main, ["doctor", *map(str, inputs), *args])
    assert result.exit_code == 1 and message in result.output


def test_an_ema_with_other_tensors_is_refused(stalled_run, tmp_path):
    root = stalled_run["root"]
    save_file({"w": torch.zeros(SIZE, dtype=BF16)}, str(tmp_path / "other.safetensors"))
    result = CliRunner().invoke(
        main, ["doctor", str(root / "run"), "--decay", "0.99", "--ema", str(tmp_path / "other.safetensors")]
    )
    assert result.exit_code == 1 and "lacks 2 tensors ('b', 'n')" in result.output


def test_installed_command(stalled_run):
    root = stalled_run["root"]
    exe = Path(sys.executable).parent / "ckpt-ema"
    done = subprocess.run(
        [str(exe), "doctor", "--ema", str(root / "ema.safetensors"), str(root / "run"), "--init",
         str(root / "base.safetensors"), "--decay", str(BETA)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "decay      0.999: half-life 692.8 steps = 692.8% of the run: too long for this run" in out
    assert f"the base model (--init) keeps {BETA**T:.1%} of the EMA at step {T}" in out
    assert "of the per-step updates (1 - decay)(theta - ema) would round to zero in an EMA kept in bf16" in out
    assert "most updates are lost" in out
    assert "trainer    " in out and "as far from the base model (--init) as the FP32 EMA of the same decay" in out
    assert "warning: decay-0.999: the base model (--init) keeps 90% of the weight" in done.stderr
