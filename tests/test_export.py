"""Hugging Face sharded exports of DCP and DeepSpeed checkpoints (``--format safetensors``, ``--max-shard-size``).

The series are real training runs: ``tests/dcp_training.py`` (one process, and FSDP2 on 2 gloo ranks), a
tiny GPT-2 from ``transformers`` saved with ``dcp.save`` beside its ``config.json``, and DeepSpeed ZeRO-3
(``tests/deepspeed_training.py``). Every exported tensor is compared with a float64 per-step EMA of the
full weights (``tests/reference.ema_reference``; for DeepSpeed the full weights are ``zero_to_fp32``'s);
the shards are read back with ``safetensors.torch.load_file`` one by one, checked against the index, and
loaded into the model (GPT-2: ``from_pretrained``) for a forward pass.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file

from ckpt_ema.errors import OutputError
from ckpt_ema.output.shards import parse_size, shard_names, split_shards
from ckpt_ema.plan.model import TensorPlan
from tests.dcp_training import make_model, train
from tests.reference import assert_close, ema_reference, run

STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, torchtitan's flat layout (model keys beside optimizer.*, lr_scheduler.*, ...)."""
    out = tmp_path_factory.mktemp("dcp") / "checkpoint"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process": as intended
        assert train(out, 30, 10, layout="flat") == list(STEPS)
    return out


def _truth(run_dir: Path, steps: tuple[int, ...] = STEPS) -> list[dict[str, torch.Tensor]]:
    return [load_file(run_dir / "truth" / f"step-{s}.safetensors") for s in steps]


def read_export(folder: Path, limit: int) -> dict[str, torch.Tensor]:
    """Every shard loaded on its own with safetensors; checks the index against the shards and the limit."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    count = len(files)
    assert files == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    assert sorted(p.name for p in folder.glob("*.safetensors")) == files
    merged: dict[str, torch.Tensor] = {}
    for name in files:
        shard = load_file(folder / name)
        data = sum(t.numel() * t.element_size() for t in shard.values())
        assert data <= limit or len(shard) == 1, (name, data)  # only a tensor larger than the limit goes over
        assert {k for k, v in index["weight_map"].items() if v == name} == set(shard)
        merged.update(shard)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    return merged


# --- the shard rule, against a hand-written expectation ----------------------------------------------------


def test_sizes_and_the_shard_rule() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("100KB") == 100_000
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size(4096) == 4096
    for bad in ("", "5 parsecs", "-1GB", "0"):
        with pytest.raises(OutputError, match="--max-shard-size"):
            parse_size(bad)
    tensors = [TensorPlan(n, (k,), True, "F32") for n, k in (("a", 10), ("b", 20), ("c", 100), ("d", 5), ("e", 20))]
    # bytes 40, 80, 400, 20, 80 with a 128-byte limit: a+b (120); c alone (400 > 128); d+e (100)
    assert [[t.name for t in s] for s in split_shards(tensors, 128)] == [["a", "b"], ["c"], ["d", "e"]]
    assert [[t.name for t in s] for s in split_shards(tensors, 10**6)] == [["a", "b", "c", "d", "e"]]
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3)[1] == "model-00002-of-00003.safetensors"


# --- DCP ---------------------------------------------------------------------------------------------------


def test_dcp_export_is_a_sharded_hugging_face_folder_equal_to_float64(dcp_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema"
    run("merge", dcp_run, "--decay", "0.9", "--format", "safetensors", "--max-shard-size", "1KB", "-o", out)
    exported = read_export(out, 1000)
    assert len({*json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()}) > 2
    reference = ema_reference(STEPS, _truth(dcp_run), 0.9)
    assert set(exported) == set(reference)
    for name, expected in reference.items():
        assert_close(exported[name], expected)
    model = make_model(seed=5)
    model.load_state_dict(exported)  # every weight of the model, under its own names
    assert model(torch.randn(4, 8)).shape == (4, 3)
    for shard in out.glob("*.safetensors"):  # each shard carries the provenance
        with safe_open(shard, "pt") as f:
            assert f.metadata()["format"] == "pt" and f.metadata()["ckpt_ema.target"] == "decay-0.9"


def test_one_shard_is_model_safetensors_and_a_file_name_is_one_file(dcp_run: Path, tmp_path: Path) -> None:
    run("merge", dcp_run, "--decay", "0.9", "--format", "safetensors", "-o", tmp_path / "ema")
    assert sorted(p.name for p in (tmp_path / "ema").iterdir()) == ["model.safetensors"]  # 3.7 kB < 5GB
    run("merge", dcp_run, "--decay", "0.9", "--format", "safetensors", "-o", tmp_path / "ema.safetensors")
    whole, single = load_file(tmp_path / "ema.safetensors"), load_file(tmp_path / "ema" / "model.safetensors")
    assert set(whole) == set(single) and all(torch.equal(whole[n], single[n]) for n in whole)
    result = run("merge", dcp_run, "--decay", "0.9", "--max-shard-size", "1KB", "-o", tmp_path / "x.safetensors",
                 "--format", "safetensors", expect=1)  # fmt: skip
    assert "--max-shard-size: applies to the Hugging Face folders" in result.output
    result = run("merge", dcp_run, "--decay", "0.9", "--format", "folder", "-o", tmp_path / "y.safetensors", expect=1)
    assert "--format folder writes a Hugging Face folder; give a folder name" in result.output


def test_several_targets_each_get_a_sharded_folder(dcp_run: Path, tmp_path: Path) -> None:
    run("merge", dcp_run, "--decay", "0.9", "--decay", "0.8", "--format", "safetensors", "--max-shard-size", "2KB",
        "-o", tmp_path / "out")  # fmt: skip
    truth = _truth(dcp_run)
    for decay in (0.9, 0.8):
        exported = read_export(tmp_path / "out" / f"decay-{decay}", 2000)
        for name, expected in ema_reference(STEPS, truth, decay).items():
            assert_close(exported[name], expected)


@pytest.mark.slow
def test_fsdp2_series_streams_its_chunks_into_the_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each dim-0 chunk of each rank goes straight into its tensor's slot: no tensor is ever assembled."""
    from ckpt_ema.io import dcp as dcp_reader
    from tests.test_dcp import _torchrun

    run_dir = tmp_path / "checkpoint"
    _torchrun("-m", "tests.dcp_training", run_dir, "--steps", 30, "--every", 10, "--layout", "flat")
    assembled = dcp_reader.DcpReader._flat_torch

    def no_assembly(self: dcp_reader.DcpReader, name: str) -> torch.Tensor:
        assert len(self.tensors[name].chunks) == 1, f"{name} was assembled"
        return assembled(self, name)

    monkeypatch.setattr(dcp_reader.DcpReader, "_flat_torch", no_assembly)
    out = tmp_path / "ema"
    run("merge", run_dir, "--decay", "0.95", "--format", "safetensors", "--max-shard-size", "1500B", "-o", out)
    exported = read_export(out, 1500)
    for name, expected in ema_reference(STEPS, _truth(run_dir), 0.95).items():
        assert_close(exported[name], expected)


