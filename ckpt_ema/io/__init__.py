"""Readers: one module per checkpoint format, all behind :func:`open_checkpoint`.

>>> source = open_checkpoint("runs/checkpoint-1000")   # headers only
>>> source.format, len(source.tensors), source.step_records
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ckpt_ema.errors import InputError
from ckpt_ema.io.dcp import is_dcp_folder, open_dcp
from ckpt_ema.io.deepspeed import is_deepspeed_folder, open_deepspeed
from ckpt_ema.io.folder import is_checkpoint_folder, open_folder
from ckpt_ema.io.safetensors_file import open_safetensors_file
from ckpt_ema.io.source import CheckpointSource, FileNote, Part, TensorMeta, WeightFile, is_lora_alpha, is_lora_factor
from ckpt_ema.io.torch_pickle import TORCH_SUFFIXES, open_torch_file

CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointSource",
    "FileNote",
    "Part",
    "TensorMeta",
    "WeightFile",
    "is_checkpoint_folder",
    "is_lora_alpha",
    "is_lora_factor",
    "open_checkpoint",
]


def open_checkpoint(
    path: str | os.PathLike, key: str | None = None, component: Sequence[str] | None = None
) -> CheckpointSource:
    """Open one checkpoint (a file or a checkpoint folder), reading headers only.

    Args:
        path: a ``.safetensors`` file, a torch pickle, or a folder (Hugging Face, diffusers, OneTrainer,
            torch.distributed.checkpoint, DeepSpeed ``global_stepN``).
        key: for torch files, where the state dict is (default: found among the usual nestings).
        component: for component folders, the components to average (default: all).
    """
    path = Path(path)
    if path.is_dir():
        if is_dcp_folder(path):
            return open_dcp(path)
        if is_deepspeed_folder(path):
            return open_deepspeed(path)
        return open_folder(path, component)
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return open_safetensors_file(path)
    if suffix in TORCH_SUFFIXES:
        return open_torch_file(path, key)
    raise InputError(
        f"{path}: unknown checkpoint type {path.suffix!r} (expected .safetensors, {', '.join(TORCH_SUFFIXES)})"
    )
