"""Reading safetensors files: a strict header parser and zero-copy, memory-mapped tensor views.

The header is parsed here rather than by the ``safetensors`` package so that every malformed or hostile
file is refused with a message naming the file and the problem, before any tensor data is touched, and so
that tensors can be read in chunks straight from the page cache (no whole-tensor copies).

Format: 8 bytes little-endian header length N, N bytes of JSON
``{name: {"dtype": str, "shape": [int], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_ema.errors import InputError
from ckpt_ema.io.identity import FileIdentity

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 500_000  # several times the largest real file; parsing stays within seconds and ~1 GB
MAX_RANK = 64  # more dimensions than any real tensor has; bounds the work on a hostile shape

# safetensors dtype name -> (numpy storage type, bytes per element, is floating point). BF16 is stored as
# uint16 and FP8 as uint8 (numpy has no such types): the kernels and writers move the bits unchanged.
DTYPES: dict[str, tuple[type[np.generic], int, bool]] = {
    "F64": (np.float64, 8, True),
    "F32": (np.float32, 4, True),
    "F16": (np.float16, 2, True),
    "BF16": (np.uint16, 2, True),
    "F8_E4M3": (np.uint8, 1, True),
    "F8_E5M2": (np.uint8, 1, True),
    "I64": (np.int64, 8, False),
    "I32": (np.int32, 4, False),
    "I16": (np.int16, 2, False),
    "I8": (np.int8, 1, False),
    "U8": (np.uint8, 1, False),
    "U16": (np.uint16, 2, False),
    "U32": (np.uint32, 4, False),
    "U64": (np.uint64, 8, False),
    "BOOL": (np.bool_, 1, False),
}


def _fp8_table(exponent_bits: int, mantissa_bits: int, has_inf: bool) -> np.ndarray:
    """float32 value of each of the 256 codes of an FP8 format (OCP E4M3FN without infinities, E5M2 with)."""
    bias = (1 << (exponent_bits - 1)) - 1
    values = np.empty(256, dtype=np.float32)
    top = (1 << exponent_bits) - 1
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent = (code >> mantissa_bits) & top
        mantissa = code & ((1 << mantissa_bits) - 1)
        if has_inf and exponent == top:
            value = math.inf if mantissa == 0 else math.nan
        elif not has_inf and exponent == top and mantissa == (1 << mantissa_bits) - 1:
            value = math.nan
        elif exponent == 0:
            value = mantissa / (1 << mantissa_bits) * 2.0 ** (1 - bias)
        else:
            value = (1 + mantissa / (1 << mantissa_bits)) * 2.0 ** (exponent - bias)
        values[code] = sign * value
    return values


_FP8 = {"F8_E4M3": _fp8_table(4, 3, has_inf=False), "F8_E5M2": _fp8_table(5, 2, has_inf=True)}


def to_float(array: np.ndarray, dtype: str) -> np.ndarray:
    """Values of a float tensor stored as ``dtype`` (BF16 as uint16 ...) as float32 (float64 for F64), exactly."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if dtype in _FP8:
        return _FP8[dtype][array]
    if dtype == "F64":
        return array
    return array.astype(np.float32, copy=False)


def all_finite(array: np.ndarray, dtype: str) -> bool:
    """No NaN or Inf among the values of a float tensor stored as ``dtype`` (checked on the bits)."""
    if dtype == "BF16":
        return not bool(((array & 0x7F80) == 0x7F80).any())
    if dtype == "F8_E4M3":  # no infinities; NaN is S.1111.111
        return not bool(((array & 0x7F) == 0x7F).any())
    if dtype == "F8_E5M2":
        return not bool(((array & 0x7C) == 0x7C).any())
    return bool(np.isfinite(array).all())


