"""What the engine reads: a checkpoint's tensors by name, their dtypes and shapes, data on demand.

Every format (a safetensors file, a Hugging Face or diffusers folder, a torch pickle) is a
``CheckpointSource`` made of one or more weight files. Only one weight file of a source is open at a
time: asking for a tensor of another file drops the previous file's mapping, so a sharded folder is read
one shard at a time (the plan orders tensors file by file to make that a single sweep).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ckpt_ema.io.identity import FileIdentity
from ckpt_ema.io.safetensors_format import DTYPES, TensorInfo

# Parameter names of LoRA factors (kohya, PEFT, OneTrainer/OMI) and of their scale.
LORA_FACTOR_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "lora.up")


def is_lora_alpha(name: str) -> bool:
    """A LoRA module's ``alpha`` scale: copied from the newest checkpoint, never averaged."""
    return name.endswith(".alpha")


def is_lora_factor(name: str) -> bool:
    return any(marker in name for marker in LORA_FACTOR_MARKERS)


@dataclass(frozen=True)
class TensorMeta:
    """A tensor's dtype name and shape where the file gives no byte range (torch pickles)."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype][2]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def dtype_name(dtype: Any) -> str | None:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``); see ``io/torch_edge.py``."""
    from ckpt_ema.io.torch_edge import dtype_name as name

    return name(dtype)


class TensorInfoLike(Protocol):
    """What every reader knows of a tensor from headers alone: a ``TensorInfo`` (safetensors, with its
    byte range) or a ``TensorMeta``."""

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def numel(self) -> int: ...

    @property
    def is_float(self) -> bool: ...

    @property
    def nbytes(self) -> int: ...


# A block of a tensor: (offsets, sizes), one per dimension; the whole tensor is ((0, ...), shape).
Region = tuple[tuple[int, ...], tuple[int, ...]]


def whole_region(shape: Sequence[int]) -> Region:
    return (0,) * len(shape), tuple(shape)


class OpenFile(Protocol):
    def flat(self, name: str) -> np.ndarray: ...


@runtime_checkable
class RegionFile(OpenFile, Protocol):
    """An open file that reads a block of a tensor without assembling the tensor (a DCP tensor's chunks)."""

    def region(self, name: str, region: Region) -> np.ndarray: ...


class ChunkedTensors(Protocol):
    """A format storing tensors in chunks, each a block of the tensor stored contiguously (DCP)."""

    def chunks(self, stored: str) -> Sequence[Region] | None:
        """The chunks of ``stored``, sorted by offsets; None when it is stored whole, in one chunk."""
        ...

    def locate(self, stored: str, region: Region) -> tuple[str, int, int] | None:
        """``(relpath, begin, end)``: the bytes of ``region`` when they are one contiguous run of one chunk
        (the chunk itself, or whole rows of it); else None."""
        ...


@dataclass
class WeightFile:
    """One file of weights: its path relative to the checkpoint, its tensors (stored names) and metadata.

    ``open`` maps the file and returns an object with ``flat(stored_name)``; it is called lazily and the
    result is dropped when another file of the same source is needed. ``identity``: the file when its
    header was read; the merge checks that it has not changed (see ``io/identity.py``). Tensors whose
    info is a :class:`TensorInfo` (real byte ranges) are read by the engine with ``pread``, without ``open``.
    """

    relpath: str
    path: Path
    tensors: dict[str, TensorInfoLike]
    metadata: dict[str, str]
    open: Callable[[], OpenFile]
    size: int
    identity: FileIdentity | None = None
    # Formats that store tensors in chunks (DCP): their layout, and where a block of one lies
    chunked: ChunkedTensors | None = None


@dataclass
class Part:
    """One model inside a checkpoint: the whole file, or a folder's model (``""``) or component (``unet``).

    Tensors of a component are named ``component/stored_name`` in the source.
    """

    name: str
    files: list[WeightFile]
    index_name: str | None = None  # e.g. "model.safetensors.index.json", relative to the part's folder
    index_metadata: dict[str, object] = field(default_factory=dict)
    in_root: bool = False  # a named model whose file sits at the folder's top (accelerate's model_1.safetensors)

    @property
    def prefix(self) -> str:
        return f"{self.name}/" if self.name else ""

    @property
    def folder(self) -> str:
        """The part's folder relative to the checkpoint root."""
        return "" if self.in_root else self.name


@dataclass(frozen=True)
class FileNote:
    """A file or folder of a checkpoint that is not averaged, and why (shown by ``inspect``).

    ``suspicious``: named like a checkpoint but unreadable as one (a dangling link, a FIFO, a folder named
    ``step-500.safetensors``); ``merge`` and ``plan`` warn about those, not only ``inspect``.
    """

    relpath: str
    reason: str
    suspicious: bool = False


