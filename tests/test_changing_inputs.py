"""Inputs that change while the merge reads them (issue 12): truncated, or rewritten in place.

Each case runs the real command line (``ckpt_ema.cli.main``) in a subprocess, so that a crash (SIGBUS from
a truncated memory mapping) is seen as the process's fate instead of killing the test run. The change is
made at a known moment, without sleeps: a hook in the subprocess wraps the output writer and changes the
input right after the first chunk of output has been written, when the pass has read at most its bounded
read-ahead of each input.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
TENSORS = 12
ELEMENTS = 1 << 20  # FP32: 4 MB per tensor, 48 MB per checkpoint (more than the pass reads ahead)
STEPS = (1000, 2000, 3000)

# Runs the command line with a hook: after the first output write, do CHANGE to the newest input.
HOOKED_CLI = """
import os, sys
import numpy as np
from ckpt_ema.output import writer as writer_module
from ckpt_ema.cli import main

victim, change = sys.argv[1], sys.argv[2]
original = writer_module.SafetensorsWriter.write
done = []

def write(self, name, data):
    original(self, name, data)
    if not done:
        done.append(True)
        size = os.path.getsize(victim)
        if change == "truncate":
            os.truncate(victim, size // 4)
        else:  # rewrite the second half in place: same size, other values
            with open(victim, "r+b") as f:
                f.seek(size // 2)
                f.write(np.full((size - size // 2) // 4, 7.0, dtype=np.float32).tobytes())
        print("changed", file=sys.stderr, flush=True)

writer_module.SafetensorsWriter.write = write
main(sys.argv[3:], prog_name="ckpt-ema")
"""


def write_series(tmp_path: Path, kind: str) -> list[Path]:
    """Three checkpoints of 48 MB: safetensors files, or torch.save pickles (read by byte range too)."""
    rng = np.random.default_rng(0)
    paths = []
    for step in STEPS:
        state = {f"layer.{i:02d}.weight": rng.standard_normal(ELEMENTS, dtype=np.float32) for i in range(TENSORS)}
        if kind == "torch":
            import torch

            path = tmp_path / "run" / f"step-{step:06d}.pt"
            path.parent.mkdir(exist_ok=True)
            torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}, "global_step": step}, path)
        else:
            path = tmp_path / "run" / f"step-{step:06d}.safetensors"
            path.parent.mkdir(exist_ok=True)
            save_file(state, str(path), metadata={"step": str(step)})
        paths.append(path)
    return paths


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return write_series(tmp_path, "safetensors")


def run_hooked(victim: Path, change: str, *args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", HOOKED_CLI, str(victim), change, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("hashing", ["--hash", "--no-hash"])
@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_an_input_changed_during_the_merge_fails_with_one_line_and_no_output(series, tmp_path, change, hashing):
    victim = series[-1]
    out = tmp_path / "out" / "ema.safetensors"
    result = run_hooked(victim, change, "merge", victim.parent, "--half-life", "1000", "-o", out, "-q", hashing)
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith("warning: ")]
    assert lines[:1] == ["changed"], result.stderr  # the hook ran, mid-merge
    assert result.returncode == 1, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {victim}: "), lines
    word = "truncated" if change == "truncate" else "changed while being read"
    assert word in lines[0], lines[0]
    assert leftovers(out.parent) == []  # no output, no temporary file


def test_an_unchanged_series_merges_under_the_same_hook_harness(series, tmp_path):
    """The harness itself: with a change that does nothing harmful (the victim is not an input), rc 0."""
    other = tmp_path / "not-an-input.bin"
    other.write_bytes(b"\0" * 1024)
    out = tmp_path / "out" / "ema.safetensors"
    result = run_hooked(other, "rewrite", "merge", series[0].parent, "--half-life", "1000", "-o", out, "-q")
    assert result.returncode == 0, result.stderr
    assert leftovers(out.parent) == ["ema.safetensors"]


def test_a_torch_pickle_truncated_during_the_merge_is_one_line_not_sigbus(tmp_path):
    """Torch pickles are read by byte range too (their offsets from a load onto torch's meta device)."""
    victim = write_series(tmp_path, "torch")[-1]
    out = tmp_path / "out" / "ema.safetensors"
    result = run_hooked(victim, "truncate", "merge", victim.parent, "--half-life", "1000", "-o", out, "-q")
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith("warning: ")]
    assert lines[:1] == ["changed"], result.stderr
    assert result.returncode == 1, f"exit code {result.returncode} (-7: SIGBUS): {result.stderr[-2000:]}"
    assert len(lines) == 2 and lines[1].startswith(f"Error: {victim}: ") and "truncated" in lines[1], lines
    assert leftovers(out.parent) == []
