"""Writing safetensors outputs: header first (all shapes are known from the plan), data streamed, atomic.

The file is written to a temporary name in the destination folder (``.NAME.ckpt-ema-tmp-PID``), locked
while it is being written, and renamed over the destination only once complete, flushed and (with
``--verify``) read back and checked; on any error the temporary file is removed. A run that is killed
leaves its temporary file behind; the next run in that folder removes it (its lock is gone).

Some metadata is only known at the end (the inputs' SHA-256, computed while streaming): the header
reserves a fixed-width value of spaces for it, rewritten in place before the rename.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ckpt_ema.errors import InputError, OutputError
from ckpt_ema.io.links import kind_of
from ckpt_ema.io.safetensors_format import DTYPES, all_finite, read_header
from ckpt_ema.output.lock import output_locked
from ckpt_ema.output.shards import DEFAULT_MAX_SHARD_BYTES
from ckpt_ema.plan.model import TensorPlan

try:
    import fcntl
except ImportError:  # Windows: stale temporary files are recognised by their process id alone
    fcntl = None  # type: ignore[assignment]

TEMP_MARKER = ".ckpt-ema-tmp-"
STALE_SECONDS = 600  # an unlocked temporary file this old is stale even if its process id was reused
VERIFY_CHUNK = 8 << 20
WRITEBACK = 64 << 20  # bytes written after which the kernel is asked to start writing them to the disk
_FADVISE = getattr(os, "posix_fadvise", None)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses longer headers (HeaderTooLarge)
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@dataclass(frozen=True)
class WriteOptions:
    """How a job's writers behave (passed to each writer, also those nested in a folder layout).

    ``late_metadata``: metadata keys whose values are only known at commit (key -> width in characters),
    filled from ``late_values()``. ``verify``: read each file back before renaming it into place.
    ``mode``: permission bits of every file written (less the umask); folders get ``x`` where ``r`` is set.
    ``max_shard_bytes``: the largest shard of a Hugging Face folder exported from a model that has no folder
    layout of its own (DCP, DeepSpeed; ``output/shards.py``).
    """

    verify: bool = False
    late_metadata: Mapping[str, int] = field(default_factory=dict)
    late_values: Callable[[], Mapping[str, str]] | None = None
    mode: int = 0o644
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES

    @property
    def folder_mode(self) -> int:
        """``mode`` for folders: search (``x``) permission wherever ``mode`` lets read (0600 -> 0700)."""
        return self.mode | ((self.mode & 0o444) >> 2)


class OutputWriter(Protocol):
    """Writes one output (a file or a folder): tensors in plan order, then ``commit`` renames it into place."""

    path: Path

    def write(self, name: str, data: np.ndarray) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


def write_json_atomic(path: Path, data: object, mode: int = 0o644) -> None:
    """Write JSON (indented, newline-terminated) atomically: a temporary file in the same folder, then a rename.
    ``mode``: the file's permission bits (less the umask)."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(temp, flags, mode), "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    os.replace(temp, path)


