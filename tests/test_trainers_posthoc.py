"""EMA snapshot folders written by ema-pytorch's ``PostHocEMA`` (``ema_model.``-prefixed keys, FP16 by default)
and pytorch-posthoc-ema's ``PostHocEMA`` (bare keys), both ``{index}.{step}.pt``, during real training.

The truth is the EDM2 power EMA of the weights after every step, in float64 (spec §3, §7). Both libraries run
the EMA from the first update with ``beta = (1 - 1/(n+1))^(gamma+1)`` where n counts updates, which differs from
EDM2's per-step form by one step; the reconstruction is checked against the truth with ``sig`` (spec §7).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckpt_ema.cli import main

from . import trainers

pytest.importorskip("ema_pytorch")
pytest.importorskip("posthoc_ema")

TARGET = 0.1
TRACKED = ",".join(str(s) for s in trainers.TRACKED)


def cli(*args: object, expect: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def ema_pytorch(tmp_path_factory) -> trainers.Series:
    return trainers.ema_pytorch_run(tmp_path_factory.mktemp("ema") / "post-hoc-ema-checkpoints")


@pytest.fixture(scope="module")
def posthoc(tmp_path_factory) -> trainers.Series:
    return trainers.posthoc_ema_run(tmp_path_factory.mktemp("phe") / "posthoc-ema")


def _sig(result, series: trainers.Series) -> float:
    every = series.extra["every_step"]
    truth = trainers.power_ema64(every, trainers.sigma_rel_to_gamma(TARGET))
    last = {k: v.double().numpy() for k, v in every[-1].items()}
    num = sum(float(((result[k].double().numpy() - truth[k]) ** 2).sum()) for k in truth)
    den = sum(float(((truth[k] - last[k]) ** 2).sum()) for k in truth)
    return (num / den) ** 0.5


@pytest.mark.parametrize("which", ["ema_pytorch", "posthoc"])
def test_snapshot_folder_is_read_and_reconstructed(which, request, tmp_path):
    series: trainers.Series = request.getfixturevalue(which)
    report = json.loads(cli("inspect", series.root, "--tracked-sigma-rel", TRACKED, "--json").stdout)
    assert report["series"]["ok"], report["series"]
    assert sorted({c["step"] for c in report["checkpoints"]}) == series.steps == [10, 20, 30, 40, 50, 60]
    out = tmp_path / "ema.safetensors"
    cli("merge", series.root, "--tracked-sigma-rel", TRACKED, "--sigma-rel", TARGET, "-o", out, "-q")
    result = load_file(out)
    assert set(result) == set(series.extra["every_step"][0])  # no 'initted'/'step', no 'ema_model.' prefix
    assert all(t.dtype == torch.float32 for t in result.values())  # a reconstruction defaults to FP32
    # measured: sig 0.072 (ema-pytorch, FP16 snapshots), 0.050 (pytorch-posthoc-ema, FP32 snapshots)
    assert _sig(result, series) < 0.15
    model = trainers.Tiny()
    model.load_state_dict(result, strict=True)
    assert model(torch.zeros(2, 4)).shape == (2, 2)


def test_ema_pytorch_own_synthesis_agrees(ema_pytorch, tmp_path):
    out = tmp_path / "ema.safetensors"
    cli("merge", ema_pytorch.root, "--tracked-sigma-rel", TRACKED, "--sigma-rel", TARGET, "-o", out, "-q")
    ours = load_file(out)
    theirs = ema_pytorch.extra["emas"].synthesize_ema_model(sigma_rel=TARGET).ema_model.state_dict()
    for name, value in theirs.items():
        scale = float(value.double().abs().max())
        assert float((ours[name].double() - value.double()).abs().max()) <= 0.02 * scale + 1e-3, name


def test_inspect_hints_the_tracked_profiles_never_per_checkpoint(ema_pytorch):
    refused = cli("inspect", ema_pytorch.root, expect=1)
    assert "--tracked-sigma-rel" in refused.output, refused.output
    assert "--per-checkpoint" not in refused.output, refused.output
    refused = cli("plan", ema_pytorch.root, "--decay", 0.9, expect=1)
    assert "--tracked-sigma-rel" in refused.output and "--per-checkpoint" not in refused.output, refused.output


def test_fp16_default_is_said(ema_pytorch):
    text = cli("plan", ema_pytorch.root, "--tracked-sigma-rel", TRACKED, "--sigma-rel", TARGET).output
    assert "fp32" in text.lower() or "float32" in text.lower() or "F32" in text, text
    same = json.loads(
        cli(
            "plan", ema_pytorch.root, "--tracked-sigma-rel", TRACKED, "--sigma-rel", TARGET, "--dtype", "same", "--json"
        ).stdout
    )
    assert np.isfinite(same["target_step"])
