"""timm ``CheckpointSaver`` as train.py uses it: ``checkpoint-{epoch}.pth.tar`` holding ``args`` (an
``argparse.Namespace``), ``state_dict`` and ``state_dict_ema``; ``last.pth.tar`` and ``model_best.pth.tar`` are
hard links to numbered checkpoints. The number is an epoch, so ckpt-ema asks for the steps (``--every``).

torchvision cannot be imported on this machine (PyPI's build needs a CUDA torch); timm imports it at module
level but neither ``CheckpointSaver`` nor the tiny model uses it, so ``trainers.stub_torchvision`` puts an inert
placeholder in its place. timm's own saving code runs unchanged (timm 1.0.31).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckpt_ema.cli import main

from . import trainers

trainers.stub_torchvision()
timm = pytest.importorskip("timm")

BETA = 0.9


class Custom(argparse.Namespace):
    """A class of the test's own in a checkpoint: not allow-listed, so refused."""


def cli(*args: object, expect: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> trainers.Series:
    return trainers.timm_run(tmp_path_factory.mktemp("timm") / "train")


def test_epoch_numbers_are_refused_with_the_ways_out(run):
    refused = cli("plan", run.root, "--decay", BETA, expect=1)
    assert "epoch" in refused.output and "--every" in refused.output and "--steps" in refused.output, refused.output
    assert "run code" not in refused.output  # argparse.Namespace is allow-listed, not refused


def test_aliases_are_skipped_and_every_gives_the_steps(run, tmp_path):
    every = run.extra["steps_per_epoch"]
    report = json.loads(cli("inspect", run.root, "--every", every, "--json").stdout)
    assert [c["step"] for c in report["checkpoints"]] == run.steps == [6, 12, 18, 24]
    skipped = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert "checkpoint-3.pth.tar" in skipped["last.pth.tar"], skipped
    assert "checkpoint-2.pth.tar" in skipped["model_best.pth.tar"], skipped
    out = tmp_path / "ema.safetensors"
    result = cli("merge", run.root, "--every", every, "--decay", BETA, "-o", out)
    assert "state_dict_ema" in result.output  # told which state dict was taken, and the other one
    tensors = load_file(out)
    assert trainers.max_rel(tensors, trainers.ema64(run.states, BETA)) < 1e-6
    model = timm.create_model(
        trainers.TIMM_MODEL, pretrained=False, num_classes=3, img_size=16, in_chans=1, patch_size=4, embed_dim=16,
        depth=1, checkpoint_path=str(out),
    )  # fmt: skip
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 3)


def test_other_classes_stay_refused_and_the_hint_gives_no_step_in_a_name(run, tmp_path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(run.root / "checkpoint-1.pth.tar", weights_only=True, map_location="cpu")
    state["args"] = Custom(model="x")
    torch.save(state, tmp_path / "checkpoint-1.pth.tar")
    refused = cli("inspect", tmp_path / "checkpoint-1.pth.tar", expect=1)
    assert "run code" in refused.output and "Custom" in refused.output, refused.output
    assert "checkpoint-1.safetensors" not in refused.output  # converting it so would make epoch 1 look like step 1
    assert "metadata={'step'" in refused.output, refused.output


def test_copies_where_hard_links_fail_are_aliases_too(run, tmp_path):
    # timm falls back to shutil.copy2 when the file system cannot hard-link (CheckpointSaver._duplicate)
    import shutil

    folder = tmp_path / "copies"
    folder.mkdir()
    for path in run.root.glob("*.pth.tar"):
        shutil.copy2(path, folder / path.name)
    report = json.loads(cli("inspect", folder, "--every", run.extra["steps_per_epoch"], "--json").stdout)
    assert [c["step"] for c in report["checkpoints"]] == run.steps
    skipped = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert "copy" in skipped["last.pth.tar"] and "checkpoint-3.pth.tar" in skipped["last.pth.tar"], skipped
    (folder / "last.pth.tar").write_bytes(b"not the same")  # an alias-named file that is no copy: refused
    refused = cli("plan", folder, "--every", 6, "--decay", BETA, expect=1)
    assert "last.pth.tar" in refused.output and "alias" in refused.output, refused.output
