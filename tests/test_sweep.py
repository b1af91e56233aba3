"""``ckpt-ema sweep`` and ``ckpt-ema plan --plot`` as a user runs them.

Checkpoints are tensors filled with their step, so each candidate's value is a short float64 per-step loop;
scores come from a tiny evaluation script written here (numpy only, so each run is quick).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckpt_ema.cli import main
from ckpt_ema.jobs.sweep import parse_score

from .reference import gamma_by_bisection as gamma_of
from .reference import invoke as run

STEPS = [100, 200, 300, 400, 500]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SCORE_SCRIPT = """
import sys
from safetensors.numpy import load_file
path = sys.argv[1]
value = float(load_file(path)["layer.weight"][0, 0])
if "FAIL" in sys.argv[2:] and "decay-0.9." in path:
    print("CUDA out of memory (pretend)", file=sys.stderr)
    sys.exit(3)
if "SILENT" in sys.argv[2:] and "sigma_rel" in path:
    print("nothing to see")
    sys.exit(0)
if "ALLFAIL" in sys.argv[2:]:
    sys.exit(1)
print(f"evaluating {path} at step 500 ...")
print(f"loss: {abs(value - 450.0)}")
"""


def write_series(folder: Path, steps=STEPS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in steps:
        path = folder / f"step-{s:06d}.safetensors"
        save_file(
            {
                "layer.weight": torch.full((4, 8), float(s)),
                "layer.bias": torch.full((8,), s / 2.0),
                "counter": torch.tensor([s], dtype=torch.int64),
            },
            str(path),
        )
        paths.append(path)
    return paths


def classic_truth(decay: float, steps=STEPS) -> float:
    """theta(t) = t moves linearly, so the per-step EMA of the interpolated weights is exact."""
    ema = float(steps[0])
    for t in range(steps[0] + 1, steps[-1] + 1):
        ema = decay * ema + (1 - decay) * t
    return ema


def power_truth(sigma_rel: float, steps=STEPS) -> float:
    """EDM2's per-step weights (t^(g+1) - (t-1)^(g+1)) / T^(g+1); steps before the first checkpoint at its value."""
    g, total = gamma_of(sigma_rel), steps[-1]
    t = np.arange(1, total + 1, dtype=np.float64)
    weights = (t ** (g + 1) - (t - 1) ** (g + 1)) / float(total) ** (g + 1)
    return float(np.sum(weights * np.maximum(t, steps[0])))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    write_series(tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def score_cmd(tmp_path) -> str:
    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT)
    return f"{sys.executable} {script} {{path}}"


def test_sweep_writes_every_candidate_in_one_pass_equal_to_per_step_emas(tmp_path, run_dir):
    out = tmp_path / "out"
    result = run("sweep", run_dir, "--decay", "0.99,0.995", "--decay", "0.999", "--sigma-rel", "0.05, 0.1", "-o", out)
    assert result.exit_code == 0, result.output
    names = ["decay-0.99", "decay-0.995", "decay-0.999", "sigma_rel-0.05", "sigma_rel-0.1"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.safetensors" for n in names] + ["sweep.json"])
    for decay in (0.99, 0.995, 0.999):
        got = load_file(out / f"decay-{decay}.safetensors")
        assert float(got["layer.weight"][0, 0]) == pytest.approx(classic_truth(decay), rel=1e-6)
        assert torch.equal(got["counter"], torch.tensor([500]))
    for sigma in (0.05, 0.1):
        got = load_file(out / f"sigma_rel-{sigma}.safetensors")
        assert float(got["layer.bias"][0]) == pytest.approx(power_truth(sigma) / 2, rel=1e-6)
    record = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in record["candidates"]] == names
    assert record["eval"] is None and record["best"] is None and record["version"]
    assert [(i["path"], i["step"]) for i in record["inputs"]] == [
        (str(run_dir / f"step-{s:06d}.safetensors"), s) for s in STEPS
    ]
    for candidate in record["candidates"]:
        assert sum(candidate["coefficients"]) == pytest.approx(1.0, abs=1e-12)
        assert candidate["score"] is None and candidate["kept"]
    first = record["candidates"][0]
    assert first["target"]["method"] == "classic" and first["target"]["decay"] == 0.99
    assert first["half_life"] == pytest.approx(np.log(0.5) / np.log(0.99))
    # theta(s0) keeps the start, decay^(T - s0), plus its linear-interpolation share of the first gap
    share = 0.99**400 + sum(0.01 * 0.99 ** (500 - t) * (1 - (t - 100) / 100) for t in range(101, 201))
    assert first["coefficients"][0] == pytest.approx(share, rel=1e-9)
    table = result.stdout.splitlines()
    assert table[0].split() == ["candidate", "half-life", "(steps)", "sigma_rel"]
    assert table[1].split()[:2] == ["decay-0.99", "68.97"]