def copy_file(origin: Path, destination: Path, mode: int) -> None:
    """Copy a regular file's bytes (and modification time) into a new file of permission ``mode``; the
    origin is opened without following a link (the caller resolves links with ``io.links.inside``)."""
    source_fd = os.open(origin, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(source_fd, "rb") as source:
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{origin}: is {kind_of(info.st_mode)}, not a file to copy")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(destination, flags, mode), "wb") as target:
            shutil.copyfileobj(source, target)
    os.utime(destination, ns=(info.st_atime_ns, info.st_mtime_ns))


def replace_folder(temp: Path, path: Path) -> None:
    """Rename the finished folder ``temp`` to ``path``, replacing what is there: the previous output is moved
    aside first and put back if the rename fails or a signal lands in between; a link at ``path`` goes, never
    its target."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.ckpt-ema-old-{os.getpid()}"
        os.replace(path, old)
    try:
        os.replace(temp, path)
    except BaseException:  # a failed rename, or a signal between the two: the previous output goes back
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None and old.is_symlink():
        old.unlink()
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


def temp_path_for(path: Path) -> Path:
    """The temporary file a run writes before renaming it to ``path``."""
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temporary files and folders left in ``folder`` by runs that died.

    A file is stale when nobody holds its lock (a writer holds it until it finishes; the kernel drops it
    when the process dies, even on ``kill -9``) and its process is gone or it is old (reused process id).
    A temporary folder (a folder output being built) is stale when its process is gone (on this machine)
    and nobody holds its output's lock (a distributed run's rank 0, maybe on another machine). Symbolic links and
    anything but regular files and folders are left alone.
    """
    removed = []
    for candidate in folder.glob(f".*{TEMP_MARKER}*"):
        pid_text = candidate.name.rsplit(TEMP_MARKER, 1)[-1]
        if not pid_text.isdigit():
            continue
        try:
            info = os.lstat(candidate)
            if stat.S_ISDIR(info.st_mode):
                output = folder / candidate.name[1:].rsplit(TEMP_MARKER, 1)[0]
                if not _process_alive(int(pid_text)) and not output_locked(output):
                    shutil.rmtree(candidate, ignore_errors=True)
                    removed.append(candidate)
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            stale = not _process_alive(int(pid_text)) or time.time() - info.st_mtime > STALE_SECONDS
            if stale and _unlink_if_unlocked(candidate):
                removed.append(candidate)
        except OSError:
            pass
    return removed


def remove_own_temp(path: Path) -> None:
    """Remove this process's temporary file (or folder) for output ``path``, if there is one."""
    temp = temp_path_for(path)
    try:
        info = os.lstat(temp)
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(temp, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def _unlink_if_unlocked(path: Path) -> bool:
    if fcntl is None:
        path.unlink()
        return True
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer holds it
        path.unlink()
        return True
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged user may still write in ``folder``'s file system."""
    status = os.statvfs(folder)
    return status.f_bavail * status.f_frsize


def check_free_space(outputs: Sequence[tuple[Path, int]]) -> None:
    """Refuse before writing anything when the outputs (path, size in bytes) cannot fit on their disks."""
    needed: dict[int, tuple[Path, int]] = {}
    for path, size in outputs:
        device = os.stat(path.parent).st_dev
        folder, total = needed.get(device, (path.parent, 0))
        needed[device] = (folder, total + size)
    for folder, total in needed.values():
        available = free_bytes(folder)
        if total > available:
            raise OutputError(
                f"{folder}: not enough free space: the output needs {total} bytes, {available} are available"
            )


def output_size(tensors: Sequence[TensorPlan], metadata: Mapping[str, str], options: WriteOptions | None = None) -> int:
    """Size in bytes of the file a writer with these tensors, metadata and options writes."""
    header, sizes = build_header(tensors, {**metadata, **_placeholders(options or WriteOptions())})
    return len(header) + sum(sizes)


def build_header(tensors: Sequence[TensorPlan], metadata: Mapping[str, str]) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix, JSON padded to 8 bytes) and each tensor's data size, in order."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    sizes = []
    offset = 0
    for tensor in tensors:
        size = math.prod(tensor.shape) * DTYPES[tensor.out_dtype][1]
        entries[tensor.name] = {
            "dtype": tensor.out_dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
        sizes.append(size)
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_BYTES:
        largest = max(metadata, key=lambda k: len(metadata[k]), default=None)
        culprit = (
            f"; its largest metadata entry is {largest!r} ({len(metadata[largest]):,} characters)" if largest else ""
        )
        raise OutputError(
            f"the output's header would be {len(text):,} bytes, over the {MAX_HEADER_BYTES:,}-byte limit of the "
            f"safetensors library, which could not read it{culprit}; no output written"
        )
    return len(text).to_bytes(8, "little") + text, sizes


def _placeholders(options: WriteOptions) -> dict[str, str]:
    return {key: " " * width for key, width in options.late_metadata.items()}


def _slot(header: bytes, key: str, width: int) -> int:
    """Byte offset of the reserved value of metadata ``key`` in the header (found exactly once)."""
    # Inside a JSON string every '"' is escaped, so '"key":"' can only be this key and its value.
    needle = (json.dumps(key) + ':"').encode() + b" " * width + b'"'
    offset = header.find(needle)
    if offset < 0 or header.find(needle, offset + 1) >= 0:
        raise RuntimeError(f"metadata slot {key!r} not found once in the header")
    return offset + len(needle) - width - 1


class Writeback:
    """Starts the kernel writing a file to the disk as it grows, every ``WRITEBACK`` bytes, without waiting.

    POSIX_FADV_DONTNEED writes dirty pages back and drops the clean ones: the disk writes the output while
    the merge reads, instead of all of it in the final fsync, and the page cache does not fill up with the
    output. Each range starts at the previous call's start, whose pages are written by now and are dropped.
    Used by every writer of large files (safetensors, DCP data files).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.position = 0  # bytes written so far
        self._flushed = [0, 0]  # where the last two writebacks started

    def wrote(self, nbytes: int) -> None:
        """``nbytes`` were appended to the file."""
        self.position += nbytes
        if self.position - self._flushed[1] >= WRITEBACK:
            if _FADVISE is not None:
                start = self._flushed[0]
                with contextlib.suppress(OSError):
                    _FADVISE(self._fd, start, self.position - start, os.POSIX_FADV_DONTNEED)
            self._flushed = [self._flushed[1], self.position]


class SafetensorsWriter:
    """Streams one safetensors file; tensors must be written in the order given, each exactly once."""

    def __init__(
        self,
        path: str | os.PathLike,
        tensors: Sequence[TensorPlan],
        metadata: Mapping[str, str],
        options: WriteOptions | None = None,
    ) -> None:
        self.path = Path(path)
        self.temp_path = temp_path_for(self.path)
        self._options = options or WriteOptions()
        self._metadata = {**metadata, **_placeholders(self._options)}
        header, self._sizes = build_header(tensors, self._metadata)
        self._slots = {k: _slot(header, k, w) for k, w in self._options.late_metadata.items()}
        self._tensors = list(tensors)
        self._names = [t.name for t in tensors]
        self._index = 0
        self._written = 0
        self._skip_empty()
        self.total_bytes = len(header) + sum(self._sizes)
        self._digest = hashlib.sha256() if self._options.verify else None
        self._file = None
        try:
            # O_EXCL | O_NOFOLLOW: never write through a link or into a file someone else placed there.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(self.temp_path, flags, self._options.mode)
            self._file = os.fdopen(fd, "wb", buffering=0)
            self._writeback = Writeback(fd)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file.write(header)
            self._writeback.wrote(len(header))
        except FileExistsError:
            raise OutputError(f"{self.temp_path}: already exists (another run writing {self.path}?)") from None
        except OSError as exc:
            self.abort()
            raise self._os_error("cannot write", exc) from None
        except BaseException:  # e.g. Ctrl-C just after the file was created: the name holds our pid, it is ours
            self.abort()
            raise

    def write(self, name: str, data: np.ndarray) -> None:
        """Append (part of) tensor ``name``; ``data`` is contiguous in the output dtype."""
        if self._index >= len(self._names) or name != self._names[self._index]:
            raise RuntimeError(f"tensor {name!r} written out of order")
        view = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        try:
            self._file.write(view)  # type: ignore[union-attr]
        except OSError as exc:
            self.abort()
            raise self._os_error("write failed", exc) from None
        if self._digest is not None:
            self._digest.update(view)
        self._writeback.wrote(view.nbytes)
        self._written += view.nbytes
        if self._written > self._sizes[self._index]:
            raise RuntimeError(f"tensor {name!r}: more bytes written than its shape holds")
        if self._written == self._sizes[self._index]:
            self._index += 1
            self._written = 0
            self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._sizes) and self._sizes[self._index] == 0:
            self._index += 1  # empty tensors have no bytes to write

    def commit(self) -> None:
        """Fill the late metadata, flush, fsync, verify if asked, and rename the file over the destination."""
        if self._index != len(self._names):
            raise RuntimeError(f"{self.path}: {len(self._names) - self._index} tensors were not written")
        try:
            try:
                self._fill_late_metadata()
                os.fsync(self._file.fileno())  # type: ignore[union-attr]
                if self._digest is not None:
                    self._verify()
                # closing releases the lock: the file is complete
                self._file.close()  # type: ignore[union-attr]
                os.replace(self.temp_path, self.path)
            except OSError as exc:
                self.abort()  # first, so that the free space reported does not count our own file
                raise self._os_error("cannot finish writing", exc) from None
        except BaseException:
            self.abort()
            raise
        _fsync_folder(self.path.parent)

    def abort(self) -> None:
        """Close and remove the temporary file (safe to call more than once)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)

    def _fill_late_metadata(self) -> None:
        if not self._slots:
            return
        values = self._options.late_values() if self._options.late_values else {}
        for key, offset in self._slots.items():
            value = values.get(key)
            width = self._options.late_metadata[key]
            if value is None or len(value) != width or json.dumps(value) != f'"{value}"':
                raise RuntimeError(f"late metadata {key!r}: {value!r} is not {width} plain characters")
            os.pwrite(self._file.fileno(), value.encode("ascii"), offset)  # type: ignore[union-attr]
            self._metadata[key] = value

    def _verify(self) -> None:
        """Read the finished temporary file back and check it against what was written."""
        fd = self._file.fileno()  # type: ignore[union-attr]
        if hasattr(os, "posix_fadvise"):  # fsync'd pages are clean: drop them so the read comes from disk
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        header = read_header(self.temp_path)
        expected = {t.name: (t.out_dtype, tuple(t.shape)) for t in self._tensors}
        found = {name: (info.dtype, info.shape) for name, info in header.tensors.items()}
        if found != expected:
            wrong = sorted(set(found.items()) ^ set(expected.items()))[:3]
            raise OutputError(f"{self.path}: --verify: the tensors read back differ from the plan ({wrong})")
        if header.metadata != self._metadata:
            raise OutputError(f"{self.path}: --verify: the metadata read back differs from what was written")
        digest = hashlib.sha256()
        buffer = bytearray(VERIFY_CHUNK)
        with open(self.temp_path, "rb") as f:
            for _, name, info in sorted((info.begin, name, info) for name, info in header.tensors.items()):
                f.seek(info.begin)
                for start in range(info.begin, info.end, VERIFY_CHUNK):
                    size = f.readinto(memoryview(buffer)[: min(VERIFY_CHUNK, info.end - start)])
                    digest.update(memoryview(buffer)[:size])
                    if info.is_float and not _all_finite(buffer, size, info.dtype):
                        raise OutputError(f"{self.path}: --verify: tensor {name!r} has NaN or Inf values")
        if digest.digest() != self._digest.digest():  # type: ignore[union-attr]
            raise OutputError(f"{self.path}: --verify: the data read back differs from the data written")

    def _os_error(self, what: str, exc: OSError) -> OutputError:
        """A one-line error; a full disk says how much space was needed and how much is left."""
        if exc.errno in DISK_FULL:
            available = _free_or_unknown(self.path.parent)
            return OutputError(
                f"{self.path}: disk full ({exc.strerror}): the output needs {self.total_bytes} bytes, "
                f"{available} are available; temporary file removed"
            )
        if exc.errno == errno.EFBIG:
            return OutputError(
                f"{self.path}: file too large for this file system ({self.total_bytes} bytes); temporary file removed"
            )
        return OutputError(f"{self.path}: {what} ({exc.strerror or exc})")


def _all_finite(buffer: bytearray, size: int, dtype: str) -> bool:
    storage, itemsize, _ = DTYPES[dtype]
    return all_finite(np.frombuffer(buffer, dtype=storage, count=size // itemsize), dtype) if size else True


def _free_or_unknown(folder: Path) -> str:
    try:
        return str(free_bytes(folder))
    except OSError:
        return "an unknown number of bytes"


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); best effort where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
