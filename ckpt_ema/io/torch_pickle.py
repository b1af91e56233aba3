"""PyTorch pickles (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), read safely and lazily.

Only ``torch.load(weights_only=True, mmap=True)`` is ever used: the restricted unpickler rebuilds
tensors, numbers, strings and containers and refuses anything that would run code from the file. The
plan loads the file onto the ``meta`` device (no data is read): each storage then records where its bytes
lie in the zip (``_checkpoint_offset``; torch stores them uncompressed), so a contiguous tensor is read by
byte range with ``pread``, as a safetensors tensor is (a file truncated during the merge is then an error,
not SIGBUS). Only a tensor stored strided is read through a memory map. There is no option that loads
arbitrary pickles: such a file must be converted once, by the user, where they trust it.

The state dict is looked for under the usual nestings (Lightning and kohya ``state_dict``, ``model``,
``module``, EMA copies); ``--key`` picks another, and the choice is reported.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from ckpt_ema.errors import InputError
from ckpt_ema.io.identity import identity
from ckpt_ema.io.legacy_pickle import code_globals
from ckpt_ema.io.safetensors_format import DTYPES, TensorInfo, check_utf8
from ckpt_ema.io.source import CheckpointSource, Part, TensorInfoLike, TensorMeta, WeightFile

# torch is imported only when a torch file is read (it takes about a second): see load_pickle.

# What LightningModule.load_from_checkpoint reads besides the state dict (kept for a .ckpt output).
LIGHTNING_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "hparams_name", "hyper_parameters")
# Classes real trainers store in checkpoints that rebuild without running code from the file (docs/trainers.md):
# argparse.Namespace (timm's train.py saves its args): an empty object whose __dict__ is set; its values go
# through the same restricted unpickler.
SAFE_CLASSES: tuple[type, ...] = (argparse.Namespace,)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
# Where trainers put the state dict, in order of preference: raw weights first, EMA copies after.
STATE_DICT_KEYS = (
    "state_dict",
    "model",
    "module",
    "model_state_dict",
    "ema",
    "model_ema",
    "state_dict_ema",
    "ema_model",
)


def _convert_hint(path: Path) -> str:
    return (
        'convert it once where you trust it, e.g. python -c "import torch, safetensors.torch as s; '
        f"s.save_file(torch.load('{path.name}', weights_only=False)['state_dict'], 'NAME.safetensors', "
        "metadata={'step': 'STEP'})\" (adjust the key; STEP is this checkpoint's optimizer step, so that no number "
        "in a name is taken for it), then pass the .safetensors files"
    )


def load_pickle(path: Path, meta: bool = False) -> object:
    """``torch.load`` with ``weights_only=True, mmap=True``; refusal messages say why and what to do.

    ``meta``: tensors on the ``meta`` device (shapes, dtypes and file offsets, no data read).
    """
    import torch

    try:
        with torch.serialization.safe_globals(list(SAFE_CLASSES)):
            return torch.load(path, map_location="meta" if meta else "cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        why = f"it needs {found.group(1)}" if found else "it holds more than tensors"
        raise InputError(
            f"{path}: refused: loading it would run code from the file ({why}); ckpt-ema only loads plain "
            f"tensors with weights_only=True; {_convert_hint(path)}"
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if "mmap" in text or "zip" in text.lower():
            raise _legacy_refusal(path) from None
        raise InputError(f"{path}: cannot load as a torch file ({text.splitlines()[0] if text else exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise InputError(f"{path}: cannot load as a torch file ({exc})") from None


def is_tensor(value: object) -> TypeGuard[Any]:
    """A torch tensor (without importing torch when no torch file was loaded)."""
    torch: Any = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _legacy_refusal(path: Path) -> InputError:
    """A pre-1.6 file is never loaded; its opcodes (listed, not run) say whether it would run code."""
    code = code_globals(path)
    if code:
        return InputError(
            f"{path}: refused: loading it would run code from the file (it needs {', '.join(code[:3])}); it is "
            f"in torch's legacy (pre-1.6) format, and ckpt-ema only loads plain tensors; {_convert_hint(path)}"
        )
    return InputError(
        f"{path}: written in torch's legacy (pre-1.6) format, which ckpt-ema does not load (it cannot be "
        "memory-mapped); convert it once, loading it safely: torch.save(torch.load(PATH, weights_only=True), NEW) "
        "with a current torch, or save it as safetensors"
    )


def _holds_tensor(value: object, depth: int = 0) -> bool:
    if is_tensor(value):
        return True
    if depth > 20:
        return False
    if isinstance(value, Mapping):
        return any(_holds_tensor(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v, depth + 1) for v in value)
    return False


def _tensor_count(value: object) -> int:
    if isinstance(value, Mapping):
        return sum(is_tensor(v) for v in value.values())
    return 0


def find_state_dict(path: Path, loaded: object, key: str | None) -> tuple[str | None, Mapping[str, object], list[str]]:
    """The state dict inside a loaded torch file: ``(key or None for the top level, dict, other candidates)``."""
    if not isinstance(loaded, Mapping):
        raise InputError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    if key is not None:
        value: object = loaded
        for part in [key] if key in loaded else key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                keys = ", ".join(repr(k) for k in loaded if isinstance(k, str))
                raise InputError(f"{path}: no key {key!r} (top-level keys: {keys})")
            value = value[part]
        if not isinstance(value, Mapping) or not _tensor_count(value):
            raise InputError(f"{path}: key {key!r} holds no tensors")
        return key, value, []
    candidates = [k for k in STATE_DICT_KEYS if _tensor_count(loaded.get(k))]
    top = _tensor_count(loaded)
    if candidates and top <= len(loaded) // 2:  # a checkpoint dict (Lightning, timm), not a state dict
        return candidates[0], loaded[candidates[0]], candidates[1:]
    if top:
        return None, loaded, candidates
    nested = [k for k, v in loaded.items() if isinstance(k, str) and _tensor_count(v)]
    if len(nested) == 1:
        return nested[0], loaded[nested[0]], []
    if nested:
        raise InputError(f"{path}: several dicts of tensors ({', '.join(map(repr, nested))}); choose one with --key")
    raise InputError(f"{path}: no state dict found (no tensors at the top level or under {', '.join(STATE_DICT_KEYS)})")


class StateDictFile:
    """``flat(stored_name)`` over a loaded state dict (views into the memory-mapped file)."""

    def __init__(self, state: Mapping[str, object]) -> None:
        self.state = state

    def flat(self, name: str) -> np.ndarray:
        from ckpt_ema.io.torch_edge import to_numpy

        tensor = self.state[name]
        assert is_tensor(tensor)
        # contiguous tensors are views into the mapped file; a rare strided one is copied once
        return to_numpy(tensor)


@dataclass
class LoadInfo:
    """What was learnt while loading a torch file: where its state dict was, what else it held."""

    key: str | None  # the key of the state dict (None: the top level)
    others: list[str]  # other keys holding state dicts (not chosen)
    skipped: list[str]  # entries of the state dict that are not tensors
    top: object  # the whole loaded object (for the trainer's records: global_step, epoch, ...)


def data_start(tensor: Any) -> int | None:
    """Where the first element of a tensor loaded with ``map_location="meta"`` lies in the file it was
    loaded from (its storage's zip record offset, ``_checkpoint_offset``, plus its storage offset), or None."""
    start = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)
    if not isinstance(start, int):
        return None
    return start + int(tensor.storage_offset()) * tensor.element_size()


