"""Hugging Face sharded exports: shard sizes, shard names, and which tensors go into which shard.

The layout is the one ``transformers``' ``save_pretrained`` and DeepSpeed's ``zero_to_fp32`` write: one
``model.safetensors`` when the model fits in one shard, else ``model-00001-of-0000N.safetensors``, ... and
``model.safetensors.index.json`` (``metadata.total_size``: the bytes of tensor data; ``weight_map``: each
tensor's shard). Tensors keep their order (huggingface_hub's ``split_state_dict_into_shards_factory`` rule):
a shard is closed when the next tensor would take it past the limit, and a tensor larger than the limit has
a shard of its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ckpt_ema.errors import OutputError
from ckpt_ema.plan.model import TensorPlan

DEFAULT_MAX_SHARD_SIZE = "5GB"  # zero_to_fp32's default (save_pretrained: 5GB in transformers 4, 50GB in 5)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes of a size as ``save_pretrained``'s ``max_shard_size`` takes it: ``5GB`` (10**9), ``500MiB``
    (2**20), ``100KB``, or a number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in UNITS:
            raise OutputError(f"--max-shard-size: {text!r} is not a size (e.g. 5GB, 500MB, 2GiB)")
        size = int(float(match.group(1)) * UNITS[unit])
    if size <= 0:
        raise OutputError(f"--max-shard-size: {text!r} must be more than 0 bytes")
    return size


def split_shards(tensors: Sequence[TensorPlan], max_bytes: int) -> list[list[TensorPlan]]:
    """Consecutive runs of ``tensors``, each at most ``max_bytes`` of data unless it is one larger tensor."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-0000K-of-0000N.safetensors``."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
