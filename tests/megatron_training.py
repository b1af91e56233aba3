"""A real Megatron-core training run on the CPU, saved in Megatron's ``torch_dist`` format by Megatron-core itself.

    python -m tests.megatron_training OUT --steps 6 --every 2        (one process: RANK/WORLD_SIZE set)
    python -m tests.megatron_training OUT --load EMA_FOLDER          (loads EMA_FOLDER, runs a forward pass)

A tiny ``GPTModel`` (local layer spec: no Transformer Engine) is trained with AdamW; every ``every`` steps
``dist_checkpointing.save`` writes ``OUT/iter_000000N/`` (``.metadata``, ``__0_*.distcp``, ``common.pt``,
``metadata.json``), and the outer tracker ``OUT/latest_checkpointed_iteration.txt`` is written as
Megatron-LM's ``training/checkpointing.py`` writes it (the iteration as text; that module is Megatron-LM's,
not part of the ``megatron-core`` package). The state saved is the one Megatron-LM's ``generate_state_dict``
builds for ``torch_dist``: ``model`` (the model's ``sharded_state_dict()``) beside common entries
(``iteration``, ``checkpoint_version``). Beside the checkpoints, ``OUT/truth/iter_N.safetensors``: the
full weights under their checkpoint keys, the test's reference, written without ckpt-ema code.

megatron-core 0.16.1 assumes a GPU in three places that do not change what is written: ``torch.cuda
.synchronize`` after its host copy, a failure flag allocated on ``torch.cuda.current_device()``, and the CUDA
RNG tracker forked around attention dropout (dropout is 0 here). The first two are made no-ops on the CPU and
the tracker's ``fork`` a null context.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import torch

TRACKER = "latest_checkpointed_iteration.txt"
VOCAB, SEQ = 64, 8


def _cpu_only() -> None:
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]


def _setup():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron.core.transformer.transformer_config import TransformerConfig

    _cpu_only()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 1)
    get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
        attention_dropout=0.0, hidden_dropout=0.0, pipeline_dtype=torch.float32,
    )  # fmt: skip
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(500 + step)
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(4, SEQ)
    mask = torch.tril(torch.ones(1, 1, SEQ, SEQ)) < 0.5
    return ids, positions, mask


def _weights(sharded: dict) -> dict[str, torch.Tensor]:
    """The tensors of a sharded state dict under their checkpoint keys (``ShardedObject`` entries left out)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    return {t.key: t.data.detach().clone() for t in sharded.values() if isinstance(t, ShardedTensor)}


def train(out: Path, steps: int, every: int) -> None:
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    model = _setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    for step in range(1, steps + 1):
        ids, positions, mask = _batch(step)
        loss = model(ids, positions, mask, labels=ids).float().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every:
            continue
        folder = out / f"iter_{step:07d}"
        folder.mkdir()
        sharded = model.sharded_state_dict(prefix="")
        truth = _weights(sharded)
        dist_checkpointing.save({"model": sharded, "iteration": step, "checkpoint_version": 3.0}, str(folder))
        (out / TRACKER).write_text(str(step))
        save_file(truth, str(out / "truth" / f"iter_{step}.safetensors"))


def load(folder: Path, result: Path) -> None:
    """Megatron-core's own load of ``folder`` into a fresh model; saves the weights it got and a forward pass."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    model = _setup()
    for parameter in model.parameters():
        parameter.data.zero_()
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict(prefix="")}, str(folder))
    model.load_state_dict(loaded["model"])
    ids, positions, mask = _batch(0)
    with torch.no_grad():
        logits = model(ids, positions, mask)
    weights = _weights(model.sharded_state_dict(prefix=""))
    common = dist_checkpointing.load_common_state_dict(str(folder))
    weights["iteration"] = torch.tensor(int(common["iteration"]))
    save_file({**weights, "logits": logits.float().contiguous()}, str(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--load", type=Path)
    args = parser.parse_args()
    try:
        if args.load is not None:
            load(args.load, args.out)
        else:
            train(args.out, args.steps, args.every)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
