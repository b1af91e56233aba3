"""``ckpt-ema batch``: many runs, one series each; failures reported at the end; an interrupted batch resumes.

Each run's tensors are filled with ``step + offset``, so every expected value is a short float64 loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import ckpt_ema.cli.batch as batch_cli

from .reference import invoke as run

STEPS = [100, 200, 300, 400]
OFFSETS = {"r1": 0.0, "r2": 1000.0, "r3": 5000.0}


def write_run(folder: Path, offset: float, steps=STEPS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in steps:
        save_file(
            {"w": torch.full((3, 5), s + offset), "n": torch.tensor([s], dtype=torch.int64)},
            str(folder / f"step-{s:06d}.safetensors"),
        )
    return folder


def truth(decay: float, offset: float, steps=STEPS) -> float:
    ema = steps[0] + offset
    for t in range(steps[0] + 1, steps[-1] + 1):
        ema = decay * ema + (1 - decay) * (t + offset)
    return ema


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [write_run(tmp_path / "runs" / name, offset) for name, offset in OFFSETS.items()]


def table(result: CliRunner.Result) -> dict[str, list[str]]:
    """The summary table's rows by run name: [status, written, skipped, time, reason...]."""
    lines = result.stdout.splitlines()
    return {line.split()[0]: line.split()[1:] for line in lines[1 : lines.index("")]}


def test_each_run_is_a_series_with_its_own_output_folder(tmp_path, runs):
    out = tmp_path / "ema"
    result = run("batch", *runs, "--decay", "0.99,0.995", "-o", out)
    assert result.exit_code == 0, result.output
    for name, offset in OFFSETS.items():
        assert sorted(p.name for p in (out / name).iterdir()) == ["decay-0.99.safetensors", "decay-0.995.safetensors"]
        for decay in (0.99, 0.995):
            got = load_file(out / name / f"decay-{decay}.safetensors")
            assert float(got["w"][0, 0]) == pytest.approx(truth(decay, offset), rel=1e-6)
            assert torch.equal(got["n"], torch.tensor([400]))
    rows = table(result)
    assert {name: row[:3] for name, row in rows.items()} == {name: ["done", "2", "0"] for name in OFFSETS}
    assert "3 runs: 3 done, 0 already complete, 0 failed" in result.stdout


def test_failed_runs_are_reported_at_the_end_and_do_not_stop_the_others(tmp_path, runs):
    broken = runs[1] / "step-000300.safetensors"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated
    empty = tmp_path / "runs" / "r0-empty"
    empty.mkdir()
    out = tmp_path / "ema"
    result = run("batch", empty, *runs, "--decay", "0.99", "-o", out)
    assert result.exit_code == 1
    rows = table(result)
    assert rows["r1"][:3] == rows["r3"][:3] == ["done", "1", "0"]
    assert rows["r2"][0] == "failed" and str(broken) in " ".join(rows["r2"])
    assert rows["r0-empty"][0] == "failed"
    assert "Error: 2 of 4 runs failed: r0-empty, r2" in result.output
    assert not (out / "r2").exists() or not any((out / "r2").iterdir())  # nothing half-written
    assert float(load_file(out / "r3" / "decay-0.99.safetensors")["w"][0, 0]) == pytest.approx(truth(0.99, 5000.0))


