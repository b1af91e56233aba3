"""Writing DCP (torch.distributed.checkpoint) folders that ``dcp.load`` and torchtitan's model-only load read.

The layout is the one torch's ``FileSystemWriter`` produces (``torch/distributed/checkpoint/filesystem.py``)::

    OUT/__R_0.distcp    rank R's tensors, each one ``torch.save`` blob (a small zip: pickle, then the data)
    OUT/.metadata       a pickle of torch's ``Metadata``: every tensor's dtype, size and chunk, and where it is
    OUT/ckpt_ema.json   the provenance (SPEC §6: ``format``, ``ckpt_ema.*``), which DCP has no place for

Each tensor is one chunk (offsets 0, the full size), or the chunks it was merged by (``plan.pieces``: the
inputs' own chunks, or runs of rows), under the model's own names, so
``dcp.load(model.state_dict(), checkpoint_id=OUT)`` fills an unwrapped model (any sharding: DCP reshards
on load). A blob's bytes are produced as ``torch.save`` writes them: its zip header and pickle come from
``torch.save`` of an empty tensor of the same dtype and shape under ``torch.serialization.skip_data`` (which
leaves a hole where the data goes), the data is streamed into the hole chunk by chunk, and the zip's CRC-32
fields are filled in afterwards. No tensor is ever held whole.

Atomic: a single-process output is built in ``.OUT.ckpt-ema-tmp-PID`` and renamed into place when complete.
In a distributed run every rank writes its own ``__R_0.distcp`` under a temporary name, they are renamed
only when every rank has succeeded, and rank 0 writes ``.metadata`` last: a DCP folder without
``.metadata`` is not a checkpoint, so no reader ever sees a partial one.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import struct
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ckpt_ema.errors import InputError, OutputError
from ckpt_ema.output.writer import (
    TEMP_MARKER,
    Writeback,
    WriteOptions,
    copy_file,
    remove_stale_temps,
    replace_folder,
    write_json_atomic,
)
from ckpt_ema.plan.model import TensorPlan
from ckpt_ema.plan.pieces import Piece, whole

if TYPE_CHECKING:
    import torch
else:
    from ckpt_ema.io.lazy_torch import torch

METADATA_NAME = ".metadata"
PROVENANCE_NAME = "ckpt_ema.json"


def data_file_name(rank: int) -> str:
    return f"__{rank}_0.distcp"


class _HoleRecorder(io.RawIOBase):
    """A stream for ``torch.save`` under ``skip_data``: keeps the bytes written, records the skipped data."""

    def __init__(self) -> None:
        self.pieces: list[bytearray] = [bytearray()]
        self.holes: list[int] = []
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.pieces[-1] += bytes(data)
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR and offset:
            self.holes.append(offset)
            self.pieces.append(bytearray())
            self.pos += offset
        elif not (whence == io.SEEK_SET and offset == self.pos) and not (whence == io.SEEK_CUR and not offset):
            raise OSError("torch.save seeked unexpectedly while writing a template")
        return self.pos

    def tell(self) -> int:
        return self.pos


@dataclass
class BlobTemplate:
    """A tensor's ``torch.save`` bytes around its data: ``head`` + data (``size`` bytes) + ``tail``."""

    head: bytes
    size: int
    tail: bytearray
    local_crc: int | None  # offset of the CRC field in head (None when a data descriptor carries it)
    tail_crcs: list[int]  # offsets of the CRC fields in tail (data descriptor, central directory)

    @property
    def length(self) -> int:
        return len(self.head) + self.size + len(self.tail)


