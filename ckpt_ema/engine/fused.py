"""The fused kernel (optional, needs numba): read, upcast and accumulate every target while in cache.

One call computes ``out[k, i] = round(sum_j c[k, j] * x_j[i])`` for a run of elements of every input,
in blocks of 16384 elements spread over the CPU cores (``_fused_numba.py`` holds the numba code). For
each block and each target, the inputs are added in step order, four at a time:
``t = a[i] + c0*x0; t += c1*x1; t += c2*x2; a[i] = t + c3*x3``, which is the same sequence of FP32
operations as adding them one by one (``acc = c_0 x_0``, then ``acc += c_j x_j``), each a multiply-add
rounded to FP32 once (a fused multiply-add where the CPU has one, as torch's ``add_(x, alpha=c)`` does),
while the accumulator stays in registers across the four inputs. Targets are processed four at a time
(then pairs, then one), so that each input value is converted once for all of them.

Inputs are BF16 or FP32 (all inputs of a call the same), outputs BF16 or FP32; BF16 -> FP32 is exact (a
shift), FP32 -> BF16 rounds to nearest even like torch. Other cases go to the pure-torch path of the
engine, which computes the same sums.

The blocks of a call are split in equal ranges between :func:`threads` threads (the caller's and a
small pool's); the kernel releases the GIL. The result does not depend on the split: each block is summed
on its own.

numba is a dependency of ckpt-ema (binary wheels for the usual platforms, no compiler needed); where it
cannot be installed, :data:`AVAILABLE` is False and the torch kernel runs. numba and the compiled kernel
(cached in ``__pycache__`` after the first run) are loaded on the first call, once per process.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from types import ModuleType

import numpy as np

AVAILABLE = importlib.util.find_spec("numba") is not None  # else the torch kernel runs
INPUT_KINDS = {"BF16": np.uint16, "F32": np.float32}
OUTPUT_KINDS = {"BF16": np.uint16, "F32": np.float32}
BLOCK = 16384  # elements per block: 4 FP32 accumulators (256 KB) stay in L2; measured vs 4096 and 65536
MIN_BLOCKS_PER_THREAD = 4  # a smaller call runs in the caller's thread alone
MIN_SAMPLE_PER_THREAD = 4096  # the same for the estimate's sums (sampled elements per thread)

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()  # batch --jobs calls the kernel from several threads
_module: ModuleType | None = None  # _fused_numba once imported


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The garbage collector off for a block (as it was before, after it): loading numba allocates some
    10^5 objects, which set off collections worth ~0.05 s of its ~0.45 s load here."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _kernels() -> ModuleType:
    """``_fused_numba``, imported on first use (numba and the cached kernels load then, once per process)."""
    global _module
    if _module is None:
        with _collector_paused():
            from ckpt_ema.engine import _fused_numba

        _module = _fused_numba
    return _module


def threads() -> int:
    """Threads per call: ``OMP_NUM_THREADS`` when set (torchrun sets 1 per rank), else the usable CPUs."""
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    if wanted.isdigit() and int(wanted) > 0:
        return int(wanted)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _workers(count: int) -> ThreadPoolExecutor:
    """The pool of kernel threads (made on first use, larger if ``OMP_NUM_THREADS`` grew)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            _pool, _pool_size = ThreadPoolExecutor(count, thread_name_prefix="ckpt-ema-kernel"), count
        return _pool


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _results(futures: list[Future[int]]) -> int:
    """The sum of every future's result, waiting for all of them even if a signal interrupts the wait:
    the threads read the caller's buffers by address, so the call must not return while one still runs."""
    total, interrupted = 0, None
    for future in futures:
        while True:
            try:
                total += future.result()
                break
            except BaseException as exc:  # KeyboardInterrupt, or the SystemExit of a SIGTERM handler
                if future.done():
                    raise
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
    return total


