"""torch.distributed.checkpoint (DCP) folders: torchtitan, FSDP2/DTensor training, Megatron/NeMo ``torch_dist``.

On disk (torch 2.x ``FileSystemWriter``, ``torch/distributed/checkpoint/filesystem.py``)::

    step-1000/.metadata        a pickle of ``Metadata``: for every flattened key (``fqn``) its size, dtype and
                               chunks (offsets, sizes), and where each chunk is stored
    step-1000/__R_S.distcp     rank R's file S: the chunks (one ``torch.save`` blob each) back to back

``Metadata.state_dict_metadata[fqn]`` is a ``TensorStorageMetadata`` (``properties.dtype``, ``size``,
``chunks``) or ``BytesStorageMetadata`` (any other object, pickled with ``torch.save``);
``Metadata.storage_data[MetadataIndex(fqn, chunk offsets)]`` is a ``_StorageInfo(relative_path, offset,
length)``. A tensor sharded across ranks (FSDP2/DTensor) has one chunk per shard, usually in different files.

How it is read here, without running any pickle code: ``.metadata`` goes through an unpickler that only
knows the DCP metadata classes (and ``torch.Size``, dtypes); each chunk's ``torch.save`` blob is opened with
``torch.load(weights_only=True, map_location="meta")``, which reads only its small header and pickle and
gives where the data record starts; a tensor in one chunk then has a byte range (read like a safetensors
tensor), a chunk read by ``flat`` is a zero-copy view of a read-only mapping of the file. A sharded tensor
is merged block by block (``ckpt_ema.plan.pieces``): :class:`DcpChunks` gives its chunk layout and the
byte range of a block lying in one chunk (the engine reads it with ``pread``), ``DcpReader.region`` copies
a block spanning several chunks; only a block that is the whole tensor is assembled whole.

Only model weights are averaged: entries under ``optimizer``, ``dataloader``, ``lr_scheduler``,
``train_state`` ... and non-tensor entries are listed as ignored. Keys are normalised: torchtitan's
``model.`` (when the model is saved under a ``model`` key), FSDP1's ``_fsdp_wrapped_module.`` and
activation checkpointing's ``_checkpoint_wrapped_module.`` are removed, so the names are those of the
unwrapped model's ``state_dict()``. The step comes from ``train_state.step`` when the trainer saved one;
the folder name (``step-1000``, ``iter_0001000``) is read by the series as for every checkpoint.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import pathlib
import pickle
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ckpt_ema.errors import InputError
from ckpt_ema.io.links import inside
from ckpt_ema.io.safetensors_format import DTYPES, TensorInfo
from ckpt_ema.io.source import (
    CheckpointSource,
    FileNote,
    Part,
    Region,
    TensorInfoLike,
    TensorMeta,
    WeightFile,
    dtype_name,
)
from ckpt_ema.io.torch_pickle import data_start

if TYPE_CHECKING:
    import torch
else:
    from ckpt_ema.io.lazy_torch import torch

METADATA_NAME = ".metadata"
DATA_FILE = re.compile(r"^__(\d+)_(\d+)\.distcp$")
# Top-level keys of the trainer's state that are not model weights (torchtitan, torch's get_state_dict,
# Megatron/NeMo, OLMo-core); the reason is shown by ``inspect``.
TRAINER_KEYS = {
    "optimizer": "optimizer state",
    "optim": "optimizer state",
    "optimizer_states": "optimizer state",
    "lr_scheduler": "learning-rate scheduler state",
    "lr_schedulers": "learning-rate scheduler state",
    "scheduler": "learning-rate scheduler state",
    "dataloader": "data loader state",
    "data_loader": "data loader state",
    "train_state": "training progress (its step is read)",
    "trainer": "trainer state",
    "rng": "random-number generator state",
    "rng_state": "random-number generator state",
    "rng_tracker_states": "random-number generator state",
    "ft_manager": "fault-tolerance state",
}
MODEL_KEY = "model"
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
STEP_KEYS = ("train_state.step", "trainer.global_step", "train_state.global_step", "iteration")
MAX_METADATA_BYTES = 1 << 30
MEGATRON_FILES = ("common.pt", "metadata.json")
HF_SUFFIXES = (".json", ".txt", ".jinja")  # config.json, generation_config.json, tokenizer files, merges.txt
HF_NAMES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def is_dcp_folder(path: Path) -> bool:
    """A folder written by ``torch.distributed.checkpoint``'s file-system writer (it has ``.metadata``)."""
    return (path / METADATA_NAME).is_file()


