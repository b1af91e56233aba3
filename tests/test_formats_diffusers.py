"""Component folders: diffusers training checkpoints (``unet/`` beside the trainer's ``unet_ema/``), full
pipelines (``model_index.json``, one folder per component) and OneTrainer backups (``meta.json``, LoRA
in ``lora/lora.safetensors``). diffusers and OneTrainer are too heavy to install here, so the layouts
are reproduced as their savers write them (file names, shard index, configs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .reference import assert_close, ema_reference, run

STEPS = [500, 1000, 1500]
BETA = 0.995


def _component(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """What ``ModelMixin.save_pretrained`` writes: config.json and diffusion_pytorch_model[-i-of-n].safetensors."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 8}))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def _weights(step: int, seed: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    return {n: torch.randn(6, 5, generator=generator).to(torch.bfloat16) for n in names}


UNET = ("conv_in.weight", "down.0.attn.to_q.weight", "down.0.attn.to_k.weight", "up.0.conv.weight", "conv_out.weight")
TEXT = ("text_model.embeddings.weight", "text_model.final_layer_norm.weight")


@pytest.fixture(scope="module")
def diffusers_run(tmp_path_factory):
    """train_text_to_image.py --use_ema: checkpoint-N/ with unet/ (sharded), unet_ema/, accelerate state."""
    root = tmp_path_factory.mktemp("diffusers") / "sd-model-finetuned"
    states = []
    for step in STEPS:
        folder = root / f"checkpoint-{step}"
        unet = _weights(step, 1, UNET)
        _component(folder / "unet", unet, shards=2)
        _component(folder / "unet_ema", _weights(step, 2, UNET))
        ema_config = json.loads((folder / "unet_ema" / "config.json").read_text())
        (folder / "unet_ema" / "config.json").write_text(json.dumps({**ema_config, "optimization_step": step}))
        text = _weights(step, 3, TEXT)
        (folder / "text_encoder").mkdir()
        save_file(text, folder / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
        (folder / "text_encoder" / "config.json").write_text("{}")
        (folder / "optimizer.bin").write_bytes(b"x")
        (folder / "scheduler.bin").write_bytes(b"x")
        (folder / "random_states_0.pkl").write_bytes(b"x")
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"step": step}))
        states.append(
            {**{f"unet/{k}": v for k, v in unet.items()}, **{f"text_encoder/{k}": v for k, v in text.items()}}
        )
    return root, states


def test_pipeline_folders_mirror_the_newest_and_average_the_raw_unet(diffusers_run, tmp_path):
    root, states = diffusers_run
    out = tmp_path / "ema"
    run("merge", root, "--decay", BETA, "-o", out, "-q")
    newest = root / "checkpoint-1500"
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "unet"]
    assert sorted(p.name for p in (out / "unet").iterdir()) == sorted(p.name for p in (newest / "unet").iterdir())
    assert (out / "scheduler" / "scheduler_config.json").read_text() == json.dumps({"step": 1500})
    expected = ema_reference(STEPS, states, BETA)
    index = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    unet = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(out / "unet" / shard)
        assert part.keys() == load_file(newest / "unet" / shard).keys()  # same tensors in each shard
        unet.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in unet.values())
    for name, tensor in unet.items():
        assert tensor.dtype == torch.bfloat16
        assert_close(tensor.float(), expected[f"unet/{name}"], rtol=8e-3)  # one rounding to BF16
    text = load_file(out / "text_encoder" / "model.safetensors")
    for name, tensor in text.items():
        assert_close(tensor.float(), expected[f"text_encoder/{name}"], rtol=8e-3)


def test_component_choice_copies_the_other_components(diffusers_run, tmp_path):
    root, states = diffusers_run
    out = tmp_path / "ema"
    run("merge", root, "--decay", BETA, "--component", "unet", "--dtype", "fp32", "-o", out, "-q")
    newest = root / "checkpoint-1500"
    copied = out / "text_encoder" / "model.safetensors"
    assert copied.read_bytes() == (newest / "text_encoder" / "model.safetensors").read_bytes()
    expected = ema_reference(STEPS, states, BETA)
    for shard in (out / "unet").glob("*.safetensors"):
        for name, tensor in load_file(shard).items():
            assert tensor.dtype == torch.float32
            assert_close(tensor, expected[f"unet/{name}"])
    single = tmp_path / "unet.safetensors"
    run("merge", root, "--decay", BETA, "--component", "unet", "--format", "safetensors", "-o", single, "-q")
    assert sorted(load_file(single)) == sorted(UNET)
    assert "choose one with --component" in run("merge", root, "--decay", BETA, "--format", "safetensors",
                                                 "-o", tmp_path / "x.safetensors", expect=1).stderr  # fmt: skip


def test_inspect_says_the_trainer_ema_is_ignored(diffusers_run):
    root, _ = diffusers_run
    out = run("inspect", root, "--component", "unet").stdout
    assert "ignored     unet_ema/: the trainer's own EMA of unet/; the raw unet/ is averaged" in out
    assert "ignored     optimizer.bin: optimizer state" in out
    assert "step        1000  from name 'checkpoint-1000'" in out
    assert "unet: 2 shards" in out
    plan = json.loads(run("plan", root, "--decay", BETA, "--json").stdout)
    ignored = plan["checkpoints"][-1]["ignored"]
    assert {"path": "unet_ema/", "reason": "the trainer's own EMA of unet/; the raw unet/ is averaged"} in ignored
    assert (
        plan["checkpoints"][-1]["format"] == "diffusers-style folder (text_encoder: model.safetensors; unet: 2 shards)"
    )


