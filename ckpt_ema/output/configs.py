"""A copied ``config.json`` that says the dtype the output is written in.

transformers loads a model in the dtype its ``config.json`` names (``dtype`` since v5, ``torch_dtype`` before):
an FP32 EMA copied with the BF16 checkpoints' config would come back as BF16, the FP32 result lost without a
word. When ``--dtype`` changes the dtype, the copied config is rewritten to match; otherwise it is copied as is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ckpt_ema.io.safetensors_format import DTYPES

CONFIG_DTYPE_KEYS = ("dtype", "torch_dtype")  # transformers v5, v4 (diffusers configs have neither)
_CONFIG_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def config_dtype_name(out_dtypes: Iterable[str]) -> str | None:
    """The config's name for the dtype of a model's float tensors (``"float32"``), None if mixed or unknown."""
    names = {_CONFIG_NAMES.get(d) for d in out_dtypes if DTYPES[d][2]}
    return names.pop() if len(names) == 1 else None


def copy_config(origin: Path, destination: Path, dtype: str | None) -> bool:
    """Write ``origin`` to ``destination`` with its dtype keys set to ``dtype``; False (nothing written) when
    there is nothing to change: no such key, already ``dtype``, ``dtype`` unknown, or not a JSON object."""
    if dtype is None:
        return False
    try:
        config = json.loads(origin.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    keys = [k for k in CONFIG_DTYPE_KEYS if isinstance(config.get(k), str) and config[k] != dtype]
    if not keys:
        return False
    for key in keys:
        config[key] = dtype
    destination.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return True
