"""torch.distributed.checkpoint (DCP) folders in and out, checked against independent references.

The series are written by real training runs (``tests/dcp_training.py``) with ``dcp.save``; the truth is the
full weights each run saved beside its checkpoints, and a float64 per-step EMA loop over them
(``tests/formats_reference.ema_reference``); outputs are read back with torch's own ``dcp.load``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from ckpt_ema.errors import InputError
from ckpt_ema.io.dcp import open_dcp, read_metadata
from ckpt_ema.io.torch_edge import to_torch
from ckpt_ema.output.dcp import DcpWriter, blob_template
from ckpt_ema.plan.model import TensorPlan
from tests.dcp_training import make_model, train
from tests.reference import ema_reference, run

TORCHRUN = Path(sys.executable).with_name("torchrun")
ROOT = Path(__file__).resolve().parents[1]
STEPS = (10, 20, 30)


def _quiet_load(state: dict, folder: Path) -> None:
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": as intended
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(folder))


@pytest.fixture(scope="session")
def nested_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, ``{"model": ..., "optimizer": ..., "train_state": ...}`` as torch's get_state_dict saves."""
    out = tmp_path_factory.mktemp("dcp") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train(out, 30, 10, layout="nested") == list(STEPS)
    return out


def _truth(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(run_dir / "truth" / f"step-{s}.safetensors") for s in STEPS]


def _rel(result: dict[str, torch.Tensor], reference: dict[str, np.ndarray]) -> float:
    """SPEC §7: ||a - b|| / ||b|| over all float tensors together."""
    diff = sum(float(((result[n].double().numpy() - ref) ** 2).sum()) for n, ref in reference.items())
    norm = sum(float((ref**2).sum()) for ref in reference.values())
    return (diff / norm) ** 0.5


def test_reader_gives_the_saved_weights_and_lists_the_rest(nested_run: Path) -> None:
    for step, truth in zip(STEPS, _truth(nested_run)):
        source = open_dcp(nested_run / f"step-{step}")
        assert set(source.tensors) == set(truth)  # "model." prefix removed: the model's own names
        for name, tensor in truth.items():
            assert source.tensors[name].shape == tuple(tensor.shape)
            assert torch.equal(flat(source, name), tensor.reshape(-1))
        assert source.step_records == [("DCP 'train_state.step'", step)]
        ignored = {note.relpath: note.reason for note in source.ignored}
        assert ignored["optimizer.*"].startswith("optimizer state")
        assert "train_state.*" in ignored
        source.close()


def test_metadata_is_never_unpickled_with_code(tmp_path: Path, nested_run: Path) -> None:
    folder = tmp_path / "step-10"
    shutil.copytree(nested_run / "step-10", folder)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(InputError, match=r"refused: the DCP metadata asks for (posix|os)\.system"):
        open_dcp(folder)
    assert not marker.exists()


def test_truncated_data_file_is_an_error_naming_it(tmp_path: Path, nested_run: Path) -> None:
    folder = tmp_path / "step-20"
    shutil.copytree(nested_run / "step-20", folder)
    data = folder / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:2000])
    with pytest.raises(InputError, match=r"__0_0\.distcp.*truncated"):
        source = open_dcp(folder)  # the blobs' zip directories are read here
        for name in source.tensors:
            flat(source, name)