def byte_range(path: Path, name: str, tensor: Any, dtype: str, file_size: int) -> TensorInfo | None:
    """Where a tensor loaded onto ``meta`` lies in its file, when it is one contiguous run of bytes, else None."""
    begin = data_start(tensor)
    if begin is None or not tensor.is_contiguous() or sys.byteorder != "little":
        return None
    itemsize = DTYPES[dtype][1]
    if (int(tensor.storage_offset()) + tensor.numel()) * itemsize > tensor.untyped_storage().nbytes():
        return None
    end = begin + tensor.numel() * itemsize
    if end > file_size:
        raise InputError(f"{path}: tensor {name!r} lies beyond the end of the file; the file is truncated")
    return TensorInfo(dtype, tuple(tensor.shape), begin, end)


def torch_weight_file(path: Path, relpath: str, key: str | None = None) -> tuple[WeightFile, LoadInfo]:
    """A weight file for a torch pickle, plus what was learnt while loading it (``info``).

    Contiguous tensors get their byte ranges (read with ``pread``); strided ones are read through ``open``.
    """
    from ckpt_ema.io.torch_edge import dtype_name

    planned = identity(path)
    loaded = load_pickle(path, meta=True)
    chosen, state, others = find_state_dict(path, loaded, key)
    tensors: dict[str, TensorInfoLike] = {}
    skipped = []
    for name, value in state.items():
        if not is_tensor(value):
            skipped.append(str(name))
            continue
        dtype = dtype_name(value.dtype)
        if dtype is None:
            raise InputError(f"{path}: tensor {name!r} has dtype {value.dtype}, which ckpt-ema does not handle")
        located = byte_range(path, str(name), value, dtype, planned.size)
        tensors[str(name)] = located if located is not None else TensorMeta(dtype, tuple(value.shape))
    check_utf8(path, tensors, "tensor name")
    info = LoadInfo(chosen, list(others), skipped, loaded)

    def reopen() -> StateDictFile:
        again = load_pickle(path)
        return StateDictFile(find_state_dict(path, again, chosen)[1] if chosen is not None else again)  # type: ignore[arg-type]

    del state, loaded
    weight_file = WeightFile(relpath, path, tensors, {}, reopen, planned.size, planned)
    return weight_file, info


