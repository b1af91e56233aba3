"""PEFT LoRA through transformers ``Trainer``: ``checkpoint-N/adapter_model.safetensors`` folders and the final
adapter beside them; the EMA is an adapter folder that ``PeftModel.from_pretrained`` loads."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ckpt_ema.cli import main

from . import trainers

peft = pytest.importorskip("peft")

BETA = 0.9


def cli(*args: object, expect: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> trainers.Series:
    return trainers.hf_trainer(tmp_path_factory.mktemp("peft") / "output", peft=True)


def test_peft_run_folder_merges_to_a_loadable_adapter(run, tmp_path):
    assert (run.root / "adapter_model.safetensors").is_file()  # the final adapter, beside checkpoint-N/
    report = json.loads(cli("inspect", run.root, "--json").stdout)
    assert [c["step"] for c in report["checkpoints"]] == run.steps == [10, 20, 30, 40]
    out = tmp_path / "ema"
    cli("merge", run.root, "--decay", BETA, "-o", out, "-q")
    assert (out / "adapter_config.json").is_file()
    base = trainers._gpt2(0)
    model = peft.PeftModel.from_pretrained(base, out)
    got = peft.get_peft_model_state_dict(model)
    expected = trainers.ema64(run.states, BETA)
    assert set(got) == set(expected)
    assert trainers.max_rel(got, expected) < 1e-6
    logits = model(input_ids=torch.arange(8).unsqueeze(0)).logits
    assert logits.shape == (1, 8, 32) and torch.isfinite(logits).all()


def test_adapter_files_one_by_one_take_the_folder_step(run):
    files = sorted(run.root.glob("checkpoint-*/adapter_model.safetensors"))
    plan = json.loads(cli("plan", *files, "--decay", BETA, "--json").stdout)
    assert [c["step"] for c in plan["checkpoints"]] == run.steps
