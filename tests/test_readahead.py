"""The read-ahead (engine/readahead.py): what the start-up prefetch asks the disk for, and that reads are exact."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from ckpt_ema.engine import readahead
from ckpt_ema.engine.readahead import ReadAhead, SpanSchedule

CHUNK = 4096  # bytes per piece (itemsize 1)
CHUNKS = 24  # per file
FILES = 3


def _series(tmp_path: Path) -> tuple[list[Path], list[bytes]]:
    rng = np.random.default_rng(0)
    paths, contents = [], []
    for i in range(FILES):
        data = rng.integers(0, 256, CHUNKS * CHUNK + 100, dtype=np.uint8).tobytes()
        path = tmp_path / f"c{i}.bin"
        path.write_bytes(data)
        paths.append(path)
        contents.append(data)
    return paths, contents


def _advice_recorder(monkeypatch) -> list[tuple[str, int, int]]:
    """Record the start-up prefetch's WILLNEED hints as (file name, offset, bytes), then pass them on."""
    calls: list[tuple[str, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, nbytes: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED and threading.current_thread().name == "ckpt-ema-prefetch":
            calls.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, nbytes))
        real(fd, offset, nbytes, advice)

    monkeypatch.setattr(readahead, "_FADVISE", record)
    return calls


def _run(paths: list[Path], contents: list[bytes]) -> None:
    """One pass over the schedule (data from byte 100 on), checking every row against the file's bytes; the
    consumer takes the first chunk only after the start-up prefetch has ended (the readers stay within
    ``depth`` chunks of the consumer, so they cannot be past the window's later chunks)."""
    span = SpanSchedule(tuple(range(FILES)), (100,) * FILES, CHUNKS * CHUNK, 1, CHUNK)
    reader = ReadAhead(paths, [None] * FILES, [span], FILES, CHUNK, depth=3)
    for position, (_, c, slot) in enumerate(reader):
        if position == 0:
            for thread in threading.enumerate():
                if thread.name == "ckpt-ema-prefetch":
                    thread.join(timeout=120)
        rows = reader.rows(slot)
        for j in range(FILES):
            start = 100 + c * CHUNK
            assert rows[j, :CHUNK].tobytes() == contents[j][start : start + CHUNK]


def _covered(calls: list[tuple[str, int, int]], name: str) -> set[int]:
    return {b for n, offset, nbytes in calls if n == name for b in range(offset, offset + nbytes, CHUNK)}


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").is_dir(), reason="Linux")
def test_the_start_up_prefetch_asks_for_the_window_first_chunks_first_and_leaves_no_descriptor(tmp_path, monkeypatch):
    paths, contents = _series(tmp_path)
    window_chunks = 10
    monkeypatch.setattr(readahead, "START_WINDOW", window_chunks * FILES * CHUNK)
    calls = _advice_recorder(monkeypatch)
    before = set(os.listdir("/proc/self/fd"))
    _run(paths, contents)
    assert set(os.listdir("/proc/self/fd")) <= before  # every descriptor closed
    window_end = 100 + window_chunks * CHUNK
    # nothing past the window; every file's window asked for, except the chunks the readers may have read
    # before the prefetch got to them (the first `depth`)
    assert calls and all(offset + nbytes <= window_end for _, offset, nbytes in calls)
    for path in paths:
        assert _covered(calls, path.name) >= set(range(100 + 3 * CHUNK, window_end, CHUNK))
    # in rounds of START_ROUND chunks across the files: a later round never comes before an earlier one
    rounds = [(offset - 100) // (readahead.START_ROUND * CHUNK) for _, offset, _ in calls]
    assert rounds == sorted(rounds)
    assert len({name for name, _, _ in calls[:FILES]}) == FILES  # the first round goes to every file


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").is_dir(), reason="Linux")
def test_the_start_up_prefetch_takes_at_most_an_eighth_of_the_available_memory(tmp_path, monkeypatch):
    paths, contents = _series(tmp_path)
    monkeypatch.setattr(readahead, "_available_memory", lambda: 8 * 5 * FILES * CHUNK)  # 5 chunks' worth
    calls = _advice_recorder(monkeypatch)
    _run(paths, contents)
    assert calls and max(offset + nbytes for _, offset, nbytes in calls) <= 100 + 5 * CHUNK
