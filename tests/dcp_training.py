"""Real training runs that save torch.distributed.checkpoint (DCP) folders, and their full weights as truth.

Run in-process (one process, plain model) or under ``torchrun --nproc-per-node 2`` (FSDP2 ``fully_shard``
on a CPU device mesh, gloo): every parameter is then a DTensor sharded on dim 0 and each rank's
``__R_0.distcp`` holds its shards, as torchtitan writes them; ``--parallel tp``: tensor parallelism
instead (``parallelize_module``, a weight sharded on dim 1). Two layouts:

- ``nested``: ``dcp.save({"model": ..., "optimizer": ..., "train_state": {"step": N}})`` (torch's
  ``get_state_dict`` style; model keys ``model.*``);
- ``flat``: torchtitan's, model keys at the top level beside ``optimizer.*``, ``lr_scheduler.*``,
  ``dataloader.*`` and ``train_state.*``.

Beside each ``step-N/`` folder, rank 0 saves the full (gathered) weights to ``truth/step-N.safetensors``:
the test's independent reference, written without any ckpt-ema code.

    python -m tests.dcp_training OUT --steps 30 --every 10 --layout flat
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict


def make_model(seed: int = 0) -> nn.Module:
    """A tiny MLP; 33 and 17 rows do not split evenly over 2 ranks (uneven FSDP shards)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 3))


def make_tp_model(seed: int = 0) -> nn.Module:
    """The MLP for tensor parallelism: widths that split evenly over 2 ranks (DTensor's Shard(-1) inputs)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))


def _parallelize(model: nn.Module, parallel: str, world: int) -> nn.Module:
    """``fsdp``: FSDP2 on every Linear (every parameter a DTensor sharded on dim 0); ``tp``: Megatron-style
    tensor parallelism, layer 0 column-wise (Shard(0)), layer 2 row-wise (its weight Shard(1)), layer 4 plain."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    if parallel == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 8, generator=generator)
    return x, torch.stack([x[:, :3].sum(1), x[:, 3:6].prod(1), x[:, 6:].sin().sum(1)], 1)


def train(
    out: Path, steps: int, every: int, layout: str = "nested", seed: int = 0, parallel: str = "fsdp"
) -> list[int]:
    """Train ``steps`` AdamW steps, saving a DCP checkpoint every ``every`` steps; returns the steps saved."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model = make_tp_model(seed) if parallel == "tp" else make_model(seed)
    if world > 1:
        model = _parallelize(model, parallel, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    saved = []
    for step in range(1, steps + 1):
        x, y = _batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % every:
            continue
        model_sd = get_model_state_dict(model)
        optim_sd = get_optimizer_state_dict(model, optimizer)
        folder = out / f"step-{step}"
        if layout == "flat":  # torchtitan: model keys at the top level
            state = {
                **model_sd,
                "optimizer": optim_sd,
                "lr_scheduler": scheduler.state_dict(),
                "dataloader": {"position": step * 16},
                "train_state": {"step": step},
            }
        else:
            state = {"model": model_sd, "optimizer": optim_sd, "train_state": {"step": step}}
        dcp.save(state, checkpoint_id=str(folder))
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model_sd.items()}
        if rank == 0:
            (out / "truth").mkdir(parents=True, exist_ok=True)
            save_file(full, str(out / "truth" / f"step-{step}.safetensors"))
        saved.append(step)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--layout", choices=("nested", "flat"), default="nested")
    parser.add_argument("--parallel", choices=("fsdp", "tp"), default="fsdp")
    args = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    try:
        train(args.out, args.steps, args.every, args.layout, parallel=args.parallel)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