def sum_of_squares(data: memoryview, dtype: str) -> float:
    """Sum of the squared values of raw bytes of a float tensor stored as ``dtype`` (float32 products)."""
    values = to_float(np.frombuffer(data, dtype=DTYPES[dtype][0]), dtype)
    return float(np.dot(values, values))


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a file: dtype name (``"BF16"``), shape, absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype][2]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    identity: FileIdentity | None = None  # the file when the header was read (see io/identity.py)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file; raise ``InputError`` naming the file.

    Checks: header length within the file and under 100 MB, valid JSON object, no duplicate keys, known
    dtypes, non-negative integer shapes, byte ranges inside the data area that match the shape and do
    not overlap, and string-to-string metadata.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO or device given as input must not block the open; it is refused below.
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            status = os.fstat(f.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise InputError(f"{path}: not a regular file")
            file_size = status.st_size
            file_identity = FileIdentity.of(status)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: not a safetensors file (only {file_size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise InputError(
                    f"{path}: not a safetensors file (header claims {header_len} bytes, "
                    f"more than the {MAX_HEADER_BYTES // 2**20} MiB limit)"
                )
            if header_len > file_size - 8:
                raise InputError(
                    f"{path}: not a safetensors file or truncated (header claims {header_len} bytes, "
                    f"file has {file_size})"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) != header_len:
        raise InputError(f"{path}: the file changed size while being read")
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        raise InputError(f"{path}: not a safetensors file (header is not a JSON object)")
    # Counted before parsing: each tensor needs one "data_offsets" key, and the quotes cannot occur
    # unescaped inside a JSON string, so this is an upper bound found at memory speed.
    claimed = raw.count(b'"data_offsets"')
    if claimed > MAX_TENSORS:
        raise InputError(f"{path}: header lists {claimed} tensors, more than the {MAX_TENSORS} ckpt-ema accepts")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not a safetensors file (header is not valid JSON: {exc})") from None
    except RecursionError:
        raise InputError(f"{path}: not a safetensors file (header JSON is nested too deeply)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_start = 8 + header_len
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: __metadata__ must map strings to strings")
    check_utf8(path, header, "tensor name")
    check_utf8(path, [*metadata, *metadata.values()], "metadata text")
    tensors = {name: _parse_entry(path, name, entry, data_start, data_size) for name, entry in header.items()}
    _check_no_overlap(path, tensors)
    return SafetensorsHeader(path, tensors, dict(metadata), data_start, file_size, file_identity)


class SafetensorsReader:
    """Zero-copy access to the tensors of one safetensors file through a private read-only mapping."""

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        self._map: mmap.mmap | None = None

    def flat(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a 1-D array in its dtype's storage type (BF16 as uint16; see ``DTYPES``),
        a view of the mapping (a copy when the data is not aligned)."""
        info = self.header.tensors[name]
        storage = DTYPES[info.dtype][0]
        if info.numel == 0:
            return np.empty(0, dtype=storage)
        buffer = self._mapping()
        if info.begin % info.itemsize == 0:
            return np.frombuffer(buffer, dtype=storage, count=info.numel, offset=info.begin)
        raw = np.frombuffer(buffer, dtype=np.uint8, count=info.nbytes, offset=info.begin)
        return raw.copy().view(storage)  # misaligned data (header not padded): copy once

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            path = self.header.path
            try:
                with open(path, "rb") as f:
                    if os.fstat(f.fileno()).st_size != self.header.file_size:
                        raise InputError(f"{path}: the file changed size while being read")
                    # ACCESS_COPY: a private mapping whose arrays are writable; the file is never written.
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except OSError as exc:
                raise InputError(f"{path}: cannot map ({exc.strerror or exc})") from None
        return self._map


def check_utf8(path: Path, texts: Iterable[str], what: str) -> None:
    """Refuse text that cannot be written as UTF-8 (a lone surrogate, e.g. ``"\\ud800"`` in the JSON): the
    safetensors library refuses such a header, so an output carrying the name would be unreadable."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(
                f"{path}: {what} {_short(text)} is not valid UTF-8 (a lone surrogate); other tools cannot read it, "
                "so ckpt-ema does not carry it into an output"
            ) from None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_short(key)}")
        result[key] = value
    return result


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    def bad(problem: str) -> InputError:
        return InputError(f"{path}: tensor {_short(name)}: {problem}")

    if not isinstance(entry, dict):
        raise bad("entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {_short(shape)}")
    if len(shape) > MAX_RANK:
        raise bad(f"shape has {len(shape)} dimensions (at most {MAX_RANK} are accepted)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise bad(f"data_offsets {_short(offsets)} outside the data area of {data_size} bytes (truncated file?)")
    span = offsets[1] - offsets[0]
    expected = _nbytes(shape, DTYPES[dtype][1], limit=data_size)
    if expected != span:
        needs = f"{expected} bytes" if expected is not None else "more bytes than the file holds"
        raise bad(f"shape {_short(shape)} of {dtype} needs {needs} but data_offsets span {span}")
    return TensorInfo(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """Bytes a shape needs, or None once it exceeds ``limit`` (no huge integers from a hostile shape)."""
    if 0 in shape:
        return 0
    total = itemsize
    for dim in shape:
        total *= dim
        if total > limit:
            return None
    return total


def _short(value: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters, so that a hostile header cannot flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((info.begin, info.end, name) for name, info in tensors.items() if info.nbytes)
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise InputError(f"{path}: tensors {_short(name_a)} and {_short(name_b)} overlap in the file")