def blob_template(shape: Sequence[int], dtype: torch.dtype) -> BlobTemplate:
    """What ``torch.save(tensor)`` writes for a contiguous tensor of this shape and dtype, minus the data."""
    placeholder = torch.empty(tuple(shape), dtype=dtype)  # never touched: no memory is committed
    recorder = _HoleRecorder()
    with torch.serialization.skip_data():
        torch.save(placeholder, recorder)  # type: ignore[arg-type]
    size = placeholder.numel() * placeholder.element_size()
    if size == 0:
        return BlobTemplate(bytes(b"".join(recorder.pieces)), 0, bytearray(), None, [])
    if recorder.holes != [size] or len(recorder.pieces) != 2:
        raise RuntimeError(f"unexpected torch.save layout for {dtype} {list(shape)}: holes {recorder.holes}")
    head, tail = bytes(recorder.pieces[0]), recorder.pieces[1]
    local = head.rfind(b"PK\x03\x04")  # the data record's local header is the last one before the data
    flags = struct.unpack_from("<H", head, local + 6)[0]
    local_crc = None if flags & 0x08 else local + 14
    crcs = [4] if tail[:4] == b"PK\x07\x08" else []
    position = tail.find(b"PK\x01\x02")
    while position >= 0:  # central directory entries: the one naming .../data/0
        name_length = struct.unpack_from("<H", tail, position + 28)[0]
        name = bytes(tail[position + 46 : position + 46 + name_length])
        if name.endswith(b"/data/0"):
            crcs.append(position + 16)
        position = tail.find(b"PK\x01\x02", position + 4)
    return BlobTemplate(head, size, tail, local_crc, crcs)