def test_writer_output_loads_with_dcp_load_and_unzips(tmp_path: Path) -> None:
    model = make_model(seed=3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["count"] = torch.tensor(7)  # a non-float 0-d tensor
    state["empty"] = torch.zeros(0, 4)
    plans = [TensorPlan(n, tuple(t.shape), t.is_floating_point(), _name(t.dtype)) for n, t in state.items()]
    out = tmp_path / "out"
    writer = DcpWriter(out, plans, {"format": "pt", "ckpt_ema.test": "1"})
    for plan in plans:
        flat = state[plan.name].reshape(-1)
        for start in range(0, flat.numel(), 5):  # in chunks, as the engine streams them
            writer.write(plan.name, flat[start : start + 5].contiguous())
    assert not out.exists()  # nothing in place before commit
    writer.commit()
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp", "ckpt_ema.json"]
    loaded = {k: torch.full_like(v, -1) for k, v in state.items()}
    _quiet_load(loaded, out)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    fresh = make_model(seed=9)
    _quiet_load(fresh.state_dict(), out)  # in place, into the module's own parameters
    x = torch.randn(4, 8)
    assert torch.equal(fresh(x), model(x))
    raw = (out / "__0_0.distcp").read_bytes()
    for info in read_metadata(out).storage_data.values():  # every blob is a valid zip, CRC-32 included
        assert zipfile.ZipFile(io.BytesIO(raw[info.offset : info.offset + info.length])).testzip() is None


def test_data_file_is_the_same_with_writeback_and_shared_templates(tmp_path: Path, monkeypatch) -> None:
    # Three tensors of one shape and dtype share a blob template (each blob still gets its own CRC-32), and
    # writeback after every write (output.writer.Writeback) leaves the data file's bytes as they were.
    from ckpt_ema.output import writer

    state = {f"w{i}": torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    state["t"] = torch.randn(5, 6)  # the same bytes, another shape: another template
    plans = [TensorPlan(n, tuple(t.shape), True, "F32") for n, t in state.items()]

    def write(out: Path) -> bytes:
        dcp_writer = DcpWriter(out, plans, {})
        for plan in plans:
            dcp_writer.write(plan.name, state[plan.name].reshape(-1))
        dcp_writer.commit()
        return (out / "__0_0.distcp").read_bytes()

    monkeypatch.setattr(writer, "_FADVISE", None)
    plain = write(tmp_path / "plain")
    monkeypatch.undo()
    monkeypatch.setattr(writer, "WRITEBACK", 1)
    assert write(tmp_path / "out") == plain
    loaded = {k: torch.zeros_like(v) for k, v in state.items()}
    _quiet_load(loaded, tmp_path / "out")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    for info in read_metadata(tmp_path / "out").storage_data.values():
        assert zipfile.ZipFile(io.BytesIO(plain[info.offset : info.offset + info.length])).testzip() is None


def test_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    plans = [TensorPlan("w", (3, 3), True, "F32")]
    writer = DcpWriter(tmp_path / "out", plans, {})
    writer.write("w", torch.ones(4))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_blob_template_is_what_torch_save_writes() -> None:
    tensor = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    template = blob_template(tensor.shape, tensor.dtype)
    saved = io.BytesIO()
    torch.save(tensor, saved)
    blob = template.head + tensor.view(torch.uint8).numpy().tobytes() + bytes(template.tail)
    assert len(blob) == len(saved.getvalue())
    assert torch.equal(torch.load(io.BytesIO(blob), weights_only=True), tensor)


def _name(dtype: torch.dtype) -> str:
    from ckpt_ema.io.source import dtype_name

    name = dtype_name(dtype)
    assert name is not None
    return name


# --- through the command line ---------------------------------------------------------------------------


def _load_output(folder: Path) -> dict[str, torch.Tensor]:
    state = {k: torch.zeros_like(v) for k, v in make_model().state_dict().items()}
    _quiet_load(state, folder)
    return state


def test_merge_of_a_dcp_series_is_a_dcp_folder_with_the_float64_ema(nested_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema"
    result = run("merge", nested_run, "--decay", "0.9", "-o", out)
    assert f"wrote {out}" in result.stdout
    assert (out / ".metadata").is_file() and (out / "__0_0.distcp").is_file()
    merged = _load_output(out)
    reference = ema_reference(STEPS, _truth(nested_run), 0.9)
    assert _rel(merged, reference) < 1e-6
    model = make_model(seed=5)
    _quiet_load(model.state_dict(), out)  # the unwrapped model's own names: loads in place
    expected = make_model(seed=5)
    expected.load_state_dict({k: torch.from_numpy(v).float() for k, v in reference.items()})
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(model(x), expected(x), rtol=1e-5, atol=1e-6)
    provenance = json.loads((out / "ckpt_ema.json").read_text())["metadata"]
    assert provenance["format"] == "pt"
    assert provenance["ckpt_ema.target_step"] == "30"


def test_format_safetensors_exports_the_same_values(nested_run: Path, tmp_path: Path) -> None:
    run("merge", nested_run, "--decay", "0.9", "-o", tmp_path / "ema")
    run("merge", nested_run, "--decay", "0.9", "-o", tmp_path / "ema.safetensors", "--format", "safetensors")
    exported = load_file(tmp_path / "ema.safetensors")
    merged = _load_output(tmp_path / "ema")
    assert set(exported) == set(merged)
    for name, tensor in merged.items():
        assert torch.equal(exported[name], tensor), name


def test_inspect_shows_the_dcp_layout_and_what_is_skipped(nested_run: Path) -> None:
    result = run("inspect", nested_run)
    assert "DCP folder (1 file(s), 1 rank(s))" in result.stdout
    assert "optimizer.*: optimizer state" in result.stdout
    assert "step        30  from DCP 'train_state.step'" in result.stdout
    assert "series: ok: 3 checkpoints" in result.stdout


# --- FSDP2-sharded, two processes (torchrun, gloo) ------------------------------------------------------


def _torchrun(*args: object) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", *map(str, args)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FSDP2 (fully_shard) on 2 gloo ranks, torchtitan's flat layout: every parameter in 2 chunks."""
    out = tmp_path_factory.mktemp("fsdp") / "checkpoint"
    _torchrun("-m", "tests.dcp_training", out, "--steps", 30, "--every", 10, "--layout", "flat")
    return out


@pytest.mark.slow
def test_fsdp2_sharded_series_merges_like_float64_and_two_ranks_like_one(fsdp_run: Path, tmp_path: Path) -> None:
    truth = _truth(fsdp_run)
    source = open_dcp(fsdp_run / "step-20")
    assert source.format == "DCP folder (2 file(s), 2 rank(s), 6 sharded tensors)"
    for name, tensor in truth[1].items():  # assembled from the ranks' chunks
        assert torch.equal(flat(source, name), tensor.reshape(-1)), name
    run("merge", fsdp_run, "--sigma-rel", "0.2", "--decay", "0.95", "-o", tmp_path / "one")
    assert _rel(_load_output(tmp_path / "one" / "decay-0.95"), ema_reference(STEPS, truth, 0.95)) < 1e-6
    _torchrun("-m", "ckpt_ema", "merge", fsdp_run, "--sigma-rel", "0.2", "--decay", "0.95", "-o", tmp_path / "two")
    for target in ("decay-0.95", "sigma_rel-0.2"):
        folder = tmp_path / "two" / target
        assert sorted(p.name for p in folder.iterdir()) == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "ckpt_ema.json",
        ]
        one, two = _load_output(tmp_path / "one" / target), _load_output(folder)
        for name in one:
            assert torch.equal(one[name], two[name]), (target, name)


def flat(source, name: str) -> torch.Tensor:
    """The reader's 1-D numpy data of a tensor, as a torch tensor of its dtype."""
    return to_torch(source.flat(name), source.tensors[name].dtype)


@pytest.mark.slow
def test_sharded_tensors_are_merged_chunk_by_chunk_never_assembled(
    fsdp_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpt_ema.io import dcp as dcp_reader
    from ckpt_ema.io.source import CheckpointSource

    source = open_dcp(fsdp_run / "step-10")
    assert source.chunks("0.weight") == [((0, 0), (17, 8)), ((17, 0), (16, 8))]  # FSDP2 on 2 ranks: rows 0-16, 17-32
    assert source.chunks("4.bias") == [((0,), (2,)), ((2,), (1,))]  # 3 values: 2 on rank 0, 1 on rank 1

    def no_assembly(self: dcp_reader.DcpReader, *args: object) -> torch.Tensor:
        raise AssertionError(f"a sharded tensor was read through the mapping: {args}")

    monkeypatch.setattr(dcp_reader.DcpReader, "_flat_torch", no_assembly)  # every chunk is read by byte range
    monkeypatch.setattr(dcp_reader.DcpReader, "region", no_assembly)
    run("merge", fsdp_run, "--decay", "0.9", "-o", tmp_path / "pieces", "--no-hash")
    monkeypatch.undo()
    monkeypatch.setattr(CheckpointSource, "chunks", lambda self, name: None)  # whole tensors, assembled
    run("merge", fsdp_run, "--decay", "0.9", "-o", tmp_path / "assembled", "--no-hash")
    pieces, whole = _load_output(tmp_path / "pieces"), _load_output(tmp_path / "assembled")
    for name in whole:
        assert torch.equal(pieces[name], whole[name]), name


def test_verify_and_dtype_with_a_dcp_output(nested_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema"
    run("merge", nested_run, "--decay", "0.9", "-o", out, "--verify", "--dtype", "bf16")
    state = {k: torch.zeros_like(v, dtype=torch.bfloat16) for k, v in make_model().state_dict().items()}
    _quiet_load(state, out)
    reference = ema_reference(STEPS, _truth(nested_run), 0.9)
    for name, expected in reference.items():  # rounded once to BF16: within half a BF16 ulp (2^-9 relative)
        assert state[name].dtype == torch.bfloat16
        assert np.allclose(state[name].double().numpy(), expected, rtol=2**-8, atol=1e-6), name
    result = run("merge", nested_run, "--decay", "0.9", "-o", out, expect=1)
    assert "already exists; pass --force" in result.output


def test_megatron_like_extra_state_is_one_ignored_line(tmp_path: Path) -> None:
    """Megatron's torch_dist format: model keys at the top level, a pickled ``_extra_state`` per layer."""
    folder = tmp_path / "iter_0000100"
    state = {f"decoder.layers.{i}.weight": torch.full((4, 2), float(i)) for i in range(3)}
    extras = {f"decoder.layers.{i}.self_attention._extra_state": io.BytesIO(b"fp8 meta") for i in range(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({**state, **extras}, checkpoint_id=str(folder))
    (folder / "common.pt").write_bytes(b"not read")
    source = open_dcp(folder)
    assert sorted(source.tensors) == sorted(state)
    notes = {n.relpath: n.reason for n in source.ignored}
    assert notes["decoder.layers.0.self_attention._extra_state, ... (3 in all)"].startswith("pickled objects")
    assert notes["common.pt"] == "not part of the DCP checkpoint"
    assert torch.equal(flat(source, "decoder.layers.2.weight"), torch.full((8,), 2.0))
