"""Writing safetensors outputs: header first (all shapes are known from the plan), data streamed, atomic.

The file is written to a temporary name in the destination folder (``.NAME.ckpt-ema-tmp-PID``) and renamed
over the destination only once complete and flushed; on any error the temporary file is removed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .errors import OutputError
from .plan import TensorPlan
from .safetensors_format import DTYPES

TEMP_MARKER = ".ckpt-ema-tmp-"


def temp_path_for(path: Path) -> Path:
    """The temporary file a run writes before renaming it to ``path``."""
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temporary files left in ``folder`` by runs that died (their process no longer exists)."""
    removed = []
    for candidate in folder.glob(f".*{TEMP_MARKER}*"):
        pid_text = candidate.name.rsplit(TEMP_MARKER, 1)[-1]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            try:
                candidate.unlink()
                removed.append(candidate)
            except OSError:
                pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    return len(text).to_bytes(8, "little") + text, sizes


class SafetensorsWriter:
    """Streams one safetensors file; tensors must be written in the order given, each exactly once."""

    def __init__(self, path: str | os.PathLike, tensors: Sequence[TensorPlan], metadata: Mapping[str, str]) -> None:
        self.path = Path(path)
        self.temp_path = temp_path_for(self.path)
        header, self._sizes = build_header(tensors, metadata)
        self._names = [t.name for t in tensors]
        self._index = 0
        self._written = 0
        self._skip_empty()
        self.total_bytes = len(header) + sum(self._sizes)
        try:
            fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._file = os.fdopen(fd, "wb", buffering=0)
            self._file.write(header)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc})") from None

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append (part of) tensor ``name``; ``data`` is contiguous in the output dtype."""
        if self._index >= len(self._names) or name != self._names[self._index]:
            raise RuntimeError(f"tensor {name!r} written out of order")
        view = data.reshape(-1).view(torch.uint8).numpy()
        try:
            self._file.write(memoryview(view))
        except OSError as exc:
            raise OutputError(f"{self.path}: write failed ({exc.strerror or exc})") from None
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
        """Flush, fsync and rename the finished file over the destination."""
        if self._index != len(self._names):
            raise RuntimeError(f"{self.path}: {len(self._names) - self._index} tensors were not written")
        try:
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.temp_path, self.path)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: cannot finish writing ({exc.strerror or exc})") from None

    def abort(self) -> None:
        """Close and remove the temporary file (safe to call more than once)."""
        file = getattr(self, "_file", None)
        if file is not None and not file.closed:
            file.close()
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass
