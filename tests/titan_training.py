"""A training run whose checkpoints torchtitan's own ``CheckpointManager`` writes, and its model-only load.

    python -m tests.titan_training OUT --steps 6 --every 2      (one process; RANK/WORLD_SIZE set)
    python -m tests.titan_training RESULT --load EMA_FOLDER     (torchtitan's initial_load_path, model only)

torchtitan 0.3.0's pieces, CPU only: ``OptimizersContainer`` (AdamW, for-loop implementation),
``LRSchedulersContainer`` (``Config.build``) and ``CheckpointManager`` (``interval`` = ``every``, synchronous
``dcp.save`` of ``OUT/checkpoint/step-N/``: the model's keys flattened beside ``optimizer``,
``lr_scheduler`` and ``train_state``). The model is the repository's tiny MLP (``tests/dcp_training.py``); the
full weights at each saved step go to ``OUT/truth/step-N.safetensors``, the test's reference. ``--load``
builds a fresh model and a ``CheckpointManager`` whose ``initial_load_path`` is the EMA folder with
``initial_load_model_only`` (torchtitan's way to start from other weights), calls ``load()``, and saves the
weights it got and a forward pass.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tests.dcp_training import _batch, make_model


class _TrainState:
    """torchtitan's trainer keeps ``{"train_state": TrainState}`` in the checkpoint states (a Stateful)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def _manager(model: nn.Module, folder: Path, every: int, initial_load_path: Path | None = None):
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig

    optimizers = OptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 0.02})],
        implementation="for-loop",
    ).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=100)
    state = _TrainState()
    config = CheckpointManager.Config(
        enable=True, folder=str(folder), interval=every, keep_latest_k=0,
        initial_load_path=None if initial_load_path is None else str(initial_load_path),
        initial_load_model_only=True,
    )  # fmt: skip
    manager = CheckpointManager(
        config, dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
        states={"train_state": state}, sd_adapter=None,
    )  # fmt: skip
    return manager, optimizers, schedulers, state


def train(out: Path, steps: int, every: int) -> None:
    from safetensors.torch import save_file

    model = make_model()
    manager, optimizers, schedulers, state = _manager(model, out / "checkpoint", every)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    for step in range(1, steps + 1):
        x, y = _batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()
        schedulers.step()
        state.step = step
        if manager.save(curr_step=step):
            full = {k: v.detach().clone() for k, v in model.state_dict().items()}
            save_file(full, str(out / "truth" / f"step-{step}.safetensors"))
    manager.close()


def load(folder: Path, result: Path, scratch: Path) -> None:
    from safetensors.torch import save_file

    model = make_model(seed=123)
    for parameter in model.parameters():
        parameter.data.zero_()
    manager, _, _, _ = _manager(model, scratch / "fresh", 10, initial_load_path=folder)  # no checkpoint yet
    assert manager.load(), "torchtitan loaded nothing"
    manager.close()
    x, _ = _batch(0)
    with torch.no_grad():
        out = model(x)
    save_file({**{k: v.detach().clone() for k, v in model.state_dict().items()}, "output": out}, str(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--load", type=Path)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        if args.load is not None:
            load(args.load, args.out, args.out.parent)
        else:
            train(args.out, args.steps, args.every)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
