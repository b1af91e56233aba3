"""Megatron-LM / NeMo ``torch_dist`` checkpoints, written and loaded back by Megatron-core itself (CPU, gloo).

``tests/megatron_training.py`` trains a tiny ``GPTModel`` and saves ``iter_000000N/`` with
``dist_checkpointing.save`` (``.metadata``, ``*.distcp``, ``common.pt``, ``metadata.json``, and the
layers' ``_extra_state`` objects), with the outer ``latest_checkpointed_iteration.txt``. The merge's DCP
output is loaded with ``dist_checkpointing.load`` into a fresh model, whose weights are compared with a
float64 per-step EMA of the full weights saved during training; the model then runs a forward pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_ema.output.dcp import TRACKER_NAME, update_tracker
from tests.reference import assert_close, ema_reference, run, run_one_rank

STEPS = (2, 4, 6)


def _megatron(*args: object) -> None:
    run_one_rank("tests.megatron_training", *args)


def test_tracker_follows_megatron_and_never_goes_back(tmp_path: Path) -> None:
    tracker = tmp_path / TRACKER_NAME
    assert update_tracker(tracker, tmp_path / "iter_0000300")
    assert tracker.read_text() == "300"
    assert not update_tracker(tracker, tmp_path / "iter_0000200")  # a later iteration stays the one loaded
    assert tracker.read_text() == "300"
    assert update_tracker(tracker, tmp_path / "iter_0000400") and tracker.read_text() == "400"
    assert not update_tracker(tmp_path / "other" / TRACKER_NAME, tmp_path / "ema")  # not an iteration's name


@pytest.mark.slow
def test_megatron_series_merges_into_a_checkpoint_megatron_loads(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    series = tmp_path / "run"
    _megatron(series, "--steps", 6, "--every", 2)
    result = run("inspect", series)
    assert "Megatron-core dist_checkpointing (torch_dist)" in result.stdout
    assert "series: ok: 3 checkpoints, steps 2 to 6" in result.stdout
    out = tmp_path / "ema" / "iter_0000006"
    run("merge", series, "--decay", "0.8", "-o", out)
    newest = series / "iter_0000006"
    for name in ("common.pt", "metadata.json"):  # copied byte for byte from the newest
        assert (out / name).read_bytes() == (newest / name).read_bytes()
    assert (tmp_path / "ema" / TRACKER_NAME).read_text() == "6"  # Megatron-LM's --load ema/ finds it
    loaded = tmp_path / "loaded.safetensors"
    _megatron(loaded, "--load", out)  # Megatron-core's own dist_checkpointing.load, then a forward pass
    weights = load_file(loaded)
    truth = [load_file(series / "truth" / f"iter_{s}.safetensors") for s in STEPS]
    reference = ema_reference(STEPS, truth, 0.8)
    assert set(reference) <= set(weights)
    for name, expected in reference.items():
        assert_close(weights[name], expected)
    assert int(weights["iteration"]) == 6  # common.pt's iteration, read by Megatron
    assert bool(torch.isfinite(weights["logits"]).all())


def test_extra_state_objects_and_megatron_files_reach_the_dcp_output(tmp_path: Path) -> None:
    """Without Megatron: ``dcp.save`` of a torch_dist-like folder, the output read back with ``dcp.load``."""
    import io
    import json
    import warnings

    import torch.distributed.checkpoint as dcp

    series = tmp_path / "run"
    for step in (100, 200):
        folder = series / f"iter_{step:07d}"
        state = {f"decoder.layers.{i}.weight": torch.full((4, 2), float(i + step)) for i in range(2)}
        extras = {f"decoder.layers.{i}._extra_state": io.BytesIO(b"fp8 meta %d" % step) for i in range(2)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({**state, **extras, "optimizer": {"m": torch.ones(3)}}, checkpoint_id=str(folder))
        (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
        (folder / "common.pt").write_bytes(b"never unpickled %d" % step)
    (series / "iter_0000200" / "config.json").write_text("{}")  # not Megatron's: not in a DCP output
    out = tmp_path / "ema" / "iter_0000200"
    run("merge", series, "--decay", "0.99", "-o", out, "--no-estimate")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".metadata", "__0_0.distcp", "ckpt_ema.json", "common.pt", "metadata.json"]
    )
    assert (out / "common.pt").read_bytes() == b"never unpickled 200"
    assert (tmp_path / "ema" / TRACKER_NAME).read_text() == "200"
    loaded = {f"decoder.layers.{i}.weight": torch.zeros(4, 2) for i in range(2)}
    loaded.update({f"decoder.layers.{i}._extra_state": io.BytesIO() for i in range(2)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, checkpoint_id=str(out))
    for i in range(2):
        assert loaded[f"decoder.layers.{i}._extra_state"].getvalue() == b"fp8 meta 200"  # the newest's bytes
        a, b = float(i + 100), float(i + 200)  # the per-step EMA of a linear path from a to b over 100 steps
        ema = a
        for k in range(1, 101):
            ema = 0.99 * ema + 0.01 * (a + (b - a) * k / 100)
        assert_close(loaded[f"decoder.layers.{i}.weight"], torch.full((4, 2), ema, dtype=torch.float64).numpy())


def test_a_link_out_of_the_checkpoint_is_never_copied(tmp_path: Path) -> None:
    import json
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "run" / "iter_0000010"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3)}, checkpoint_id=str(folder))
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    secret = tmp_path / "secret.pt"
    secret.write_bytes(b"private")
    (folder / "common.pt").symlink_to(secret)
    result = run("merge", folder, "--decay", "0.9", "-o", tmp_path / "ema", "--steps", "10", expect=1)
    assert "outside the checkpoint" in result.output and "common.pt" in result.output
    assert not (tmp_path / "ema").exists()
