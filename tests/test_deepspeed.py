"""DeepSpeed ``global_stepN/`` checkpoints, written by DeepSpeed itself on the CPU (``tests/deepspeed_training.py``).

The reference for the FP32 master weights is DeepSpeed's own ``zero_to_fp32`` (imported here, never by
ckpt-ema); for the module weights, ``torch.load`` of the file. The whole file is slow (``make test-slow``):
importing DeepSpeed and its first run take 20-100 s of a 2-core machine, a third of ``make test``'s budget;
each later DeepSpeed run takes ~5 s (ZeRO-2 and ZeRO-3 in one process, 2-rank runs under torchrun, whose
partitions really split the parameters).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_ema.errors import InputError
from ckpt_ema.io.deepspeed import open_deepspeed
from ckpt_ema.io.torch_edge import to_torch
from tests.reference import assert_close, ema_reference, run

pytestmark = pytest.mark.slow
deepspeed = pytest.importorskip("deepspeed")
zero_to_fp32 = pytest.importorskip("deepspeed.utils.zero_to_fp32")

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = (2, 4, 6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(out: Path, stage: int, ranks: int) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    script = ["-m", "tests.deepspeed_training", str(out), "--stage", str(stage), "--steps", "6", "--every", "2"]
    if ranks == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        command = [sys.executable, *script]
    else:
        command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={ranks}", *script]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _reference(run: Path, step: int) -> dict[str, torch.Tensor]:
    state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(run), tag=f"global_step{step}")
    return {name: tensor.detach() for name, tensor in state.items()}


@pytest.fixture(scope="session")
def zero2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("ds") / "zero2", 2, 1)


@pytest.fixture(scope="session")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("ds") / "zero3", 3, 1)


def _check_fp32(run: Path, stage: int, ranks: int) -> None:
    assert (run / "latest").read_text().strip() == f"global_step{STEPS[-1]}"
    for step in STEPS:
        source = open_deepspeed(run / f"global_step{step}")
        assert source.format == f"DeepSpeed checkpoint (ZeRO-{stage}, {ranks} rank(s), FP32 master weights)"
        assert source.step_records == [("DeepSpeed 'global_steps'", step)]
        assert any("FP32 master weights" in note and "BF16" in note for note in source.notes)
        reference = _reference(run, step)
        assert set(source.tensors) == set(reference)
        for name, tensor in reference.items():
            assert source.tensors[name].dtype == "F32"
            assert torch.equal(flat(source, name), tensor.contiguous().reshape(-1)), name
        source.close()


def test_zero2_fp32_master_weights_as_zero_to_fp32_reads_them(zero2: Path) -> None:
    _check_fp32(zero2, 2, 1)


@pytest.mark.slow
def test_zero3_fp32_master_weights_as_zero_to_fp32_reads_them(zero3: Path) -> None:
    _check_fp32(zero3, 3, 1)


def test_module_weights_when_the_optimizer_partitions_are_gone(tmp_path: Path, zero2: Path) -> None:
    folder = tmp_path / "global_step4"
    shutil.copytree(zero2 / "global_step4", folder)
    for partition in folder.glob("*_optim_states.pt"):
        partition.unlink()
    source = open_deepspeed(folder)
    assert source.format == "DeepSpeed checkpoint (module weights)"
    assert any("module weights (BF16)" in note for note in source.notes)
    module = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]  # trusted: ours
    for name, tensor in module.items():
        assert source.tensors[name].dtype == "BF16"
        assert torch.equal(flat(source, name), tensor.reshape(-1))


@pytest.mark.slow
def test_zero3_without_partitions_is_an_error(tmp_path: Path, zero3: Path) -> None:
    folder = tmp_path / "global_step2"
    shutil.copytree(zero3 / "global_step2", folder)
    for partition in folder.glob("*_optim_states.pt"):
        partition.unlink()
    with pytest.raises(InputError, match="optimizer partitions"):
        open_deepspeed(folder)


def test_a_pickle_asking_for_other_code_is_refused(tmp_path: Path, zero2: Path) -> None:
    folder = tmp_path / "global_step2"
    shutil.copytree(zero2 / "global_step2", folder)
    partition = next(folder.glob("*_optim_states.pt"))
    state = torch.load(partition, weights_only=False)  # trusted: written by the fixture
    state["optimizer_state_dict"]["extra"] = shutil.rmtree  # any callable global the allow-list lacks
    torch.save(state, partition)
    with pytest.raises(InputError, match="refused: loading it would run code"):
        open_deepspeed(folder)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_partitions(tmp_path: Path, stage: int) -> None:
    run = _train(tmp_path / f"zero{stage}", stage, 2)
    _check_fp32(run, stage, 2)


def test_merge_of_a_deepspeed_run_is_the_float64_ema_of_its_fp32_weights(zero2: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    result = run("inspect", zero2)
    assert "series: ok: 3 checkpoints, steps 2 to 6" in result.stdout
    run("merge", zero2, "--decay", "0.8", "-o", out)  # the run folder: latest, global_step2/ ... global_step6/
    merged = load_file(out)
    reference = ema_reference(STEPS, [_reference(zero2, s) for s in STEPS], 0.8)
    assert set(merged) == set(reference)
    for name, expected in reference.items():
        assert merged[name].dtype == torch.float32
        assert_close(merged[name], expected)


def flat(source, name: str) -> torch.Tensor:
    """The reader's 1-D numpy data of a tensor, as a torch tensor of its dtype."""
    return to_torch(source.flat(name), source.tensors[name].dtype)