def _onetrainer_backup(root: Path, step: int, epoch: int, epoch_step: int, lora: dict, meta_step: int | None = None):
    folder = root / f"2024-05-01_10-{step // 60:02d}-{step % 60:02d}-backup-{step}-{epoch}-{epoch_step}"
    (folder / "lora").mkdir(parents=True)
    save_file(lora, folder / "lora" / "lora.safetensors", metadata={"modelspec.sai_model_spec": "1.0.0"})
    progress = {"epoch": epoch, "epoch_step": epoch_step, "epoch_sample": 0, "global_step": meta_step or step}
    (folder / "meta.json").write_text(json.dumps({"train_progress": progress, "last_action_epoch": {}}))
    (folder / "optimizer").mkdir()
    torch.save({"state": {}}, folder / "optimizer" / "optimizer.pt")
    (folder / "ema").mkdir()
    torch.save({"decay": 0.999, "ema_parameters": [torch.zeros(2)]}, folder / "ema" / "ema.pt")
    (folder / "onetrainer_config").mkdir()
    (folder / "onetrainer_config" / "args.json").write_text("{}")
    return folder


def _lora(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return {
        "lora_unet_down_0_attn_to_q.lora_down.weight": torch.randn(4, 16, generator=generator),
        "lora_unet_down_0_attn_to_q.lora_up.weight": torch.randn(16, 4, generator=generator),
        "lora_unet_down_0_attn_to_q.alpha": torch.tensor(4.0),
    }


def test_onetrainer_lora_backups(tmp_path):
    backups = tmp_path / "workspace" / "backup"
    steps = [200, 400, 600]
    loras = [_lora(s) for s in steps]
    for step, lora in zip(steps, loras):
        _onetrainer_backup(backups, step, step // 250, step % 250, lora)
    out = tmp_path / "ema"
    inspect = run("inspect", backups).stdout
    assert "OneTrainer backup (lora: lora.safetensors)" in inspect
    assert "step        400  from OneTrainer meta.json 'global_step'" in inspect
    assert "ignored     ema/: the trainer's own EMA" in inspect
    run("merge", backups, "--decay", 0.99, "-o", out, "-q")
    assert sorted(p.name for p in out.iterdir()) == ["lora"]  # meta.json, optimizer/, ema/ are not the model
    merged = load_file(out / "lora" / "lora.safetensors")
    expected = ema_reference(steps, loras, 0.99)
    for name, tensor in merged.items():
        if name.endswith(".alpha"):
            assert float(tensor) == 4.0
        else:
            assert_close(tensor, expected[name])


def test_onetrainer_meta_disagreeing_with_the_name(tmp_path):
    backups = tmp_path / "backup"
    _onetrainer_backup(backups, 200, 0, 200, _lora(1))
    _onetrainer_backup(backups, 400, 1, 150, _lora(2), meta_step=450)
    err = run("plan", backups, "--decay", 0.9, expect=1).stderr
    assert "OneTrainer meta.json 'global_step' says step 450" in err and "OneTrainer name" in err


def test_onetrainer_fine_tune_backups_with_variants(tmp_path):
    """A fine-tune backup: the diffusers pipeline at the top of the backup folder, meta.json beside it;
    an fp16 variant saved next to a component's weights is not averaged a second time."""
    backups = tmp_path / "backup"
    steps = [100, 200, 300]
    states = []
    for step in steps:
        folder = backups / f"2024-05-01_10-00-{step // 10:02d}-backup-{step}-0-{step}"
        unet, vae = _weights(step, 1, UNET), _weights(step, 4, ("decoder.conv_out.weight",))
        _component(folder / "unet", unet)
        _component(folder / "vae", vae)
        save_file({k: v.half() for k, v in vae.items()}, folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
        (folder / "model_index.json").write_text("{}")
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.json").write_text("{}")
        progress = {"epoch": 0, "epoch_step": step, "epoch_sample": 0, "global_step": step}
        (folder / "meta.json").write_text(json.dumps({"train_progress": progress}))
        states.append({**{f"unet/{k}": v for k, v in unet.items()}, **{f"vae/{k}": v for k, v in vae.items()}})
    text = run("inspect", backups).stdout
    assert (
        "OneTrainer backup (unet: diffusion_pytorch_model.safetensors; vae: diffusion_pytorch_model.safetensors)"
        in text
    )
    assert "vae/diffusion_pytorch_model.fp16.safetensors: another copy or variant of the model" in text
    out = tmp_path / "ema"
    run("merge", backups, "--decay", BETA, "--dtype", "fp32", "-o", out, "-q")
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "tokenizer", "unet", "vae"]
    assert sorted(p.name for p in (out / "vae").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    expected = ema_reference(steps, states, BETA)
    for component in ("unet", "vae"):
        for name, tensor in load_file(out / component / "diffusion_pytorch_model.safetensors").items():
            assert_close(tensor, expected[f"{component}/{name}"])
