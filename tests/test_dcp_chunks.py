"""DCP tensors merged chunk by chunk, and torchrun merges where each rank reads and writes only its chunks.

The series are written by real training runs under ``torchrun --nproc-per-node 2`` (gloo, CPU): FSDP2 (every
parameter sharded on dim 0) and tensor parallelism (``parallelize_module``: a weight sharded on dim 1). The
truth is the full weights each run saved beside its checkpoints and a float64 per-step EMA over them; the
chunks and byte ranges expected are read from torch's own ``FileSystemReader`` metadata; outputs are
loaded with ``dcp.load``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from ckpt_ema.io import dcp as dcp_reader
from ckpt_ema.output.lock import OutputLock
from tests.dcp_training import make_model, make_tp_model
from tests.reference import ema_reference, run

TORCHRUN = Path(sys.executable).with_name("torchrun")
ROOT = Path(__file__).resolve().parents[1]
STEPS = (10, 20, 30)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python"),
]


def _torchrun(*args: object, expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", *map(str, args)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == (expect == 0), done.stderr[-3000:]
    return done


def _train(tmp_path_factory: pytest.TempPathFactory, parallel: str) -> Path:
    out = tmp_path_factory.mktemp(parallel) / "checkpoint"
    _torchrun("-m", "tests.dcp_training", out, "--steps", 30, "--every", 10, "--layout", "flat", "--parallel", parallel)
    return out


@pytest.fixture(scope="module")
def fsdp_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory, "fsdp")


@pytest.fixture(scope="module")
def tp_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory, "tp")


def _truth(series: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(series / "truth" / f"step-{s}.safetensors") for s in STEPS]


def _load(folder: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process": as intended
        dcp.load(state, checkpoint_id=str(folder))
    return state


def _close(merged: dict[str, torch.Tensor], reference: dict[str, np.ndarray]) -> None:
    """Each tensor within FP32 rounding of the float64 EMA (SPEC §7 relative error)."""
    for name, expected in reference.items():
        got = merged[name].double().numpy()
        assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected) + 1e-9, name


def _chunks(folder: Path) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Every tensor's chunks as torch's own reader sees them."""
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    return {
        k: sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks)
        for k, v in metadata.state_dict_metadata.items()
        if hasattr(v, "chunks")
    }


# --- chunk to chunk: a weight sharded on dim 1 (tensor parallelism) ----------------------------------


