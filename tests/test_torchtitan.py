"""torchtitan's own checkpoint code writes the series and loads the EMA (``tests/titan_training.py``, CPU, gloo).

``make install`` installs torchtitan with ``--no-deps`` plus the three packages its checkpoint code imports
(see the Makefile: its training-only dependencies made pip's resolver backtrack for over 16 minutes); the test
is skipped where torchtitan is not installed. torchtitan 0.3.0 was used.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.reference import assert_close, ema_reference, run, run_one_rank

STEPS = (2, 4, 6)


def _titan(*args: object) -> None:
    run_one_rank("tests.titan_training", *args)


@pytest.mark.slow
def test_torchtitan_checkpoints_merge_and_load_with_its_model_only_path(tmp_path: Path) -> None:
    pytest.importorskip("torchtitan.components.checkpoint")
    _titan(tmp_path / "run", "--steps", 6, "--every", 2)
    series = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in series.iterdir()) == [f"step-{s}" for s in STEPS]
    result = run("inspect", series)
    assert "step        6  from DCP 'train_state.step'" in result.stdout
    assert "optimizer.*: optimizer state" in result.stdout
    run("merge", series, "--decay", "0.8", "-o", tmp_path / "ema")
    _titan(tmp_path / "loaded.safetensors", "--load", tmp_path / "ema")  # initial_load_path, model only
    loaded = load_file(tmp_path / "loaded.safetensors")
    truth = [load_file(tmp_path / "run" / "truth" / f"step-{s}.safetensors") for s in STEPS]
    reference = ema_reference(STEPS, truth, 0.8)
    for name, expected in reference.items():
        assert_close(loaded[name], expected)
    assert bool(torch.isfinite(loaded["output"]).all())
