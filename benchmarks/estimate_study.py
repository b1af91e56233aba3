"""Validation of the error estimate (docs/estimate.md) against per-step float64 EMAs of real tiny runs.

    python benchmarks/estimate_study.py [--markdown docs/estimate-table.md]

Trains small models on the CPU (a minute or two in all), keeps every step's weights, computes the true
per-step EMAs in float64 with the textbook recurrences (independent of ckpt_ema), then for checkpoints every
10, 25, 50 and 100 steps compares the tool's result with the truth (the true sig, spec §7) and with the
estimate (ckpt_ema.math.estimate). Not run by ``make test``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ckpt_ema.math import ema as kernels
from ckpt_ema.math import estimate as est

STEPS = 3000
SPACINGS = (10, 25, 50, 100)
DECAYS = (0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999)
SIGMA_RELS = (0.05, 0.1, 0.15, 0.2)


def _flat(model: nn.Module) -> np.ndarray:
    values = [v.detach().reshape(-1).double() for v in model.state_dict().values() if v.is_floating_point()]
    return torch.cat(values).numpy()


def run_mlp_sgd(seed: int, steps: int = STEPS) -> np.ndarray:
    """tests/training.py's model: 6-16-3 MLP with BatchNorm, SGD momentum 0.9, constant lr 0.05."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(seed + 1)
    target_map = torch.randn(6, 3, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    states = [_flat(model)]
    for _ in range(steps):
        x = torch.randn(32, 6, generator=g)
        y = torch.tanh(x @ target_map) + 0.3 * torch.randn(32, 3, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        states.append(_flat(model))
    return np.stack(states)


def run_mlp_adamw(seed: int, steps: int = STEPS) -> np.ndarray:
    """16-64-64-8 GELU MLP learning a random teacher's classes, AdamW, warm-up then cosine to 10% of lr."""
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)

    def factor(t: int) -> float:
        return min(1.0, (t + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * t / steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    states = [_flat(model)]
    for _ in range(steps):
        x = torch.randn(64, 16, generator=g)
        with torch.no_grad():
            y = teacher(x).argmax(1)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        states.append(_flat(model))
    return np.stack(states)


def run_conv_adam(seed: int, steps: int = STEPS) -> np.ndarray:
    """A 1-D conv net on noisy sequences, Adam at a constant lr 1e-3, batch 16 (noisy updates)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 5, padding=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(4), nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    freqs = torch.tensor([1.0, 2.0, 3.0, 5.0])
    grid = torch.linspace(0, 2 * math.pi, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    states = [_flat(model)]
    for _ in range(steps):
        y = torch.randint(0, 4, (16,), generator=g)
        phase = torch.rand(16, 1, generator=g) * 2 * math.pi
        x = torch.sin(freqs[y][:, None] * grid + phase) + 0.8 * torch.randn(16, 32, generator=g)
        loss = nn.functional.cross_entropy(model(x[:, None, :]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        states.append(_flat(model))
    return np.stack(states)


RUNS = {"mlp-sgd": run_mlp_sgd, "mlp-adamw": run_mlp_adamw, "conv-adam": run_conv_adam}


def classic_truth(x: np.ndarray, decay: float) -> np.ndarray:
    ema = x[0].copy()
    for theta in x[1:]:
        ema = decay * ema + (1.0 - decay) * theta
    return ema


def power_truth(x: np.ndarray, gamma: float) -> np.ndarray:
    ema = x[0].copy()
    for t in range(1, len(x)):
        beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
        ema = beta * ema + (1.0 - beta) * x[t]
    return ema


def targets() -> list[tuple[str, float, float]]:
    """(name, decay or None, gamma or None)"""
    out = [(f"decay {d:g}", d, math.nan) for d in DECAYS]
    out += [(f"sigma_rel {s:g}", math.nan, kernels.sigma_rel_to_gamma(s)) for s in SIGMA_RELS]
    return out


def cases(name: str, x: np.ndarray, interp: str = "linear") -> list[dict[str, object]]:
    total = len(x) - 1
    rows = []
    truths = {}
    for label, decay, gamma in targets():
        truths[label] = classic_truth(x, decay) if not math.isnan(decay) else power_truth(x, gamma)
    for spacing in SPACINGS:
        steps = list(range(0, total + 1, spacing))
        thetas = x[steps]
        model = est.fit_variogram(est.IncrementStats.from_array(steps, thetas))
        for label, decay, gamma in targets():
            if not math.isnan(decay):
                c = kernels.classic_coefficients(steps, decay, interp)
                c_lin = kernels.classic_coefficients(steps, decay, "linear")
                cumulative = est.classic_cumulative(decay, total)
            else:
                c = kernels.power_coefficients(steps, gamma, interp)
                c_lin = kernels.power_coefficients(steps, gamma, "linear")
                cumulative = est.power_cumulative(gamma, total)
            result = c @ thetas
            truth = truths[label]
            true_sig = float(np.linalg.norm(result - truth) / np.linalg.norm(truth - x[-1]))
            bias_sq = float(((c - c_lin) @ thetas) @ ((c - c_lin) @ thetas))
            e = est.estimate(steps, c, cumulative, model, float(((result - x[-1]) ** 2).sum()), bias_sq)
            rows.append(
                {"run": name, "spacing": spacing, "target": label, "true": true_sig, "est": e.sig,
                 "true_abs": float(np.linalg.norm(result - truth)), "est_abs": e.error,
                 "parts": (e.diffusion, e.nugget, e.bias), "warnings": e.warnings}
            )  # fmt: skip
    return rows


def summarise(rows: list[dict[str, object]]) -> tuple[str, list[dict[str, object]]]:
    judged = [r for r in rows if r["true"] > 0.005]
    within = [r for r in judged if 0.5 <= r["est"] / r["true"] <= 2.0]
    optimistic = [r for r in rows if r["true"] > 0.05 and r["est"] < r["true"] / 2]
    misses = [r for r in judged if not 0.5 <= r["est"] / r["true"] <= 2.0]
    ratios = np.array([r["est"] / r["true"] for r in judged])
    text = (
        f"{len(rows)} cases, {len(judged)} with true sig > 0.005: {len(within)} within a factor 2 "
        f"({len(within) / max(len(judged), 1):.1%}); {len(optimistic)} more than 2x too optimistic with true sig > 0.05; "
        f"estimate/true: median {np.median(ratios):.2f}, 5%-95% {np.quantile(ratios, 0.05):.2f}-{np.quantile(ratios, 0.95):.2f}"
    )
    return text, misses


def markdown(rows: list[dict[str, object]], text: str, misses: list[dict[str, object]]) -> str:
    """The table of docs/estimate.md: per run and spacing, each target's true sig / estimated sig."""
    labels = [t[0] for t in targets()]
    short = [label.replace("decay ", "").replace("sigma_rel ", "σ ") for label in labels]
    lines = [
        "<!-- generated by benchmarks/estimate_study.py --markdown; do not edit -->",
        "",
        f"Summary: {text}.",
        "",
        "Each cell is `true sig / estimated sig` (spec §7); **bold**: not within a factor 2 (true sig > 0.005).",
        "",
        "| run | every | " + " | ".join(short) + " |",
        "|---|---:|" + "---:|" * len(labels),
    ]
    by_key = {(r["run"], r["spacing"], r["target"]): r for r in rows}
    for run in dict.fromkeys(r["run"] for r in rows):
        for spacing in SPACINGS:
            cells = []
            for label in labels:
                r = by_key[(run, spacing, label)]
                cell = f"{r['true']:.3g} / {r['est']:.3g}"
                if r["true"] > 0.005 and not 0.5 <= r["est"] / r["true"] <= 2.0:
                    cell = f"**{cell}**"
                cells.append(cell)
            lines.append(f"| {run} | {spacing} | " + " | ".join(cells) + " |")
    lines += ["", "Misses (estimate / true outside [0.5, 2], true sig > 0.005):", ""]
    for r in misses:
        lines.append(
            f"- {r['run']} every {r['spacing']} steps, {r['target']}: true {r['true']:.4f}, estimated "
            f"{r['est']:.4f} ({r['est'] / r['true']:.2f}x)"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--runs", default=",".join(f"{m}:{s}" for m in RUNS for s in range(4 if m != "conv-adam" else 3))
    )
    parser.add_argument("--interp", default="linear")
    parser.add_argument("--cache", default="/tmp/ckpt-ema-estimate-study")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.runs.split(","):
        name, seed = spec.split(":")
        path = cache / f"{name}-{seed}-{STEPS}.npy"
        if not path.exists():
            started = time.time()
            np.save(path, RUNS[name](int(seed)))
            print(f"trained {name} seed {seed} in {time.time() - started:.1f} s", file=sys.stderr)
        x = np.load(path)
        rows += cases(f"{name}:{seed}", x, args.interp)
    text, misses = summarise(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(markdown(rows, text, misses))
    if args.verbose:
        for r in rows:
            flag = "" if r["true"] <= 0.005 or 0.5 <= r["est"] / r["true"] <= 2 else "  MISS"
            d, n, b = r["parts"]
            print(
                f"{r['run']:<12} {r['spacing']:>4} {r['target']:<16} true {r['true']:.4f} est {r['est']:.4f} "
                f"ratio {r['est'] / max(r['true'], 1e-12):6.2f}  D {d:.3g} N {n:.3g}{flag}"
            )
    else:
        for r in misses:
            print(f"miss: {r['run']} every {r['spacing']} {r['target']}: true {r['true']:.4f} est {r['est']:.4f}")


if __name__ == "__main__":
    main()