def weighted_sums(addresses: np.ndarray, in_dtype: str, coefs: np.ndarray, n: int, out: np.ndarray) -> int:
    """``out[k, :n] = round(sum_j coefs[k, j] * input_j[:n])``; returns the count of non-finite sums.

    Args:
        addresses: int64 (inputs,), the address of each input's first element (kept alive by the caller).
        in_dtype: ``"BF16"`` or ``"F32"``, the dtype of every input.
        coefs: float32 (outputs, inputs), C-contiguous.
        n: elements per input.
        out: (outputs, >= n) array of uint16 (BF16 bits) or float32.
    """
    weighted_sums_kernel = _kernels().weighted_sums_kernel
    like = np.empty(0, dtype=INPUT_KINDS[in_dtype])
    blocks = -(-n // BLOCK)
    count = max(1, min(threads(), blocks // MIN_BLOCKS_PER_THREAD))
    bounds = [blocks * i // count for i in range(count + 1)]
    futures = []
    if count > 1:
        pool = _workers(count - 1)
        for first, last in zip(bounds[1:-1], bounds[2:]):
            futures.append(pool.submit(weighted_sums_kernel, addresses, like, coefs, n, out, first, last))
    try:
        bad = int(weighted_sums_kernel(addresses, like, coefs, n, out, bounds[0], bounds[1]))
    finally:
        bad_elsewhere = _results(futures)
    return bad + bad_elsewhere


def sum_of_squares(data: memoryview, dtype: str) -> float:
    """Sum of the squared values of raw bytes of a float tensor stored as ``dtype`` (BF16/FP32 in numba,
    float64 sums; other dtypes, or without numba, in numpy with float32 products)."""
    if AVAILABLE and dtype in INPUT_KINDS and len(data):
        sum_of_squares_kernel = _kernels().sum_of_squares_kernel
        raw = np.frombuffer(data, dtype=np.uint8)
        like = np.empty(0, dtype=INPUT_KINDS[dtype])
        return float(sum_of_squares_kernel(raw.ctypes.data, like, raw.size // like.itemsize))
    from ckpt_ema.io.safetensors_format import sum_of_squares as numpy_sum_of_squares

    return numpy_sum_of_squares(data, dtype)


def increment_products(
    addresses: np.ndarray,
    in_dtype: str,
    sample: np.ndarray,
    outputs: np.ndarray,
    rows: np.ndarray,
    sums: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> int:
    """Add the error estimate's sums over the elements ``sample`` (int64 positions, ascending, not empty) of
    one chunk (jobs/estimate.py), in float64.

    With ``x_j`` the sampled values of input ``j`` (``addresses[j]``, all ``in_dtype``) and ``d_j = x_j -
    x_{j-1}``: ``sq[j-1] += sum d_j^2``, ``cross1[j-2] += sum d_{j-1} d_j``, ``cross2[j-3] += sum d_{j-2} d_j``,
    and ``distance[k] += sum (outputs[rows[k]] - x_last)^2`` (``sums = (sq, cross1, cross2, distance)``).
    Returns the count of non-finite sampled input values. One pass, no temporary arrays per input: the
    numpy version cost as much as the merge's kernel. A large sample is split between the kernel threads,
    each summing its part into sums of its own (the sums are over elements, so the parts add up).
    """
    increment_products_kernel = _kernels().increment_products_kernel
    like = np.empty(0, dtype=INPUT_KINDS[in_dtype])
    count = max(1, min(threads(), len(sample) // MIN_SAMPLE_PER_THREAD))
    parts = np.array_split(sample, count)
    own = [sums] + [tuple(np.zeros_like(a) for a in sums) for _ in parts[1:]]
    futures = []
    if count > 1:
        pool = _workers(count - 1)
        futures = [
            pool.submit(increment_products_kernel, addresses, like, part, outputs, rows, *part_sums)
            for part, part_sums in zip(parts[1:], own[1:])
        ]
    try:
        bad = int(increment_products_kernel(addresses, like, parts[0], outputs, rows, *sums))
    finally:
        bad_elsewhere = _results(futures)
    for part_sums in own[1:]:
        for total, part_sum in zip(sums, part_sums):
            total += part_sum
    return bad + bad_elsewhere