# --- .metadata: a pickle, read with an allow-list of the classes DCP writes ------------------------------


class _Record:
    """A DCP metadata object read as plain data: its pickled state becomes attributes; no torch code runs.

    Stands in for torch's dataclasses of the same name, so that reading needs neither their code nor the
    import of ``torch.distributed.checkpoint`` (about 1.5 s).
    """

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(s, (dict, type(None))) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, __slots__ state)
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {type(self).__name__}")
        self.__dict__.update(state)


class Metadata(_Record):
    state_dict_metadata: dict[str, object]
    storage_data: dict[object, object]
    planner_data: object = None


class TensorStorageMetadata(_Record):
    properties: TensorProperties
    size: tuple[int, ...]
    chunks: list[ChunkStorageMetadata]


class BytesStorageMetadata(_Record):
    pass


class ChunkStorageMetadata(_Record):
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


class TensorProperties(_Record):
    dtype: torch.dtype

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and state and isinstance(state[0], torch.dtype):
            self.dtype = state[0]  # torch pickles (dtype, layout, requires_grad, memory format, pin_memory)
        else:
            super().__setstate__(state)


class StorageMeta(_Record):
    pass


class MetadataIndex(_Record):
    fqn: str
    offset: tuple[int, ...] | None = None


class StorageInfo(_Record):
    relative_path: str
    offset: int
    length: int
    transform_descriptors: list[str] | None = None


def _enum_value(value: int) -> int:
    """Stands in for ``_MEM_FORMAT_ENCODING(value)`` (how a memory format was pickled)."""
    return value


def _layout(name: str) -> torch.layout:
    """``torch.serialization._get_layout``, limited to the layouts a tensor property can have."""
    layout = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(layout, torch.layout):
        raise pickle.UnpicklingError(f"unknown layout {name!r}")
    return layout


_METADATA = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"
_PLANNER = "torch.distributed.checkpoint.planner"
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    **{
        (_METADATA, cls.__name__): cls
        for cls in (
            Metadata,
            TensorStorageMetadata,
            BytesStorageMetadata,
            ChunkStorageMetadata,
            TensorProperties,
            StorageMeta,
            MetadataIndex,
        )
    },
    (_METADATA, "_MEM_FORMAT_ENCODING"): _enum_value,
    # Megatron-core's torch_dist planner keeps every rank's save plan in the metadata (``all_local_plans``)
    **{(_PLANNER, name): _Record for name in ("SavePlan", "WriteItem", "TensorWriteData", "BytesIOWriteData")},
    (_PLANNER, "WriteItemType"): _enum_value,
    (_FILESYSTEM, "_StorageInfo"): StorageInfo,
    (_FILESYSTEM, "_StoragePrefix"): _Record,
    ("torch", "Size"): tuple,
    ("torch.serialization", "_get_layout"): _layout,
    ("collections", "OrderedDict"): dict,
    # StorageMeta.checkpoint_id: the path the checkpoint was saved to (kept as a pure path)
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
}


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's metadata as plain records and nothing else: any other global is refused."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None and module == "torch":  # dtypes, layouts and memory formats only
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                found = value
        if found is None:
            raise InputError(
                f"{self.path}: refused: the DCP metadata asks for {module}.{name}, which a "
                "torch.distributed.checkpoint .metadata file never holds (ckpt-ema never runs code from a file)"
            )
        return found

    def persistent_load(self, pid: object) -> object:
        raise InputError(f"{self.path}: not a DCP .metadata file (it refers to external objects)")