def test_tensor_parallel_series_merges_chunk_to_chunk_and_keeps_its_chunks(
    tp_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = _chunks(tp_series / "step-20")
    assert chunks["2.weight"] == [((0, 0), (16, 16)), ((0, 16), (16, 16))]  # RowwiseParallel: Shard(1)
    assert chunks["0.weight"] == [((0, 0), (16, 8)), ((16, 0), (16, 8))]  # ColwiseParallel: Shard(0)

    def refused(*args: object) -> None:
        raise AssertionError(f"read through the memory map, not chunk to chunk: {args[1:]}")

    monkeypatch.setattr(dcp_reader.DcpReader, "region", refused)
    monkeypatch.setattr(dcp_reader.DcpReader, "_flat_torch", refused)
    out = tmp_path / "ema"
    run("merge", tp_series, "--decay", "0.9", "-o", out, "--verify")
    monkeypatch.undo()
    for name in ("0.weight", "0.bias", "2.weight"):
        assert _chunks(out)[name] == chunks[name], name  # the output keeps the inputs' chunks
    merged = _load(out, make_tp_model())
    reference = ema_reference(STEPS, _truth(tp_series), 0.9)
    _close(merged, reference)
    model, expected = make_tp_model(seed=4), make_tp_model(seed=4)
    model.load_state_dict(merged)
    expected.load_state_dict({k: torch.from_numpy(v).float() for k, v in reference.items()})
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(model(x), expected(x), rtol=1e-5, atol=1e-6)
    # a safetensors output needs whole tensors in element order: bands of rows copied from both chunks
    run("merge", tp_series, "--decay", "0.9", "-o", tmp_path / "ema.safetensors", "--format", "safetensors")
    exported = load_file(tmp_path / "ema.safetensors")
    for name, tensor in merged.items():
        assert torch.equal(exported[name], tensor), name


def test_layouts_that_differ_between_checkpoints_are_merged_by_bands(tp_series: Path, tmp_path: Path) -> None:
    series = tmp_path / "checkpoint"
    for step in (10, 20):
        shutil.copytree(tp_series / f"step-{step}", series / f"step-{step}")
    state = _load(tp_series / "step-30", make_tp_model())  # step 30 saved again by one process: one chunk each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({**state, "train_state": {"step": 30}}, checkpoint_id=str(series / "step-30"))
    assert _chunks(series / "step-30")["2.weight"] == [((0, 0), (16, 32))]
    out = tmp_path / "ema"
    run("merge", series, "--decay", "0.9", "-o", out)
    _close(_load(out, make_tp_model()), ema_reference(STEPS, _truth(tp_series), 0.9))


# --- torchrun: each rank reads and writes only its chunks -------------------------------------------


def _model_blobs(series: Path) -> dict[tuple[str, int], tuple[str, int, int]]:
    """(file, data start) -> (tensor, data start, data end) of every model chunk of every checkpoint."""
    blobs = {}
    for step in STEPS:
        folder = series / f"step-{step}"
        metadata = dcp.FileSystemReader(str(folder)).read_metadata()
        for index, info in metadata.storage_data.items():
            if index.fqn.split(".")[0] in dcp_reader.TRAINER_KEYS:
                continue
            entry = metadata.state_dict_metadata[index.fqn]
            chunk = next(c for c in entry.chunks if tuple(c.offsets) == tuple(index.offset))
            nbytes = int(np.prod(chunk.sizes)) * entry.properties.dtype.itemsize
            path = str(folder / info.relative_path)
            with open(path, "rb") as f:  # the data ends the blob's zip record: locate it from the blob's end
                blob = f.read()[info.offset : info.offset + info.length]
            data = torch.load(__import__("io").BytesIO(blob), weights_only=True)
            start = blob.find(data.contiguous().view(torch.uint8).numpy().tobytes())
            assert start >= 0
            blobs[(path, info.offset + start)] = (index.fqn, info.offset + start, info.offset + start + nbytes)
    return blobs


def test_torchrun_ranks_read_only_their_chunks_and_write_what_one_process_writes(
    fsdp_series: Path, tmp_path: Path
) -> None:
    series = tmp_path / "checkpoint"
    shutil.copytree(fsdp_series, series)
    for path in series.rglob("*"):
        if path.is_file():
            path.chmod(0o600)  # private inputs: private outputs
    targets = ["--decay", "0.95", "--sigma-rel", "0.2"]
    run("merge", series, *targets, "-o", tmp_path / "one")
    log = tmp_path / "reads"
    done = _torchrun(
        "-m", "tests.dcp_merge_reads", log, "--", "merge", series, *targets, "-o", tmp_path / "two",
        "--verify", "--json", "--no-hash",
    )  # fmt: skip
    document = json.loads(done.stdout)  # one document, from rank 0 only
    assert [o["path"] for o in document["outputs"]] == [
        str(tmp_path / "two" / t) for t in ("decay-0.95", "sigma_rel-0.2")
    ]
    truth = _truth(series)
    for target in ("decay-0.95", "sigma_rel-0.2"):
        folder = tmp_path / "two" / target
        names = sorted(p.name for p in folder.iterdir())
        assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "ckpt_ema.json"]
        for name in names:
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
        one, two = _load(tmp_path / "one" / target, make_model()), _load(folder, make_model())
        for name in one:
            assert torch.equal(one[name], two[name]), (target, name)
        if target == "decay-0.95":
            _close(two, ema_reference(STEPS, truth, 0.95))
        model = make_model(seed=2)
        model.load_state_dict(two)
        assert torch.isfinite(model(torch.randn(4, 8))).all()
        # every rank wrote its own chunks: each sharded tensor's chunks lie in both ranks' files
        metadata = dcp.FileSystemReader(str(folder)).read_metadata()
        files = {}
        for index, info in metadata.storage_data.items():
            files.setdefault(index.fqn, set()).add(info.relative_path)
        assert all(files[name] == {"__0_0.distcp", "__1_0.distcp"} for name in one), files
    blobs = _model_blobs(series)
    reads = [[tuple(r) for r in json.loads(Path(f"{log}.{rank}.json").read_text())] for rank in (0, 1)]
    covered: list[dict[tuple[str, int], int]] = [{}, {}]
    for rank, ranges in enumerate(reads):
        for path, offset, length in ranges:  # each read lies inside one model chunk's data
            owner = [k for k, (_, lo, hi) in blobs.items() if k[0] == path and lo <= offset and offset + length <= hi]
            assert len(owner) == 1, (rank, path, offset, length)
            covered[rank][owner[0]] = covered[rank].get(owner[0], 0) + length
    for key, (name, lo, hi) in blobs.items():  # every chunk read whole exactly once, by one rank
        assert sorted(c.get(key, 0) for c in covered) == [0, hi - lo], (key, name)
    for rank in (0, 1):  # and no rank read every chunk of a tensor
        for name in {n for n, _, _ in blobs.values()}:
            theirs = [k for k, v in blobs.items() if v[0] == name]
            assert not all(k in covered[rank] for k in theirs), (rank, name)


def test_torchrun_output_is_locked_and_odd_outputs_refused_and_strict(fsdp_series: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema"
    done = _torchrun("-m", "ckpt_ema", "merge", fsdp_series, "--decay", "0.9", "-o", out, "--strict", expect=1)
    assert "the first checkpoint (step 10) keeps 20% of the weight" in done.stderr  # a plan warning
    assert "(--strict: no output written)" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    lock = OutputLock(out)
    lock.acquire()  # another run writing the same output
    try:
        done = _torchrun("-m", "ckpt_ema", "merge", fsdp_series, "--decay", "0.9", "-o", out, expect=1)
    finally:
        lock.release()
    assert "another ckpt-ema run is writing it" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no temporary folder left
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    done = _torchrun("-m", "ckpt_ema", "merge", fsdp_series, "--decay", "0.9", "-o", tmp_path / "link", expect=1)
    assert "is a symbolic link" in done.stderr and "which does not exist" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


@pytest.mark.parametrize(("rank", "moment"), [(1, "write"), (0, "verify")])
def test_torchrun_one_rank_failing_leaves_the_previous_output_and_nothing_else(
    fsdp_series: Path, tmp_path: Path, rank: int, moment: str
) -> None:
    out = tmp_path / "ema"
    out.mkdir()
    (out / "previous.txt").write_text("the previous output")
    command = ["-m", "tests.torchrun_fault", rank, moment, "--", "merge", fsdp_series, "--decay", "0.95"]
    done = _torchrun(*command, "-o", out, "--force", "--verify", expect=1)
    assert f"injected failure at {moment} on rank {rank}" in done.stderr
    assert "another rank of the distributed run failed (see its message); no output written" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]  # no temporary folder, no lock file left
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
