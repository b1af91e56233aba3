"""A real DeepSpeed training run on the CPU (gloo), saving ``global_stepN/`` checkpoints with DeepSpeed itself.

    python -m tests.deepspeed_training OUT --stage 2 [--steps 6 --every 2]     (one process: RANK/WORLD_SIZE set)
    torchrun --nproc-per-node 2 -m tests.deepspeed_training OUT --stage 3

BF16 training with a torch AdamW as the client optimizer: the module's weights are saved in BF16
(``mp_rank_00_model_states.pt``), the FP32 master weights in each rank's optimizer partition. The test's
reference for those is DeepSpeed's own ``zero_to_fp32``, never ckpt-ema's code.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": True},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(1000 + engine.global_rank)
    for step in range(1, args.steps + 1):
        x = torch.randn(8, 8, generator=generator)
        y = torch.stack([x[:, :3].sum(1), x[:, 3:6].prod(1), x[:, 6:].sin().sum(1)], 1)
        loss = nn.functional.mse_loss(engine(x.bfloat16()).float(), y)
        engine.backward(loss)
        engine.step()
        if step % args.every == 0:
            engine.save_checkpoint(args.out, client_state={"note": "ckpt-ema test"})


if __name__ == "__main__":
    main()