def test_eval_scores_each_candidate_and_marks_the_best(tmp_path, run_dir, score_cmd):
    out = tmp_path / "out"
    result = run("sweep", run_dir, "--decay", "0.9,0.99,0.995", "--sigma-rel", "0.1", "-o", out, "--eval", score_cmd)
    assert result.exit_code == 0, result.output
    truth = {f"decay-{d}": abs(classic_truth(d) - 450) for d in (0.9, 0.99, 0.995)}
    truth["sigma_rel-0.1"] = abs(power_truth(0.1) - 450)
    best = min(truth, key=truth.get)
    record = json.loads((out / "sweep.json").read_text())
    for candidate in record["candidates"]:
        assert candidate["score"] == pytest.approx(truth[candidate["name"]], rel=1e-5, abs=1e-4)
        assert candidate["error"] is None
    assert record["best"] == best and record["direction"] == "minimize" and record["eval"] == score_cmd
    best_rows = [line for line in result.output.splitlines() if "<- best" in line]
    assert len(best_rows) == 1 and best_rows[0].startswith(best + " ")
    assert f"best: {best} " in result.output

    maximized = run("sweep", run_dir, "--decay", "0.9,0.99,0.995", "--sigma-rel", "0.1", "-o", tmp_path / "max",
                    "--eval", score_cmd, "--maximize")  # fmt: skip
    assert maximized.exit_code == 0, maximized.output
    record = json.loads((tmp_path / "max" / "sweep.json").read_text())
    assert record["best"] == max(truth, key=truth.get) and record["direction"] == "maximize"


def test_a_failing_eval_is_reported_with_its_stderr_and_the_sweep_goes_on(tmp_path, run_dir, score_cmd):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["sweep", str(run_dir), "--decay", "0.9,0.99", "--sigma-rel", "0.1", "-o", str(out),
               "--eval", score_cmd + " FAIL SILENT"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "eval failed for decay-0.9: exit code 3: CUDA out of memory (pretend)" in result.stderr
    assert "eval failed for sigma_rel-0.1: printed no number on stdout" in result.stderr
    record = {c["name"]: c for c in json.loads((out / "sweep.json").read_text())["candidates"]}
    assert record["decay-0.9"]["score"] is None and "CUDA out of memory" in record["decay-0.9"]["error"]
    assert record["decay-0.99"]["score"] == pytest.approx(abs(classic_truth(0.99) - 450), rel=1e-5)
    assert json.loads((out / "sweep.json").read_text())["best"] == "decay-0.99"
    assert [line.split()[-1] for line in result.stdout.splitlines()[1:4]] == ["failed", "best", "failed"]


def test_every_eval_failing_exits_1(tmp_path, run_dir, score_cmd):
    result = run("sweep", run_dir, "--decay", "0.9,0.99", "-o", tmp_path / "out", "--eval", score_cmd + " ALLFAIL")
    assert result.exit_code == 1
    assert "Error: every evaluation failed" in result.output
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["best"] is None


def test_keep_best_deletes_the_other_candidates(tmp_path, run_dir, score_cmd):
    out = tmp_path / "out dir"  # {path} is shell-quoted
    result = run("sweep", run_dir, "--decay", "0.9,0.99,0.995", "-o", out, "--eval", score_cmd, "--keep", "best")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sweep.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == [f"{record['best']}.safetensors", "sweep.json"]
    assert [c["kept"] for c in record["candidates"]] == [c["name"] == record["best"] for c in record["candidates"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep", "best"], "--keep best needs --eval"),
        (["--plot"], "--plot needs --eval"),
        (["--decay", "1.5"], "--decay 1.5: the decay per step must be in (0, 1)"),
        (["--decay", "0.9,0.9"], "target given twice: decay-0.9"),
        (["--eval", "python eval.py"], "--eval: the command must contain {path}"),
    ],
)
def test_bad_sweeps_stop_before_any_output(tmp_path, run_dir, args, message):
    result = run("sweep", run_dir, "--decay", "0.99", "-o", tmp_path / "out", *args)
    assert result.exit_code in (1, 2) and message in result.output
    assert not any((tmp_path / "out").glob("*.safetensors"))


def test_existing_candidates_need_force(tmp_path, run_dir):
    assert run("sweep", run_dir, "--decay", "0.99", "-o", tmp_path / "out").exit_code == 0
    again = run("sweep", run_dir, "--decay", "0.99", "-o", tmp_path / "out")
    assert again.exit_code == 1 and "already exists; pass --force" in again.output
    assert run("sweep", run_dir, "--decay", "0.99", "-o", tmp_path / "out", "--force").exit_code == 0
    # a single candidate is still named after its target, inside the folder
    assert (tmp_path / "out" / "decay-0.99.safetensors").is_file()


@pytest.mark.parametrize(
    ("stdout", "score"),
    [
        ("loss 0.25\n", 0.25),
        ("step 100: 3\nfinal -1.5e-3", -1.5e-3),
        ("wrote out/decay-0.9.safetensors", None),  # numbers inside names do not count
        ("0.5 for step-000100\n", 0.5),
        ("accuracy=97.5%", 97.5),
        ("nothing", None),
    ],
)
def test_the_score_is_the_last_number_standing_on_its_own(stdout, score):
    assert parse_score(stdout) == score


def test_a_nan_score_is_a_failure_not_an_earlier_number(tmp_path, run_dir):
    out = tmp_path / "out"
    result = run(
        "sweep",
        run_dir,
        "--decay",
        "0.99",
        "-o",
        out,
        "--eval",
        f"{sys.executable} -c \"print('epoch 3 loss nan')\" {{path}}",
    )
    assert result.exit_code == 1
    assert "not finite (nan)" in json.loads((out / "sweep.json").read_text())["candidates"][0]["error"]


def _hide_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError


def test_plot_without_matplotlib_says_how_to_install_it_before_any_work(tmp_path, run_dir, score_cmd, monkeypatch):
    _hide_matplotlib(monkeypatch)
    result = run("sweep", run_dir, "--decay", "0.99", "-o", tmp_path / "out", "--eval", score_cmd, "--plot")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --plot needs matplotlib, which is not installed: pip install 'ckpt-ema[plot]'"
    ]
    assert not (tmp_path / "out").exists()
    plan = run("plan", run_dir, "--decay", "0.99", "--plot", tmp_path / "w.png")
    assert plan.exit_code == 1 and "pip install 'ckpt-ema[plot]'" in plan.output


