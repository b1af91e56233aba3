"""--last, --window, --lr-decay through the command line, on a real tiny training run (spec §8).

References are written here from the definitions, in float64, without ckpt-ema code: the per-step mean of theta,
the per-step decayed update sum, closed forms for sparse checkpoints, and timm's ``avg_checkpoints`` rule (timm
cannot be imported on this machine: it needs torchvision; the rule is written below as timm 1.0 has it).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.reference import invoke, run
from tests.training import classic_truth, rel_error, save_series, train_tiny

STEPS = 120
SHAPES = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: (1.0 + math.cos(math.pi * x)) / 2.0,
    "sqrt": lambda x: 1.0 - math.sqrt(x),
}


@pytest.fixture(scope="module")
def states():
    return train_tiny(STEPS)


@pytest.fixture(scope="module")
def every_step(states, tmp_path_factory):
    folder = tmp_path_factory.mktemp("every") / "run"
    save_series(states, folder, range(STEPS + 1))
    return folder


@pytest.fixture(scope="module")
def sparse(states, tmp_path_factory):
    """Checkpoints every 10 steps from step 0, one more at 115 (uneven at the end)."""
    folder = tmp_path_factory.mktemp("sparse") / "run"
    save_series(states, folder, [*range(0, STEPS + 1, 10), 115])
    return folder


def floats(state):
    return {k: v.double() for k, v in state.items() if v.is_floating_point()}


def combine(states, weights):
    """sum_s weights[s] * theta(s) in float64."""
    names = floats(states[0]).keys()
    return {k: sum(w * states[s][k].double() for s, w in weights.items()) for k in names}


def window_truth(states, length):
    return {
        k: sum(states[t][k].double() for t in range(STEPS - length + 1, STEPS + 1)) / length for k in floats(states[0])
    }


def lr_decay_truth(states, shape, length):
    """theta(T - L) + sum_t f((t - 1 - (T - L)) / L) (theta(t) - theta(t - 1)), accumulated update by update."""
    start = STEPS - length
    result = floats(states[start])
    for t in range(start + 1, STEPS + 1):
        factor = SHAPES[shape]((t - 1 - start) / length)
        for k in result:
            result[k] += factor * (states[t][k].double() - states[t - 1][k].double())
    return result


def test_every_step_window_and_lr_decay_equal_their_per_step_definitions(every_step, states, tmp_path):
    # All of them, and an EMA, in one pass.
    out = tmp_path / "out"
    args = ["--window", 1, "--window", 40, "--window", STEPS, "--decay", 0.95, "--dtype", "fp32", "-o", out]
    for shape in SHAPES:
        args += ["--lr-decay", f"{shape}:30", "--lr-decay", f"{shape}:{STEPS}"]
    run("merge", "-q", every_step, *args)
    for length in (1, 40, STEPS):
        assert rel_error(load_file(out / f"window-{length}.safetensors"), window_truth(states, length)) < 2e-6
    for shape in SHAPES:
        for length in (30, STEPS):
            result = load_file(out / f"lr_decay-{shape}-{length}.safetensors")
            assert rel_error(result, lr_decay_truth(states, shape, length)) < 2e-6, (shape, length)
    assert rel_error(load_file(out / "decay-0.95.safetensors"), classic_truth(states, 0.95)) < 2e-6


@pytest.mark.parametrize("interp", ["linear", "hold"])
def test_sparse_checkpoints_against_closed_forms(sparse, states, tmp_path, interp):
    # Checkpoints 0, 10, ..., 110, 115, 120. A window of 40 = (80, 120]:
    #   hold: each checkpoint gets the steps of its gap that are in the window: 90, 100, 110 get 10/40, 115 and 120 5/40;
    #   linear: a gap (a, b] of g steps gives b sum_{k=1}^{g} k/g = (g+1)/2 and a (g-1)/2.
    # lr-decay hold: checkpoint b gets w_{a+1} - w_{b+1} with w_t = f((t - 1 - (T - L)) / L).
    out = tmp_path / "out"
    run("merge", "-q", sparse, "--window", 40, "--lr-decay", "cosine:40", "--lr-decay", "sqrt:40", "--interp", interp,
        "--dtype", "fp32", "-o", out)  # fmt: skip
    gaps = [(80, 90), (90, 100), (100, 110), (110, 115), (115, 120)]
    if interp == "hold":
        window = {b: (b - a) / 40 for a, b in gaps}
    else:
        window = {80: 0.0}
        for a, b in gaps:
            g = b - a
            window[b] = window.get(b, 0.0) + (g + 1) / 2 / 40
            window[a] += (g - 1) / 2 / 40
    assert math.isclose(sum(window.values()), 1.0)
    assert rel_error(load_file(out / "window-40.safetensors"), combine(states, window)) < 2e-6
    if interp == "hold":
        for shape in ("cosine", "sqrt"):

            def w(t, f=SHAPES[shape]):
                return f(min(max(t - 1 - 80, 0), 40) / 40)

            decay = {b: w(a + 1) - w(b + 1) for a, b in gaps}
            assert rel_error(load_file(out / f"lr_decay-{shape}-40.safetensors"), combine(states, decay)) < 2e-6


def timm_average(paths, n):
    """timm 1.0's avg_checkpoints.py: sort by the checkpoint's metric (here its step), keep the last n, sum every
    tensor in float64, divide by the count, clamp to the float32 range, cast to float32."""
    ranked = sorted((int(p.stem.split("-")[1]), p) for p in paths)[-n:]
    total, counts = {}, {}
    for _, path in ranked:
        for k, v in load_file(path).items():
            if k not in total:
                total[k], counts[k] = v.clone().to(torch.float64), 1
            else:
                total[k] += v.to(torch.float64)
                counts[k] += 1
    info = torch.finfo(torch.float32)
    return {k: (v / counts[k]).clamp(info.min, info.max).to(torch.float32) for k, v in total.items()}


def test_last_n_is_timms_avg_checkpoints(sparse, tmp_path):
    paths = sorted(sparse.glob("*.safetensors"))
    run("merge", "-q", sparse, "--last", 5, "--last", 1, "--dtype", "fp32", "-o", tmp_path / "out")
    for n in (5, 1):
        ours = load_file(tmp_path / "out" / f"last-{n}.safetensors")
        theirs = timm_average(paths, n)
        # timm averages integer buffers too (num_batches_tracked becomes a float); ckpt-ema copies them from
        # the newest checkpoint (spec §5), so only the float tensors are compared.
        floats_ = [k for k, v in ours.items() if v.is_floating_point()]
        assert floats_ and set(floats_) < set(theirs)
        assert rel_error({k: ours[k] for k in floats_}, {k: theirs[k].double() for k in floats_}) < 1e-6
    assert torch.equal(ours["1.num_batches_tracked"], load_file(paths[-1])["1.num_batches_tracked"])


def test_plan_warnings_and_units(sparse, tmp_path):
    # Uneven spacing in the last checkpoints; a window shorter than the spacing; tokens from --tokens-per-step.
    result = run("plan", sparse, "--last", 4, "--window", 4, "--lr-decay", "sqrt:200ktokens", "--tokens-per-step",
                 2000, "--half-life", "20ktokens")  # fmt: skip
    out = result.output
    assert "2000 tokens per step (from --tokens-per-step); T = 120 steps = 240k tokens" in out
    assert "lr_decay-sqrt-200ktokens: as if the learning rate had decayed to 0 (sqrt) over the last 100 steps = " \
        "200k tokens (steps 21 to 120)" in out  # fmt: skip
    assert "half_life-20ktokens: classic EMA, decay 0.933033 per step; half-life 10 steps = 20k tokens" in out
    assert (
        "warning: last-4: the 4 checkpoints (steps 100 to 120) are unevenly spaced, gaps of 5 to 10 steps (2x)" in out
    )
    assert (
        "warning: window-4: the window (4 steps) is shorter than the spacing of the checkpoints (10 steps); "
        "it rests on interpolation (the last checkpoint gets 70%)" in out
    )
    result = run("plan", sparse, "--last", 5)
    assert (
        "warning: last-5: the 5 checkpoints (steps 90 to 120) are unevenly spaced, gaps of 5 to 10 steps (2x): "
        "--last weights checkpoints, not steps; --window 30 weights the steps of that span equally" in result.output
    )
    plan = json.loads(run("plan", sparse, "--lr-decay", "cosine:50", "--samples-per-step", 8, "--json").stdout)
    output = plan["outputs"][0]
    assert output["target"] == {"method": "lr_decay", "length": 50.0, "shape": "cosine"}
    assert output["equivalents"]["length_samples"] == 400.0 and output["equivalents"]["start_step"] == 70.0
    assert plan["step_size"] == {"tokens_per_step": None, "samples_per_step": 8.0, "source": "--samples-per-step"}


def test_window_before_the_first_checkpoint(states, tmp_path):
    run_dir = tmp_path / "run"
    save_series(states, run_dir, [40, 80, 120])
    result = invoke("plan", run_dir, "--window", 95)
    assert result.exit_code == 1
    assert "--window 95: the window of 95 steps covers steps 26 to 120, before the first checkpoint (step 40); " \
        "the longest is 81 steps; shorten it, or pass --init (the weights at step 0)" in result.output  # fmt: skip
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in states[0].items()}, str(base))
    out = run("plan", run_dir, "--window", 95, "--lr-decay", "linear:95", "--init", base).output
    # (25, 120] with theta linear between step 0 and 40: steps 26..40 give the base model
    # sum_{t=26}^{40} (40 - t)/40 = 105/40, over 95 steps: 2.76%
    assert "window-95: the window starts at step 25, before the first checkpoint (step 40); the base model " \
        "(--init) gets 2.8% of the weight" in out  # fmt: skip
    assert "lr_decay-linear-95: the decay starts at step 25" in out


def test_errors(sparse):
    for args, message in [
        (["--last", 0], "--last 0: must be at least 1 checkpoint"),
        (["--last", 20], "--last 20: need 1 <= N <= 14"),
        (["--window", "2.5"], "--window 2.5: must be a whole number of steps"),
        (["--window", "1Mtok"], "--window 1Mtok: the tokens per optimizer step are unknown; pass --tokens-per-step N"),
        (["--lr-decay", "step:10"], "--lr-decay step:10: write SHAPE:LENGTH, SHAPE one of linear, cosine, sqrt"),
        (["--lr-decay", "cosine"], "write SHAPE:LENGTH"),
        (
            ["--window", 10, "--per-checkpoint"],
            "--window is a length in steps: it does not apply with --per-checkpoint",
        ),
        (["--window", 10, "--tokens-per-step", 0], "--tokens-per-step 0: must be > 0"),
        (["--window", 10, "--window", "10steps"], "target given twice: window-10"),
    ]:
        result = invoke("plan", sparse, *args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)


def test_provenance_and_at_in_tokens(sparse, tmp_path):
    out = tmp_path / "w.safetensors"
    run("merge", "-q", sparse, "--lr-decay", "sqrt:20", "--at", "1.1Msamples", "--samples-per-step", 10_000, "-o", out)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ckpt_ema.method"] == "lr_decay" and meta["ckpt_ema.shape"] == "sqrt"
    assert meta["ckpt_ema.length"] == "20.0" and meta["ckpt_ema.target_step"] == "110"


def test_sweep_and_batch_take_the_new_targets(sparse, states, tmp_path):
    result = run("sweep", "-q", sparse, "--window", "20,40", "--lr-decay", "cosine:40,sqrt:40", "--last", 3,
                 "--half-life", 10, "-o", tmp_path / "sweep", "--eval", "echo {path} 1", "--plot")  # fmt: skip
    names = {p.stem for p in (tmp_path / "sweep").glob("*.safetensors")}
    assert names == {"window-20", "window-40", "lr_decay-cosine-40", "lr_decay-sqrt-40", "last-3", "half_life-10"}
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert {"method": "lr_decay", "length": 40.0, "shape": "sqrt"} in [c["target"] for c in record["candidates"]]
    assert "lr_decay-sqrt-40" in result.output
    other = tmp_path / "runs" / "b"
    save_series(states, other, [60, 90, 120])
    run("batch", "-q", sparse, other, "--window", 30, "--lr-decay", "linear:30", "-o", tmp_path / "batch")
    for run_name in (sparse.name, "b"):
        assert (tmp_path / "batch" / run_name / "window-30.safetensors").is_file()
    # --window 30 = --lr-decay linear:30 (linear decay weights the window's steps equally)
    a = load_file(tmp_path / "batch" / "b" / "window-30.safetensors")
    b = load_file(tmp_path / "batch" / "b" / "lr_decay-linear-30.safetensors")
    assert rel_error(a, {k: v.double() for k, v in b.items() if v.is_floating_point()}) < 1e-6


def test_plan_plot_draws_them(sparse, tmp_path):
    pytest.importorskip("matplotlib")
    run("plan", sparse, "--window", 40, "--lr-decay", "cosine:40", "--last", 3, "--plot", tmp_path / "w.png")
    assert (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"


def test_tokens_per_step_from_a_real_transformers_trainer(tmp_path, monkeypatch):
    # The Trainer's own saving code with include_num_input_tokens_seen: checkpoint-N/trainer_state.json holds
    # num_input_tokens_seen; 2 sequences of 8 tokens per step make 16 tokens per step.
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(32)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, save_steps=2, per_device_train_batch_size=2,
        include_num_input_tokens_seen=True, report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    plan = json.loads(run("plan", tmp_path / "out", "--window", "64tokens", "--half-life", "32tok", "--json").stdout)
    assert plan["step_size"]["tokens_per_step"] == 16.0
    assert plan["step_size"]["source"] == "checkpoint-6/trainer_state.json (num_input_tokens_seen / global_step)"
    window = next(o for o in plan["outputs"] if o["name"] == "window-64tokens")
    assert window["target"]["length"] == 4.0  # 64 tokens / 16 per step
    # (2, 6] over checkpoints 2, 4, 6, linear: 0.5/4, (1.5 + 0.5)/4, 1.5/4
    assert [i["coefficient"] for i in window["inputs"]] == pytest.approx([0.125, 0.5, 0.375], abs=1e-15)
    half_life = next(o for o in plan["outputs"] if o["name"] == "half_life-32tokens")
    assert half_life["target"]["decay"] == pytest.approx(0.5**0.5, rel=1e-15)  # half-life 32 tokens = 2 steps
    assert half_life["equivalents"]["half_life_tokens"] == pytest.approx(32.0, rel=1e-14)


def test_every_and_first_in_tokens(states, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for i, step in enumerate((40, 80, 120)):  # names without steps: --every gives them
        save_file({k: v.contiguous() for k, v in states[step].items()}, str(folder / f"ckpt-{i}.safetensors"))
    plan = json.loads(run("plan", folder, "--every", "80ktok", "--first", "80k tokens", "--tokens-per-step", "2k",
                          "--window", 40, "--json").stdout)  # fmt: skip
    assert [c["step"] for c in plan["checkpoints"]] == [40, 80, 120]
    result = invoke("plan", folder, "--every", "81ktok", "--tokens-per-step", "2k", "--window", 40)
    assert (
        result.exit_code == 1 and "--every 81ktok: is 40.5 steps; it must be a whole number of steps" in result.output
    )
    result = invoke("plan", folder, "--every", "80ktok", "--window", 40)
    assert result.exit_code == 1 and "--every 80ktok: the tokens per optimizer step are unknown" in result.output
