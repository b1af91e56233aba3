"""Lightning ``ModelCheckpoint(every_n_train_steps=10, save_top_k=-1, save_last=True)``: ``epoch=E-step=S.ckpt``
files and ``last.ckpt``, a copy of the newest; the EMA as a ``.ckpt`` that ``load_from_checkpoint`` loads."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckpt_ema.cli import main

from . import trainers

pytest.importorskip("lightning")

BETA = 0.9


def cli(*args: object, expect: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> trainers.Series:
    return trainers.lightning_run(tmp_path_factory.mktemp("lightning") / "checkpoints")


def test_last_ckpt_is_an_alias_of_the_newest(run):
    names = sorted(p.name for p in run.root.iterdir())
    assert "last.ckpt" in names and "epoch=2-step=40.ckpt" in names, names
    report = json.loads(cli("inspect", run.root, "--json").stdout)
    assert [c["step"] for c in report["checkpoints"]] == run.steps == [10, 20, 30, 40]
    assert all(c["source"] == "Lightning 'global_step'" for c in report["checkpoints"])
    skipped = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert "last.ckpt" in skipped and "epoch=2-step=40.ckpt" in skipped["last.ckpt"], skipped
    assert report["series"]["ok"], report["series"]


def test_merge_to_safetensors_matches_reference(run, tmp_path):
    out = tmp_path / "ema.safetensors"
    cli("merge", run.root, "--decay", BETA, "-o", out, "-q")
    assert trainers.max_rel(load_file(out), trainers.ema64(run.states, BETA)) < 1e-6


def test_merge_to_a_lightning_checkpoint_that_load_from_checkpoint_loads(run, tmp_path):
    out = tmp_path / "ema.ckpt"
    cli("merge", run.root, "--decay", BETA, "-o", out, "-q")
    raw = torch.load(out, weights_only=True)
    assert "optimizer_states" not in raw and raw["global_step"] == 40
    module = run.extra["cls"].load_from_checkpoint(out)
    assert module.hparams.width == 6  # the newest input's hyper-parameters
    assert trainers.max_rel(module.state_dict(), trainers.ema64(run.states, BETA)) < 1e-6
    assert module(torch.zeros(2, 4)).shape == (2, 2)
