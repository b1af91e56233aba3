"""The torch edge: safetensors dtype names <-> torch dtypes, numpy buffers <-> torch tensors.

The data path (readers, engine, writers) moves numpy arrays in each dtype's storage type (BF16 as uint16,
FP8 as uint8; see ``safetensors_format.DTYPES``). Only the places that need torch import this module:
torch pickles, the torch kernel, in-memory state dicts, the torch.distributed job. Importing it imports
torch (about a second), so nothing on the safetensors path does.
"""

from __future__ import annotations

import numpy as np
import torch

# safetensors dtype name -> torch dtype
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
# torch dtypes whose .numpy() is missing or differs in meaning: viewed through a same-size signed integer
_SIGNED_TWIN = {
    torch.bfloat16: torch.int16,
    torch.float8_e4m3fn: torch.int8,
    torch.float8_e5m2: torch.int8,
    torch.uint16: torch.int16,
    torch.uint32: torch.int32,
    torch.uint64: torch.int64,
}
_STORAGE = {
    torch.bfloat16: np.uint16,
    torch.float8_e4m3fn: np.uint8,
    torch.float8_e5m2: np.uint8,
    torch.uint16: np.uint16,
    torch.uint32: np.uint32,
    torch.uint64: np.uint64,
}


def dtype_name(dtype: torch.dtype) -> str | None:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``), None if it has none."""
    return NAMES.get(dtype)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's data as a 1-D numpy array in its storage type (no copy when contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    twin = _SIGNED_TWIN.get(flat.dtype)
    if twin is None:
        return flat.numpy()
    return flat.view(twin).numpy().view(_STORAGE[flat.dtype])


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A numpy array in a dtype's storage type as a torch tensor of that dtype (shares the memory)."""
    target = TORCH_DTYPES[dtype]
    twin = _SIGNED_TWIN.get(target)
    if twin is None:
        return torch.from_numpy(array)
    signed = np.dtype(f"i{array.dtype.itemsize}")
    return torch.from_numpy(array.view(signed)).view(target)
