"""The command line as a user runs it: outputs, names, summaries, and every bad input of the core issue.

Fixtures are tensors filled with their step number, so every expected value is a short float64 loop.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckpt_ema import merge_to_state_dict
from ckpt_ema.cli import main
from ckpt_ema.jobs.integrity import DEFAULT_HASH

from .reference import invoke as run

STEPS = [100, 200, 300, 400, 500]


def write_checkpoint(path: Path, step: float, dtype=torch.float32, metadata=None, **overrides) -> Path:
    tensors = {
        "layer.weight": torch.full((4, 8), float(step), dtype=dtype),
        "layer.bias": torch.full((8,), float(step) / 2, dtype=dtype),
        "counter": torch.tensor([int(step)], dtype=torch.int64),
    }
    tensors.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture
def series(tmp_path) -> list[Path]:
    return [
        write_checkpoint(tmp_path / "run" / f"step-{s:06d}.safetensors", s, metadata={"modelspec.title": f"t{s}"})
        for s in STEPS
    ]


def expected_linear_ema(decay: float, steps=STEPS) -> float:
    """theta(t) = t moves linearly, so linear interpolation is exact: loop over every step in float64."""
    ema = float(steps[0])
    for t in range(steps[0] + 1, steps[-1] + 1):
        ema = decay * ema + (1 - decay) * t
    return ema


def test_merge_one_target_writes_the_file_with_provenance(tmp_path, series):
    out = tmp_path / "ema.safetensors"
    result = run("merge", *series, "--decay", "0.99", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    tensors = load_file(out)
    assert torch.allclose(tensors["layer.weight"].double(), torch.tensor(expected_linear_ema(0.99)).double(), rtol=1e-6)
    assert torch.equal(tensors["counter"], torch.tensor([500]))  # copied from the newest, not averaged
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["modelspec.title"] == "t500"  # the newest input's metadata is carried over
    assert meta["ckpt_ema.method"] == "classic" and meta["ckpt_ema.decay"] == "0.99"
    assert meta["ckpt_ema.target_step"] == "500"
    assert meta["ckpt_ema.input.0.step"] == "100" and meta["ckpt_ema.input.4.path"] == str(series[-1])
    assert sum(float(meta[f"ckpt_ema.input.{i}.coefficient"]) for i in range(5)) == pytest.approx(1.0, abs=1e-12)


def test_several_targets_go_to_a_folder_named_as_written(tmp_path, series):
    out = tmp_path / "out"
    result = run("merge", tmp_path / "run", "--decay", "0.999", "--sigma-rel", "0.10", "--half-life", "500", "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "decay-0.999.safetensors",
        "half_life-500.safetensors",
        "sigma_rel-0.1.safetensors",
    ]
    half_life = load_file(out / "half_life-500.safetensors")["layer.weight"][0, 0].item()
    assert half_life == pytest.approx(expected_linear_ema(0.5 ** (1 / 500)), rel=1e-6)


def test_input_order_does_not_matter(tmp_path, series):
    shuffled = series[:]
    random.Random(3).shuffle(shuffled)
    for name, inputs in (("a", series), ("b", shuffled)):
        assert run("merge", *inputs, "--sigma-rel", "0.2", "-o", tmp_path / f"{name}.safetensors").exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_plan_json_reads_no_tensor_data(tmp_path, series, monkeypatch):
    from ckpt_ema.io import safetensors_format

    def refuse(self):
        raise AssertionError("plan must not read tensor data")

    monkeypatch.setattr(safetensors_format.SafetensorsReader, "_mapping", refuse)
    result = run("plan", *series, "--decay", "0.99", "--gamma", "7", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    names = [o["name"] for o in summary["outputs"]]
    assert names == ["decay-0.99", "gamma-7"]
    first = summary["outputs"][0]
    assert first["target"]["method"] == "classic" and first["target"]["decay"] == 0.99
    assert [i["step"] for i in first["inputs"]] == STEPS
    assert sum(i["coefficient"] for i in first["inputs"]) == pytest.approx(1.0)
    assert first["equivalents"]["half_life"] == pytest.approx(68.97, abs=0.01)


def test_plan_text_shows_steps_coefficients_and_warnings(series):
    result = run("plan", *series, "--decay", "0.999", "--decay", "0.9")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "5 checkpoints, steps 100 to 500 (every 100 steps)" in out
    assert "step from name 'step-000100'" in out
    assert "half-life 692.8 steps = 6.93 x checkpoint spacing" in out
    assert "warning: decay-0.999: the first checkpoint (step 100) keeps 70% of the weight" in out
    assert "warning: decay-0.9: the half-life (6.58 steps) is shorter than the spacing" in out


def test_uneven_steps_and_bare_numbers_are_warned(tmp_path):
    paths = [write_checkpoint(tmp_path / f"model-{s:06d}.safetensors", s) for s in (1, 2, 3, 10)]
    result = run("plan", *paths, "--decay", "0.5")
    assert result.exit_code == 0, result.output
    assert "unevenly spaced" in result.output
    assert "bare trailing number" in result.output and "pass --steps" in result.output


def test_init_steps_and_at(tmp_path):
    paths = [write_checkpoint(tmp_path / f"ckpt-{name}.safetensors", s) for name, s in (("b", 20), ("a", 10))]
    base = write_checkpoint(tmp_path / "base.safetensors", 0)
    out = tmp_path / "ema.safetensors"
    # --steps follows the order the files are given; the EMA starts at the base model (step 0).
    result = run("merge", *paths, "--steps", "20,10", "--init", base, "--decay", "0.9", "-o", out)
    assert result.exit_code == 0, result.output
    assert load_file(out)["layer.weight"][0, 0].item() == pytest.approx(expected_linear_ema(0.9, [0, 10, 20]), rel=1e-6)
    result = run("merge", *paths, "--steps", "20,10", "--at", "10", "--decay", "0.9", "-o", tmp_path / "at.safetensors")
    assert result.exit_code == 0, result.output
    assert load_file(tmp_path / "at.safetensors")["counter"].item() == 10  # newest at or before T


def test_dtype_choice_and_same_dtype_default(tmp_path):
    paths = [write_checkpoint(tmp_path / f"step-{s}.safetensors", s, dtype=torch.bfloat16) for s in (1, 2)]
    assert run("merge", *paths, "--decay", "0.5", "-o", tmp_path / "same.safetensors").exit_code == 0
    assert load_file(tmp_path / "same.safetensors")["layer.weight"].dtype == torch.bfloat16
    assert run("merge", *paths, "--decay", "0.5", "--dtype", "fp32", "-o", tmp_path / "f.safetensors").exit_code == 0
    assert load_file(tmp_path / "f.safetensors")["layer.weight"].dtype == torch.float32
    assert load_file(tmp_path / "f.safetensors")["counter"].dtype == torch.int64


def test_existing_output_needs_force(tmp_path, series):
    out = tmp_path / "ema.safetensors"
    out.write_bytes(b"keep me")
    result = run("merge", *series, "--decay", "0.9", "-o", out)
    assert result.exit_code == 1 and "--force" in result.output
    assert out.read_bytes() == b"keep me"
    assert run("merge", *series, "--decay", "0.9", "-o", out, "--force").exit_code == 0
    assert load_file(out)["counter"].item() == 500


def test_nan_in_an_input_is_warned_with_tensor_and_file(tmp_path, series):
    bad = torch.full((4, 8), 300.0)
    bad[1, 2] = float("nan")
    write_checkpoint(series[2], 300, **{"layer.weight": bad})
    result = run("merge", *series, "--decay", "0.9", "-o", tmp_path / "ema.safetensors")
    assert result.exit_code == 0
    assert f"warning: {series[2]}: tensor 'layer.weight' (step 300) has NaN or Inf values" in result.output


def test_merge_json_summary(tmp_path, series):
    result = CliRunner().invoke(
        main, ["merge", *map(str, series), "--decay", "0.9", "--json", "-o", str(tmp_path / "e.safetensors")]
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["outputs"][0]["path"] == str(tmp_path / "e.safetensors")


def test_python_api_gives_the_same_numbers_as_the_file(tmp_path, series):
    out = tmp_path / "ema.safetensors"
    assert run("merge", *series, "--gamma", "5", "-o", out).exit_code == 0
    in_memory = merge_to_state_dict(series, gamma=[5])["gamma-5"]
    on_disk = load_file(out)
    assert all(torch.equal(in_memory[k], on_disk[k]) for k in on_disk)


def _bad(tmp_path, series):
    """(description, extra setup -> args, text the error must contain)."""
    run_dir = tmp_path / "run"

    def text_file():
        p = tmp_path / "notes.safetensors"
        p.write_text("hello, not a checkpoint")
        return [*series, p, "--decay", "0.9"], "notes.safetensors: not a safetensors file"

    def truncated():
        data = series[3].read_bytes()
        series[3].write_bytes(data[: len(data) - 40])
        return [*series, "--decay", "0.9"], "step-000400.safetensors: tensor"

    def keys_differ():
        write_checkpoint(series[1], 200, **{"extra.b": torch.zeros(2), "extra.a": torch.zeros(2)})
        return [*series, "--decay", "0.9"], "has extra 2 tensors ('extra.a', 'extra.b')"

    def shape_differs():
        write_checkpoint(series[1], 200, **{"layer.bias": torch.zeros(9)})
        return [*series, "--decay", "0.9"], "'layer.bias' is (8,) in " + str(series[-1]) + " but (9,) in " + str(
            series[1]
        )

    def kind_differs():
        write_checkpoint(series[1], 200, **{"layer.bias": torch.zeros(8, dtype=torch.int32)})
        return [*series, "--decay", "0.9"], "floating point and integer tensors cannot be mixed"

    def duplicate_step():
        p = write_checkpoint(tmp_path / "other" / "checkpoint-300.safetensors", 300)
        return [*series, p, "--decay", "0.9"], "both have step 300"

    def no_step():
        p = write_checkpoint(tmp_path / "final.safetensors", 600)
        return [*series, p, "--decay", "0.9"], "final.safetensors: no step found"

    def at_outside():
        return [*series, "--decay", "0.9", "--at", "900"], "--at 900 is outside the series"

    def at_between():
        return [*series, "--decay", "0.9", "--at", "250"], "nearest are 200 and 300"

    def sigma_rel_range():
        return [*series, "--sigma-rel", "0.3"], "sigma_rel must be in (0, 0.2887)"

    def decay_range():
        return [*series, "--decay", "1.0"], "the decay per step must be in (0, 1)"

    def decay_not_number():
        return [*series, "--decay", "fast"], "--decay fast: not a number"

    def output_is_input():
        return [*series, "--decay", "0.9", "--force", "-o", series[0]], "is an input"

    def output_is_hard_link():
        link = tmp_path / "link.safetensors"
        os.link(series[0], link)
        return [*series, "--decay", "0.9", "--force", "-o", link], "is an input"

    def no_target():
        return [*series], "no target given"

    def empty_folder():
        (tmp_path / "empty").mkdir()
        return [tmp_path / "empty", "--decay", "0.9"], "empty: folder holds no .safetensors files"

    def missing_file():
        return [tmp_path / "nope.safetensors", "--decay", "0.9"], "nope.safetensors: no such file or folder"

    def several_targets_to_a_file_name():
        return [*series, "--decay", "0.9", "--decay", "0.99", "-o", tmp_path / "out" / "ema.safetensors"], (
            "2 targets are written into a folder, one file each; give a folder"
        )

    def given_twice():
        return [*series, run_dir, "--decay", "0.9"], "given twice"

    return {
        f.__name__: f
        for f in (
            text_file,
            truncated,
            keys_differ,
            shape_differs,
            kind_differs,
            duplicate_step,
            no_step,
            at_outside,
            at_between,
            sigma_rel_range,
            decay_range,
            decay_not_number,
            output_is_input,
            output_is_hard_link,
            no_target,
            empty_folder,
            missing_file,
            given_twice,
            several_targets_to_a_file_name,
        )
    }


BAD_CASES = list(_bad(Path("."), []).keys())


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gives_one_line_error_and_no_output(tmp_path, series, case):
    args, expected = _bad(tmp_path, series)[case]()
    if "-o" not in args:
        args = [*args, "-o", tmp_path / "out" / "ema.safetensors"]
    before = {p: p.read_bytes() for p in series if p.exists()}
    result = CliRunner().invoke(main, ["merge", *map(str, args)])
    assert result.exit_code == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert expected in lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert not (tmp_path / "out" / "ema.safetensors").exists()
    leftovers = [p for p in tmp_path.rglob("*") if ".ckpt-ema-tmp-" in p.name]
    assert leftovers == []
    assert {p: p.read_bytes() for p in series if p.exists()} == before  # inputs untouched


def test_installed_command_and_module_entry_point(tmp_path, series):
    bindir = Path(sys.executable).parent
    out = tmp_path / "ema.safetensors"
    done = subprocess.run(
        [str(bindir / "ckpt-ema"), "merge", *map(str, series), "--decay", "0.9", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,  # a guard against hangs, not a deadline: a loaded machine is slow
    )
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "ckpt_ema", "merge", str(tmp_path / "nope"), "--decay", "0.9", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,  # a guard against hangs, not a deadline: a loaded machine is slow
    )
    assert done.returncode == 1
    assert done.stderr.strip() == f"Error: {tmp_path / 'nope'}: no such file or folder"
    assert "Traceback" not in done.stderr


def test_no_hash_skips_the_input_hashes_and_gives_the_same_tensors(tmp_path, series):
    hashed, plain = tmp_path / "hashed.safetensors", tmp_path / "plain.safetensors"
    assert run("merge", *series, "--decay", "0.9", "-o", hashed).exit_code == 0
    assert run("merge", *series, "--decay", "0.9", "--no-hash", "--verify", "-o", plain).exit_code == 0
    with safe_open(str(hashed), "pt") as f:
        assert f"ckpt_ema.input.0.{DEFAULT_HASH}" in f.metadata()
    with safe_open(str(plain), "pt") as f:
        assert not any(k.endswith((".sha256", ".blake3")) for k in f.metadata())
    a, b = load_file(hashed), load_file(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)