def test_plots_are_pngs(tmp_path, run_dir, score_cmd):
    pytest.importorskip("matplotlib")
    result = run("sweep", run_dir, "--decay", "0.9,0.99", "--sigma-rel", "0.1", "-o", tmp_path / "out",
                 "--eval", score_cmd, "--plot")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "sweep.png").read_bytes().startswith(PNG_MAGIC)
    plan = run("plan", run_dir, "--decay", "0.99", "--sigma-rel", "0.1", "--plot", tmp_path / "w.png")
    assert plan.exit_code == 0, plan.output
    assert f"wrote {tmp_path / 'w.png'}" in plan.output
    assert (tmp_path / "w.png").read_bytes().startswith(PNG_MAGIC)


def test_installed_command(tmp_path, run_dir, score_cmd):
    exe = Path(sys.executable).parent / "ckpt-ema"
    out = tmp_path / "out"
    done = subprocess.run(
        [str(exe), "sweep", str(run_dir), "--decay", "0.99,0.999", "-o", str(out), "--eval", score_cmd, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "decay-0.999: the first checkpoint (step 100) keeps 70%" in done.stderr
    assert "%|" not in done.stderr  # no progress bar when piped
    record = json.loads(done.stdout)
    scores = {c["name"]: c["score"] for c in record["candidates"]}
    assert scores["decay-0.999"] == pytest.approx(abs(classic_truth(0.999) - 450), rel=1e-5)
    assert record["best"] == min(scores, key=scores.get)


def test_reconstructions_from_ema_snapshots_are_candidates_too(tmp_path):
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    for s in range(100, 1100, 100):
        for sigma in ("0.050", "0.100"):
            save_file({"w": torch.full((4,), float(s))}, str(snaps / f"ema-{s:07d}-{sigma}.safetensors"))
    out = tmp_path / "out"
    result = run("sweep", snaps, "--tracked-sigma-rel", "0.05,0.1", "--sigma-rel", "0.07,0.12", "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sweep.json").read_text())
    for candidate, sigma in zip(record["candidates"], (0.07, 0.12)):
        assert candidate["target"]["method"] == "reconstruction" and candidate["sigma_rel"] == pytest.approx(sigma)
        # half-life of the power profile's per-step decay at T: (1 - 1/T)^(gamma + 1)
        decay = (1 - 1 / 1000) ** (gamma_of(sigma) + 1)
        assert candidate["half_life"] == pytest.approx(np.log(0.5) / np.log(decay), rel=1e-6)
        assert sum(candidate["coefficients"]) == pytest.approx(1.0, abs=1e-9)