def read_metadata(folder: Path) -> Metadata:
    """The ``Metadata`` of a DCP folder, unpickled with the allow-list (no code from the file runs)."""
    path = folder / METADATA_NAME
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise InputError(f"{path}: {size} bytes, too large for DCP metadata")
        with open(path, "rb") as f:
            loaded = _MetadataUnpickler(f, path).load()
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # a truncated or foreign pickle: any unpickling error
        raise InputError(f"{path}: not a readable DCP .metadata file ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, Metadata) or not isinstance(getattr(loaded, "state_dict_metadata", None), dict):
        raise InputError(f"{path}: not a DCP .metadata file (holds a {type(loaded).__name__})")
    if not isinstance(getattr(loaded, "storage_data", None), dict):
        raise InputError(
            f"{path}: its storage_data is a {type(getattr(loaded, 'storage_data', None)).__name__}; only "
            "checkpoints written by the file-system writer (dcp.save to a folder) can be read"
        )
    return loaded


def _storage(metadata: Metadata) -> dict[tuple[str, tuple[int, ...] | None], StorageInfo]:
    """``storage_data`` by (fqn, chunk offsets); offsets None for a non-tensor entry."""
    result = {}
    for key, info in metadata.storage_data.items():
        if isinstance(key, MetadataIndex) and isinstance(info, StorageInfo):
            offset = getattr(key, "offset", None)
            result[(key.fqn, tuple(offset) if offset is not None else None)] = info
    return result


# --- which entries are model weights, and their names -------------------------------------------------


def normalise_key(fqn: str, strip_model: bool) -> str:
    """The model's own ``state_dict()`` name: without ``model.`` (if so saved) and FSDP/checkpoint wrappers."""
    name = fqn[len(MODEL_KEY) + 1 :] if strip_model and fqn.startswith(MODEL_KEY + ".") else fqn
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _top(fqn: str) -> str:
    return fqn.split(".", 1)[0]


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it sits in the tensor, and where its blob is in which file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    relpath: str
    offset: int  # of the torch.save blob in the file, bytes
    length: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class DcpTensor:
    """A model tensor of a DCP checkpoint: its stored key, dtype, shape and chunks."""

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


def model_tensors(folder: Path, metadata: Metadata) -> tuple[dict[str, DcpTensor], list[FileNote], list[str]]:
    """The model tensors of a DCP checkpoint by normalised name, what is ignored (and why), and notes."""
    entries: Mapping[str, object] = metadata.state_dict_metadata
    where = _storage(metadata)
    tensor_keys = [k for k, v in entries.items() if isinstance(v, TensorStorageMetadata)]
    # torchtitan / get_state_dict layouts: {"model": ..., "optimizer": ...}; a Hugging Face model saved flat
    # also has "model." keys (model.layers.0...) but lm_head beside them: then nothing is stripped
    weights = [k for k in tensor_keys if _top(k) not in TRAINER_KEYS]
    strip_model = bool(weights) and all(_top(k) == MODEL_KEY for k in weights)
    ignored: dict[str, list[str]] = {}
    objects: list[str] = []  # non-tensor entries outside the trainer's state
    notes: list[str] = []
    tensors: dict[str, DcpTensor] = {}
    origin: dict[str, str] = {}
    for fqn, entry in entries.items():
        top = _top(fqn)
        if isinstance(entry, BytesStorageMetadata):
            if top in TRAINER_KEYS:
                ignored.setdefault(f"{top}.*", []).append(TRAINER_KEYS[top])
            else:  # e.g. Megatron's *._extra_state: one line for all of them
                objects.append(fqn)
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise InputError(f"{folder / METADATA_NAME}: entry {fqn!r} is a {type(entry).__name__}")
        if top in TRAINER_KEYS:
            ignored.setdefault(f"{top}.*", []).append(TRAINER_KEYS[top])
            continue
        dtype = dtype_name(entry.properties.dtype)
        if dtype is None:
            raise InputError(
                f"{folder}: tensor {fqn!r} has dtype {entry.properties.dtype}, which ckpt-ema does not handle"
            )
        shape = tuple(int(d) for d in entry.size)
        chunks = []
        for chunk in entry.chunks:
            offsets = tuple(int(o) for o in chunk.offsets)
            sizes = tuple(int(s) for s in chunk.sizes)
            info = where.get((fqn, offsets))
            if info is None:
                raise InputError(f"{folder / METADATA_NAME}: no storage recorded for {fqn!r} at {list(offsets)}")
            if getattr(info, "transform_descriptors", None):
                raise InputError(
                    f"{folder}: {fqn!r} is stored with transforms {list(info.transform_descriptors or [])} "
                    "(e.g. compression), which ckpt-ema does not read; save without _extensions"
                )
            if (
                len(offsets) != len(shape)
                or len(sizes) != len(shape)
                or any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape))
            ):
                raise InputError(f"{folder}: chunk {list(offsets)} {list(sizes)} of {fqn!r} lies outside {list(shape)}")
            chunks.append(Chunk(offsets, sizes, str(info.relative_path), int(info.offset), int(info.length)))
        if sum(c.numel for c in chunks) != math.prod(shape):
            raise InputError(
                f"{folder}: the chunks of {fqn!r} hold {sum(c.numel for c in chunks)} values, its shape "
                f"{list(shape)} needs {math.prod(shape)}; the checkpoint is incomplete"
            )
        name = normalise_key(fqn, strip_model)
        if name in origin:
            raise InputError(f"{folder}: {origin[name]!r} and {fqn!r} are both {name!r} once wrappers are removed")
        origin[name] = fqn
        tensors[name] = DcpTensor(fqn, dtype, shape, tuple(sorted(chunks, key=lambda c: c.offsets)))
    if strip_model:
        notes.append(f"model weights under {MODEL_KEY!r}; names without the '{MODEL_KEY}.' prefix")
    if any(any(p in fqn for p in WRAPPER_PARTS) for fqn in origin.values()):
        notes.append("FSDP / activation-checkpointing wrapper names removed from the keys")
    notes_ignored = [
        FileNote(key, f"{reasons[0]}; {len(reasons)} entr{'y' if len(reasons) == 1 else 'ies'} in .metadata")
        for key, reasons in ignored.items()
    ]
    if objects:
        example = f"{objects[0]}" + (f", ... ({len(objects)} in all)" if len(objects) > 1 else "")
        notes_ignored.append(
            FileNote(example, "pickled objects, not tensors (never loaded; copied byte for byte into a DCP output)")
        )
    return tensors, notes_ignored, notes


