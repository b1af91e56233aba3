"""DeepSpeed ``global_stepN/`` folders (``engine.save_checkpoint``), read as ``zero_to_fp32`` reads them.

Layout (DeepSpeed 0.19.8, ``deepspeed/runtime/engine.py`` and ``deepspeed/utils/zero_to_fp32.py``)::

    run/latest                                        the tag of the newest checkpoint ("global_step600")
    run/global_step600/mp_rank_00_model_states.pt     ZeRO 0-2: the module's weights (in the training dtype,
                                                      e.g. BF16), param_shapes, buffer_names, global_steps
    run/global_step600/zero_pp_rank_R_mp_rank_00_model_states.pt   ZeRO-3: one per rank, parameters empty
    run/global_step600/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt   rank R's optimizer partition:
                                                      the FP32 master weights and the optimizer moments

The FP32 master weights are more precise than the module's BF16/FP16 copy, so they are used whenever the
optimizer partitions are there (the choice is shown as a note). Their layout:

- ZeRO 1-2: ``optimizer_state_dict.single_partition_of_fp32_groups[g]`` on each rank; concatenated over
  the ranks, group ``g`` is one flat vector holding the parameters of ``param_shapes[g]`` back to back (with
  ``param_alignment_paddings[g][i]`` after parameter ``i`` when recorded), padding at the end.
- ZeRO-3: ``optimizer_state_dict.fp32_flat_groups`` on each rank; concatenated over its groups, each rank's
  vector holds ``ceil(numel / world)`` values of every parameter in turn; a parameter is its slices from
  every rank, concatenated, cut to ``numel``.

Buffers come from the (rank 0) module states, frozen parameters from the module (ZeRO 0-2) or from
``frozen_param_fragments`` (ZeRO-3), shared parameters from ``shared_params``. The step is the client state's
``global_steps`` (the folder name ``global_stepN`` is read by the series as for every checkpoint).

Loading uses ``torch.load(weights_only=True, mmap=True)`` only: the DeepSpeed objects these files hold
besides tensors (its ``LossScaler``, ``ZeroStageEnum`` and ``fragment_address``) are read into inert stand-ins (their state is
kept as data, no DeepSpeed code runs and DeepSpeed need not be installed); anything else is refused as for
every torch file. Memory-mapped, the optimizer moments are never read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ckpt_ema.errors import InputError
from ckpt_ema.io.source import CheckpointSource, FileNote, Part, TensorInfoLike, TensorMeta, WeightFile, dtype_name
from ckpt_ema.io.torch_pickle import load_pickle

if TYPE_CHECKING:
    import torch
else:
    from ckpt_ema.io.lazy_torch import torch

MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?:(?:bf16|fp16|fp32)_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
DEEPSPEED_FOLDER = re.compile(r"^global_step\d+$")


class DeepSpeedObject:
    """An inert stand-in for a DeepSpeed class in a checkpoint (e.g. ``LossScaler``): keeps its state as data."""

    def __setstate__(self, state: object) -> None:
        self.state = state


def _enum_value(value: object) -> object:
    """Stands in for ``ZeroStageEnum(value)``: the stage as a plain int."""
    return value


SAFE_GLOBALS: list[object] = [
    (DeepSpeedObject, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (DeepSpeedObject, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_enum_value, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (DeepSpeedObject, "deepspeed.utils.tensor_fragment.fragment_address"),  # param_slice_mappings entries
]


def load_deepspeed_file(path: Path) -> Any:
    """``torch.load(weights_only=True, mmap=True)`` with DeepSpeed's two objects read as inert data."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):  # type: ignore[arg-type]
        return load_pickle(path)


def is_deepspeed_folder(path: Path) -> bool:
    """A ``global_stepN/``-style folder written by DeepSpeed's ``save_checkpoint``."""
    try:
        return any(MODEL_STATES.match(p.name) for p in path.iterdir())
    except OSError:
        return False


def _natural_rank(path: Path, pattern: re.Pattern[str]) -> int:
    return max(0, _group(pattern, path, 1))


def _group(pattern: re.Pattern[str], path: Path, group: int) -> int:
    """A number in a DeepSpeed file name (-1 when that part is absent)."""
    match = pattern.match(path.name)
    value = match.group(group) if match else None
    return int(value) if value is not None else -1


