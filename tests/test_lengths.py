"""Lengths in steps, tokens or samples (``series/lengths.py``): parsing, conversion, the trainer's record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckpt_ema.errors import TargetError
from ckpt_ema.series.lengths import Length, StepSize, parse_length, step_size_from_record


@pytest.mark.parametrize(
    ("text", "amount", "unit", "label"),
    [
        ("500", 500, "steps", "500"),
        ("10k", 10_000, "steps", "10000"),
        ("2.5ksteps", 2_500, "steps", "2500"),
        ("2Btokens", 2e9, "tokens", "2Btokens"),
        ("2Gtok", 2e9, "tokens", "2Btokens"),
        ("50M tokens", 5e7, "tokens", "50Mtokens"),
        ("1.5Msamples", 1.5e6, "samples", "1.5Msamples"),
        ("8Mimg", 8e6, "samples", "8Msamples"),
        ("640samples", 640, "samples", "640samples"),
        ("1e3", 1000, "steps", "1000"),
    ],
)
def test_parse(text, amount, unit, label):
    length = parse_length("--window", text)
    assert (length.amount, length.unit, length.label) == (pytest.approx(amount, rel=1e-15), unit, label)


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "5mtok", "5 parsecs", "1.2.3", "inf", "nan"])
def test_bad_lengths(text):
    with pytest.raises(TargetError, match="--window"):
        parse_length("--window", text)


def test_conversion_to_steps():
    size = StepSize(tokens=4096.0, samples=8.0, source="test")
    assert parse_length("--window", "4.096Mtok").steps(size, "--window") == pytest.approx(1000)
    assert parse_length("--window", "4000samples").whole_steps(size, "--window") == 500
    assert parse_length("--window", "1000tok").whole_steps(size, "--window") == 1  # rounded, at least 1 step
    assert size.describe(1000) == "1000 steps = 4.1M tokens = 8k samples"
    with pytest.raises(TargetError, match="samples per optimizer step are unknown; pass --samples-per-step"):
        parse_length("--window", "5samples").steps(StepSize(tokens=1.0), "--window")
    with pytest.raises(TargetError, match="tokens per optimizer step are unknown"):
        parse_length("--at", "5Mtok").steps(None, "--at")
    with pytest.raises(TargetError, match="whole number of steps"):
        Length(2.5, "steps", "2.5").whole_steps(None, "--window")


@dataclass
class Ckpt:
    path: Path
    step: int


def test_step_size_from_the_trainers_record(tmp_path):
    # Hugging Face Trainer with include_num_input_tokens_seen: trainer_state.json in each checkpoint-N/ folder.
    folders = []
    for step in (100, 200):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        state = {"global_step": step, "num_input_tokens_seen": step * 2048 + (7 if step == 200 else 0)}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        folders.append(Ckpt(folder, step))
    size = step_size_from_record(folders, [{}, {}])
    assert size.tokens == (200 * 2048 + 7) / 200  # the newest checkpoint's record: the run's average
    assert size.samples is None and "checkpoint-200/trainer_state.json" in size.source
    # kohya: ss_total_batch_size (samples per step) in the safetensors metadata; the options come first.
    files = [Ckpt(tmp_path / "a.safetensors", 10)]
    size = step_size_from_record(files, [{"ss_total_batch_size": "16"}], tokens_per_step=512.0)
    assert (size.tokens, size.samples) == (512.0, 16.0)
    assert size.source == "--tokens-per-step; a.safetensors metadata 'ss_total_batch_size'"
    assert step_size_from_record(files, [{}]) is None


def test_per_step_counts():
    from ckpt_ema.series.lengths import check_per_step

    assert check_per_step("--tokens-per-step", "1M") == 1e6
    assert check_per_step("--tokens-per-step", 4096.0) == 4096.0
    assert check_per_step("--samples-per-step", None) is None
    for bad in ("1Mtok", "0", "x"):
        with pytest.raises(TargetError, match="--tokens-per-step"):
            check_per_step("--tokens-per-step", bad)
