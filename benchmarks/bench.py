"""`make bench`: how fast ckpt-ema merges, side by side in one run with the limits (``cat``, reading the bytes).

Writes a synthetic BF16 series to disk (``--count`` checkpoints of ``--size-mb`` MB, a transformer-like mix
of large matrices and small biases/norms plus an integer buffer), then measures, each row in the same run:

- ``cat``: ``cat FILES > /dev/null`` (the disk's or the page cache's speed through read(2));
- ``read``: every file memory-mapped and every 32-bit word touched (a max-reduction on all cores);
- ``engine N``: ckpt-ema's streaming pass alone, in this process, outputs discarded;
- ``write N``: writing N outputs' bytes (one checkpoint's size each) with ``write`` and ``fsync``, nothing
  computed: with ``cat``, the floor of a merge that reads the inputs and writes N targets;
- ``ckpt-ema N``: ``python -m ckpt_ema merge`` as a subprocess writing real outputs, with N = 1, 4, 16
  targets, with the default hash of the inputs (BLAKE3) and with ``--no-hash``;
- ``--help`` and ``plan``: the command's start-up (``plan`` reads the headers and plans).

*warm* rows read from the page cache (a read of every file first), outputs into ``/dev/shm`` when it fits;
*cold* rows drop every input from the page cache first (``posix_fadvise(DONTNEED)`` on each file, which
works on disk file systems, not on tmpfs) and write their outputs beside the series, on the same disk;
each cold run is paired with a cold ``cat`` just before it, and its ``x cat`` is the median of those
ratios (a virtual disk's speed drifts within minutes). ``cpu s`` is the user + system time of a row.
Peak memory is the anonymous RSS (``RssAnon`` of the process and its children, sampled every 5 ms from
/proc), not the page cache or mapped files. The scale table repeats the warm CLI rows on a series a
quarter the size, and runs 1 and 2 processes at once each merging its own series (how a torchrun merge
over machines that each read their own files would scale, on one machine that shares its disk and cores).

Examples:
    python benchmarks/bench.py                          # 8 x 512 MB (4.3 GB) on $TMPDIR, ~4 min
    python benchmarks/bench.py --size-mb 128 --repeat 1 # quick
    python benchmarks/bench.py --json bench.json --dir /mnt/nvme/tmp
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dcp  # noqa: E402  (the DCP table, beside this file)

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    1: ["--decay", "0.9995"],
    4: ["--decay", "0.9995", "--decay", "0.9999", "--sigma-rel", "0.05", "--sigma-rel", "0.1"],
    16: [
        *[a for d in ("0.999", "0.9993", "0.9995", "0.9997", "0.9998", "0.9999") for a in ("--decay", d)],
        *[
            a
            for s in ("0.03", "0.05", "0.07", "0.09", "0.11", "0.13", "0.15", "0.17", "0.19", "0.21")
            for a in ("--sigma-rel", s)
        ],
    ],
}
STEP_GAP = 1000


# ----------------------------------------------------------------------------------------------
# the synthetic series (numpy only: BF16 bits written by hand)
# ----------------------------------------------------------------------------------------------


def layout(size_bytes: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a transformer-like model of about ``size_bytes`` in BF16.

    Each block has q/k/v/out projections (d x d), an MLP (4d x d, d x 4d), their biases and two norms:
    12 tensors, 7 of them small vectors, like a real checkpoint where most tensors are small and most
    bytes sit in a few large ones.
    """
    d = 1024 if size_bytes >= 64 << 20 else 256
    block = {
        "attn.q.weight": (d, d),
        "attn.k.weight": (d, d),
        "attn.v.weight": (d, d),
        "attn.out.weight": (d, d),
        "attn.out.bias": (d,),
        "mlp.fc1.weight": (4 * d, d),
        "mlp.fc1.bias": (4 * d,),
        "mlp.fc2.weight": (d, 4 * d),
        "mlp.fc2.bias": (d,),
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "norm2.weight": (d,),
    }
    block_bytes = 2 * sum(math.prod(s) for s in block.values())
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (max(1, (size_bytes % block_bytes) // (2 * d)), d)}
    for b in range(max(1, size_bytes // block_bytes)):
        shapes.update({f"blocks.{b}.{name}": shape for name, shape in block.items()})
    shapes["final_norm.weight"] = (d,)
    return shapes


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    u = values.astype(np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def make_series(folder: Path, count: int, size_bytes: int, seed: int = 0) -> list[Path]:
    """``count`` BF16 checkpoints ``step-N.safetensors`` (N = 1000, 2000, ...) drifting like a training run."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = layout(size_bytes)
    total = sum(math.prod(s) for s in shapes.values())
    base = rng.standard_normal(total, dtype=np.float32) * np.float32(0.02)
    drift = rng.standard_normal(total, dtype=np.float32) * np.float32(1e-3)
    paths = []
    for i in range(count):
        step = STEP_GAP * (i + 1)
        header: dict[str, object] = {"__metadata__": {"step": str(step)}}
        offset = 0
        for name, shape in shapes.items():
            n = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header["step_counter"] = {"dtype": "I64", "shape": [1], "data_offsets": [offset, offset + 8]}
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path = folder / f"step-{step:06d}.safetensors"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            piece = 1 << 24
            for start in range(0, total, piece):
                stop = min(total, start + piece)
                f.write(_bf16_bits(base[start:stop] + np.float32(i + 1) * drift[start:stop]).tobytes())
            f.write(struct.pack("<q", step))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# the measured runs
# ----------------------------------------------------------------------------------------------


def drop_cache(paths: list[Path]) -> None:
    """Evict the files from the page cache (disk file systems; tmpfs keeps them)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cat_pass(paths: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def write_pass(dest: Path, files: int, nbytes: int) -> float:
    """Write ``files`` files of ``nbytes`` bytes each into ``dest`` (8 MB ``write`` calls, ``fsync`` each, as
    the merge does for its outputs), then delete them: what writing the outputs' bytes alone costs."""
    block = np.ones(8 << 20, dtype=np.uint8)
    dest.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(files):
        fd = os.open(dest / f"write-{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = nbytes
            while left > 0:
                left -= os.write(fd, memoryview(block)[: min(left, len(block))])
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - start
    shutil.rmtree(dest, ignore_errors=True)
    return seconds


def read_pass(paths: list[Path]) -> float:
    """Map each file and touch every 32-bit word (so every BF16 value) with a max-reduction (all cores)."""
    import torch

    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        words = torch.frombuffer(mm, dtype=torch.int32, count=len(mm) // 4)
        int(words.max())
        del words
        mm.close()
    return time.perf_counter() - start


class _NullSink:
    def write(self, name: str, data: object) -> None:
        pass


def _options(targets: list[str]) -> dict[str, list[float]]:
    options: dict[str, list[float]] = {}
    for flag, value in zip(targets[::2], targets[1::2]):
        options.setdefault(flag.lstrip("-").replace("-", "_"), []).append(float(value))
    return options


def engine_pass(series: Path, targets: list[str], kernel: str | None = None) -> float:
    """The engine alone, in this process: ckpt-ema's MergePass with the outputs discarded."""
    from ckpt_ema import plan_merge

    try:
        from ckpt_ema.engine.merge_pass import MergePass
    except ImportError:  # a checkout from before the package layout (--tree)
        from ckpt_ema.engine import MergePass  # type: ignore[attr-defined, no-redef]

    plan = plan_merge([series], **_options(targets))
    start = time.perf_counter()
    for _ in MergePass(plan, [_NullSink() for _ in plan.outputs], kernel=kernel):
        pass
    return time.perf_counter() - start


def _tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    pids.extend(_tree(int(child)))
    except OSError:
        pass
    return pids


def _rss_anon_kb(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def run_cli(args: list[str], concurrent: int = 1) -> tuple[float, int]:
    """Run ``python -m ckpt_ema ARGS`` (``concurrent`` copies at once, ``{i}`` in ARGS replaced by the copy's
    number); return (seconds until all ended, peak anonymous RSS in bytes of one process tree)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # as an installed package runs: from cached bytecode (with PYTHONDONTWRITEBYTECODE set, as on the
    # development machine, every run compiled ckpt_ema's sources again: ~0.5 s of each row)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ckpt_ema", *[a.replace("{i}", str(i)) for a in args]],
            env=env,
            cwd=ROOT,  # python -m puts the working folder first on sys.path: make it the tree measured
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(concurrent)
    ]
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, max(_rss_anon_kb(p.pid) for p in procs))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    for p, stderr in zip(procs, errors):
        if p.returncode != 0:
            raise SystemExit(f"ckpt-ema {' '.join(args)} failed:\n{stderr.decode(errors='replace')}")
    return elapsed, peak * 1024


class Timing(NamedTuple):
    """``seconds``: the best run; ``peak``: the largest peak RSS (or None); ``cpu``: the median CPU seconds
    (user + system) of the runs; ``x_cat``: the median of each run's time over its paired ``cat`` (cold);
    ``user``: the median user CPU seconds (the steadier figure where writing into tmpfs costs system time
    that varies several-fold between runs on this VM); ``paired_cat``: the median time of the paired ``cat``
    runs (cold)."""

    seconds: float
    peak: int | None
    cpu: float | None
    x_cat: float | None
    user: float | None = None
    paired_cat: float | None = None


def _cpu(children: bool) -> tuple[float, float]:
    """(user, user + system) CPU seconds so far, of the subprocesses or of this process."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_utime + usage.ru_stime


def timing(runs: int, fn, *args, cold: list[Path] | None = None, paired: bool = False, children: bool = True) -> Timing:
    """``runs`` calls of ``fn(*args)``, each after evicting ``cold`` from the page cache if given.

    ``paired``: each call is preceded by a cold ``cat`` of the same files (evicted again before the call),
    and the call's time is divided by that ``cat``'s. A virtual disk's speed drifts by 2x within minutes
    here; a ratio against the ``cat`` of the same minute is what tells the disk from the tool.
    ``children``: CPU time is that of subprocesses (the CLI), else of this process (the engine).
    """
    times, peaks, cpus, users, ratios, cats = [], [], [], [], [], []
    for _ in range(runs):
        cat_seconds = None
        if cold is not None and paired:
            drop_cache(cold)
            cat_seconds = cat_pass(cold)
        if cold is not None:
            drop_cache(cold)
        user_before, cpu_before = _cpu(children)
        result = fn(*args)
        user_after, cpu_after = _cpu(children)
        cpus.append(cpu_after - cpu_before)
        users.append(user_after - user_before)
        seconds, peak = result if isinstance(result, tuple) else (result, None)
        times.append(seconds)
        peaks.append(peak)
        if cat_seconds:
            ratios.append(seconds / cat_seconds)
            cats.append(cat_seconds)
    peak_values = [p for p in peaks if p is not None]
    return Timing(
        min(times),
        max(peak_values) if peak_values else None,
        statistics.median(cpus),
        statistics.median(ratios) if ratios else None,
        statistics.median(users),
        statistics.median(cats) if cats else None,
    )


def best(runs: int, fn, *args, cold: list[Path] | None = None) -> tuple[float, int | None]:
    """Best time of ``runs`` calls and the largest peak RSS (``timing`` without the CPU and pairs)."""
    result = timing(runs, fn, *args, cold=cold)
    return result.seconds, result.peak


# ----------------------------------------------------------------------------------------------
# the tables
# ----------------------------------------------------------------------------------------------


def merge_args(series: Path, n: int, dest: Path, extra: list[str]) -> list[str]:
    out = dest / ("one.safetensors" if n == 1 else f"t{n}")
    return ["merge", str(series), *TARGETS[n], "-o", str(out), "--force", "-q", *extra]


def main_table(series: Path, paths: list[Path], warm_out: Path, cold_out: Path, args: argparse.Namespace) -> dict:
    rows: dict[str, dict[str, float | None]] = {}
    repeat, extra = args.repeat, args.merge_args.split()

    def row(label: str, result: Timing, mode: str = "warm") -> None:
        rows[label] = {
            "seconds": result.seconds,
            "peak_rss": result.peak,
            "cpu": result.cpu,
            "user": result.user,
            "x_cat": result.x_cat,
            "paired_cat": result.paired_cat,
            "mode": mode,
        }
        paired = f"  ({result.x_cat:.2f} x its cat)" if result.x_cat else ""
        print(f"  {label:34} {result.seconds:7.3f} s{paired}", file=sys.stderr, flush=True)

    cat_pass(paths)  # warm the page cache
    row("cat (warm)", timing(repeat, cat_pass, paths))
    row("read (warm)", timing(repeat, read_pass, paths, children=False))
    for label, cli in (("ckpt-ema --help", ["--help"]), ("ckpt-ema plan", ["plan", str(series), *TARGETS[1]])):
        row(label, timing(repeat, run_cli, cli))
    engine_pass(series, TARGETS[1])  # warm-up (numba loads its cache or compiles)
    for n in (1, 4, 16):
        row(f"engine {n} (warm)", timing(repeat, engine_pass, series, TARGETS[n], children=False))
    output_bytes = paths[-1].stat().st_size  # one output per target, in the inputs' dtype
    for n in (1, 4, 16):
        row(f"write {n} (warm)", timing(repeat, write_pass, warm_out / "write", n, output_bytes, children=False))
    for n in (1, 4, 16):
        for flags in ([], ["--no-hash"]):
            label = f"ckpt-ema {n}{' --no-hash' if flags else ''} (warm)"
            row(label, timing(repeat, run_cli, merge_args(series, n, warm_out, flags + extra)))
            shutil.rmtree(warm_out, ignore_errors=True)
    if not args.no_cold:
        cold_repeat = max(1, args.cold_repeat)
        row("cat (cold)", timing(cold_repeat, cat_pass, paths, cold=paths), mode="cold")
        for n in (1, 4, 16):
            result = timing(cold_repeat, write_pass, cold_out / "write", n, output_bytes, children=False)
            row(f"write {n} (cold)", result, mode="cold")
        for n in (1, 4, 16):
            result = timing(cold_repeat, engine_pass, series, TARGETS[n], cold=paths, paired=True, children=False)
            row(f"engine {n} (cold)", result, mode="cold")
        for n in (1, 4, 16):
            for flags in ([], ["--no-hash"]):
                label = f"ckpt-ema {n}{' --no-hash' if flags else ''} (cold)"
                cli = merge_args(series, n, cold_out, flags + extra)
                row(label, timing(cold_repeat, run_cli, cli, cold=paths, paired=True), mode="cold")
                shutil.rmtree(cold_out, ignore_errors=True)
    return rows


def scale_table(folder: Path, count: int, size_mb: int, warm_out: Path, args: argparse.Namespace) -> dict:
    """Warm CLI runs on a series a quarter the size, and 1 vs 2 processes each merging its own series."""
    small_mb = max(16, size_mb // 4)
    series = [folder / f"small-{i}" for i in range(2)]
    paths = [p for s in series for p in make_series(s, count, small_mb << 20, seed=1 + int(s.name[-1]))]
    cat_pass(paths)
    result: dict[str, object] = {"size_mb": small_mb, "bytes": sum(p.stat().st_size for p in paths) // 2, "rows": {}}
    for n in (1, 4, 16):
        seconds, peak = best(args.repeat, run_cli, merge_args(series[0], n, warm_out, args.merge_args.split()))
        result["rows"][f"ckpt-ema {n}"] = {"seconds": seconds, "peak_rss": peak}  # type: ignore[index]
        print(f"  scale {small_mb} MB, {n} targets: {seconds:.3f} s", file=sys.stderr, flush=True)
        shutil.rmtree(warm_out, ignore_errors=True)
    template = str(folder / "small-{i}")
    for k in (1, 2):
        cli = ["merge", template, *TARGETS[1], "-o", str(warm_out / "p{i}.safetensors"), "--force", "-q"]
        drop = paths if not args.no_cold else None
        seconds, _ = best(max(1, min(args.repeat, 2)), run_cli, cli, k, cold=drop)
        result["rows"][f"{k} processes"] = {"seconds": seconds}  # type: ignore[index]
        print(f"  {k} processes (cold): {seconds:.3f} s", file=sys.stderr, flush=True)
        shutil.rmtree(warm_out, ignore_errors=True)
    for s in series:
        shutil.rmtree(s, ignore_errors=True)
    return result


def x_cat_of(rows: dict, label: str) -> float | None:
    """A row's time over ``cat``'s: the paired median for cold rows that have one, else over the cat row."""
    r = rows.get(label)
    if r is None:
        return None
    if r.get("x_cat"):
        return float(r["x_cat"])
    cat = rows.get(f"cat ({r['mode']})", {}).get("seconds")
    return r["seconds"] / cat if cat else None


def print_report(info: dict, rows: dict, scale: dict | None) -> None:
    print(
        f"{info['machine']}; Python {info['python']}; numba {info['numba']}; series on {info['dir']}, "
        f"warm outputs in {info['warm_out']}"
    )
    print(
        f"\n{info['count']} x {info['size_mb']} MB BF16 ({info['bytes'] / 1e9:.2f} GB read, {info['tensors']} tensors per checkpoint)"
    )
    header = f"{'':34} {'s':>7} {'GB/s':>6} {'x cat':>6} {'x read':>6} {'cpu s':>6} {'user s':>6} {'peak anon RSS':>13}"
    print(header)
    print("-" * len(header))
    size = info["bytes"]
    for label, r in rows.items():
        seconds = r["seconds"]
        rss = f"{r['peak_rss'] / 2**20:10.0f} MB" if r.get("peak_rss") else ""
        cpu = f"{r['cpu']:6.2f}" if r.get("cpu") is not None else ""
        user = f"{r['user']:6.2f}" if r.get("user") is not None else ""
        if label in ("ckpt-ema --help", "ckpt-ema plan"):
            print(f"{label:34} {seconds:7.3f} {'':>6} {'':>6} {'':>6} {cpu:>6} {user:>6} {rss:>13}")
            continue
        moved = int(label.split()[1]) * info["output_bytes"] if label.startswith("write ") else size  # bytes
        x_cat = f"{x_cat_of(rows, label):6.2f}" if x_cat_of(rows, label) else ""
        x_read = f"{seconds / rows['read (warm)']['seconds']:6.2f}" if r["mode"] == "warm" else ""
        print(
            f"{label:34} {seconds:7.3f} {moved / seconds / 1e9:6.2f} {x_cat:>6} {x_read:>6} {cpu:>6} {user:>6} {rss:>13}"
        )
    if any(r.get("x_cat") for r in rows.values()):
        print(
            "(cold rows: x cat is the median of each run's time over a cold cat run just before it; cpu s is "
            "user + system time, user s user time alone, medians of the runs)"
        )

    def ratio(a: str, b: str) -> str:
        if b == "cat (cold)" and x_cat_of(rows, a):
            return f"{x_cat_of(rows, a):.2f}"
        return f"{rows[a]['seconds'] / rows[b]['seconds']:.2f}" if a in rows and b in rows else "-"

    def user_ratio(a: str, b: str) -> str:
        if a in rows and b in rows and rows[a].get("user") and rows[b].get("user"):
            return f"{rows[a]['user'] / rows[b]['user']:.2f}"
        return "-"

    def share(a: str, b: str) -> str:  # how much of a's time b saves
        return f"{100 * (1 - rows[b]['seconds'] / rows[a]['seconds']):.0f}%" if a in rows and b in rows else "-"

    read = rows["read (warm)"]["seconds"]
    if "ckpt-ema 1 (warm)" in rows:
        print(
            f"warm: 4 targets / 1 = {ratio('ckpt-ema 4 (warm)', 'ckpt-ema 1 (warm)')}, 16 / 1 = "
            f"{ratio('ckpt-ema 16 (warm)', 'ckpt-ema 1 (warm)')}; 1 target at "
            f"{read / rows['ckpt-ema 1 (warm)']['seconds']:.2f} of read speed "
            f"({read / rows['ckpt-ema 1 --no-hash (warm)']['seconds']:.2f} with --no-hash); "
            f"the hash is {share('ckpt-ema 1 (warm)', 'ckpt-ema 1 --no-hash (warm)')} of the 1-target wall time"
        )
        print(
            f"warm, user CPU seconds (writing into tmpfs adds system time that varies between runs): 4 targets / "
            f"1 = {user_ratio('ckpt-ema 4 (warm)', 'ckpt-ema 1 (warm)')} "
            f"({user_ratio('ckpt-ema 4 --no-hash (warm)', 'ckpt-ema 1 --no-hash (warm)')} with --no-hash)"
        )
    if "ckpt-ema 1 (cold)" in rows:
        print(
            f"cold: 1 target = {ratio('ckpt-ema 1 (cold)', 'cat (cold)')} x cat, 4 targets = "
            f"{ratio('ckpt-ema 4 (cold)', 'cat (cold)')} x cat, 16 = {ratio('ckpt-ema 16 (cold)', 'cat (cold)')} x cat; "
            f"4 / 1 = {ratio('ckpt-ema 4 (cold)', 'ckpt-ema 1 (cold)')}; the hash is "
            f"{share('ckpt-ema 1 (cold)', 'ckpt-ema 1 --no-hash (cold)')} of the 1-target wall time"
        )
    for mode in ("warm", "cold"):
        if f"write 1 ({mode})" not in rows or f"ckpt-ema 1 --no-hash ({mode})" not in rows:
            continue
        against_floor = []
        for n in (1, 4, 16):
            merge = rows[f"ckpt-ema {n} --no-hash ({mode})"]
            # reading the inputs (cold: the median of the merge's paired cats) and writing n outputs' bytes
            floor = (merge.get("paired_cat") or rows[f"cat ({mode})"]["seconds"]) + rows[f"write {n} ({mode})"][
                "seconds"
            ]
            against_floor.append(
                f"{n} target{'s' if n > 1 else ''} {merge['seconds'] / floor:.2f} (floor {floor:.2f} s)"
            )
        print(
            f"{mode}, --no-hash against reading the inputs and writing the outputs' bytes (cat + write"
            f"{', the paired cat' if mode == 'cold' else ''}): " + ", ".join(against_floor)
        )
    if scale:
        print("\nscale (warm, default hash): wall seconds by series bytes and targets")
        print(f"{'series':>22} {'1 target':>9} {'4':>7} {'16':>7}")
        big = [rows.get(f"ckpt-ema {n} (warm)", {}).get("seconds") for n in (1, 4, 16)]
        small = [scale["rows"][f"ckpt-ema {n}"]["seconds"] for n in (1, 4, 16)]
        for label, values in ((f"{scale['bytes'] / 1e9:.2f} GB", small), (f"{size / 1e9:.2f} GB", big)):
            print(f"{label:>22} " + " ".join(f"{v:7.3f}" if v else "      -" for v in values))
        one, two = scale["rows"]["1 processes"]["seconds"], scale["rows"]["2 processes"]["seconds"]
        print(
            f"processes each merging its own {scale['bytes'] / 1e9:.2f} GB series at once (cold): 1: {one:.3f} s, "
            f"2: {two:.3f} s -> {2 * one / two:.2f}x the throughput of one"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=512, help="checkpoint size in MB (default 512)")
    parser.add_argument("--count", type=int, default=8, help="checkpoints in the series (default 8)")
    parser.add_argument("--repeat", type=int, default=2, help="repetitions of warm rows; the best is kept (default 2)")
    parser.add_argument(
        "--dir", type=Path, help="where to write the series: a disk, for the cold rows (default TMPDIR)"
    )
    parser.add_argument(
        "--cold-repeat", type=int, default=3, help="runs of each cold row, each paired with a cold cat (default 3)"
    )
    parser.add_argument("--no-cold", action="store_true", help="skip the cold rows (e.g. when --dir is a tmpfs)")
    parser.add_argument("--no-scale", action="store_true", help="skip the scale table")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--merge-args", default="", help="extra arguments for every ckpt-ema merge run")
    parser.add_argument(
        "--dcp", default="4x512", metavar="COUNTxMB", help="the DCP series of the DCP table (default 4x512; 0: skip)"
    )
    parser.add_argument(
        "--tree", type=Path, help="measure the ckpt-ema of this checkout (e.g. an older commit) instead of this one"
    )
    args = parser.parse_args()
    global ROOT
    ROOT = (args.tree or ROOT).resolve()
    sys.path.insert(0, str(ROOT))
    try:
        from ckpt_ema.engine import fused
    except ImportError:
        from ckpt_ema import fused  # type: ignore[attr-defined, no-redef]

    size = args.count * args.size_mb << 20
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="ckpt-ema-bench-", dir=args.dir) as tmp:
        folder = Path(tmp)
        shm_ok = shm.is_dir() and shutil.disk_usage(shm).free > 4 * size
        warm_out = Path(tempfile.mkdtemp(prefix="ckpt-ema-bench-out-", dir=shm if shm_ok else folder))
        try:
            series = folder / "series"
            print(f"generating {args.count} x {args.size_mb} MB BF16 checkpoints in {series} ...", file=sys.stderr)
            paths = make_series(series, args.count, args.size_mb << 20)
            info = {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs; ckpt-ema from {ROOT}",
                "python": platform.python_version(),
                "numba": _version("numba") if fused.AVAILABLE else "not installed",
                "dir": str(folder),
                "warm_out": str(warm_out),
                "count": args.count,
                "size_mb": args.size_mb,
                "bytes": sum(p.stat().st_size for p in paths),
                "output_bytes": paths[-1].stat().st_size,
                "tensors": len(layout(args.size_mb << 20)) + 1,
            }
            rows = main_table(series, paths, warm_out, folder / "out", args)
            shutil.rmtree(series, ignore_errors=True)
            scale = None if args.no_scale else scale_table(folder, args.count, args.size_mb, warm_out, args)
            dcp = _bench_dcp(folder, args.dcp, args.repeat)
        finally:
            shutil.rmtree(warm_out, ignore_errors=True)
    print_report(info, rows, scale)
    if dcp is not None:
        bench_dcp.print_dcp(dcp)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": rows, "scale": scale, "dcp": dcp}, indent=2))


def _bench_dcp(folder: Path, spec: str, repeat: int) -> dict[str, object] | None:
    """The DCP table (benchmarks/bench_dcp.py): ``COUNTxMB`` checkpoints, or None for ``0``."""
    if spec in ("", "0"):
        return None
    count, _, size_mb = spec.partition("x")
    return bench_dcp.bench_dcp(folder, int(count), int(size_mb), repeat, layout, run_cli, best)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
