"""Hugging Face folders as transformers writes them: Trainer ``checkpoint-N/`` folders with sharded
``save_pretrained`` weights, merged into a folder that ``from_pretrained`` loads."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_ema import io as readers
from ckpt_ema import merge, merge_to_state_dict
from ckpt_ema.engine import readahead
from ckpt_ema.io.safetensors_format import SafetensorsReader

from .reference import assert_close, ema_reference, run

transformers = pytest.importorskip("transformers")

STEPS = [100, 200, 300]
BETA = 0.99


def _model(seed: int = 0):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    """A Trainer-like output_dir: checkpoint-N/ with 20 kB shards, trainer state and resume files."""
    root = tmp_path_factory.mktemp("hf") / "output"
    model = _model()
    states = []
    for step in STEPS:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
        folder = root / f"checkpoint-{step}"
        model.save_pretrained(folder, max_shard_size="20KB")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 300}))
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
        torch.save({"last_epoch": step}, folder / "scheduler.pt")
        (folder / "rng_state.pth").write_bytes(b"rng")
        (folder / "training_args.bin").write_bytes(b"not loaded")
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return root, states


def test_sharded_trainer_folders_merge_to_a_loadable_folder(trainer_run, tmp_path):
    root, states = trainer_run
    out = tmp_path / "ema"
    run("merge", root, "--decay", BETA, "-o", out, "-q")
    newest = root / "checkpoint-300"
    shards = sorted(p.name for p in newest.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*shards, "model.safetensors.index.json", "config.json", "generation_config.json"]
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged = {}
    for shard in shards:
        tensors = load_file(out / shard)
        assert all(index["weight_map"][name] == shard for name in tensors)
        merged.update(tensors)
    assert set(index["weight_map"]) == set(merged)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    expected = ema_reference(STEPS, states, BETA)
    for name, tensor in merged.items():
        assert_close(tensor, expected[name])
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    for name, tensor in loaded.state_dict().items():
        source = "transformer.wte.weight" if name == "lm_head.weight" else name  # tied
        assert_close(tensor, expected[source])


def test_shards_are_read_one_at_a_time_and_never_mapped(trainer_run, monkeypatch):
    root, _ = trainer_run
    opened: list[str] = []
    original = os.open

    def counting(path, *args, **kwargs):
        # the start-up prefetch's opens (to ask the disk for the first chunks) read nothing: not counted
        reading = threading.current_thread().name != "ckpt-ema-prefetch"
        if str(path).endswith(".safetensors") and "model-" in str(path) and reading:
            opened.append(str(path))
        return original(path, *args, **kwargs)

    def no_mapping(self):
        raise AssertionError("the pass maps no safetensors file (it reads with pread)")

    monkeypatch.setattr(readahead.os, "open", counting)
    monkeypatch.setattr(SafetensorsReader, "_mapping", no_mapping)
    merge_to_state_dict([root], decay=[BETA])
    shards = sorted((root / "checkpoint-300").glob("model-*.safetensors"))
    # each shard of each checkpoint is opened for its data (once more at most, for a non-float tensor
    # copied after the read-ahead closed it): the pass sweeps the files in order
    assert len(set(opened)) == len(shards) * len(STEPS) and len(opened) <= 2 * len(set(opened))


def test_single_file_format_and_steps_from_trainer_state(trainer_run, tmp_path):
    root, states = trainer_run
    out = tmp_path / "ema.safetensors"
    result = run("merge", root, "--decay", BETA, "--format", "safetensors", "-o", out, "--json")
    summary = json.loads(result.stdout)
    assert [c["step_source"] for c in summary["checkpoints"]] == ["trainer_state.json 'global_step'"] * 3
    expected = ema_reference(STEPS, states, BETA)
    tensors = load_file(out)
    assert set(tensors) == set(expected) - {"lm_head.weight"}  # tied to wte: save_pretrained drops it
    for name, tensor in tensors.items():
        assert_close(tensor, expected[name])


def test_trainer_state_disagreeing_with_the_name_is_an_error(tmp_path):
    model = _model()
    for step in (10, 20):
        model.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
        (tmp_path / "run" / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": 15}))
    result = run("plan", tmp_path / "run", "--decay", 0.9, expect=1)
    assert "trainer_state.json 'global_step' says step 15" in result.stderr
    assert "checkpoint-10" in result.stderr


def test_inspect_lists_steps_and_ignored_files(trainer_run):
    root, _ = trainer_run
    out = run("inspect", root).stdout
    assert "step        300  from trainer_state.json 'global_step'" in out
    assert "ignored     optimizer.pt: optimizer state" in out
    assert "ignored     training_args.bin: training arguments" in out
    assert "copied      config.json, generation_config.json" in out
    assert "series: ok: 3 checkpoints, steps 100 to 300" in out


def test_folder_output_is_atomic_and_never_replaces_an_input(trainer_run, tmp_path, monkeypatch):
    root, _ = trainer_run
    run("merge", root, "--decay", BETA, "-o", root / "checkpoint-300", "--force", expect=1)
    err = run("merge", root, "--decay", BETA, "-o", tmp_path / "ema.safetensors", expect=1).stderr
    assert "so the EMA is a folder like them; give a folder name, or pass --format safetensors" in err
    out = tmp_path / "ema"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert "already exists" in run("merge", root, "--decay", BETA, "-o", out, expect=1).stderr

    from ckpt_ema.output import writer

    calls = {"n": 0}
    original = writer.SafetensorsWriter.write

    def failing(self, name, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return original(self, name, data)

    monkeypatch.setattr(writer.SafetensorsWriter, "write", failing)
    with pytest.raises(OSError):
        merge([root], out, force=True, decay=[BETA])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]  # no temporary folder left
    assert (out / "old.txt").read_text() == "old"  # the old output is untouched
    monkeypatch.setattr(writer.SafetensorsWriter, "write", original)
    merge([root], out, force=True, decay=[BETA])
    assert not (out / "old.txt").exists() and (out / "config.json").exists()


def test_reader_finds_the_layout(trainer_run):
    root, _ = trainer_run
    source = readers.open_checkpoint(root / "checkpoint-200")
    assert source.is_folder and source.step_records == [("trainer_state.json 'global_step'", 200)]
    assert source.format.startswith("Hugging Face folder (model: ")
    assert {n.relpath for n in source.ignored} >= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}


def test_output_dir_with_the_final_model_beside_the_checkpoints(trainer_run, tmp_path):
    """After training, Trainer.save_model() writes the final model into output_dir beside checkpoint-N/."""
    root, states = trainer_run
    output_dir = tmp_path / "output"
    for child in root.iterdir():
        (output_dir / child.name).mkdir(parents=True)
        for f in child.iterdir():
            os.link(f, output_dir / child.name / f.name)  # a symbolic link out of the checkpoint is refused
    _model().save_pretrained(output_dir, max_shard_size="20KB")
    text = run("inspect", output_dir).stdout
    assert "series: ok: 3 checkpoints, steps 100 to 300" in text
    assert "model.safetensors.index.json" not in text.split("skipped")[0]
    assert "final model beside checkpoint folders" in text
    out = tmp_path / "emas"
    run("merge", output_dir, "--decay", BETA, "--decay", 0.9, "-o", out, "-q")
    assert sorted(p.name for p in out.iterdir()) == ["decay-0.9", "decay-0.99"]
    for name, beta in (("decay-0.9", 0.9), ("decay-0.99", BETA)):
        loaded = transformers.GPT2LMHeadModel.from_pretrained(out / name)
        expected = ema_reference(STEPS, states, beta)
        assert_close(
            loaded.state_dict()["transformer.h.1.mlp.c_fc.weight"], expected["transformer.h.1.mlp.c_fc.weight"]
        )


def test_base_model_folder_as_init(trainer_run, tmp_path):
    root, states = trainer_run
    base = tmp_path / "base"
    model = _model()
    model.save_pretrained(base)
    init_state = model.state_dict()
    out = tmp_path / "ema"
    run("merge", root, "--decay", BETA, "--init", base, "-o", out, "-q")
    expected = ema_reference([0, *STEPS], [init_state, *states], BETA)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert_close(loaded.state_dict()["transformer.wpe.weight"], expected["transformer.wpe.weight"])


def test_shard_files_are_closed_during_the_pass(trainer_run, monkeypatch):
    """A shard is closed once the pass has read its last chunk (Linux: /proc/self/fd): at most the current
    and the next shard of each checkpoint are open, however many shards there are. (The start-up prefetch,
    off here, opens one file at a time for a moment: tests/test_readahead.py checks it closes them.)"""
    root, _ = trainer_run
    monkeypatch.setattr(readahead, "START_WINDOW", 0)
    fds = Path("/proc/self/fd")
    if not fds.exists():
        pytest.skip("needs /proc/self/fd")
    from ckpt_ema.engine.merge_pass import MemorySink, MergePass
    from ckpt_ema.jobs.merge import plan_merge

    def open_files() -> set[str]:
        names = set()
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if str(root) in target:
                    names.add(target)
        return names

    plan = plan_merge([root], decay=[BETA])
    most = 0

    class Watching(MemorySink):
        def write(self, name, data):
            nonlocal most
            most = max(most, len(open_files()))
            super().write(name, data)

    for _ in MergePass(plan, [Watching(plan.tensors)], chunk_elements=256):
        pass
    shards = len(list((root / "checkpoint-300").glob("model-*.safetensors")))
    assert shards > 2 and 0 < most <= 2 * len(STEPS)
    assert open_files() == set()


def test_peft_adapter_checkpoints(tmp_path):
    """PEFT LoRA under the Trainer: adapter_model.safetensors + adapter_config.json in checkpoint-N/."""
    from safetensors.torch import save_file

    steps, states = [50, 100, 150], []
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        state = {
            "base_model.model.h.0.attn.c_attn.lora_A.weight": torch.randn(4, 32, generator=generator),
            "base_model.model.h.0.attn.c_attn.lora_B.weight": torch.randn(96, 4, generator=generator),
        }
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        states.append(state)
    out = tmp_path / "ema"
    run("merge", tmp_path / "run", "--decay", BETA, "-o", out, "-q")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    expected = ema_reference(steps, states, BETA)
    for name, tensor in load_file(out / "adapter_model.safetensors").items():
        assert_close(tensor, expected[name])
    bad = tmp_path / "run" / "checkpoint-200"
    bad.mkdir()
    save_file({k: torch.zeros(8, 32) if "lora_A" in k else torch.zeros(96, 8) for k in states[0]},
              bad / "adapter_model.safetensors")  # fmt: skip
    assert "LoRA ranks differ" in run("plan", tmp_path / "run", "--decay", BETA, expect=1).stderr


def test_folder_format_needs_folder_checkpoints(tmp_path):
    from safetensors.torch import save_file

    for step in (1, 2):
        save_file({"w": torch.ones(2) * step}, tmp_path / f"step-{step}.safetensors")
    err = run("merge", tmp_path, "--decay", 0.5, "--format", "folder", "-o", tmp_path / "o", expect=1).stderr
    assert "--format folder: the checkpoints are single files" in err