def open_torch_file(path: Path, key: str | None = None) -> CheckpointSource:
    weight_file, info = torch_weight_file(path, path.name, key)
    top = info.top
    source = CheckpointSource(path, "torch file (weights_only)", [Part("", [weight_file])])
    source.state_dict_key = info.key
    source.other_keys = list(info.others)
    if info.key is not None:
        others = info.others
        alt = f"; also found {', '.join(map(repr, others))} (--key to choose)" if others else ""
        source.notes.append(f"state dict under key {info.key!r}{alt}")
        source.format += f", key {info.key!r}"
    if info.skipped:
        skipped = info.skipped
        source.notes.append(f"{len(skipped)} non-tensor entries of the state dict skipped ({', '.join(skipped[:4])})")
    if isinstance(top, Mapping):
        lightning = "pytorch-lightning_version" in top
        # a step saved beside the state dict (not an entry of a top-level state dict)
        for name in ("global_step", "step") if info.key is not None else ("global_step",):
            step = top.get(name)
            if isinstance(step, int) and not isinstance(step, bool):
                label = "Lightning 'global_step'" if lightning else f"{name!r} in the file"
                source.step_records.append((label, step))
                break
        epoch = top.get("epoch") if info.key is not None else None
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            source.recorded_epoch = epoch
            if "arch" in top and not source.step_records:  # timm CheckpointSaver
                source.epoch_numbered = f"the file records epoch {epoch}"
        if lightning:
            source.format = f"Lightning checkpoint {top['pytorch-lightning_version']}, key {info.key!r}"
            # kept for a .ckpt output: from a real (memory-mapped) load, since hyper_parameters may hold tensors
            real = load_pickle(path) if any(_holds_tensor(top.get(k)) for k in LIGHTNING_KEYS) else top
            assert isinstance(real, Mapping)
            source.lightning = {k: v for k, v in real.items() if k in LIGHTNING_KEYS}
    return source
