"""The numba kernel behind ``fused.py`` (imported only when a fused pass runs: numba takes ~0.3 s to load).

See ``fused.py`` for what it computes and in which order. The kernel is sequential and releases the GIL:
``fused.py`` runs it on ranges of blocks in several threads. numba's ``parallel=True`` would do the same
split, but it made the first compilation (one per input/output dtype pair, before the cache has it) take
2.7 times as long: about 25 s of CPU on the development machine instead of about 9 s.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ckpt_ema.engine.fused import BLOCK

GROUP = 4  # inputs added per pass over an accumulator block


@intrinsic
def _pointer(typingctx, address, like):
    """``address`` (an int64) as a pointer to ``like``'s element type."""
    sig = types.CPointer(like.dtype)(types.int64, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(like.dtype)))

    return sig, codegen


@intrinsic
def _bf16_to_f32(typingctx, bits):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return sig, codegen


def _f32(value):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_f32, inline="always")
def _f32_impl(value):
    if value == types.uint16:
        return lambda value: _bf16_to_f32(value)
    if value == types.float32:
        return lambda value: value
    return None


def _store(out, index, value):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_store, inline="always")
def _store_impl(out, index, value):
    if out.dtype == types.uint16:

        def store_bf16(out, index, value):
            u = _f32_bits(value)
            is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)  # NaN stays a (quiet) NaN
            nearest_even = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            quiet_nan = (u >> np.uint32(16)) | np.uint32(0x40)
            mask = np.uint32(0) - np.uint32(is_nan)  # all ones for a NaN (branch-free select)
            out[index] = np.uint16((quiet_nan & mask) | (nearest_even & ~mask))

        return store_bf16
    if out.dtype == types.float32:

        def store_f32(out, index, value):
            out[index] = value

        return store_f32
    return None


