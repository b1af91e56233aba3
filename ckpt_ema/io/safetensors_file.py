"""A single ``.safetensors`` file (kohya, OneTrainer, ComfyUI, plain ``save_file``)."""

from __future__ import annotations

from pathlib import Path

from ckpt_ema.io.safetensors_format import SafetensorsReader, read_header
from ckpt_ema.io.source import CheckpointSource, Part, WeightFile


def safetensors_weight_file(path: Path, relpath: str) -> WeightFile:
    """A weight file entry for one safetensors file: header parsed now, data mapped when first read."""
    header = read_header(path)
    return WeightFile(
        relpath=relpath,
        path=path,
        tensors=dict(header.tensors),
        metadata=dict(header.metadata),
        open=lambda: SafetensorsReader(header),
        size=header.file_size,
        identity=header.identity,
    )


def open_safetensors_file(path: Path) -> CheckpointSource:
    weight_file = safetensors_weight_file(path, path.name)
    return CheckpointSource(path, "safetensors file", [Part("", [weight_file])], metadata=weight_file.metadata)