@dataclass(frozen=True)
class _Slot:
    """Where a parameter's FP32 master values are: its group, offset (elements) and size."""

    group: int
    offset: int  # ZeRO 1-2: in the group's vector over all ranks; ZeRO-3: in each rank's vector
    numel: int
    shape: tuple[int, ...]


def _get(mapping: object, key: str, path: Path) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        raise InputError(f"{path}: not a DeepSpeed checkpoint file (no {key!r})")
    return mapping[key]


def _shapes(value: object, path: Path) -> list[dict[str, tuple[int, ...]]]:
    groups = value if isinstance(value, list) else [value]
    result = []
    for group in groups:
        if not isinstance(group, Mapping):
            raise InputError(f"{path}: param_shapes is not a list of name -> shape maps")
        result.append({str(k): tuple(int(d) for d in v) for k, v in group.items()})
    return result


class _Layout:
    """What a DeepSpeed folder holds and where each tensor comes from (built from the rank-0 model states)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
        model_files = [folder / n for n in names if MODEL_STATES.match(n)]
        self.optim_files = sorted(
            (folder / n for n in names if OPTIM_STATES.match(n)), key=lambda p: _natural_rank(p, OPTIM_STATES)
        )
        self.model_files = sorted(model_files, key=lambda p: _natural_rank(p, MODEL_STATES))
        parallel = [_group(MODEL_STATES, p, 2) for p in self.model_files]
        parallel += [_group(OPTIM_STATES, p, 2) for p in self.optim_files]
        if set(parallel) != {0}:
            raise InputError(
                f"{folder}: model-parallel ranks {sorted(set(parallel))} (tensor or pipeline parallelism); "
                "only data-parallel DeepSpeed checkpoints (mp_rank_00) can be read"
            )
        self.model_path = self.model_files[0]
        states = load_deepspeed_file(self.model_path)
        self.module: Mapping[str, Any] = _get(states, "module", self.model_path)
        if not isinstance(self.module, Mapping):
            raise InputError(f"{self.model_path}: 'module' is not a state dict")
        shapes = states.get("param_shapes")
        self.param_shapes = _shapes(shapes, self.model_path) if shapes is not None else []
        self.buffer_names = [str(n) for n in (states.get("buffer_names") or [])]
        frozen = states.get("frozen_param_shapes") or {}
        self.frozen_shapes = {str(k): tuple(int(d) for d in v) for k, v in frozen.items()}
        shared = states.get("shared_params") or {}
        self.shared = {str(k): str(v) for k, v in shared.items()}
        steps = states.get("global_steps")
        self.global_steps = steps if isinstance(steps, int) and not isinstance(steps, bool) else None
        self.stage: int | None = None
        self.world = 1
        self.slots: dict[str, _Slot] = {}
        self.fp32 = False
        self.why_module = ""
        if self.optim_files and self.param_shapes:
            self._read_optimizer_layout()
        elif any(_group(MODEL_STATES, p, 1) >= 0 for p in self.model_files):  # zero_pp_rank_R_...: ZeRO-3
            raise InputError(
                f"{folder}: ZeRO-3 model states without the optimizer partitions (*_optim_states.pt) that hold "
                "the weights; copy the whole global_step folder"
            )
        elif self.optim_files:
            self.why_module = f"{self.model_path.name} records no param_shapes to place the FP32 master weights"
        else:
            self.why_module = "no optimizer partitions (*_optim_states.pt) with FP32 master weights"

    def _read_optimizer_layout(self) -> None:
        first = load_deepspeed_file(self.optim_files[0])
        optimizer = _get(first, "optimizer_state_dict", self.optim_files[0])
        stage = optimizer.get("zero_stage") if isinstance(optimizer, Mapping) else None
        stage = getattr(stage, "value", stage)
        if not isinstance(stage, int):
            self.why_module = f"{self.optim_files[0].name} records no ZeRO stage"
            return
        counts = optimizer.get("partition_count")
        world = max(counts) if isinstance(counts, list) else counts
        if not isinstance(world, int) or world < 1:
            raise InputError(f"{self.optim_files[0]}: no valid partition_count")
        if world != len(self.optim_files):
            raise InputError(
                f"{self.folder}: {len(self.optim_files)} optimizer partition file(s) but partition_count {world}; "
                "the checkpoint is incomplete or mixes two saves"
            )
        self.stage, self.world = stage, world
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        groups = optimizer.get(key)
        if not isinstance(groups, list) or not all(isinstance(g, torch.Tensor) for g in groups):
            raise InputError(f"{self.optim_files[0]}: ZeRO-{stage} partition without {key!r}")
        if stage == 3:
            self._zero3_slots([g.numel() for g in groups])
        else:
            paddings = optimizer.get("param_alignment_paddings")
            self._zero2_slots(groups, paddings if isinstance(paddings, list) else None)
        self.fp32 = True

    def _zero2_slots(self, groups: Sequence[torch.Tensor], paddings: list[object] | None) -> None:
        if len(groups) != len(self.param_shapes):
            raise InputError(
                f"{self.optim_files[0]}: {len(groups)} FP32 groups but {len(self.param_shapes)} param groups"
            )
        for g, shapes in enumerate(self.param_shapes):
            offset = 0
            pads = paddings[g] if paddings is not None else None
            for i, (name, shape) in enumerate(shapes.items()):
                numel = _numel(shape)
                self.slots[name] = _Slot(g, offset, numel, shape)
                offset += numel + (int(pads[i]) if isinstance(pads, list) and i < len(pads) else 0)
            available = groups[g].numel() * self.world  # every rank's partition of a group has one size
            if offset > available:
                raise InputError(
                    f"{self.folder}: param group {g} needs {offset} FP32 values, the partitions hold {available}"
                )

    def _zero3_slots(self, group_sizes: Sequence[int]) -> None:
        offset = 0
        for shapes in self.param_shapes:
            for name, shape in shapes.items():
                numel = _numel(shape)
                part = -(-numel // self.world)
                self.slots[name] = _Slot(0, offset, numel, shape)
                offset += part
        if offset > sum(group_sizes):
            raise InputError(
                f"{self.folder}: the ZeRO-3 partitions hold {sum(group_sizes)} values per rank, {offset} needed"
            )

    def tensors(self) -> dict[str, TensorInfoLike]:
        infos: dict[str, TensorInfoLike] = {}
        if self.fp32:
            for name, slot in self.slots.items():
                infos[name] = TensorMeta("F32", slot.shape)
            for name in [*self.buffer_names, *(self.frozen_shapes if self.stage != 3 else [])]:
                infos[name] = self._module_meta(name)
            if self.stage == 3:
                for name, shape in self.frozen_shapes.items():
                    infos[name] = TensorMeta(self._frozen_dtype(), shape)
        else:
            for name in self.module:
                infos[str(name)] = self._module_meta(str(name))
        for alias, original in self.shared.items():
            if original in infos:
                infos[alias] = infos[original]
        return infos

    def _module_meta(self, name: str) -> TensorMeta:
        value = self.module.get(name)
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{self.model_path}: {name!r} is not a tensor in 'module'")
        dtype = dtype_name(value.dtype)
        if dtype is None:
            raise InputError(
                f"{self.model_path}: tensor {name!r} has dtype {value.dtype}, which ckpt-ema does not handle"
            )
        return TensorMeta(dtype, tuple(value.shape))

    def _frozen_dtype(self) -> str:
        for value in self.module.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return dtype_name(value.dtype) or "F32"
        return "F32"


def _numel(shape: tuple[int, ...]) -> int:
    result = 1
    for d in shape:
        result *= d
    return result


def _cut(pieces: Sequence[torch.Tensor], start: int, count: int) -> list[torch.Tensor]:
    """Elements ``[start, start + count)`` of the concatenation of ``pieces``, as views of them."""
    result = []
    for piece in pieces:
        n = piece.numel()
        if count <= 0:
            break
        if start >= n:
            start -= n
            continue
        take = min(n - start, count)
        result.append(piece.reshape(-1)[start : start + take])
        count -= take
        start = 0
    return result


def _join(pieces: list[torch.Tensor], numel: int, where: str) -> torch.Tensor:
    if sum(p.numel() for p in pieces) < numel:
        raise InputError(f"{where}: the partitions end before the tensor does; the checkpoint is truncated")
    if len(pieces) == 1:
        return pieces[0][:numel]
    return torch.cat(pieces)[:numel]


class _Open:
    """``flat(name)`` for one DeepSpeed folder: the partitions stay memory-mapped, views where possible."""

    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        self.module = load_deepspeed_file(layout.model_path)["module"]
        self._groups: list[list[torch.Tensor]] | None = None
        self._frozen: list[Mapping[str, torch.Tensor]] | None = None

    def _fp32_groups(self) -> list[list[torch.Tensor]]:
        if self._groups is None:
            key = "fp32_flat_groups" if self.layout.stage == 3 else "single_partition_of_fp32_groups"
            self._groups = []
            for path in self.layout.optim_files:
                optimizer = _get(load_deepspeed_file(path), "optimizer_state_dict", path)
                self._groups.append(list(optimizer[key]))
        return self._groups

    def flat(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a 1-D numpy array in its dtype's storage type (BF16 as uint16)."""
        from ckpt_ema.io.torch_edge import to_numpy

        return to_numpy(self._flat_torch(name))

    def _flat_torch(self, name: str) -> torch.Tensor:
        layout = self.layout
        if name in layout.shared and name not in layout.slots:
            name = layout.shared[name]  # a tied parameter: the values of the one it is tied to
        slot = layout.slots.get(name) if layout.fp32 else None
        where = f"{layout.folder} ({name})"
        if slot is None:
            if layout.stage == 3 and name in layout.frozen_shapes:
                return self._zero3_frozen(name, where)
            value = self.module[name]
            return value.contiguous().reshape(-1)
        groups = self._fp32_groups()
        if layout.stage == 3:
            part = -(-slot.numel // layout.world)
            pieces = [p for rank in groups for p in _cut(rank, slot.offset, part)]
            return _join(pieces, slot.numel, where)
        pieces = _cut([rank[slot.group] for rank in groups], slot.offset, slot.numel)
        return _join(pieces, slot.numel, where)

    def _zero3_frozen(self, name: str, where: str) -> torch.Tensor:
        if self._frozen is None:
            self._frozen = []
            for path in self.layout.model_files:
                fragments = load_deepspeed_file(path).get("frozen_param_fragments") or {}
                self._frozen.append(fragments)
        pieces = [f[name].reshape(-1) for f in self._frozen if name in f]
        return _join(pieces, _numel(self.layout.frozen_shapes[name]), where)


def open_deepspeed(path: Path) -> CheckpointSource:
    """A DeepSpeed ``global_stepN/`` folder, reading the pickles' structure only (tensors stay mapped)."""
    layout = _Layout(path)
    infos = layout.tensors()
    if not infos:
        raise InputError(f"{path}: the DeepSpeed checkpoint holds no weights")
    files = [layout.model_path, *layout.optim_files] if layout.fp32 else [layout.model_path]
    # Every file read is a weight file of the source (its SHA-256 is recorded); the tensors are listed
    # under the model states file, and a reader opened for any of them reads from all.
    weight_files = [
        WeightFile(p.name, p, infos if p == layout.model_path else {}, {}, lambda: _Open(layout), p.stat().st_size)
        for p in files
    ]
    if layout.fp32:
        kind = f"ZeRO-{layout.stage}, {layout.world} rank(s), FP32 master weights"
    else:
        kind = "module weights"
    source = CheckpointSource(path, f"DeepSpeed checkpoint ({kind})", [Part("", weight_files)])
    source.exports_folder = True
    module_dtypes = sorted({dtype_name(v.dtype) or "?" for v in layout.module.values() if isinstance(v, torch.Tensor)})
    if layout.fp32:
        source.notes.append(
            f"FP32 master weights from the ZeRO-{layout.stage} optimizer partitions "
            f"({len(layout.optim_files)} file(s)), as zero_to_fp32 reads them; the module's "
            f"{'/'.join(module_dtypes)} copy in {layout.model_path.name} is not averaged"
        )
    else:
        source.notes.append(
            f"module weights ({'/'.join(module_dtypes)}) from {layout.model_path.name}: {layout.why_module}"
        )
    used = {p.name for p in files}
    for entry in sorted(path.iterdir()):
        if entry.name in used:
            continue
        if OPTIM_STATES.match(entry.name):
            reason = "optimizer partition (its FP32 master weights are not used: see the note)"
        elif MODEL_STATES.match(entry.name):
            reason = "another rank's model states (ZeRO-3: the parameters are in the optimizer partitions)"
        else:
            reason = "not part of the DeepSpeed model weights"
        source.ignored.append(FileNote(entry.name, reason))
    if layout.fp32:
        source.notes.append("optimizer moments in the partitions are not read (memory-mapped, never paged in)")
    if layout.global_steps is not None:
        source.step_records.append(("DeepSpeed 'global_steps'", layout.global_steps))
    return source
