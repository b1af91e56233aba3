"""PyTorch pickles, loaded only with ``torch.load(weights_only=True, mmap=True)``: Lightning ``.ckpt``
dicts, nested state dicts (``--key``), DDP and torch.compile prefixes, and files that would run code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_ema import io as readers

from .reference import assert_close, ema_reference, run

BETA = 0.97
STEPS = [50, 100, 150]


def _state(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return {
        "net.encoder.weight": torch.randn(8, 4, generator=generator),
        "net.encoder.bias": torch.randn(8, generator=generator),
        "net.norm.running_mean": torch.randn(8, generator=generator),
        "net.norm.num_batches_tracked": torch.tensor(step),
    }


def _lightning(path: Path, step: int, epoch: int, state: dict, global_step: int | None = None) -> None:
    """The dict Lightning's dump_checkpoint saves (Lightning itself is not installed)."""
    torch.save(
        {
            "epoch": epoch,
            "global_step": step if global_step is None else global_step,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": state,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": epoch}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(8, 4)}}, "param_groups": [{"lr": 1e-3}]}],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": {"lr": 1e-3, "hidden": 8},
        },
        path,
    )


def test_lightning_checkpoints(tmp_path):
    root = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    root.mkdir(parents=True)
    states = [_state(s) for s in STEPS]
    for i, (step, state) in enumerate(zip(STEPS, states)):
        _lightning(root / f"epoch={i}-step={step}.ckpt", step, i, state)
    inspect = run("inspect", root).stdout
    assert "Lightning checkpoint 2.4.0, key 'state_dict'" in inspect
    assert "step        100  from Lightning 'global_step'" in inspect
    out = tmp_path / "ema.safetensors"
    run("merge", root, "--decay", BETA, "-o", out, "-q")
    merged = load_file(out)
    expected = ema_reference(STEPS, states, BETA)
    assert set(merged) == set(states[-1])
    for name, tensor in merged.items():
        if tensor.is_floating_point():
            assert_close(tensor, expected[name])
        else:
            assert int(tensor) == 150  # integer buffers come from the newest checkpoint
    assert "format folder" not in out.name


def test_lightning_global_step_disagreeing_with_the_name(tmp_path):
    _lightning(tmp_path / "epoch=0-step=100.ckpt", 100, 0, _state(1), global_step=200)
    _lightning(tmp_path / "epoch=1-step=300.ckpt", 300, 1, _state(2))
    err = run("plan", tmp_path, "--decay", 0.9, expect=1).stderr
    assert "Lightning 'global_step' says step 200 but the name 'step=100' says 100" in err


