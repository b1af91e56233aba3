"""transformers ``Trainer`` output_dir: ``checkpoint-N/`` folders, then ``trainer.save_model()`` beside them.

The run trains a BF16 GPT-2 (the model itself in BF16, as a user who loads ``dtype=torch.bfloat16`` has it),
so the checkpoints' ``config.json`` says ``"dtype": "bfloat16"``: an FP32 EMA must say FP32 there too, or
``from_pretrained`` loads it back as BF16 and the FP32 result is lost without a word.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckpt_ema.cli import main

from . import trainers

transformers = pytest.importorskip("transformers")

BETA = 0.95


def cli(*args: object, expect: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> trainers.Series:
    return trainers.hf_trainer(tmp_path_factory.mktemp("hf") / "output", dtype=torch.bfloat16)


def test_output_dir_after_save_model_is_a_series(run):
    root = run.root
    assert (root / "training_args.bin").is_file() and (root / "model.safetensors").is_file()  # what save_model left
    report = json.loads(cli("inspect", root, "--json").stdout)
    assert [c["step"] for c in report["checkpoints"]] == run.steps == [10, 20, 30, 40]
    assert all(c["source"] == "trainer_state.json 'global_step'" for c in report["checkpoints"])
    skipped = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert "model.safetensors" in skipped and "training_args.bin" in skipped, skipped
    assert report["series"]["ok"], report["series"]


def test_fp32_ema_of_bf16_checkpoints_loads_as_fp32(run, tmp_path):
    out = tmp_path / "ema"
    cli("merge", run.root, "--decay", BETA, "--dtype", "fp32", "-o", out, "-q")
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32", config
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float32
    expected = trainers.ema64(run.states, BETA)
    got = model.state_dict()
    assert (
        trainers.max_rel({k: got[k] for k in expected if k in got}, {k: v for k, v in expected.items() if k in got})
        < 1e-6
    )
    logits = model(torch.arange(8).unsqueeze(0)).logits
    assert logits.shape == (1, 8, 32) and torch.isfinite(logits).all()


def test_same_dtype_output_keeps_the_config(run, tmp_path):
    out = tmp_path / "ema"
    cli("merge", run.root, "--decay", BETA, "-o", out, "-q")
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    tensors = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    expected = trainers.ema64(run.states, BETA)
    assert trainers.max_rel({k: tensors[k] for k in tensors}, {k: expected[k] for k in tensors}) < 1e-2  # BF16 rounding


def test_final_model_files_passed_one_by_one(run):
    # checkpoint-*/model.safetensors: each takes its folder's step (trainer_state.json / checkpoint-N)
    files = sorted(run.root.glob("checkpoint-*/model.safetensors"))
    plan = json.loads(cli("plan", *files, "--decay", BETA, "--json").stdout)
    assert [c["step"] for c in plan["checkpoints"]] == run.steps
    assert all("checkpoint-" in c["step_source"] or "trainer_state" in c["step_source"] for c in plan["checkpoints"])
