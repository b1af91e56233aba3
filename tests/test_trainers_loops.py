"""Hand-written ``torch.save`` loops and accelerate's ``save_state()``, run as a user runs ckpt-ema.

The two silently wrong cases of issue 10: a hand-written loop names its files by epoch
(``checkpoint_{epoch}.pt``) but records the step inside, and accelerate's automatic checkpoint naming
numbers its folders by save (``checkpoints/checkpoint_0, checkpoint_1, ...``). Neither number is a step.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckpt_ema.cli import main

from . import trainers

pytest.importorskip("accelerate")

BETA = 0.9


def cli(*args: object, expect: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.output, result.exception)
    return result


def inspect_json(*args: object, expect: int = 0) -> dict:
    return json.loads(cli("inspect", *args, "--json", expect=expect).stdout)


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> trainers.Series:
    return trainers.handwritten(tmp_path_factory.mktemp("loop") / "run")


@pytest.fixture(scope="module")
def accel(tmp_path_factory) -> trainers.Series:
    return trainers.accelerate_run(tmp_path_factory.mktemp("accel") / "project")


# ----------------------------------------------------------------------------------------------
# hand-written loop: checkpoint_{epoch}.pt holding {"model", "optimizer", "step", "epoch"}
# ----------------------------------------------------------------------------------------------


def test_loop_step_recorded_in_the_file_beats_the_epoch_in_its_name(loop):
    report = inspect_json(loop.root)
    assert [c["step"] for c in report["checkpoints"]] == loop.steps == [10, 20, 30, 40]
    assert all("'step' in the file" in c["source"] for c in report["checkpoints"]), report["checkpoints"]
    assert report["series"]["ok"]


def test_loop_merge_matches_float64_reference_and_loads(loop, tmp_path):
    out = tmp_path / "ema.safetensors"
    cli("merge", loop.root, "--decay", BETA, "-o", out, "-q")
    result = load_file(out)
    assert trainers.max_rel(result, trainers.ema64(loop.states, BETA)) < 1e-6
    model = trainers.Tiny()
    model.load_state_dict(result, strict=True)
    assert model(torch.zeros(3, 4)).shape == (3, 2)


def test_loop_without_a_recorded_step_is_refused_then_every_gives_the_steps(loop, tmp_path):
    # the same loop without "step": the only number is the epoch (in the name and in the file)
    folder = tmp_path / "epochs"
    folder.mkdir()
    for epoch, step in enumerate(loop.steps):
        torch.save({"model": loop.states[step], "epoch": epoch}, folder / f"checkpoint_{epoch}.pt")
    refused = cli("plan", folder, "--decay", BETA, expect=1)
    assert "--every" in refused.output and "--steps" in refused.output, refused.output
    out = tmp_path / "ema.safetensors"
    cli("merge", folder, "--every", 10, "--decay", BETA, "-o", out, "-q")
    assert trainers.max_rel(load_file(out), trainers.ema64(loop.states, BETA)) < 1e-6
    plan = json.loads(cli("plan", folder, "--every", 10, "--decay", BETA, "--json").stdout)
    assert [c["step"] for c in plan["checkpoints"]] == [10, 20, 30, 40]
    assert all(c["step_source"] == "--every 10" for c in plan["checkpoints"]), plan["checkpoints"]


def test_every_with_first(loop):
    plan = json.loads(cli("plan", loop.root, "--every", 10, "--first", 5, "--decay", BETA, "--json").stdout)
    assert [c["step"] for c in plan["checkpoints"]] == [5, 15, 25, 35]
    refused = cli("plan", loop.root, "--every", 10, "--steps", "1,2,3,4", "--decay", BETA, expect=2)
    assert "--every" in refused.output
    cli("plan", loop.root, "--first", 5, "--decay", BETA, expect=2)  # --first needs --every


# ----------------------------------------------------------------------------------------------
# accelerate: project_dir/checkpoints/checkpoint_{save index}/ with model.safetensors + model_1.safetensors
# ----------------------------------------------------------------------------------------------


def test_accelerate_save_index_is_never_a_step(accel):
    names = sorted(p.name for p in (accel.root / "checkpoints").iterdir())
    assert names == [f"checkpoint_{i}" for i in range(6)]  # what accelerate wrote: save counts
    report = inspect_json(accel.root)  # the project folder, as the user has it
    assert [c["step"] for c in report["checkpoints"]] == accel.steps == [5, 10, 15, 20, 25, 30]
    for entry in report["checkpoints"]:
        assert "optimizer.bin" in entry["source"], entry["source"]
        assert entry["components"] == ["model", "model_1"]


def test_accelerate_merge_both_models_matches_reference_and_loads(accel, tmp_path):
    from accelerate.utils import load_checkpoint_in_model

    out = tmp_path / "ema"
    cli("merge", accel.root, "--decay", BETA, "-o", out, "-q")
    model, other = trainers.Tiny(), trainers.Tiny(width=3)
    load_checkpoint_in_model(model, str(out / "model.safetensors"))
    load_checkpoint_in_model(other, str(out / "model_1.safetensors"))
    got = {k: v for k, v in model.state_dict().items()}
    got_1 = {k: v for k, v in other.state_dict().items()}
    assert trainers.max_rel(got, trainers.ema64(accel.states, BETA)) < 1e-6
    assert trainers.max_rel(got_1, trainers.ema64(accel.extra["model_1"], BETA)) < 1e-6
    assert model(torch.zeros(2, 4)).shape == (2, 2)


def test_accelerate_choose_one_model(accel, tmp_path):
    out = tmp_path / "m1.safetensors"
    cli("merge", accel.root, "--component", "model_1", "--format", "safetensors", "--decay", BETA, "-o", out, "-q")
    assert trainers.max_rel(load_file(out), trainers.ema64(accel.extra["model_1"], BETA)) < 1e-6
    # the files one by one take their folder's step (not the '1' of model_1, not the save index)
    files = sorted((accel.root / "checkpoints").glob("checkpoint_*/model_1.safetensors"))
    plan = json.loads(cli("plan", *files, "--decay", BETA, "--json").stdout)
    assert sorted(c["step"] for c in plan["checkpoints"]) == accel.steps


def test_accelerate_without_a_step_record_is_refused(tmp_path):
    # SGD without momentum keeps no per-parameter 'step', and there is no scheduler: nothing says the step
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    model = trainers.Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    config = ProjectConfiguration(project_dir=str(tmp_path / "p"), automatic_checkpoint_naming=True)
    accelerator = Accelerator(project_config=config, cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = trainers.batches(9)
    for step in range(1, 7):
        x, y = next(data)
        optimizer.zero_grad()
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
        optimizer.step()
        if step % 3 == 0:
            accelerator.save_state()
    refused = cli("plan", tmp_path / "p", "--decay", BETA, expect=1)
    assert "save" in refused.output and "--every" in refused.output and "--steps" in refused.output, refused.output
    cli("plan", tmp_path / "p", "--every", 3, "--decay", BETA)


def test_inspect_takes_the_options_plan_takes(loop, tmp_path):
    base = tmp_path / "base.pt"
    torch.save({"model": loop.init}, base)
    report = inspect_json(loop.root, "--every", 10, "--init", base, "--decay", BETA, "--at", 40, "--interp", "hold")
    assert [c["step"] for c in report["checkpoints"]] == [0, 10, 20, 30, 40], report["checkpoints"]
    assert report["checkpoints"][0]["source"] == "--init"
    assert all(c["source"] == "--every 10" for c in report["checkpoints"][1:]), report["checkpoints"]
    report = inspect_json(loop.root, "--steps", "1,2,3,4", "--key", "model", "--per-checkpoint")
    assert [c["step"] for c in report["checkpoints"]] == [1, 2, 3, 4]
    assert all(c["source"] == "--steps" for c in report["checkpoints"])


def test_merge_says_where_the_steps_came_from(loop, accel, tmp_path):
    said = cli("merge", loop.root, "--decay", BETA, "-o", tmp_path / "a.safetensors").stderr
    assert "steps 10 to 40 (4 inputs) from 'step' in the file" in said, said
    said = cli("merge", accel.root, "--decay", BETA, "-o", tmp_path / "b").stderr
    assert "steps 5 to 30 (6 inputs) from accelerate optimizer.bin 'step'" in said, said
    said = cli("merge", loop.root, "--every", 10, "--decay", BETA, "-o", tmp_path / "c.safetensors").stderr
    assert "from --every 10" in said, said


def test_loop_with_hyphen_names_the_epoch_in_the_name_is_not_a_step(loop, tmp_path):
    # checkpoint-{epoch}.pt looks like the Trainer's checkpoint-{step}; the file's own epoch says what it is
    folder = tmp_path / "hyphen"
    folder.mkdir()
    for epoch, step in enumerate(loop.steps):
        torch.save({"model": loop.states[step], "step": step, "epoch": epoch}, folder / f"checkpoint-{epoch}.pt")
    plan = json.loads(cli("plan", folder, "--decay", BETA, "--json").stdout)
    assert [c["step"] for c in plan["checkpoints"]] == loop.steps
    assert all(c["step_source"] == "'step' in the file" for c in plan["checkpoints"])
