"""Hostile safetensors headers: every malformed file is refused with one clear line, quickly, in bounded memory.

Files are built byte by byte here (length prefix + JSON + data), never with the code under test. The
hypothesis tests assert that ``read_header`` only ever raises ``InputError``, or returns a header whose
every tensor lies inside the file, matches its shape and overlaps no other.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from ckpt_ema.cli import main
from ckpt_ema.errors import InputError
from ckpt_ema.io.safetensors_format import DTYPES, MAX_HEADER_BYTES, MAX_TENSORS, SafetensorsHeader, read_header
from ckpt_ema.io.torch_edge import TORCH_DTYPES

# no deadline: a loaded machine must not turn a slow example into a failure (issue 12)
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw_file(path: Path, header: object | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """A file made of an 8-byte little-endian length, the header (JSON-encoded unless bytes) and data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(text) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + text + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def duplicate_key_json() -> bytes:
    return b'{"a": ' + json.dumps(entry()).encode() + b', "a": ' + json.dumps(entry()).encode() + b"}"


# (name, header, data, header_len override, text the error must contain)
CASES = [
    ("empty file", b"", b"", 0, "not a safetensors file"),
    ("length beyond the file", {"a": entry()}, bytes(8), 10_000, "header claims 10000 bytes"),
    ("length over 100 MB", b"{}", b"", MAX_HEADER_BYTES + 1, "MiB limit"),
    ("length 2**64-1", b"{}", b"", 2**64 - 1, "MiB limit"),
    ("not JSON", b"hello world", b"", None, "not a safetensors file"),
    ("not UTF-8", b'{"\xff\xfe": 1}', b"", None, "not valid JSON"),
    ("JSON array", b"[1, 2, 3]", b"", None, "not a JSON object"),
    ("JSON string", b'"text"', b"", None, "not a JSON object"),
    ("deeply nested", b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", b"", None, "nested too deeply"),
    ("duplicate tensor names", duplicate_key_json(), bytes(8), None, "duplicate key 'a'"),
    (
        "duplicate field",
        b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}',
        bytes(8),
        None,
        "duplicate key 'dtype'",
    ),
    ("entry is a list", {"a": [1, 2]}, b"", None, "entry is not a JSON object"),
    ("entry is null", {"a": None}, b"", None, "entry is not a JSON object"),
    ("unknown dtype", {"a": entry(dtype="F128")}, bytes(8), None, "unknown dtype 'F128'"),
    ("dtype is a list", {"a": entry(dtype=["F32"])}, bytes(8), None, "unknown dtype"),
    ("missing dtype", {"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "unknown dtype None"),
    ("negative dim", {"a": entry(shape=(-2,))}, bytes(8), None, "non-negative integers"),
    ("float dim", {"a": entry(shape=(2.0,))}, bytes(8), None, "non-negative integers"),
    ("bool dim", {"a": entry(shape=(True, 2))}, bytes(8), None, "non-negative integers"),
    ("shape not a list", {"a": entry(shape="2")}, bytes(8), None, "non-negative integers"),
    ("too many dims", {"a": entry(shape=(1,) * 65)}, bytes(8), None, "65 dimensions"),
    ("huge dims overflow", {"a": entry(shape=(2**62,) * 64)}, bytes(8), None, "more bytes than the file holds"),
    ("2**64 elements", {"a": entry(shape=(2**32, 2**32))}, bytes(8), None, "more bytes than the file holds"),
    ("shape product mismatch", {"a": entry(shape=(3,))}, bytes(16), None, "needs 12 bytes but data_offsets span 8"),
    ("offsets beyond the data", {"a": entry(offsets=(0, 16))}, bytes(8), None, "outside the data area of 8"),
    ("negative offset", {"a": entry(offsets=(-8, 0))}, bytes(8), None, "outside the data area"),
    ("reversed offsets", {"a": entry(offsets=(8, 0))}, bytes(8), None, "outside the data area"),
    ("three offsets", {"a": entry(offsets=(0, 4, 8))}, bytes(8), None, "outside the data area"),
    ("float offsets", {"a": entry(offsets=(0.0, 8.0))}, bytes(8), None, "outside the data area"),
    ("missing offsets", {"a": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "outside the data area"),
    ("overlapping ranges", {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, bytes(12), None, "overlap"),
    ("identical ranges", {"a": entry(), "b": entry()}, bytes(8), None, "overlap"),
    ("metadata is a list", {"__metadata__": ["x"]}, b"", None, "__metadata__ must map strings to strings"),
    ("metadata is null", {"__metadata__": None}, b"", None, "__metadata__ must map strings to strings"),
    ("metadata value not a string", {"__metadata__": {"step": 5}}, b"", None, "__metadata__ must map strings"),
    ("huge integer", b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}", b"", None, "not valid JSON"),
    ("long hostile name", {"x" * 100_000: entry(dtype="??")}, b"", None, "unknown dtype"),
]


@pytest.mark.parametrize("name, header, data, header_len, expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_header_is_refused_with_a_clear_one_line_error(tmp_path, name, header, data, header_len, expected):
    path = raw_file(tmp_path / "bad.safetensors", header, data, header_len)
    start = time.process_time()  # CPU time: a loaded machine stretches the wall clock, not the work
    with pytest.raises(InputError) as info:
        read_header(path)
    assert time.process_time() - start < 2.0
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert "\n" not in message and len(message) < 400


def test_huge_sparse_file_with_huge_header_length_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 8))
        f.truncate(MAX_HEADER_BYTES + 4096)  # sparse: no disk space used
    with pytest.raises(InputError, match="MiB limit"):
        read_header(path)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        read_header(fifo)


def test_too_many_tensors_are_refused_before_parsing(tmp_path):
    item = b'"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
    path = raw_file(tmp_path / "many.safetensors", b"{" + item * (MAX_TENSORS + 1) + b'"u":1}')
    start = time.process_time()  # CPU time, as above
    with pytest.raises(InputError, match=f"lists {MAX_TENSORS + 1} tensors, more than the {MAX_TENSORS}"):
        read_header(path)
    assert time.process_time() - start < 2.0


def test_many_tensors_parse_in_bounded_time(tmp_path):
    n = 100_000  # about 6 MB of header, far more tensors than any real file
    header = {f"t{i}": entry(dtype="U8", shape=(1,), offsets=(i, i + 1)) for i in range(n)}
    path = raw_file(tmp_path / "many.safetensors", header, bytes(n))
    start = time.process_time()  # CPU time: a loaded machine stretches the wall clock, not the work
    parsed = read_header(path)
    assert len(parsed.tensors) == n
    assert time.process_time() - start < 10.0


def test_agrees_with_the_safetensors_package_on_a_real_file(tmp_path):
    path = tmp_path / "real.safetensors"
    tensors = {
        "w": torch.randn(3, 5),
        "b": torch.randn(5).to(torch.bfloat16),
        "n": torch.tensor([7], dtype=torch.int64),
        "e": torch.zeros(0, 4, dtype=torch.float16),
        "s": torch.tensor(3.0, dtype=torch.float64),
    }
    save_file(tensors, str(path), metadata={"step": "12"})
    parsed = read_header(path)
    assert parsed.metadata == {"step": "12"}
    with safe_open(str(path), "pt") as f:
        assert sorted(parsed.tensors) == sorted(f.keys())
        for key in f.keys():
            info = parsed.tensors[key]
            assert info.shape == tuple(f.get_slice(key).get_shape())
            assert TORCH_DTYPES[info.dtype] == tensors[key].dtype


def _check_valid(parsed: SafetensorsHeader) -> None:
    spans = []
    for info in parsed.tensors.values():
        assert info.dtype in DTYPES
        assert parsed.data_start <= info.begin <= info.end <= parsed.file_size
        count = 1
        for dim in info.shape:
            count *= dim
        assert count * DTYPES[info.dtype][1] == info.end - info.begin
        if info.end > info.begin:
            spans.append((info.begin, info.end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.metadata.items())


FUZZ_FOLDER = tempfile.mkdtemp(prefix="ckpt-ema-fuzz-")  # one file rewritten per example: fast
atexit.register(shutil.rmtree, FUZZ_FOLDER, True)
FUZZ_FILE = Path(FUZZ_FOLDER) / "fuzz.safetensors"


def _parse_bytes(content: bytes) -> None:
    """Write ``content`` to a file and parse it: InputError or a valid header, nothing else."""
    FUZZ_FILE.write_bytes(content)
    try:
        parsed = read_header(FUZZ_FILE)
    except InputError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(FUZZ_FILE))
        return
    _check_valid(parsed)


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
dims = st.integers(-2, 6) | st.sampled_from([2**31, 2**63, 2**64 + 1])
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*DTYPES, "F128", "f32", ""]) | json_scalars,
        "shape": st.lists(dims, max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | json_values,
        "extra": json_values,
    },
)
headers = st.dictionaries(
    st.text(max_size=6) | st.just("__metadata__"),
    entries | json_values | st.dictionaries(st.text(max_size=4), st.text(max_size=4) | json_scalars, max_size=3),
    max_size=6,
)


