"""Distributed merges (torchrun, gloo on CPU): the shards and index of a 2-process run hold exactly the
tensors of a single-process run; the split of the tensors between ranks is complete and balanced."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckpt_ema.jobs.distributed import INDEX_NAME, split_pieces, split_tensors
from ckpt_ema.plan.model import TensorPlan
from ckpt_ema.plan.pieces import BAND_ELEMENTS, Piece, tensor_pieces

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_split_is_complete_balanced_and_in_plan_order():
    rng = np.random.default_rng(1)
    tensors = [TensorPlan(f"t{i:03d}", (int(n),), True, "BF16") for i, n in enumerate(rng.integers(1, 10_000, 200))]
    for ranks in (1, 2, 3, 7):
        shares = split_tensors(tensors, ranks)
        assert sorted(t.name for share in shares for t in share) == [t.name for t in tensors]
        for share in shares:
            assert [t.name for t in share] == sorted(t.name for t in share)  # plan order kept
        loads = [sum(t.nbytes for t in share) for share in shares]
        assert max(loads) - min(loads) <= max(t.nbytes for t in tensors)


class _Layouts:
    """A stand-in plan: checkpoint j stores tensor ``t`` in the chunks ``layouts[j]`` (None: whole)."""

    def __init__(self, *layouts: object) -> None:
        self.checkpoints = [
            SimpleNamespace(source=SimpleNamespace(chunks=lambda name, given=layout: given)) for layout in layouts
        ]


def _regions(pieces: list[Piece]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [p.region for p in pieces]


def test_pieces_follow_the_chunk_layouts_and_assemble_only_by_bands():
    t = TensorPlan("t", (10, 6), True, "F32")
    rows_2 = [((0, 0), (5, 6)), ((5, 0), (5, 6))]  # dim 0 over 2 ranks
    rows_3 = [((0, 0), (4, 6)), ((4, 0), (3, 6)), ((7, 0), (3, 6))]  # ... and over 3
    cols = [((0, 0), (10, 3)), ((0, 3), (10, 3))]  # dim 1
    for chunked in (False, True):
        assert _regions(tensor_pieces(_Layouts(None, None), t, chunked, [0, 1])) == [((0, 0), (10, 6))]
        # runs of rows, whatever the world sizes: cut where any checkpoint's chunks end, in element order
        cuts = [0, 4, 5, 7, 10]
        expected = [((a, 0), (b - a, 6)) for a, b in zip(cuts, cuts[1:])]
        assert _regions(tensor_pieces(_Layouts(rows_2, rows_3, None), t, chunked, [0, 1, 2])) == expected
    # the same chunks everywhere: chunk to chunk for a DCP output, bands (here the whole) for a safetensors one
    assert _regions(tensor_pieces(_Layouts(cols, cols), t, True, [0, 1])) == cols
    assert _regions(tensor_pieces(_Layouts(cols, cols), t, False, [0, 1])) == [((0, 0), (10, 6))]
    # layouts that differ: bands of rows
    assert _regions(tensor_pieces(_Layouts(cols, rows_2), t, True, [0, 1])) == [((0, 0), (10, 6))]
    big = TensorPlan("big", (3 * (BAND_ELEMENTS // 1000) + 1, 1000), True, "BF16")  # 3 bands and a row
    bands = tensor_pieces(
        _Layouts([((0, 0), (big.shape[0], 500)), ((0, 500), (big.shape[0], 500))], None), big, True, [0, 1]
    )
    assert len(bands) == 4 and all(p.numel <= BAND_ELEMENTS for p in bands)
    assert sum(p.numel for p in bands) == big.shape[0] * 1000 and bands[1].offsets == (BAND_ELEMENTS // 1000, 0)


def test_pieces_of_one_tensor_go_to_different_ranks_and_the_split_is_complete_and_balanced():
    rng = np.random.default_rng(2)
    pieces = []
    for i, rows in enumerate(rng.integers(1, 400, 60)):
        tensor = TensorPlan(f"t{i:02d}", (int(rows), 16), True, "BF16")
        cuts = sorted({0, int(rows), *(int(c) for c in rng.integers(0, rows, int(rng.integers(0, 6))))})
        pieces += [Piece(tensor, (a, 0), (b - a, 16)) for a, b in zip(cuts, cuts[1:])]
    for ranks in (2, 3, 8):
        shares = split_pieces(pieces, ranks)
        assert sorted((p.name, p.offsets) for share in shares for p in share) == sorted(
            (p.name, p.offsets) for p in pieces
        )
        for share in shares:
            assert share == [p for p in pieces if p in share]  # plan order kept
            names = [p.name for p in share]
            for name in set(names):  # a rank gets a second piece of a tensor only when every rank has one
                count = sum(p.name == name for p in pieces)
                assert names.count(name) <= -(-count // ranks), (ranks, name)
        loads = [sum(p.nbytes for p in share) for share in shares]
        assert max(loads) - min(loads) <= max(p.nbytes for p in pieces)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_two_processes_write_the_same_tensors_as_one(tmp_path):
    series = tmp_path / "run"
    series.mkdir()
    generator = torch.Generator().manual_seed(0)
    shapes = {"a.bias": (70,), "a.weight": (300, 70), "b.weight": (5000,), "c.norm": (1234,), "d.big": (40_000,)}
    for step in (100, 200, 300, 400, 500):
        tensors = {n: torch.randn(s, generator=generator).to(torch.bfloat16) for n, s in shapes.items()}
        tensors["counter"] = torch.tensor([step])
        save_file(tensors, str(series / f"step-{step}.safetensors"))
    targets = ["--decay", "0.99", "--sigma-rel", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    single = subprocess.run(
        [sys.executable, "-m", "ckpt_ema", "merge", str(series), *targets, "-o", str(tmp_path / "one"), "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a guard against hangs, not a deadline: a loaded machine is slow
    )
    assert single.returncode == 0, single.stderr
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "ckpt_ema", "merge", str(series)]
    sharded = subprocess.run(
        [*command, *targets, "-o", str(tmp_path / "two"), "-q"], env=env, capture_output=True, text=True, timeout=600
    )
    assert sharded.returncode == 0, sharded.stderr
    for name in ("decay-0.99", "sigma_rel-0.1"):
        expected = load_file(tmp_path / "one" / f"{name}.safetensors")
        folder = tmp_path / "two" / name
        index = json.loads((folder / INDEX_NAME).read_text())
        assert sorted(index["weight_map"]) == sorted(expected)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
        assert sorted(p.name for p in folder.glob("*.safetensors")) == [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]
        got = {}
        for shard in sorted(set(index["weight_map"].values())):
            part = load_file(folder / shard)
            assert all(index["weight_map"][k] == shard for k in part)
            got.update(part)
            with safe_open(str(folder / shard), "pt") as f:
                assert f.metadata()["ckpt_ema.target"] == name
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    shutil.rmtree(tmp_path / "two")