@intrinsic
def _f32_bits(typingctx, value):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@numba.njit(fastmath={"contract"}, inline="always")
def _finish(acc, out, lo, m):
    """Round the block to the output dtype; count non-finite values.

    Stores go through the slice ``out[lo : lo + m]`` indexed from 0: with ``out[lo + i]`` numba keeps its
    negative-index wrap-around, and LLVM then stored element by element (1.4x slower with 1 target, 1.8x
    with 4, in a single-thread measurement of the whole kernel)."""
    bad = 0
    dst = out[lo : lo + m]
    for i in range(m):
        value = acc[i]
        bad += (_f32_bits(value) & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
        _store(dst, i, value)
    return bad


@numba.njit(fastmath={"contract"}, inline="always")
def _add_inputs(addresses, like, coefs, k, k1, lo, m, a, b):
    """Accumulate every input into ``a`` (target ``k``) and, if ``k1 != k``, ``b`` (target ``k1``)."""
    n_in = coefs.shape[1]
    step = like.itemsize
    pair = k1 != k
    j = 0
    while j < n_in:
        s0 = numba.carray(_pointer(addresses[j] + step * lo, like), m)
        c0, d0 = coefs[k, j], coefs[k1, j]
        if j + GROUP > n_in:  # fewer than four inputs left: one at a time
            if j == 0:
                for i in range(m):
                    a[i] = c0 * _f32(s0[i])
            else:
                for i in range(m):
                    a[i] += c0 * _f32(s0[i])
            if pair:
                if j == 0:
                    for i in range(m):
                        b[i] = d0 * _f32(s0[i])
                else:
                    for i in range(m):
                        b[i] += d0 * _f32(s0[i])
            j += 1
            continue
        s1 = numba.carray(_pointer(addresses[j + 1] + step * lo, like), m)
        s2 = numba.carray(_pointer(addresses[j + 2] + step * lo, like), m)
        s3 = numba.carray(_pointer(addresses[j + 3] + step * lo, like), m)
        c1, c2, c3 = coefs[k, j + 1], coefs[k, j + 2], coefs[k, j + 3]
        d1, d2, d3 = coefs[k1, j + 1], coefs[k1, j + 2], coefs[k1, j + 3]
        # Four copies of one loop (pair or single target; first inputs or not): each stays a plain loop
        # that LLVM vectorises, and the first group writes the accumulators without reading them.
        if pair and j == 0:
            for i in range(m):
                x0, x1, x2, x3 = _f32(s0[i]), _f32(s1[i]), _f32(s2[i]), _f32(s3[i])
                t = c0 * x0
                u = d0 * x0
                t += c1 * x1
                u += d1 * x1
                t += c2 * x2
                u += d2 * x2
                a[i] = t + c3 * x3
                b[i] = u + d3 * x3
        elif pair:
            for i in range(m):
                x0, x1, x2, x3 = _f32(s0[i]), _f32(s1[i]), _f32(s2[i]), _f32(s3[i])
                t = a[i] + c0 * x0
                u = b[i] + d0 * x0
                t += c1 * x1
                u += d1 * x1
                t += c2 * x2
                u += d2 * x2
                a[i] = t + c3 * x3
                b[i] = u + d3 * x3
        elif j == 0:
            for i in range(m):
                t = c0 * _f32(s0[i])
                t += c1 * _f32(s1[i])
                t += c2 * _f32(s2[i])
                a[i] = t + c3 * _f32(s3[i])
        else:
            for i in range(m):
                t = a[i] + c0 * _f32(s0[i])
                t += c1 * _f32(s1[i])
                t += c2 * _f32(s2[i])
                a[i] = t + c3 * _f32(s3[i])
        j += GROUP


@numba.njit(fastmath={"contract"}, inline="always")
def _add_inputs4(addresses, like, coefs, k, lo, m, acc):
    """Accumulate every input into ``acc[0..3]`` (targets ``k .. k+3``), four inputs at a time."""
    n_in = coefs.shape[1]
    step = like.itemsize
    a, b, c, d = acc[0], acc[1], acc[2], acc[3]
    j = 0
    while j + GROUP <= n_in:
        s0 = numba.carray(_pointer(addresses[j] + step * lo, like), m)
        s1 = numba.carray(_pointer(addresses[j + 1] + step * lo, like), m)
        s2 = numba.carray(_pointer(addresses[j + 2] + step * lo, like), m)
        s3 = numba.carray(_pointer(addresses[j + 3] + step * lo, like), m)
        a0, a1, a2, a3 = coefs[k, j], coefs[k, j + 1], coefs[k, j + 2], coefs[k, j + 3]
        b0, b1, b2, b3 = coefs[k + 1, j], coefs[k + 1, j + 1], coefs[k + 1, j + 2], coefs[k + 1, j + 3]
        c0, c1, c2, c3 = coefs[k + 2, j], coefs[k + 2, j + 1], coefs[k + 2, j + 2], coefs[k + 2, j + 3]
        d0, d1, d2, d3 = coefs[k + 3, j], coefs[k + 3, j + 1], coefs[k + 3, j + 2], coefs[k + 3, j + 3]
        if j == 0:  # separate loops: a select between c*x and acc + c*x would stop the fused multiply-add
            for i in range(m):
                x0, x1, x2, x3 = _f32(s0[i]), _f32(s1[i]), _f32(s2[i]), _f32(s3[i])
                ta, tb, tc, td = a0 * x0, b0 * x0, c0 * x0, d0 * x0
                ta += a1 * x1
                tb += b1 * x1
                tc += c1 * x1
                td += d1 * x1
                ta += a2 * x2
                tb += b2 * x2
                tc += c2 * x2
                td += d2 * x2
                a[i] = ta + a3 * x3
                b[i] = tb + b3 * x3
                c[i] = tc + c3 * x3
                d[i] = td + d3 * x3
        else:
            for i in range(m):
                x0, x1, x2, x3 = _f32(s0[i]), _f32(s1[i]), _f32(s2[i]), _f32(s3[i])
                ta = a[i] + a0 * x0
                tb = b[i] + b0 * x0
                tc = c[i] + c0 * x0
                td = d[i] + d0 * x0
                ta += a1 * x1
                tb += b1 * x1
                tc += c1 * x1
                td += d1 * x1
                ta += a2 * x2
                tb += b2 * x2
                tc += c2 * x2
                td += d2 * x2
                a[i] = ta + a3 * x3
                b[i] = tb + b3 * x3
                c[i] = tc + c3 * x3
                d[i] = td + d3 * x3
        j += GROUP
    while j < n_in:  # fewer than four inputs left: one at a time
        s0 = numba.carray(_pointer(addresses[j] + step * lo, like), m)
        a0, b0, c0, d0 = coefs[k, j], coefs[k + 1, j], coefs[k + 2, j], coefs[k + 3, j]
        if j == 0:
            for i in range(m):
                x0 = _f32(s0[i])
                a[i], b[i], c[i], d[i] = a0 * x0, b0 * x0, c0 * x0, d0 * x0
        else:
            for i in range(m):
                x0 = _f32(s0[i])
                a[i] += a0 * x0
                b[i] += b0 * x0
                c[i] += c0 * x0
                d[i] += d0 * x0
        j += 1


@numba.njit(fastmath={"contract"}, inline="always")
def _block(addresses, like, coefs, lo, m, out, acc):
    """One block of every target: four targets at a time, then pairs, then one."""
    n_out = coefs.shape[0]
    bad = 0
    k = 0
    while k < n_out:
        if n_out - k >= 4:
            _add_inputs4(addresses, like, coefs, k, lo, m, acc)
            for q in range(4):
                bad += _finish(acc[q], out[k + q], lo, m)
            k += 4
        else:
            k1 = k + 1 if k + 1 < n_out else k
            _add_inputs(addresses, like, coefs, k, k1, lo, m, acc[0], acc[1])
            bad += _finish(acc[0], out[k], lo, m)
            if k1 != k:
                bad += _finish(acc[1], out[k1], lo, m)
            k += 2 if k1 != k else 1
    return bad


@numba.njit(fastmath={"contract"}, nogil=True, cache=True)
def weighted_sums_kernel(addresses, like, coefs, n, out, first, last):
    """Blocks ``[first, last)`` of every target (``fused.py`` gives each thread a range of blocks)."""
    bad = 0
    acc = np.empty((4, BLOCK), dtype=np.float32)
    for block in range(first, last):
        lo = block * BLOCK
        m = min(n, lo + BLOCK) - lo
        bad += _block(addresses, like, coefs, lo, m, out, acc)
    return bad


@numba.njit(fastmath=True, nogil=True, cache=True)
def sum_of_squares_kernel(address, like, n):  # pragma: no cover - compiled
    """Sum of ``x*x`` over ``n`` BF16 (uint16 bits) or FP32 values from ``address``, accumulated in float64."""
    values = numba.carray(_pointer(address, like), n)
    total = 0.0
    for i in range(n):
        x = np.float64(_f32(values[i]))
        total += x * x
    return total


@numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True)
def increment_products_kernel(
    addresses, like, index, outputs, rows, sq, cross1, cross2, distance
):  # pragma: no cover - compiled
    """The error estimate's sums over the elements ``index`` (ascending) of one chunk (see
    ``fused.increment_products``), in float64."""
    n_in = addresses.shape[0]
    count = index.shape[0]
    last = index[count - 1] + 1
    previous = np.empty(count, dtype=np.float64)
    d1 = np.zeros(count, dtype=np.float64)  # the increments of the gap before (0 until there is one)
    d2 = np.zeros(count, dtype=np.float64)  # and of the gap before that
    bad = 0
    for j in range(n_in):  # branch-free inner loops (they vectorise): the first input only seeds previous
        x = numba.carray(_pointer(addresses[j], like), last)
        if j == 0:
            for e in range(count):
                value = np.float64(_f32(x[index[e]]))
                bad += not math.isfinite(value)
                previous[e] = value
            continue
        s = 0.0
        c1 = 0.0
        c2 = 0.0
        for e in range(count):
            value = np.float64(_f32(x[index[e]]))
            bad += not math.isfinite(value)
            d = value - previous[e]
            s += d * d
            c1 += d1[e] * d
            c2 += d2[e] * d
            d2[e] = d1[e]
            d1[e] = d
            previous[e] = value
        sq[j - 1] += s
        if j >= 2:
            cross1[j - 2] += c1
        if j >= 3:
            cross2[j - 3] += c2
    for k in range(rows.shape[0]):
        row = outputs[rows[k]]
        total = 0.0
        for e in range(count):
            d = np.float64(_f32(row[index[e]])) - previous[e]
            total += d * d
        distance[k] += total
    return bad
