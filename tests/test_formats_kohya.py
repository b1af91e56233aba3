"""kohya sd-scripts and OneTrainer single files: step from ``ss_steps`` or the name, sessions, modelspec
metadata carried over with ``merged_from``, LoRA alphas copied (and required to agree) and ranks checked."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .reference import assert_close, ema_reference, run

BETA = 0.98


def _lora(step: int, rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    tensors = {}
    for module in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1"):
        tensors[f"{module}.lora_down.weight"] = torch.randn(rank, 12, generator=generator).half()
        tensors[f"{module}.lora_up.weight"] = torch.randn(12, rank, generator=generator).half()
        tensors[f"{module}.alpha"] = torch.tensor(alpha).half()
    return tensors


def _kohya_metadata(step: int, epoch: int, session: str = "1234567") -> dict[str, str]:
    """What train_network.py's save_model writes (all values strings), with sai modelspec keys."""
    return {
        "ss_session_id": session,
        "ss_training_started_at": "1714550000.5",
        "ss_training_finished_at": str(1714550000 + step),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_max_train_steps": "1600",
        "ss_network_dim": "4",
        "ss_network_alpha": "2.0",
        "ss_network_module": "networks.lora",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "mychar",
        "modelspec.resolution": "1024x1024",
        "modelspec.date": "2024-05-01T10:00:00",
        "modelspec.hash_sha256": "0x" + "ab" * 32,
    }


def _series(root: Path, steps, name="mychar-step{:08d}.safetensors", **lora_args) -> list[dict[str, torch.Tensor]]:
    root.mkdir(parents=True, exist_ok=True)
    states = []
    for i, step in enumerate(steps):
        tensors = _lora(step, **lora_args)
        save_file(tensors, root / name.format(step), metadata=_kohya_metadata(step, i))
        states.append(tensors)
    return states


def test_kohya_lora_steps_metadata_and_alphas(tmp_path):
    steps = [400, 800, 1200, 1600]
    states = _series(tmp_path / "output", steps)
    out = tmp_path / "ema.safetensors"
    summary = json.loads(run("merge", tmp_path / "output", "--decay", BETA, "-o", out, "--json").stdout)
    assert [c["step_source"] for c in summary["checkpoints"]] == ["metadata 'ss_steps'"] * 4
    merged = load_file(out)
    expected = ema_reference(steps, states, BETA)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float16
        if name.endswith(".alpha"):
            assert float(tensor) == 2.0  # copied from the newest, not averaged
        else:
            assert_close(tensor.float(), expected[name], rtol=2e-3)  # one rounding to FP16
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "mychar" and meta["ss_steps"] == "1600"
    assert meta["modelspec.merged_from"] == ", ".join(f"mychar-step{s:08d}" for s in steps)
    assert "modelspec.hash_sha256" not in meta  # it would describe the input's bytes
    assert meta["format"] == "pt" and meta["ckpt_ema.target_step"] == "1600"


def test_epoch_names_take_the_step_from_ss_steps(tmp_path):
    steps = [250, 500, 750]
    root = tmp_path / "out"
    root.mkdir()
    states = []
    for epoch, step in enumerate(steps, start=1):
        tensors = _lora(step)
        save_file(tensors, root / f"mychar-{epoch:06d}.safetensors", metadata=_kohya_metadata(step, epoch))
        states.append(tensors)
    out = run("inspect", root).stdout
    assert "step        500  from metadata 'ss_steps'" in out
    merged = load_file(_merge(root, tmp_path / "ema.safetensors"))
    expected = ema_reference(steps, states, BETA)
    assert_close(merged["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"].float(),
                 expected["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"], rtol=2e-3)  # fmt: skip


def _merge(inputs: Path, out: Path, *extra) -> Path:
    run("merge", inputs, "--decay", BETA, "-o", out, "-q", *extra)
    return out


def test_sessions_are_not_mixed_unless_allowed(tmp_path):
    root = tmp_path / "output"
    _series(root, [400, 800])
    tensors = _lora(1200)
    save_file(tensors, root / "mychar-step00001200.safetensors", metadata=_kohya_metadata(1200, 2, session="999"))
    err = run("merge", root, "--decay", BETA, "-o", tmp_path / "a.safetensors", expect=1).stderr
    assert "ss_session_id 1234567" in err and "ss_session_id 999" in err and "--allow-mixed-runs" in err
    assert not (tmp_path / "a.safetensors").exists()
    _merge(root, tmp_path / "a.safetensors", "--allow-mixed-runs")
    assert "session     ss_session_id 999" in run("inspect", root, expect=1).stdout
    assert "series: ok" in run("inspect", root, "--allow-mixed-runs").stdout


def test_alphas_and_ranks_must_agree(tmp_path):
    root = tmp_path / "alpha"
    _series(root, [100, 200])
    save_file(_lora(300, alpha=4.0), root / "mychar-step00000300.safetensors", metadata=_kohya_metadata(300, 0))
    err = run("merge", root, "--decay", BETA, "-o", tmp_path / "x.safetensors", expect=1).stderr
    assert "LoRA alpha" in err and "[4.0]" in err and "[2.0]" in err and "copied, not averaged" in err
    root = tmp_path / "rank"
    _series(root, [100, 200])
    save_file(_lora(300, rank=8), root / "mychar-step00000300.safetensors", metadata=_kohya_metadata(300, 0))
    err = run("merge", root, "--decay", BETA, "-o", tmp_path / "x.safetensors", expect=1).stderr
    assert "LoRA ranks differ" in err and "(8, 12)" in err and "(4, 12)" in err


def test_onetrainer_single_file_saves(tmp_path):
    """OneTrainer's save/ files: {prefix}{timestamp}-save-{step}-{epoch}-{epoch_step}.safetensors, no step key."""
    root = tmp_path / "save"
    root.mkdir()
    steps = [300, 600, 900]
    states = []
    for step in steps:
        tensors = _lora(step)
        name = f"mychar2024-05-01_10-00-{step % 60:02d}-save-{step}-{step // 400}-{step % 400}.safetensors"
        save_file(tensors, root / name, metadata={"modelspec.title": "mychar", "ot_branch": "master"})
        states.append(tensors)
    assert "step        600  from OneTrainer name 'save-600-1-200'" in run("inspect", root).stdout
    merged = load_file(_merge(root, tmp_path / "ema.safetensors"))
    expected = ema_reference(steps, states, BETA)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    assert_close(merged[name].float(), expected[name], rtol=2e-3)


def test_resume_state_folders_beside_the_files_are_skipped(tmp_path):
    """--save_state writes NAME-stepNNNNNNNN-state/ (accelerate state) beside each saved file."""
    root = tmp_path / "output"
    steps = [400, 800]
    states = _series(root, steps)
    for step in steps:
        state = root / f"mychar-step{step:08d}-state"
        state.mkdir()
        save_file(_lora(step + 1), state / "model.safetensors")
        (state / "train_state.json").write_text(json.dumps({"current_step": step, "current_epoch": 0}))
    text = run("inspect", root).stdout
    assert "kohya resume state (the saved files beside it are read)" in text
    merged = load_file(_merge(root, tmp_path / "ema.safetensors"))
    expected = ema_reference(steps, states, BETA)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"
    assert_close(merged[name].float(), expected[name], rtol=2e-3)