def test_finished_outputs_are_skipped_only_missing_targets_are_computed(tmp_path, runs):
    out = tmp_path / "ema"
    assert run("batch", *runs, "--decay", "0.99", "-o", out).exit_code == 0
    kept = out / "r1" / "decay-0.99.safetensors"
    kept.write_bytes(kept.read_bytes())  # same content, new mtime: to see it is not rewritten
    before = kept.stat().st_mtime_ns
    again = run("batch", *runs, "--decay", "0.99", "--sigma-rel", "0.1", "-o", out)
    assert again.exit_code == 0, again.output
    assert {name: row[:3] for name, row in table(again).items()} == {name: ["done", "1", "1"] for name in OFFSETS}
    assert kept.stat().st_mtime_ns == before
    third = run("batch", *runs, "--decay", "0.99", "--sigma-rel", "0.1", "-o", out)
    assert {name: row[:3] for name, row in table(third).items()} == {name: ["skipped", "0", "2"] for name in OFFSETS}
    assert "already written (--force to redo)" in third.stdout
    forced = run("batch", *runs, "--decay", "0.99", "--sigma-rel", "0.1", "-o", out, "--force")
    assert {name: row[:3] for name, row in table(forced).items()} == {name: ["done", "2", "0"] for name in OFFSETS}


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_interrupted_batch_is_resumed_by_running_it_again(tmp_path, runs, monkeypatch, jobs):
    monkeypatch.setenv("CKPT_EMA_KERNEL", "torch")  # so that --jobs 2 runs threads
    out = tmp_path / "ema"
    real_execute = batch_cli.execute

    def interrupt_at_r2(task, *args, **kwargs):
        if task.name == "r2":
            raise KeyboardInterrupt
        real_execute(task, *args, **kwargs)

    monkeypatch.setattr(batch_cli, "execute", interrupt_at_r2)
    interrupted = run("batch", *runs, "--decay", "0.99", "-o", out, "--jobs", jobs)
    assert interrupted.exit_code == 130
    assert not (out / "r2").exists()
    assert [p.name for p in out.rglob("*") if p.is_file()] in (["decay-0.99.safetensors"] * n for n in (1, 2))
    monkeypatch.setattr(batch_cli, "execute", real_execute)
    resumed = run("batch", *runs, "--decay", "0.99", "-o", out)
    assert resumed.exit_code == 0, resumed.output
    statuses = [row[0] for row in table(resumed).values()]
    assert statuses[:2] == ["skipped", "done"] and statuses[2] == ("done" if jobs == 1 else statuses[2])
    assert all((out / name / "decay-0.99.safetensors").is_file() for name in OFFSETS)


@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_jobs_give_the_same_files(tmp_path, runs, kernel, monkeypatch):
    monkeypatch.setenv("CKPT_EMA_KERNEL", kernel)  # torch, or (auto) the fused kernel entered from two threads
    assert run("batch", *runs, "--sigma-rel", "0.05,0.1", "-o", tmp_path / "one").exit_code == 0
    assert run("batch", *runs, "--sigma-rel", "0.05,0.1", "-o", tmp_path / "two", "--jobs", "2").exit_code == 0
    for name in OFFSETS:
        for target in ("sigma_rel-0.05", "sigma_rel-0.1"):
            a = (tmp_path / "one" / name / f"{target}.safetensors").read_bytes()
            b = (tmp_path / "two" / name / f"{target}.safetensors").read_bytes()
            assert a == b  # the same bytes: the runs are independent of the threads


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "1,2,3,4"], "--steps cannot be used with batch"),
        (["--decay", "2"], "--decay 2: the decay per step must be in (0, 1)"),
    ],
)
def test_bad_batches_stop_before_any_output(tmp_path, runs, extra, message):
    result = run("batch", *runs, "--decay", "0.99", "-o", tmp_path / "ema", *extra)
    assert result.exit_code in (1, 2) and message in result.output
    assert not (tmp_path / "ema").exists()


def test_duplicate_run_names_are_an_error_up_front(tmp_path, runs):
    other = write_run(tmp_path / "elsewhere" / "r1", 7.0)
    result = run("batch", *runs, other, "--decay", "0.99", "-o", tmp_path / "ema")
    assert result.exit_code == 1
    assert f"Error: {runs[0]} and {other} have the same name 'r1'" in result.output
    assert not (tmp_path / "ema").exists()


def test_installed_command(tmp_path, runs):
    exe = Path(sys.executable).parent / "ckpt-ema"
    done = subprocess.run(
        [str(exe), "batch", *map(str, runs), "--half-life", "50", "-o", str(tmp_path / "ema"), "--json", "-j", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert [(s["run"], s["status"]) for s in summary] == [(name, "done") for name in OFFSETS]
    decay = 0.5 ** (1 / 50)
    for entry, offset in zip(summary, OFFSETS.values()):
        assert float(load_file(entry["written"][0])["w"][0, 0]) == pytest.approx(truth(decay, offset), rel=1e-6)