@dataclass(frozen=True)
class StoredObject:
    """A non-tensor entry of the model (Megatron's ``*._extra_state``): where its bytes are; never unpickled."""

    fqn: str
    relpath: str
    offset: int
    length: int


def model_objects(metadata: Metadata) -> list[StoredObject]:
    """The model's non-tensor entries (outside the trainer's state), which a DCP output copies byte for byte."""
    where = _storage(metadata)
    result = []
    for fqn, entry in metadata.state_dict_metadata.items():
        info = where.get((fqn, None))
        if isinstance(entry, BytesStorageMetadata) and _top(fqn) not in TRAINER_KEYS and info is not None:
            result.append(StoredObject(fqn, str(info.relative_path), int(info.offset), int(info.length)))
    return result


# --- tensor data ------------------------------------------------------------------------------------------

# Loads of 2/4/8-byte values from an address that is not a multiple of their size work on these CPUs (DCP
# blobs start at any byte offset); elsewhere a misaligned chunk is copied once.
_UNALIGNED_OK = platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64")


class _FileView(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file, as a seekable stream starting at 0."""

    def __init__(self, file: io.BufferedReader, start: int, length: int) -> None:
        self.file, self.start, self.length, self.pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        size = max(0, min(len(buffer), self.length - self.pos))
        self.file.seek(self.start + self.pos)
        got = self.file.readinto(memoryview(buffer)[:size])
        self.pos += got or 0
        return got or 0


def locate_blob(file: io.BufferedReader, offset: int, length: int, where: str) -> tuple[int, torch.Tensor]:
    """Where the data of the ``torch.save`` blob at ``offset`` starts in the file, and its meta tensor.

    ``torch.load(weights_only=True, map_location="meta")`` reads the blob's zip directory and pickle only;
    the storage it describes records the data record's offset in the blob (``_checkpoint_offset``).
    """
    try:
        meta = torch.load(_FileView(file, offset, length), map_location="meta", weights_only=True)  # type: ignore[arg-type]
    except Exception as exc:
        raise InputError(f"{where}: cannot read the stored tensor ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, torch.Tensor):
        raise InputError(f"{where}: holds a {type(meta).__name__}, not a tensor")
    start = data_start(meta)
    if start is None:
        raise InputError(f"{where}: cannot locate the tensor data in the stored blob")
    return offset + start, meta


def _holding(tensor: DcpTensor, region: Region) -> Chunk | None:
    """The chunk of which ``region`` is one contiguous run: the chunk itself, or whole rows of it."""
    offsets, sizes = region
    for chunk in tensor.chunks:
        if (chunk.offsets, chunk.sizes) == (offsets, sizes):
            return chunk
        if (
            offsets
            and offsets[1:] == chunk.offsets[1:]
            and sizes[1:] == chunk.sizes[1:]
            and chunk.offsets[0] <= offsets[0]
            and offsets[0] + sizes[0] <= chunk.offsets[0] + chunk.sizes[0]
        ):
            return chunk
    return None


class DcpChunks:
    """The chunk layout of a DCP checkpoint's tensors, and where a block of one lies in its ``.distcp`` file.

    Locating a chunk reads its blob's zip directory and pickle (``torch.load(map_location="meta")``, about
    1.5 kB), only when the pass asks for it: a rank of a distributed merge locates only its own chunks.
    """

    def __init__(self, folder: Path, tensors: Mapping[str, DcpTensor]) -> None:
        self.folder = folder
        self.tensors = tensors
        self._starts: dict[tuple[str, int], int | None] = {}  # (relpath, blob offset) -> data start

    def chunks(self, stored: str) -> list[Region] | None:
        tensor = self.tensors[stored]
        if len(tensor.chunks) < 2:
            return None
        return [(c.offsets, c.sizes) for c in tensor.chunks]

    def locate(self, stored: str, region: Region) -> tuple[str, int, int] | None:
        tensor = self.tensors[stored]
        chunk = _holding(tensor, region)
        if chunk is None or not chunk.numel:
            return None
        key = (chunk.relpath, chunk.offset)
        if key not in self._starts:
            self._starts[key] = self._data_start(tensor, chunk)
        start = self._starts[key]
        if start is None:
            return None
        itemsize = DTYPES[tensor.dtype][1]
        row = math.prod(chunk.sizes[1:]) if chunk.sizes else 1
        begin = start + ((region[0][0] - chunk.offsets[0]) * row if chunk.sizes else 0) * itemsize
        return chunk.relpath, begin, begin + math.prod(region[1]) * itemsize

    def _data_start(self, tensor: DcpTensor, chunk: Chunk) -> int | None:
        """Where the chunk's data starts in its file, if stored contiguous as the metadata says (else None:
        ``DcpReader`` reads it, and says what is wrong if anything is)."""
        path = self.folder / chunk.relpath
        where = f"{path} ({tensor.fqn} at {list(chunk.offsets)})"
        try:
            with open(path, "rb") as file:
                if chunk.offset + chunk.length > os.fstat(file.fileno()).st_size:
                    raise InputError(f"{where}: lies beyond the end of the file; the checkpoint is truncated")
                start, meta = locate_blob(file, chunk.offset, chunk.length, where)
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
        nbytes = chunk.numel * DTYPES[tensor.dtype][1]
        if (
            dtype_name(meta.dtype) != tensor.dtype
            or tuple(meta.shape) != chunk.sizes
            or not meta.is_contiguous()
            or start + nbytes > chunk.offset + chunk.length
        ):
            return None
        return start


class DcpReader:
    """``flat(name)`` for one DCP checkpoint: chunks as views of read-only mappings of the ``.distcp`` files."""

    def __init__(self, folder: Path, tensors: Mapping[str, DcpTensor]) -> None:
        self.folder = folder
        self.tensors = tensors
        self._maps: dict[str, mmap.mmap] = {}
        self._files: dict[str, io.BufferedReader] = {}

    def _file(self, relpath: str) -> tuple[io.BufferedReader, mmap.mmap]:
        if relpath not in self._maps:
            path = self.folder / relpath
            if "/" in relpath or relpath.startswith("."):
                raise InputError(f"{self.folder / METADATA_NAME}: refers to a file outside the folder: {relpath!r}")
            try:
                file = open(path, "rb")
                # ACCESS_COPY: a private mapping torch can view as writable; the file is never written.
                self._maps[relpath] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError as exc:
                raise InputError(f"{path}: cannot map ({exc.strerror or exc})") from None
            except ValueError:
                raise InputError(f"{path}: empty file; the checkpoint is incomplete") from None
            self._files[relpath] = file
        return self._files[relpath], self._maps[relpath]

    def chunk(self, tensor: DcpTensor, chunk: Chunk) -> torch.Tensor:
        """One chunk, shaped ``chunk.sizes``, as a view of the mapping (copied only if strided or misaligned)."""
        file, buffer = self._file(chunk.relpath)
        where = f"{self.folder / chunk.relpath} ({tensor.fqn} at {list(chunk.offsets)})"
        if chunk.offset < 0 or chunk.offset + chunk.length > len(buffer):
            raise InputError(f"{where}: lies beyond the end of the file; the checkpoint is truncated")
        start, meta = locate_blob(file, chunk.offset, chunk.length, where)
        if dtype_name(meta.dtype) != tensor.dtype or tuple(meta.shape) != chunk.sizes:
            raise InputError(
                f"{where}: stored as {dtype_name(meta.dtype)} {list(meta.shape)}, the metadata says "
                f"{tensor.dtype} {list(chunk.sizes)}"
            )
        storage_bytes = meta.untyped_storage().nbytes()
        if start + storage_bytes - meta.storage_offset() * meta.element_size() > chunk.offset + chunk.length:
            raise InputError(f"{where}: its data runs past the stored blob; the checkpoint is corrupt")
        if meta.numel() == 0:
            return torch.empty(chunk.sizes, dtype=meta.dtype)
        span = int(storage_bytes // meta.element_size() - meta.storage_offset())
        aligned = _UNALIGNED_OK or start % meta.element_size() == 0
        if aligned:
            flat = torch.frombuffer(buffer, dtype=meta.dtype, count=span, offset=start)
        else:
            flat = torch.frombuffer(buffer, dtype=torch.uint8, count=span * meta.element_size(), offset=start)
            flat = flat.clone().view(meta.dtype)
        return flat.as_strided(meta.shape, meta.stride())

    def flat(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a 1-D numpy array in its dtype's storage type (BF16 as uint16)."""
        from ckpt_ema.io.torch_edge import to_numpy

        return to_numpy(self._flat_torch(name))

    def region(self, name: str, region: Region) -> np.ndarray:
        """A block of tensor ``name`` as 1-D: a view of the chunk holding it, else copied from the chunks it
        spans (memory: the block, never the whole tensor unless the block is the tensor)."""
        from ckpt_ema.io.torch_edge import to_numpy

        tensor = self.tensors[name]
        offsets, sizes = region
        if (offsets, sizes) == ((0,) * len(tensor.shape), tensor.shape):
            return to_numpy(self._flat_torch(name))
        chunk = _holding(tensor, region)
        if chunk is not None:
            view = self.chunk(tensor, chunk)
            inner = tuple(slice(o - c, o - c + s) for o, c, s in zip(offsets, chunk.offsets, sizes))
            block = view[inner]
            return to_numpy(block.reshape(-1) if block.is_contiguous() else block.contiguous().reshape(-1))
        out: torch.Tensor | None = None
        for chunk in tensor.chunks:
            low = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            high = [min(o + s, c + z) for o, s, c, z in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(lo >= hi for lo, hi in zip(low, high)):
                continue
            data = self.chunk(tensor, chunk)
            if out is None:
                out = torch.empty(sizes, dtype=data.dtype)
            source = tuple(slice(lo - c, hi - c) for lo, hi, c in zip(low, high, chunk.offsets))
            target = tuple(slice(lo - o, hi - o) for lo, hi, o in zip(low, high, offsets))
            out[target].copy_(data[source])
        if out is None:
            raise InputError(f"{self.folder}: no chunk of {tensor.fqn!r} holds {list(offsets)} {list(sizes)}")
        return to_numpy(out.reshape(-1))

    def _flat_torch(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as 1-D in its stored dtype: a view for one chunk, else assembled from its chunks."""
        tensor = self.tensors[name]
        if len(tensor.chunks) == 1:
            view = self.chunk(tensor, tensor.chunks[0])
            return view.reshape(-1) if view.is_contiguous() else view.contiguous().reshape(-1)
        full = torch.empty(tensor.shape, dtype=self.chunk(tensor, tensor.chunks[0]).dtype)
        for chunk in tensor.chunks:
            region = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
            full[region].copy_(self.chunk(tensor, chunk))
        return full.reshape(-1)

    def close(self) -> None:
        for mapping in self._maps.values():
            try:
                mapping.close()
            except BufferError:  # a view is still alive; the mapping goes with it
                pass
        for file in self._files.values():
            file.close()
        self._maps.clear()
        self._files.clear()


def _load_entry(folder: Path, info: StorageInfo | None) -> object:
    """A small stored entry (a pickled object or a scalar tensor), loaded with ``weights_only=True``."""
    if info is None or info.length > 1 << 20:
        return None
    try:
        with open(folder / info.relative_path, "rb") as f:
            return torch.load(_FileView(f, info.offset, info.length), weights_only=True)  # type: ignore[arg-type]
    except Exception:
        return None


def _step_record(folder: Path, metadata: Metadata) -> tuple[str, int] | None:
    """The trainer's step (torchtitan's ``train_state.step``: a pickled int or a scalar tensor)."""
    where = _storage(metadata)
    for key in STEP_KEYS:
        entry = metadata.state_dict_metadata.get(key)
        if isinstance(entry, BytesStorageMetadata):
            value = _load_entry(folder, where.get((key, None)))
        elif isinstance(entry, TensorStorageMetadata) and math.prod(entry.size) == 1 and entry.chunks:
            value = _load_entry(folder, where.get((key, tuple(entry.chunks[0].offsets))))
        else:
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return f"DCP {key!r}", value
    return None


def open_dcp(path: Path) -> CheckpointSource:
    """A DCP folder as a checkpoint source, reading ``.metadata`` only (and a train-state step if saved).

    Each ``.distcp`` file holding model weights is one weight file of the source (so the inputs' SHA-256
    covers them); a tensor belongs to the file of its first chunk, and a reader opened for any of them reads
    chunks from every file (a sharded tensor's chunks are in several).
    """
    metadata = read_metadata(path)
    try:
        tensors, ignored, notes = model_tensors(path, metadata)
    except (AttributeError, TypeError, ValueError) as exc:  # records of the right classes, wrong contents
        raise InputError(f"{path / METADATA_NAME}: malformed DCP metadata ({type(exc).__name__}: {exc})") from None
    if not tensors:
        raise InputError(
            f"{path}: the DCP checkpoint holds no model weights (only {', '.join(n.relpath for n in ignored) or 'nothing'})"
        )
    data_files = sorted({c.relpath for t in tensors.values() for c in t.chunks}, key=_data_file_order)
    sizes = {}
    for relpath in data_files:
        try:
            sizes[relpath] = (path / relpath).stat().st_size
        except OSError:
            raise InputError(f"{path / relpath}: missing; the DCP checkpoint is incomplete") from None
    by_file: dict[str, dict[str, TensorInfoLike]] = {relpath: {} for relpath in data_files}
    ranges = _byte_ranges(path, tensors)
    chunked = DcpChunks(path, tensors)
    for name, tensor in tensors.items():
        by_file[tensor.chunks[0].relpath][name] = ranges.get(name) or TensorMeta(tensor.dtype, tensor.shape)
    weight_files = [  # also the files holding only later chunks: their bytes are read (and hashed) too
        WeightFile(
            relpath,
            path / relpath,
            infos,
            {},
            lambda: DcpReader(path, tensors),
            sizes[relpath],
            chunked=chunked,
        )
        for relpath, infos in by_file.items()
    ]
    ranks = {int(m.group(1)) for m in map(DATA_FILE.match, data_files) if m}
    sharded = sum(len(t.chunks) > 1 for t in tensors.values())
    described = f"DCP folder ({len(data_files)} file(s), {len(ranks) or '?'} rank(s)"
    described += f", {sharded} sharded tensors)" if sharded else ")"
    source = CheckpointSource(path, described, [Part("", weight_files)])
    source.output_format = "dcp"
    source.ignored = ignored
    source.notes = notes
    source.exports_folder = True
    source.objects = model_objects(metadata)
    other = [p.name for p in sorted(path.iterdir()) if p.name != METADATA_NAME and p.name not in data_files]
    megatron = is_megatron_folder(path)
    if megatron:
        source.notes.append(
            f"Megatron-core dist_checkpointing ({megatron}): {', '.join(MEGATRON_FILES)} copied into a DCP output"
        )
    for name in other:
        if name in MEGATRON_FILES and megatron or name not in MEGATRON_FILES and _hf_file(path / name):
            source.copied.append(name)
        elif name.endswith(".distcp"):
            source.ignored.append(FileNote(name, "holds only ignored entries"))
        else:
            source.ignored.append(FileNote(name, "not part of the DCP checkpoint"))
    record = _step_record(path, metadata)
    if record is not None:
        source.step_records.append(record)
    return source


def is_megatron_folder(path: Path) -> str | None:
    """The ``sharded_backend`` of a Megatron-core ``dist_checkpointing`` folder (``torch_dist``), else None.

    Megatron-core's ``dist_checkpointing.save`` (``serialization.py``; 0.16.1) writes, beside torch's DCP files,
    ``metadata.json`` (``CheckpointingConfig``: ``{"sharded_backend": "torch_dist", ...}``, ``core.py``) and
    ``common.pt`` (``torch.save`` of the non-sharded part of the state: ``args``, ``iteration``, ...), which
    its ``load`` reads first. ``metadata.json`` is small JSON and is read here; ``common.pt`` is never loaded.
    """
    try:
        config = inside(path, path / "metadata.json")  # a link out of the checkpoint is never read
        if not config.is_file() or config.stat().st_size > 1 << 16 or not (path / "common.pt").is_file():
            return None
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except (InputError, OSError, UnicodeDecodeError, ValueError):
        return None
    backend = loaded.get("sharded_backend") if isinstance(loaded, dict) else None
    return backend if isinstance(backend, str) else None


def _hf_file(path: Path) -> bool:
    """A Hugging Face file beside the weights (``config.json``, tokenizer files): copied into a safetensors
    export, which ``from_pretrained`` then loads."""
    return path.is_file() and (path.suffix in HF_SUFFIXES or path.name in HF_NAMES)


def _byte_ranges(folder: Path, tensors: Mapping[str, DcpTensor]) -> dict[str, TensorInfo]:
    """Where the data of each tensor stored in one contiguous chunk lies in its ``.distcp`` file.

    Such a tensor is then read like a safetensors tensor, by byte range (the engine's read-ahead path);
    each blob's zip directory and pickle are read for it (``torch.load(map_location="meta")``, about 1.5 kB).
    Tensors in several chunks, or stored strided, are left to ``flat``.
    """
    result: dict[str, TensorInfo] = {}
    files: dict[str, io.BufferedReader] = {}
    try:
        for name, tensor in tensors.items():
            if len(tensor.chunks) != 1 or not math.prod(tensor.shape):
                continue
            chunk = tensor.chunks[0]
            if chunk.relpath not in files:
                files[chunk.relpath] = open(folder / chunk.relpath, "rb")  # noqa: SIM115 (closed below)
            where = f"{folder / chunk.relpath} ({tensor.fqn})"
            if chunk.offset + chunk.length > os.fstat(files[chunk.relpath].fileno()).st_size:
                raise InputError(f"{where}: lies beyond the end of the file; the checkpoint is truncated")
            start, meta = locate_blob(files[chunk.relpath], chunk.offset, chunk.length, where)
            nbytes = math.prod(tensor.shape) * DTYPES[tensor.dtype][1]
            if (
                dtype_name(meta.dtype) != tensor.dtype
                or tuple(meta.shape) != tensor.shape
                or not meta.is_contiguous()
                or start + nbytes > chunk.offset + chunk.length
            ):
                continue  # flat() reads it, and says what is wrong if anything is
            result[name] = TensorInfo(tensor.dtype, tensor.shape, start, start + nbytes)
    except OSError as exc:
        raise InputError(f"{folder}: cannot read ({exc.strerror or exc})") from None
    finally:
        for file in files.values():
            file.close()
    return result


def _data_file_order(relpath: str) -> tuple[int, int, str]:
    match = DATA_FILE.match(relpath)
    return (int(match.group(1)), int(match.group(2)), relpath) if match else (1 << 62, 0, relpath)
