"""The experiment behind docs/performance.md's "next step": each thread reads and computes its own pieces.

Every one of ``--threads`` threads takes a contiguous share of the elements and, piece after piece, reads
``--piece`` elements of every checkpoint with ``pread`` into its own buffers and runs the fused kernel (1
target) on them at once, while they are still in that core's cache. No hash, no estimate, no outputs
written: compare with ``bench.engine_pass`` (the engine alone) on the same series, warm.

    python benchmarks/per_thread_experiment.py /tmp/series    # a series of bench.make_series (BF16)
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np

from ckpt_ema.engine import fused
from ckpt_ema.io.safetensors_format import read_header


def data_range(path: Path) -> tuple[int, int]:
    """(first byte, bytes) of the tensor data of a safetensors file."""
    header = read_header(path)
    return header.data_start, header.file_size - header.data_start


def run(paths: list[Path], threads: int, piece: int) -> float:
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    start, size = data_range(paths[0])
    total = size // 2  # BF16 elements (the bench's series is all BF16 but an 8-byte counter)
    coefs = np.full((1, len(paths)), 1 / len(paths), dtype=np.float32)
    kernel = fused._kernels().weighted_sums_kernel
    like = np.empty(0, dtype=np.uint16)

    def work(lo: int, hi: int) -> None:
        buffers = np.empty((len(paths), piece), dtype=np.uint16)
        out = np.empty((1, piece), dtype=np.uint16)
        addresses = np.array([buffers[j].ctypes.data for j in range(len(paths))], dtype=np.int64)
        for position in range(lo, hi, piece):
            m = min(piece, hi - position)
            for j, fd in enumerate(fds):
                os.preadv(fd, [memoryview(buffers[j])[:m].cast("B")], start + 2 * position)
            kernel(addresses, like, coefs, m, out, 0, -(-m // fused.BLOCK))

    bounds = [total * i // threads for i in range(threads + 1)]
    workers = [threading.Thread(target=work, args=(bounds[i], bounds[i + 1])) for i in range(threads)]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    for fd in fds:
        os.close(fd)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("series", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--piece", type=int, default=1 << 16, help="elements per read and kernel call")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    paths = sorted(args.series.glob("*.safetensors"))
    run(paths, args.threads, args.piece)  # numba loads, the files come into the page cache
    times = [run(paths, args.threads, args.piece) for _ in range(args.repeat)]
    print(f"{len(paths)} files, {args.threads} threads, pieces of {args.piece} elements: "
          + " ".join(f"{t:.2f}" for t in times) + " s")  # fmt: skip


if __name__ == "__main__":
    main()