@pytest.mark.slow
@FUZZ
@given(header=headers, data_size=st.integers(0, 96), length_delta=st.sampled_from([0, 0, 0, -1, 1, 7, 2**40]))
def test_fuzz_structured_headers(header, data_size, length_delta):
    text = json.dumps(header).encode()
    length = max(0, len(text) + length_delta)
    _parse_bytes(struct.pack("<Q", length) + text + bytes(data_size))


@FUZZ
@given(content=st.binary(max_size=200))
def test_fuzz_random_bytes_after_a_plausible_length(content):
    _parse_bytes(struct.pack("<Q", len(content)) + content)
    _parse_bytes(content)


VALID_JSON = json.dumps(
    {"__metadata__": {"step": "3"}, "a": entry(offsets=(0, 8)), "b": entry(dtype="BF16", shape=(2,), offsets=(8, 12))}
).encode()
VALID = struct.pack("<Q", len(VALID_JSON)) + VALID_JSON + bytes(12)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_byte_flips_of_a_valid_file(edits):
    content = bytearray(VALID)
    for position, value in edits:
        content[position] = value
    _parse_bytes(bytes(content))


def test_the_unmodified_fuzz_seed_is_valid(tmp_path):
    parsed = read_header(raw_file(tmp_path / "seed.safetensors", VALID_JSON, bytes(12)))
    assert sorted(parsed.tensors) == ["a", "b"]


def test_cli_prints_one_line_naming_the_file_and_exits_1(tmp_path):
    good = tmp_path / "step-100.safetensors"
    save_file({"w": torch.ones(4)}, str(good))
    bad = raw_file(
        tmp_path / "step-200.safetensors", {"w": entry(dtype="F32", shape=(4,), offsets=(0, 999))}, bytes(16)
    )
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(main, ["merge", str(good), str(bad), "--decay", "0.9", "-o", str(out)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"Error: {bad}: tensor 'w': data_offsets [0, 999] outside the data area of 16 bytes (truncated file?)"
    ]
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not out.exists()
