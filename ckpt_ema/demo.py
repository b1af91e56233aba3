"""``make demo``: train a tiny model on the CPU, save checkpoints, choose the EMA afterwards.

Trains a small MLP with noisy minibatch SGD for 400 steps, saving a BF16 safetensors checkpoint every
20 steps (as trainers do), while also keeping the EMA a trainer would keep in BF16 at decay 0.999.
Then runs ``ckpt-ema merge`` at several decays and sigma_rel in one pass and prints each candidate's
held-out loss: the best EMA is only known after training, and the BF16 trainer EMA barely moved.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STEPS = 400
SAVE_EVERY = 20
CANDIDATES = [
    *("--decay", "0.9", "--decay", "0.99", "--decay", "0.995", "--decay", "0.999"),
    *("--sigma-rel", "0.05", "--sigma-rel", "0.15"),
]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))


def make_task(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    teacher = 0.3 * torch.randn(16, 4, generator=generator)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 16, generator=generator)
        return x, torch.sin(x @ teacher) + 0.3 * torch.randn(n, 4, generator=generator)

    return (*sample(4096), *sample(2048))


def held_out_loss(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def train(run_dir: Path) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Train, saving ``run_dir/step-NNNNNN.safetensors``; return the model, the BF16 trainer EMA, held-out data."""
    model = make_model()
    x_train, y_train, x_test, y_test = make_task()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(2)
    bf16_ema = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    save_file(
        {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, str(run_dir.parent / "base.safetensors")
    )
    for step in range(1, STEPS + 1):
        batch = torch.randint(0, len(x_train), (16,), generator=generator)
        loss = nn.functional.mse_loss(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # what a trainer keeping its EMA in BF16 at decay 0.999 does
            for k, v in model.state_dict().items():
                bf16_ema[k] = (0.999 * bf16_ema[k] + 0.001 * v.to(torch.bfloat16)).to(torch.bfloat16)
        if step % SAVE_EVERY == 0:
            state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
            save_file(state, str(run_dir / f"step-{step:06d}.safetensors"), metadata={"global_step": str(step)})
    return model, bf16_ema, x_test, y_test


def main(out_dir: str = "demo-out") -> None:
    from .cli import main as cli

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    run_dir = out / "run"
    run_dir.mkdir(parents=True)
    print(f"Training a tiny MLP for {STEPS} steps, a BF16 checkpoint every {SAVE_EVERY} steps -> {run_dir}/")
    model, bf16_ema, x_test, y_test = train(run_dir)
    checkpoints = sorted(str(p) for p in run_dir.glob("step-*.safetensors"))
    init = out / "base.safetensors"
    args = ["merge", str(run_dir), "--init", str(init), *CANDIDATES, "-q", "-o", str(out / "ema")]
    print(f"\n$ ckpt-ema merge {run_dir}/ --init {init} \\\n    {' '.join(CANDIDATES)} -o {out / 'ema'}")
    cli.main(args, standalone_mode=False)

    rows = [("last checkpoint (no EMA)", held_out_loss(model, load_file(checkpoints[-1]), x_test, y_test))]
    rows.append(("trainer's BF16 EMA, decay 0.999", held_out_loss(model, bf16_ema, x_test, y_test)))
    for path in sorted((out / "ema").glob("*.safetensors")):
        rows.append((f"ckpt-ema {path.stem}", held_out_loss(model, load_file(path), x_test, y_test)))
    best = min(rows[2:], key=lambda r: r[1])
    print(f"\n{'weights':<34}held-out loss")
    for name, loss in rows:
        print(f"{name:<34}{loss:.4f}{'   <- best' if (name, loss) == best else ''}")
    base = load_file(init)
    fp32_ema = load_file(out / "ema" / "decay-0.999.safetensors")
    moved = sum(float((bf16_ema[k].float() - base[k].float()).norm()) for k in base)
    moved_fp32 = sum(float((fp32_ema[k].float() - base[k].float()).norm()) for k in base)
    print(
        f"\nThe trainer's BF16 EMA at decay 0.999 moved only {moved / moved_fp32:.0%} as far from the start as the same "
        "EMA computed in FP32:\nmany of its per-step updates were below BF16 precision and rounded away. Post-hoc, every candidate came "
        f"from one pass over the same checkpoints;\nthe best here is {best[0].split()[-1]}."
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