@dataclass(frozen=True)
class StoredTensor:
    """Where one written chunk is: the tensor, the block it holds, its data file, the blob's offset and length."""

    name: str
    dtype: str
    shape: tuple[int, ...]  # of the whole tensor
    relpath: str
    offset: int
    length: int
    data_offset: int  # where the chunk's bytes start in the file
    data_bytes: int
    chunk_offsets: tuple[int, ...] = ()  # the block of the tensor this chunk holds (default: all of it)
    chunk_sizes: tuple[int, ...] | None = None

    @property
    def region(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        sizes = self.shape if self.chunk_sizes is None else self.chunk_sizes
        return (self.chunk_offsets or (0,) * len(self.shape)), tuple(sizes)


@dataclass(frozen=True)
class StoredBytes:
    """Where one copied non-tensor entry is: its data file, and its bytes' offset and length in it."""

    name: str
    relpath: str
    offset: int
    length: int


@dataclass(frozen=True)
class ObjectCopy:
    """A non-tensor entry to copy byte for byte: its key, and where its bytes are in the newest checkpoint."""

    name: str
    path: Path
    offset: int
    length: int

    def read(self) -> bytes:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                data = os.pread(fd, self.length, self.offset)
            finally:
                os.close(fd)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read {self.name!r} ({exc.strerror or exc})") from None
        if len(data) != self.length:
            raise InputError(f"{self.path}: {self.name!r} lies beyond the end of the file; the checkpoint is truncated")
        return data


class DcpDataFile:
    """Streams one ``__R_0.distcp`` file: one blob per piece (a tensor, or one block of it: a chunk), in the
    order given; each tensor's data arrives as its pieces' data one after the other."""

    def __init__(
        self,
        path: Path,
        tensors: Sequence[TensorPlan | Piece],
        relpath: str | None = None,
        digest: bool = False,
        mode: int = 0o644,  # permission bits of the file (the inputs' most restrictive: output.paths.output_mode)
    ) -> None:
        self.path = path
        self.digest = hashlib.sha256() if digest else None
        self.relpath = relpath or path.name
        self.temp_path = path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")
        self._pieces = [t if isinstance(t, Piece) else whole(t) for t in tensors]
        self._index = 0
        self._template: BlobTemplate | None = None
        self._templates: dict[tuple[tuple[int, ...], str], BlobTemplate] = {}  # by shape and dtype
        self._written = 0
        self._crc = 0
        self._blob_start = 0
        self.stored: list[StoredTensor] = []
        self.stored_bytes: list[StoredBytes] = []
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            self._file = os.fdopen(os.open(self.temp_path, flags, mode), "wb", buffering=0)
            self._writeback = Writeback(self._file.fileno())
        except FileExistsError:
            raise OutputError(f"{self.temp_path}: already exists (another run writing {path}?)") from None
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        self._advance()

    def _advance(self) -> None:
        """Start the next tensor (finishing empty ones at once: they have no data to wait for)."""
        while self._index < len(self._pieces):
            piece = self._pieces[self._index]
            key = (tuple(piece.sizes), piece.tensor.out_dtype)
            if key not in self._templates:  # torch.save takes ~1 ms; the bytes depend on shape and dtype only
                self._templates[key] = blob_template(piece.sizes, torch_dtype(piece.tensor.out_dtype))
            self._template = self._templates[key]
            self._blob_start = self._file.tell()
            self._write(self._template.head)
            self._written, self._crc = 0, 0
            if self._template.size:
                return
            self._finish_tensor()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: write failed ({exc.strerror or exc})") from None
        self._writeback.wrote(memoryview(data).nbytes)

    def write(self, name: str, data: np.ndarray) -> None:
        """Append (part of) tensor ``name``; ``data`` is in the output dtype's storage type."""
        if self._index >= len(self._pieces) or name != self._pieces[self._index].name:
            raise RuntimeError(f"tensor {name!r} written out of order")
        view = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        self._write(view)
        self._crc = zlib.crc32(view, self._crc)
        if self.digest is not None:
            self.digest.update(view)
        self._written += view.nbytes
        assert self._template is not None
        if self._written > self._template.size:
            raise RuntimeError(f"tensor {name!r}: more bytes written than its shape holds")
        if self._written == self._template.size:
            self._finish_tensor()
            self._advance()

    def _finish_tensor(self) -> None:
        template = self._template
        assert template is not None
        crc = struct.pack("<I", self._crc & 0xFFFFFFFF)
        tail = bytearray(template.tail)
        for offset in template.tail_crcs:
            tail[offset : offset + 4] = crc
        self._write(tail)
        if template.local_crc is not None and template.size:
            os.pwrite(self._file.fileno(), crc, self._blob_start + template.local_crc)
        piece = self._pieces[self._index]
        self.stored.append(
            StoredTensor(
                piece.name,
                piece.tensor.out_dtype,
                tuple(piece.tensor.shape),
                self.relpath,
                self._blob_start,
                template.length,
                self._blob_start + len(template.head),
                template.size,
                piece.offsets,
                piece.sizes,
            )
        )
        self._index += 1
        self._template = None

    def append_bytes(self, name: str, data: bytes) -> None:
        """A non-tensor entry after the tensors, as ``FileSystemWriter`` writes a ``BYTE_IO`` item: its bytes as they are."""
        offset = self._file.tell()
        self._write(data)
        self.stored_bytes.append(StoredBytes(name, self.relpath, offset, len(data)))

    def close(self) -> None:
        """Flush and close the temporary file (every tensor must have been written)."""
        if self._index != len(self._pieces):
            raise RuntimeError(f"{self.path}: {len(self._pieces) - self._index} chunks were not written")
        try:
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: cannot finish writing ({exc.strerror or exc})") from None

    def rename(self) -> None:
        os.replace(self.temp_path, self.path)
        self.temp_path = self.path  # abort() now removes the renamed file

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


def build_metadata(
    stored: Sequence[StoredTensor], checkpoint_id: str, stored_bytes: Sequence[StoredBytes] = ()
) -> object:
    """torch's ``Metadata`` for the chunks written (by every rank), as ``FileSystemWriter.finish`` writes it:
    each tensor's size and chunks, and where each chunk's blob is; and the non-tensor entries copied."""
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    state_dict_metadata: dict[str, TensorStorageMetadata] = {}
    storage_data: dict[object, object] = {}
    for item in sorted(stored, key=lambda i: (i.name, i.region[0])):
        offsets, sizes = (torch.Size(r) for r in item.region)
        entry = state_dict_metadata.get(item.name)
        if entry is None:
            entry = state_dict_metadata[item.name] = TensorStorageMetadata(
                TensorProperties(dtype=torch_dtype(item.dtype)), torch.Size(item.shape), []
            )
        storage_data[MetadataIndex(item.name, offsets, len(entry.chunks))] = _StorageInfo(
            item.relpath, item.offset, item.length
        )
        entry.chunks.append(ChunkStorageMetadata(offsets, sizes))
    entries: dict[str, object] = dict(state_dict_metadata)
    for copied in stored_bytes:
        entries[copied.name] = BytesStorageMetadata()
        storage_data[MetadataIndex(copied.name)] = _StorageInfo(copied.relpath, copied.offset, copied.length)
    return Metadata(
        state_dict_metadata=entries,  # type: ignore[arg-type]
        planner_data={name: (name,) for name in entries},
        storage_data=storage_data,
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=str(uuid.uuid4())),
        version=CURRENT_DCP_VERSION,
    )


