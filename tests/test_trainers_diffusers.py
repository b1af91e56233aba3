"""diffusers training scripts' saving: accelerate ``save_state`` into ``checkpoint-{global_step}/`` with the
scripts' ``save_model_hook`` (``unet/`` + ``unet_ema/`` for a full fine-tune; ``pytorch_lora_weights.safetensors``
for LoRA), and the final pipeline or LoRA file saved beside the checkpoint folders."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckpt_ema.cli import main

from . import trainers

diffusers = pytest.importorskip("diffusers")

BETA = 0.9


def cli(*args: object, expect: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> trainers.Series:
    return trainers.diffusers_unconditional(tmp_path_factory.mktemp("unet"))


def test_unet_run_merges_to_a_loadable_unet(full, tmp_path):
    report = json.loads(cli("inspect", full.root, "--json").stdout)
    assert [c["step"] for c in report["checkpoints"]] == full.steps == [8, 16, 24]
    out = tmp_path / "ema"
    cli("merge", full.root, "--decay", BETA, "-o", out, "-q")
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet")
    got = {f"unet/{k}": v for k, v in unet.state_dict().items()}
    assert trainers.max_rel(got, trainers.ema64(full.states, BETA)) < 1e-6
    sample = unet(torch.zeros(1, 1, 8, 8), torch.tensor([3])).sample
    assert sample.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("init", ["base", "base/unet"])
def test_init_with_the_base_pipeline_or_its_unet(full, init, tmp_path):
    base = full.root.parent / init
    out = tmp_path / "ema"
    cli("merge", full.root, "--init", base, "--decay", BETA, "-o", out, "-q")
    got = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    expected = trainers.ema64({0: full.init, **full.states}, BETA)
    assert trainers.max_rel(got, expected, strip="unet/") < 1e-6


@pytest.mark.slow  # the text-to-image LoRA run (UNet2DConditionModel, StableDiffusionPipeline's imports): ~25 s
def test_lora_run_folder_and_files(tmp_path_factory, tmp_path):
    series = trainers.diffusers_lora(tmp_path_factory.mktemp("lora"))
    assert (series.root / "pytorch_lora_weights.safetensors").is_file()  # the final LoRA beside checkpoint-N/
    report = json.loads(cli("inspect", series.root, "--json").stdout)
    assert [c["step"] for c in report["checkpoints"]] == series.steps == [8, 16, 24]
    files = sorted(series.root.glob("checkpoint-*/pytorch_lora_weights.safetensors"))
    plan = json.loads(cli("plan", *files, "--decay", BETA, "--json").stdout)
    assert [c["step"] for c in plan["checkpoints"]] == series.steps
    out = tmp_path / "ema.safetensors"
    cli("merge", *files, "--decay", BETA, "-o", out, "-q")
    tensors = load_file(out)
    assert trainers.max_rel(tensors, trainers.ema64(series.states, BETA)) < 1e-6
    unet = trainers.tiny_cond_unet()
    unet.load_lora_adapter(str(out), prefix="unet", adapter_name="ema")
    sample = unet(torch.zeros(1, 1, 8, 8), torch.tensor([3]), encoder_hidden_states=torch.zeros(1, 3, 8)).sample
    assert sample.shape == (1, 1, 8, 8)
