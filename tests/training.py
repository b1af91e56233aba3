"""A tiny real training run whose EMAs are tracked step by step in float64: the truth the tool must match.

Nothing here uses ckpt_ema: the per-step EMAs are the textbook recurrences (spec §2-3), computed while the
model trains, independent of the tool's closed-form coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

State = dict[str, torch.Tensor]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


def train_tiny(steps: int = 120, seed: int = 0, lr: float = 0.05) -> list[State]:
    """Train with noisy minibatch SGD; return the state dict after each step 0..steps (step 0 = init)."""
    model = make_model(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    target_map = torch.randn(6, 3, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    states = [_snapshot(model)]
    for _ in range(steps):
        x = torch.randn(32, 6, generator=generator)
        y = torch.tanh(x @ target_map) + 0.3 * torch.randn(32, 3, generator=generator)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        states.append(_snapshot(model))
    return states


def classic_truth(states: Sequence[State], decay: float, start: int = 0) -> State:
    """Per-step EMA in float64 from ``states[start]``: ``ema = decay*ema + (1-decay)*theta``."""
    ema = {k: v.double().clone() for k, v in states[start].items() if v.is_floating_point()}
    for state in states[start + 1 :]:
        for k in ema:
            ema[k] = decay * ema[k] + (1.0 - decay) * state[k].double()
    return ema


def power_truth(states: Sequence[State], gamma: float) -> State:
    """EDM2 power EMA in float64: ``beta_t = (1 - 1/t)**(gamma+1)`` for t = 1.. (step 0 gets no weight)."""
    ema = {k: v.double().clone() for k, v in states[0].items() if v.is_floating_point()}
    for t, state in enumerate(states[1:], start=1):
        beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
        for k in ema:
            ema[k] = beta * ema[k] + (1.0 - beta) * state[k].double()
    return ema


def save_series(
    states: Sequence[State], folder: Path, steps: Sequence[int], dtype: torch.dtype = torch.float32
) -> list[Path]:
    """Save ``states[s]`` for each step as ``folder/step-{s:06d}.safetensors`` (float tensors in ``dtype``)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in steps:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in states[step].items()}
        path = folder / f"step-{step:06d}.safetensors"
        save_file(state, str(path), metadata={"trainer": "tests.training"})
        paths.append(path)
    return paths


def rel_error(result: State, truth: State) -> float:
    """``||a - b|| / ||b||`` over all float tensors together (spec §7)."""
    num = sum(float(((result[k].double() - truth[k]) ** 2).sum()) for k in truth)
    den = sum(float((truth[k] ** 2).sum()) for k in truth)
    return (num / den) ** 0.5


def sig_error(result: State, truth: State, last: State) -> float:
    """``||a - truth|| / ||truth - theta(T)||`` (spec §7): 0 is perfect, 1 no better than the last weights."""
    num = sum(float(((result[k].double() - truth[k]) ** 2).sum()) for k in truth)
    den = sum(float(((truth[k] - last[k].double()) ** 2).sum()) for k in truth)
    return (num / den) ** 0.5


def _snapshot(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
