"""Does merging constant-learning-rate checkpoints emulate a learning-rate decay? (docs/averaging.md)

A tiny real run on the CPU: a student MLP learns a random teacher's noisy labels (fresh samples every step,
like one epoch of pre-training), at a constant learning rate, saving a checkpoint every K steps. From the
same point (step T - L, same optimizer state, same batches) the script also runs a real learning-rate decay
to zero of each shape over the last L steps. It then compares the held-out loss (cross-entropy against the
teacher's label distribution, on fixed held-out inputs) of

- the last checkpoint (no decay), and the real decays (linear, cosine, sqrt; over L and 2L steps);
- merges of the constant-rate checkpoints: ``--lr-decay SHAPE:L``, ``--window L``, ``--last N``, EMAs.

Merges are computed by ``ckpt-ema merge`` on the saved files (``--engine cli``, the default) or by applying
the coefficients of ``ckpt_ema.math`` in float64 to the checkpoints (``--engine math``, no CLI needed).

    python benchmarks/averaging_experiment.py --out /tmp/avg-exp          # ~1-2 minutes on 1 core
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

IN, HIDDEN, CLASSES, TEACHER_HIDDEN = 32, 128, 10, 64
SHAPES = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: (1.0 + math.cos(math.pi * x)) / 2.0,
    "sqrt": lambda x: 1.0 - math.sqrt(x),
}


def teacher(seed: int):
    g = torch.Generator().manual_seed(10_000 + seed)
    w1 = torch.randn(IN, TEACHER_HIDDEN, generator=g) / math.sqrt(IN)
    w2 = torch.randn(TEACHER_HIDDEN, CLASSES, generator=g) * 2.0 / math.sqrt(TEACHER_HIDDEN)
    return lambda x: torch.tanh(2.0 * x @ w1) @ w2


def batch(step: int, seed: int, logits_of, size: int):
    """The minibatch of optimizer step ``step`` (1-based): the same in the constant run and in every decay."""
    g = torch.Generator().manual_seed(seed * 10**7 + step)
    x = torch.randn(size, IN, generator=g)
    y = torch.multinomial(torch.softmax(logits_of(x), -1), 1, generator=g).squeeze(1)
    return x, y


def student(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, CLASSES)
    )


def make_optimizer(name: str, params, lr: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def train(model, optimizer, steps, seed, logits_of, args, lr_factor=None, on_step=None):
    for t in steps:
        if lr_factor is not None:
            for group in optimizer.param_groups:
                group["lr"] = args.lr[args.optimizer] * lr_factor(t)
        x, y = batch(t, seed, logits_of, args.batch)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(t)


def run_seed(seed: int, args, folder: Path) -> dict[str, float]:
    total, every = args.steps, args.every
    logits_of = teacher(seed)
    g = torch.Generator().manual_seed(99_999 + seed)
    held_x = torch.randn(args.heldout, IN, generator=g)
    held_p = torch.softmax(logits_of(held_x), -1)

    def heldout(state) -> float:
        model = student(seed)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        with torch.no_grad():
            return float(-(held_p * torch.log_softmax(model(held_x), -1)).sum(-1).mean())

    model = student(seed)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr[args.optimizer])
    run = folder / "run"
    run.mkdir(parents=True, exist_ok=True)
    branches: dict[int, tuple[dict, dict]] = {}
    lengths = [round(f * total) for f in args.decay_fractions]

    def save(t: int) -> None:
        if t in [total - n for n in lengths]:
            branches[t] = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
        if t % every == 0:
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(run / f"step-{t:06d}.safetensors"), metadata={"global_step": str(t)})

    save(0)
    train(model, optimizer, range(1, total + 1), seed, logits_of, args, on_step=save)
    results = {"bayes (teacher entropy)": float(-(held_p * torch.log(held_p)).sum(-1).mean())}
    results["last checkpoint (constant lr)"] = heldout(model.state_dict())

    for length in lengths:  # the real decays, branched from step T - L
        start = total - length
        for shape, f in SHAPES.items():
            branch = student(seed)
            branch.load_state_dict(branches[start][0])
            opt = make_optimizer(args.optimizer, branch.parameters(), args.lr[args.optimizer])
            opt.load_state_dict(branches[start][1])
            factor = lambda t, f=f, start=start, length=length: f((t - 1 - start) / length)  # noqa: E731
            train(branch, opt, range(start + 1, total + 1), seed, logits_of, args, lr_factor=factor)
            results[f"real decay {shape} over {length}"] = heldout(branch.state_dict())

    targets = []
    for length in lengths:
        targets += [("--lr-decay", f"{shape}:{length}") for shape in SHAPES]
        targets += [("--window", str(length)), ("--last", str(length // every))]
    targets += [("--half-life", str(h)) for h in args.half_lives] + [("--sigma-rel", str(s)) for s in args.sigma_rels]
    merged = MERGES[args.engine](sorted(run.glob("*.safetensors")), targets, folder / "merged")
    for (option, value), state in zip(targets, merged):
        results[f"merge {option} {value}"] = heldout(state)
    return results


def merge_with_math(paths, targets, out):
    """Apply ckpt_ema.math coefficients in float64 to the checkpoints (no CLI)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ckpt_ema.math import windows

    try:
        from ckpt_ema.math import ema
    except ImportError:  # before the restructure
        from ckpt_ema import kernels as ema

    states = [load_file(str(p)) for p in paths]
    steps = [int(p.stem.split("-")[1]) for p in paths]
    results = []
    for option, value in targets:
        if option == "--lr-decay":
            shape, length = value.split(":")
            coefs = windows.lr_decay_coefficients(steps, shape, int(length))
        elif option == "--window":
            coefs = windows.window_coefficients(steps, int(value))
        elif option == "--last":
            coefs = windows.last_n_coefficients(len(steps), int(value))
        elif option == "--half-life":
            coefs = ema.classic_coefficients(steps, ema.half_life_to_decay(float(value)))
        else:
            coefs = ema.power_coefficients(steps, ema.sigma_rel_to_gamma(float(value)))
        results.append({k: sum(float(c) * s[k].double() for c, s in zip(coefs, states)) for k in states[0]})
    return results