def write_metadata(
    folder: Path,
    stored: Sequence[StoredTensor],
    final: Path,
    mode: int = 0o644,
    stored_bytes: Sequence[StoredBytes] = (),
) -> None:
    """``.metadata`` (through a temporary name: its appearance completes the checkpoint)."""
    temp = folder / f"{METADATA_NAME}.tmp-{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(temp, flags, mode), "wb") as f:
        pickle.dump(build_metadata(stored, str(final), stored_bytes), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, folder / METADATA_NAME)


def write_provenance(folder: Path, metadata: Mapping[str, str], options: WriteOptions | None = None) -> None:
    """``ckpt_ema.json``: the output's metadata, with the values only known at the end (inputs' SHA-256)."""
    values = dict(metadata)
    if options is not None and options.late_metadata:
        late = options.late_values() if options.late_values else {}
        values.update({k: v for k, v in late.items() if k in options.late_metadata})
    write_json_atomic(folder / PROVENANCE_NAME, {"metadata": values}, options.mode if options else 0o644)


class DcpWriter:
    """Writes one DCP output folder in a single process; ``commit`` renames it into place.

    Args:
        path: the output folder (replaced on commit if it exists; the caller checks ``--force``).
        tensors: the output's tensors (or pieces: tensors cut into chunks, ``plan.pieces``), in the order
            they will be written.
        metadata: provenance, written to ``ckpt_ema.json``.
        options: ``verify`` reads the data file back; ``late_metadata`` values are filled in at commit.
        copies: files copied unchanged into the folder, by name: the real path of each (links resolved by the
            caller); Megatron-core's ``metadata.json`` and ``common.pt``, which its ``load`` needs.
        objects: non-tensor entries of the model copied byte for byte into the data file after the tensors
            (Megatron's ``*._extra_state``, which its ``load`` asks for); never unpickled.
        tracker: Megatron-LM's ``latest_checkpointed_iteration.txt`` beside an ``iter_NNNNNNN`` output, written
            after the rename (see :func:`update_tracker`).
    """

    def __init__(
        self,
        path: Path,
        tensors: Sequence[TensorPlan | Piece],
        metadata: Mapping[str, str],
        options: WriteOptions | None = None,
        copies: Mapping[str, Path] | None = None,
        objects: Sequence[ObjectCopy] = (),
        tracker: Path | None = None,
    ) -> None:
        self.path = Path(path)
        self._objects = list(objects)
        self._tracker = tracker
        self.temp = self.path.parent / f".{self.path.name}{TEMP_MARKER}{os.getpid()}"
        self._metadata = dict(metadata)
        self._options = options or WriteOptions()
        self._data: DcpDataFile | None = None
        try:
            remove_stale_temps(self.path.parent)
            self.temp.mkdir(mode=self._options.folder_mode, parents=True)
            for name, origin in (copies or {}).items():
                copy_file(origin, self.temp / name, self._options.mode)
            self._data = DcpDataFile(
                self.temp / data_file_name(0), tensors, digest=self._options.verify, mode=self._options.mode
            )
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, data: np.ndarray) -> None:
        assert self._data is not None
        self._data.write(name, data)

    def commit(self) -> None:
        """Finish the data file, write ``.metadata`` and the provenance, rename the folder into place."""
        assert self._data is not None
        try:
            for entry in self._objects:
                self._data.append_bytes(entry.name, entry.read())
            self._data.close()
            self._data.rename()
            if self._data.digest is not None:
                verify_data_file(self._data, self._data.digest.digest())
            write_provenance(self.temp, self._metadata, self._options)
            write_metadata(self.temp, self._data.stored, self.path, self._options.mode, self._data.stored_bytes)
            if self._options.verify:
                verify_metadata(self.temp, self._data.stored, self._data.stored_bytes)
            replace_folder(self.temp, self.path)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: cannot finish writing ({exc.strerror or exc})") from None
        except BaseException:
            self.abort()
            raise
        if self._tracker is not None:
            update_tracker(self._tracker, self.path)

    def abort(self) -> None:
        if self._data is not None:
            self._data.abort()
        shutil.rmtree(self.temp, ignore_errors=True)


