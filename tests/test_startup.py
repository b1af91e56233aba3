"""Start-up (issue 15): the command line imports torch only where it is needed.

``import torch`` takes about a second (several on a busy machine); ``--help``, ``plan`` and a merge of
safetensors files with the fused kernel need numpy (and numba) only. Checked by running each command in a
fresh interpreter and looking at ``sys.modules`` afterwards, not by timing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ckpt_ema.engine import fused

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
from ckpt_ema.cli import main
try:
    main(sys.argv[1:], prog_name="ckpt-ema", standalone_mode=False)
finally:
    heavy = sorted(m for m in ("torch", "matplotlib", "numba") if m in sys.modules)
    print("IMPORTED:" + ",".join(heavy), file=sys.stderr)
"""


def imported(*args: object) -> tuple[set[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CKPT_EMA_KERNEL", None)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    line = [x for x in result.stderr.splitlines() if x.startswith("IMPORTED:")][-1]
    return set(filter(None, line[len("IMPORTED:") :].split(","))), result.stdout


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    for step in (100, 200, 300):
        state = {"w": rng.standard_normal(64, dtype=np.float32), "n": np.array([step], dtype=np.int64)}
        save_file(state, str(folder / f"step-{step:06d}.safetensors"), metadata={"step": str(step)})
    return folder


def test_help_imports_neither_torch_nor_numba():
    modules, out = imported("--help")
    assert "merge" in out and modules == set()


def test_plan_of_a_safetensors_series_imports_neither_torch_nor_numba(series):
    modules, out = imported("plan", series, "--half-life", "100")
    assert "coefficients" in out and modules == set()


@pytest.mark.skipif(not fused.AVAILABLE, reason="the fused kernel needs numba")
def test_merge_of_safetensors_with_the_fused_kernel_imports_no_torch(series, tmp_path):
    out = tmp_path / "ema.safetensors"
    modules, _ = imported("merge", series, "--half-life", "100", "-o", out, "-q")
    assert out.is_file() and modules == {"numba"}


SPIN_PROBE = """
import os, sys, types
from ckpt_ema.__main__ import run
cli = types.ModuleType("ckpt_ema.cli")
cli.main = lambda prog_name: print(os.environ.get("OPENBLAS_THREAD_TIMEOUT"), "numpy" in sys.modules)
sys.modules["ckpt_ema.cli"] = cli
run()
"""


@pytest.mark.parametrize(("given", "expected"), [(None, "4"), ("12", "12")])
def test_the_command_tells_openblas_not_to_spin_before_numpy_loads(given, expected):
    """OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` once, when numpy loads: ``run()`` must set it first (a value
    the user set stays). The effect itself, measured by hand: a 300 x 300 ``lstsq`` left 0.099 CPU seconds
    of spinning in the half second after it without the setting, none with it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    result = subprocess.run([sys.executable, "-c", SPIN_PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [expected, "False"]
