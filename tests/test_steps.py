"""Step detection from names and trainer metadata (spec §1)."""

from __future__ import annotations

import pytest

from ckpt_ema.errors import StepError
from ckpt_ema.series.steps import detect_step, step_from_name


@pytest.mark.parametrize(
    ("stem", "step", "ambiguous"),
    [
        ("step-001000", 1000, False),
        ("step=1000", 1000, False),
        ("epoch=3-step=1000", 1000, False),
        ("checkpoint-1000", 1000, False),
        ("sdxl-lora-step00001000", 1000, False),
        ("global_step1000", 1000, False),
        ("iter_1000", 1000, False),
        ("model-backup-1200-3-40", 1200, False),
        ("2024-05-01_12-00-00-save-1200-3-40", 1200, False),
        ("ema_0.999-step_500", 500, False),
        ("model-000100", 100, True),
    ],
)
def test_step_from_name(stem, step, ambiguous):
    found = step_from_name(stem)
    assert found is not None
    assert (found[0], found[2]) == (step, ambiguous)


@pytest.mark.parametrize("stem", ["model-epoch-3", "model-epoch=3", "final", "model"])
def test_epochs_and_unnumbered_names_give_no_step(stem):
    assert step_from_name(stem) is None


def test_two_labelled_steps_in_one_name_is_an_error():
    with pytest.raises(StepError, match="several different steps"):
        step_from_name("step-100-checkpoint-200")


def test_trainer_record_wins_over_a_bare_number():
    info = detect_step("a.safetensors", "lora-000005", {"ss_steps": "250"})
    assert (info.step, info.source, info.ambiguous) == (250, "metadata 'ss_steps'", False)


def test_record_and_labelled_name_that_disagree_is_an_error_naming_both():
    with pytest.raises(StepError) as excinfo:
        detect_step("runs/step-000100.safetensors", "step-000100", {"global_step": "200"})
    message = str(excinfo.value)
    assert "runs/step-000100.safetensors" in message and "200" in message and "100" in message
    assert "--steps" in message


def test_no_step_found_says_how_to_supply_it():
    with pytest.raises(StepError, match="--steps.*--per-checkpoint"):
        detect_step("final.safetensors", "final", {})


def test_decimals_are_not_a_bare_step_and_snapshot_names_get_a_hint():
    assert step_from_name("ema-0001000-0.050") is None
    with pytest.raises(StepError, match="--tracked-sigma-rel"):
        detect_step("ema-0001000-0.050.safetensors", "ema-0001000-0.050", {})


def test_disagreement_names_both_ways_out():
    with pytest.raises(StepError, match="--steps.*--per-checkpoint"):
        detect_step("step-000100.safetensors", "step-000100", {"global_step": "200"})
