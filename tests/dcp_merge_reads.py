"""``ckpt-ema merge`` under torchrun, recording every byte range of an input each rank reads.

    torchrun --nproc-per-node 2 -m tests.dcp_merge_reads LOG -- merge SERIES --decay 0.9 -o OUT

Every rank runs the real command line in-process; the engine's read-ahead shows each piece it reads to a
``ReadObserver`` installed here (the command line installs none under torchrun), and the reader's
memory-mapped paths (``DcpReader.region``, whole-tensor assembly) are made to fail, so every byte of
tensor data a rank reads is in ``LOG.RANK.json``: ``[[path, offset, length], ...]``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from ckpt_ema.engine import merge_pass
from ckpt_ema.io import dcp as dcp_reader


class Recorder:
    def __init__(self) -> None:
        self.reads: list[tuple[tuple[int, int], int, int]] = []
        self.lock = threading.Lock()

    def after_read(self, file: tuple[int, int], offset: int, data: memoryview) -> None:
        with self.lock:
            self.reads.append((file, offset, len(data)))


def main() -> None:
    log, args = Path(sys.argv[1]), sys.argv[sys.argv.index("--") + 1 :]
    recorder = Recorder()
    passes: list[merge_pass.MergePass] = []
    original = merge_pass.MergePass.__init__

    def observed(self: merge_pass.MergePass, *a: object, **k: object) -> None:
        k["observer"] = recorder
        original(self, *a, **k)  # type: ignore[arg-type]
        passes.append(self)

    def refused(*a: object, **k: object) -> None:
        raise AssertionError("tensor data read through the memory map, not by byte range")

    merge_pass.MergePass.__init__ = observed  # type: ignore[method-assign]
    dcp_reader.DcpReader.region = refused  # type: ignore[method-assign,assignment]
    dcp_reader.DcpReader._flat_torch = refused  # type: ignore[method-assign,assignment]
    from ckpt_ema.cli import main as cli

    try:
        cli(args, standalone_mode=False)
    finally:
        reads = []
        for job in passes:
            for (j, number), offset, length in recorder.reads:
                path = job.plan.checkpoints[j].source.files[number].path
                reads.append([str(path), offset, length])
        Path(f"{log}.{os.environ['RANK']}.json").write_text(json.dumps(reads))


if __name__ == "__main__":
    main()