def merge_with_cli(paths, targets, out):
    """One ``ckpt-ema merge`` pass for all targets, fp32 outputs, read back."""
    command = [sys.executable, "-m", "ckpt_ema", "merge", "-q", "--dtype", "fp32", "--force", "--no-hash"]
    command += [str(p) for p in paths] + [x for target in targets for x in target] + ["-o", str(out)]
    subprocess.run(command, check=True)
    files = {p.stem: p for p in out.glob("*.safetensors")}
    names = [_output_name(option, value) for option, value in targets]
    missing = [n for n in names if n not in files]
    if missing:
        raise SystemExit(f"ckpt-ema merge wrote {sorted(files)}, not {missing}")
    return [load_file(str(files[n])) for n in names]


def _output_name(option: str, value: str) -> str:
    if option == "--lr-decay":
        return "lr_decay-" + value.replace(":", "-")
    return option[2:].replace("-", "_") + "-" + value


MERGES = {"math": merge_with_math, "cli": merge_with_cli}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--decay-fractions", default="0.1,0.2")
    parser.add_argument("--heldout", type=int, default=20000)
    parser.add_argument("--engine", choices=sorted(MERGES), default="cli")
    args = parser.parse_args()
    args.lr = {"adamw": 3e-3, "sgd": 0.1}
    args.decay_fractions = [float(x) for x in args.decay_fractions.split(",")]
    args.half_lives = [round(f * args.steps) for f in (0.025, 0.05, 0.1)]
    args.sigma_rels = [0.05, 0.1, 0.2]
    torch.set_num_threads(1)
    started = time.time()
    per_seed = {}
    for seed in map(int, args.seeds.split(",")):
        per_seed[seed] = run_seed(seed, args, args.out / f"{args.optimizer}-seed{seed}")
        print(f"seed {seed} done ({time.time() - started:.0f} s)", file=sys.stderr)
    rows = list(next(iter(per_seed.values())))
    mean = {r: sum(s[r] for s in per_seed.values()) / len(per_seed) for r in rows}
    const = mean["last checkpoint (constant lr)"]
    bayes = mean["bayes (teacher entropy)"]
    print(
        f"{args.optimizer}, lr {args.lr[args.optimizer]} constant, {args.steps} steps, batch {args.batch}, "
        f"checkpoint every {args.every} steps, seeds {args.seeds}; held-out cross-entropy (mean over seeds)"
    )
    print(f"{'weights':40s} {'loss':>8s} {'excess':>8s} {'vs const':>9s}   per seed")
    for r in rows:
        excess = mean[r] - bayes
        gain = (const - mean[r]) / (const - bayes)
        seeds = " ".join(f"{s[r]:.4f}" for s in per_seed.values())
        print(f"{r:40s} {mean[r]:8.4f} {excess:8.4f} {gain:+9.1%}   {seeds}")
    print(f"({time.time() - started:.0f} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / f"results-{args.optimizer}.json").write_text(
        json.dumps({"settings": settings, "per_seed": per_seed, "mean": mean}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()