class CheckpointSource:
    """One checkpoint: tensors by name (``tensors``), ``metadata``, ``flat(name)`` data, ``nbytes`` read.

    Attributes:
        path: the file or folder given.
        format: a short description (``"safetensors file"``, ``"Hugging Face folder, 3 shards"``, ...).
        is_folder: a folder checkpoint (its output is a folder mirroring it).
        output_format: the output format by default when it is neither of those (``"dcp"`` for DCP folders).
        exports_folder: a model with no Hugging Face layout of its own (DCP, DeepSpeed): its safetensors output
            is a Hugging Face folder (``model.safetensors``, or shards and an index), unless ``-o`` names a file.
        parts: the models it holds, each with its weight files.
        step_records: steps the trainer recorded outside safetensors metadata, as ``(source, step)``.
        ignored: files not read, and why; copied: files copied unchanged to a folder output.
        notes: what the reader chose (e.g. the ``--key`` of a torch file), shown to the user.
    """

    def __init__(
        self,
        path: Path,
        format: str,
        parts: list[Part],
        metadata: Mapping[str, str] | None = None,
        is_folder: bool = False,
    ) -> None:
        self.path = path
        self.format = format
        self.parts = parts
        self.is_folder = is_folder
        self.output_format: str | None = None
        self.exports_folder = False
        self.metadata: dict[str, str] = dict(metadata or {})
        self.step_records: list[tuple[str, int]] = []
        self.ignored: list[FileNote] = []
        self.copied: list[str] = []
        self.notes: list[str] = []
        self.state_dict_key: str | None = None  # torch files: where the state dict was found
        self.other_keys: list[str] = []  # ... and the other state dicts the file holds, if it was not --key
        self.epoch_numbered = ""  # set when the trainer numbers files by epoch (timm): the name is no step
        self.recorded_epoch: int | None = None  # an epoch the file records: a name's equal number is no step
        # DCP: the model's non-tensor entries (io.dcp.StoredObject), copied byte for byte into a DCP output
        self.objects: list[Any] = []
        self.lightning: dict[str, object] = {}  # a Lightning checkpoint's top-level entries besides tensors
        self._where: dict[str, tuple[int, str]] = {}  # name -> (file number, stored name)
        self._files: list[WeightFile] = []
        self._tensors: dict[str, TensorInfoLike] = {}
        for part in parts:
            for weight_file in part.files:
                number = len(self._files)
                self._files.append(weight_file)
                for stored, info in weight_file.tensors.items():
                    name = part.prefix + stored
                    self._where[name] = (number, stored)
                    self._tensors[name] = info
        self._open_number = -1
        self._open: OpenFile | None = None
        self._numbers: dict[str, int] | None = None  # relpath -> file number

    @property
    def tensors(self) -> dict[str, TensorInfoLike]:
        return self._tensors

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self._files)

    @property
    def files(self) -> list[WeightFile]:
        return self._files

    def file_number(self, name: str) -> int:
        """Which weight file holds ``name`` (the plan orders tensors by it)."""
        return self._where[name][0]

    def stored_name(self, name: str) -> str:
        return self._where[name][1]

    def locate(self, name: str) -> tuple[int, int, int, str] | None:
        """Where tensor ``name``'s bytes lie: ``(file number, begin, end, dtype)``, absolute offsets in
        ``files[number].path``; None when the reader knows no byte range (torch pickles): use ``flat``."""
        number, stored = self._where[name]
        info = self._files[number].tensors[stored]
        if not isinstance(info, TensorInfo):
            return None
        return number, info.begin, info.end, info.dtype

    def flat(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a 1-D numpy array in its dtype's storage type (BF16 as uint16, see
        ``safetensors_format.DTYPES``); opens its file, closing the previous one."""
        number, stored = self._where[name]
        return self._opened(number).flat(stored)

    def _opened(self, number: int) -> OpenFile:
        if number != self._open_number:
            self._open = None  # drop the previous file's mapping before opening the next
            self._open = self._files[number].open()
            self._open_number = number
        assert self._open is not None
        return self._open

    def chunks(self, name: str) -> Sequence[Region] | None:
        """The chunks ``name`` is stored in (blocks of the tensor, sorted by offsets), or None: stored whole."""
        number, stored = self._where[name]
        chunked = self._files[number].chunked
        return chunked.chunks(stored) if chunked is not None else None

    def locate_region(self, name: str, region: Region) -> tuple[int, int, int, str] | None:
        """Like :meth:`locate`, for a block of the tensor: its bytes when they are one contiguous run of one
        stored chunk; else None (then :meth:`region` reads it)."""
        if region == whole_region(self._tensors[name].shape) and self.chunks(name) is None:
            return self.locate(name)
        number, stored = self._where[name]
        chunked = self._files[number].chunked
        found = chunked.locate(stored, region) if chunked is not None else None
        if found is None:
            return None
        relpath, begin, end = found
        if self._numbers is None:
            self._numbers = {f.relpath: n for n, f in enumerate(self._files)}
        file = self._numbers.get(relpath)
        return None if file is None else (file, begin, end, self._tensors[name].dtype)

    def region(self, name: str, region: Region) -> np.ndarray:
        """A block of tensor ``name`` as 1-D row-major data (a view when it lies in one stored chunk)."""
        number, stored = self._where[name]
        opened = self._opened(number)
        if isinstance(opened, RegionFile):
            return opened.region(stored, region)
        shape = self._tensors[name].shape
        if region == whole_region(shape):
            return opened.flat(stored)
        block = tuple(slice(o, o + s) for o, s in zip(*region))
        return np.ascontiguousarray(opened.flat(stored).reshape(shape)[block]).reshape(-1)

    def close(self) -> None:
        self._open = None
        self._open_number = -1

    def rename(self, mapping: Mapping[str, str]) -> None:
        """Give tensors new names (``old -> new``), e.g. without a ``module.`` prefix."""
        self._where = {mapping.get(n, n): w for n, w in self._where.items()}
        self._tensors = {mapping.get(n, n): t for n, t in self._tensors.items()}

    def __repr__(self) -> str:
        return f"CheckpointSource({str(self.path)!r}, {self.format!r}, {len(self._tensors)} tensors)"