class _Payload:
    """Unpickling this creates the marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "run").mkdir()
    for step in (100, 200):
        torch.save({"state_dict": _state(step), "extra": _Payload(str(marker))}, tmp_path / "run" / f"step-{step}.pt")
    for command in (
        ["merge", tmp_path / "run", "--decay", 0.9, "-o", tmp_path / "o.safetensors"],
        ["inspect", tmp_path / "run"],
    ):
        result = run(*command, expect=1)
        err = result.stdout + result.stderr
        assert "refused: loading it would run code from the file (it needs posix.system)" in err
        assert "convert it once" in err
    assert not marker.exists()
    assert not (tmp_path / "o.safetensors").exists()


def test_nested_state_dicts_and_key_choice(tmp_path):
    """timm's CheckpointSaver: state_dict (raw) and state_dict_ema; the raw one is taken unless --key."""
    states, emas = [_state(s) for s in STEPS], [_state(s + 1000) for s in STEPS]
    for step, state, ema in zip(STEPS, states, emas):
        torch.save({"epoch": step // 50, "arch": "mlp", "state_dict": state, "state_dict_ema": ema, "version": 2},
                   tmp_path / f"checkpoint-{step}.pth.tar")  # fmt: skip
    err = run("plan", tmp_path, "--decay", BETA, expect=1).stderr
    assert "timm's CheckpointSaver numbers its files by epoch (the file records epoch 1)" in err  # checkpoint-50
    source = readers.open_checkpoint(tmp_path / "checkpoint-50.pth.tar")
    assert source.notes[0] == "state dict under key 'state_dict'; also found 'state_dict_ema' (--key to choose)"
    assert "note        state dict under key 'state_dict'" in run("inspect", tmp_path, expect=1).stdout
    for key, series in ((None, states), ("state_dict_ema", emas)):
        out = tmp_path.parent / f"{tmp_path.name}-{key}.safetensors"
        key_option = ["--key", key] if key else []
        result = run("merge", tmp_path, "--decay", BETA, "-o", out, "-q", "--steps", "50,100,150", *key_option)
        warned = "3 torch file(s) hold several state dicts; took 'state_dict' (also found 'state_dict_ema'"
        assert (warned in result.stderr) == (key is None)
        expected = ema_reference(STEPS, series, BETA)
        merged = load_file(out)
        assert_close(merged["net.encoder.weight"], expected["net.encoder.weight"])
    assert "no key 'nope'" in run("inspect", tmp_path, "--key", "nope", expect=1).stdout


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped_when_only_some_have_them(tmp_path, prefix):
    states = [_state(s) for s in STEPS]
    for i, (step, state) in enumerate(zip(STEPS, states)):
        saved = {(prefix + k if i == 1 else k): v for k, v in state.items()}
        torch.save(saved, tmp_path / f"step_{step}.pt")
    out = tmp_path / "ema.safetensors"
    run("merge", tmp_path, "--decay", BETA, "-o", out, "-q")
    merged = load_file(out)
    assert set(merged) == set(states[0])
    expected = ema_reference(STEPS, states, BETA)
    assert_close(merged["net.encoder.bias"], expected["net.encoder.bias"])


def test_a_prefix_all_checkpoints_share_is_kept(tmp_path):
    for step in STEPS:
        torch.save({"module." + k: v for k, v in _state(step).items()}, tmp_path / f"step_{step}.pt")
    out = tmp_path / "ema.safetensors"
    run("merge", tmp_path, "--decay", BETA, "-o", out, "-q")
    assert all(name.startswith("module.") for name in load_file(out))


def test_folders_and_files_cannot_be_mixed(tmp_path):
    save_file(_state(1), tmp_path / "step-100.safetensors")
    folder = tmp_path / "checkpoint-200"
    folder.mkdir()
    save_file(_state(2), folder / "model.safetensors")
    err = run("plan", tmp_path / "step-100.safetensors", folder, "--decay", 0.9, expect=1).stderr
    assert "a series cannot mix them" in err
    err = run("plan", tmp_path, "--decay", 0.9, expect=1).stderr
    assert "holds both checkpoint files" in err


def test_hf_pytorch_model_bin_folders_are_written_as_safetensors(tmp_path):
    states = [_state(s) for s in STEPS]
    for step, state in zip(STEPS, states):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        names = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[:2], "pytorch_model-00002-of-00002.bin": names[2:]}
        for shard, keys in shards.items():
            torch.save({k: state[k] for k in keys}, folder / shard)
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
        )
        (folder / "config.json").write_text("{}")
    out = tmp_path / "ema"
    run("merge", tmp_path / "run", "--decay", BETA, "-o", out, "-q")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    ]  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["net.norm.running_mean"] == "model-00002-of-00002.safetensors"
    expected = ema_reference(STEPS, states, BETA)
    merged = {
        **load_file(out / "model-00001-of-00002.safetensors"),
        **load_file(out / "model-00002-of-00002.safetensors"),
    }
    assert_close(merged["net.encoder.weight"], expected["net.encoder.weight"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())


def test_legacy_torch_files_are_refused_with_a_way_out(tmp_path):
    for step in (100, 200):
        torch.save(_state(step), tmp_path / f"step-{step}.pt", _use_new_zipfile_serialization=False)
    result = run("merge", tmp_path, "--decay", 0.9, "-o", tmp_path / "out.safetensors", expect=1)
    assert "legacy (pre-1.6) format, which ckpt-ema does not load" in result.stderr
    assert "torch.load(PATH, weights_only=True)" in result.stderr  # the safe way to convert it
    assert not (tmp_path / "out.safetensors").exists()