def _train_gpt2(out: Path, steps: tuple[int, ...]) -> list[dict[str, torch.Tensor]]:
    """A tiny GPT-2 trained with AdamW, ``dcp.save``d at ``steps`` with its config; returns the full weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=16)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(7)
    truth = []
    for step in range(1, steps[-1] + 1):
        ids = torch.randint(0, 97, (4, 16), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in steps:
            folder = out / f"step-{step}"
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "train_state": {"step": step}}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save(state, checkpoint_id=str(folder))
            config.save_pretrained(folder)  # config.json beside the DCP files
            truth.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return truth


@pytest.mark.slow
def test_gpt2_saved_with_dcp_exports_a_folder_from_pretrained_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    steps = (2, 4, 6)
    truth = _train_gpt2(tmp_path / "run", steps)
    out = tmp_path / "ema"
    result = run("inspect", tmp_path / "run")
    assert "copied      config.json" in result.stdout
    run("merge", tmp_path / "run", "--decay", "0.7", "--format", "safetensors", "--max-shard-size", "40KB", "-o", out)
    assert (out / "config.json").is_file()
    exported = read_export(out, 40_000)
    reference = ema_reference(steps, truth, 0.7)
    assert set(exported) == set(reference)
    for name, expected in reference.items():
        assert_close(exported[name], expected)
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = model.state_dict()
    for name, expected in reference.items():
        assert_close(loaded[name], expected)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 16, 97) and bool(torch.isfinite(logits).all())


# --- DeepSpeed ZeRO-3 ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deepspeed_zero3_series_exports_a_sharded_folder(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from tests.deepspeed_training import make_model as deepspeed_model
    from tests.test_deepspeed import STEPS as DS_STEPS
    from tests.test_deepspeed import _reference, _train

    series = _train(tmp_path / "zero3", 3, 1)
    out = tmp_path / "ema"
    run("merge", series, "--decay", "0.8", "--max-shard-size", "1KB", "-o", out)  # the default format for DeepSpeed
    exported = read_export(out, 1000)
    reference = ema_reference(DS_STEPS, [_reference(series, s) for s in DS_STEPS], 0.8)
    assert set(exported) == set(reference)
    for name, expected in reference.items():
        assert exported[name].dtype == torch.float32  # the FP32 master weights
        assert_close(exported[name], expected)
    model = deepspeed_model(seed=9)
    model.load_state_dict(exported)
    assert model(torch.randn(4, 8)).shape == (4, 3)
    assert math.isfinite(float(model(torch.randn(4, 8)).detach().sum()))