MEGATRON_ITERATION = re.compile(r"^iter_(\d{7})$")
TRACKER_NAME = "latest_checkpointed_iteration.txt"


def megatron_tracker(path: Path) -> Path | None:
    """The tracker an output named like a Megatron-LM iteration (``run/iter_0000300``) keeps current, else None."""
    return path.parent / TRACKER_NAME if MEGATRON_ITERATION.match(path.name) else None


def update_tracker(tracker: Path, folder: Path) -> bool:
    """Point Megatron-LM's ``--load`` at ``folder``: write its iteration to the tracker, as Megatron-LM's
    ``training/checkpointing.py`` does (the number as text), unless the tracker names a later iteration
    (a newer checkpoint beside it stays the one loaded). Returns whether it was written."""
    match = MEGATRON_ITERATION.match(folder.name)
    if match is None:
        return False
    iteration = int(match.group(1))
    try:
        current = tracker.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        current = ""
    except (OSError, UnicodeDecodeError):
        return False
    if current and (not current.isdigit() or int(current) > iteration):
        return False
    temp = tracker.with_name(f".{tracker.name}.tmp-{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(temp, flags, 0o644), "w", encoding="ascii") as f:
        f.write(str(iteration))
    os.replace(temp, tracker)
    return True


def verify_data_file(data: DcpDataFile, digest: bytes) -> None:
    """``--verify``: read the finished data file back from disk and compare its bytes with those written."""
    with open(data.path, "rb") as f:
        if hasattr(os, "posix_fadvise"):  # fsync'd pages are clean: drop them so the read comes from disk
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        read_back = hashlib.sha256()
        for item in data.stored:
            f.seek(item.data_offset)
            left = item.data_bytes
            while left:
                block = f.read(min(left, 8 << 20))
                if not block:
                    break
                read_back.update(block)
                left -= len(block)
    if read_back.digest() != digest:
        raise OutputError(f"{data.path}: --verify: the data read back differs from the data written")


def verify_metadata(folder: Path, stored: Sequence[StoredTensor], stored_bytes: Sequence[StoredBytes] = ()) -> None:
    """``--verify``: read ``.metadata`` back (with the reader's allow-list unpickler) and check that it names
    every chunk written and every non-tensor entry copied, where each was written, and nothing else."""
    from ckpt_ema.io.dcp import read_metadata

    path = folder / METADATA_NAME
    metadata = read_metadata(folder)
    found = set()
    for key, info in metadata.storage_data.items():
        fqn = str(getattr(key, "fqn", ""))
        entry = metadata.state_dict_metadata.get(fqn)
        offsets = tuple(getattr(key, "offset", None) or ())
        sizes = next((tuple(c.sizes) for c in getattr(entry, "chunks", ()) if tuple(c.offsets) == offsets), None)
        where = (str(getattr(info, "relative_path", "")), getattr(info, "offset", -1), getattr(info, "length", -1))
        found.add((fqn, offsets, sizes, *where))
    expected: set[tuple[object, ...]] = {(t.name, *t.region, t.relpath, t.offset, t.length) for t in stored}
    expected |= {(b.name, (), None, b.relpath, b.offset, b.length) for b in stored_bytes}
    if found != expected:
        raise OutputError(f"{path}: --verify: the chunks it describes differ from those written")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (imports torch)."""
    from ckpt_ema.io.torch_edge import TORCH_DTYPES

    return TORCH_DTYPES[name]
