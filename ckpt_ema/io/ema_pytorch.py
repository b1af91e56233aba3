"""EMA snapshot files ``{index}.{step}.pt``, one snapshot of one tracked profile each: ema-pytorch's
``PostHocEMA`` (weights under ``ema_model.``) and pytorch-posthoc-ema's (the same layout with bare keys)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ckpt_ema.errors import InputError
from ckpt_ema.io.identity import identity
from ckpt_ema.io.source import CheckpointSource, Part, TensorInfoLike, TensorMeta, WeightFile
from ckpt_ema.io.torch_pickle import StateDictFile, is_tensor, load_pickle

EMA_PYTORCH_PREFIX = "ema_model."
BOOKKEEPING = ("initted", "step")  # the EMA's own state in both libraries' snapshots, never weights


def open_ema_pytorch(path: Path) -> CheckpointSource:
    """One ema-pytorch ``PostHocEMA`` snapshot file as a checkpoint source (tensors named without prefix).

    Loaded only with ``torch.load(weights_only=True, mmap=True)`` (:func:`ckpt_ema.io.torch_pickle.load_pickle`):
    no code from the file runs, and tensor data stays in the page cache until the engine reads it. The
    weights are the entries under ``ema_model.``; ``initted`` and ``step`` (bool/int64, or FP16 in newer
    versions) are the EMA's own bookkeeping and are left out.
    """
    from ckpt_ema.io.torch_edge import dtype_name

    planned = identity(path)
    state = _state_dict(path)
    prefixed = any(isinstance(k, str) and k.startswith(EMA_PYTORCH_PREFIX) for k in state)
    bare = not prefixed and all(k in state for k in BOOKKEEPING)  # pytorch-posthoc-ema
    tensors: dict[str, TensorInfoLike] = {}
    for key, value in state.items():
        weight = key.startswith(EMA_PYTORCH_PREFIX) if prefixed else bare and key not in BOOKKEEPING
        if isinstance(key, str) and weight and is_tensor(value):
            dtype = dtype_name(value.dtype)
            if dtype is None:
                raise InputError(f"{path}: tensor {key!r} has unsupported dtype {value.dtype}")
            tensors[key] = TensorMeta(dtype, tuple(value.shape))
    if not tensors:
        raise InputError(
            f"{path}: no {EMA_PYTORCH_PREFIX!r} tensors, and not bare weights beside 'initted' and 'step'; not an "
            "ema-pytorch or pytorch-posthoc-ema PostHocEMA snapshot"
        )
    del state  # reopened lazily, when the engine reads the data
    weight_file = WeightFile(
        path.name, path, tensors, {}, lambda: StateDictFile(_state_dict(path)), planned.size, planned
    )
    library = "ema-pytorch" if prefixed else "pytorch-posthoc-ema"
    source = CheckpointSource(path, f"{library} PostHocEMA snapshot (weights_only)", [Part("", [weight_file])])
    if prefixed:
        source.rename({key: key[len(EMA_PYTORCH_PREFIX) :] for key in tensors})
    return source


def _state_dict(path: Path) -> Mapping[str, object]:
    state = load_pickle(path)
    if not isinstance(state, Mapping):
        raise InputError(f"{path}: not an ema-pytorch snapshot (holds a {type(state).__name__}, not a state dict)")
    return state
