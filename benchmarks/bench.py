"""`make bench`: how fast ckpt-ema merges, next to the limit (reading the bytes) and the usual script.

Generates a synthetic BF16 series in a temporary folder (``--count`` checkpoints of ``--size-mb`` MB each,
a mix of large matrices and small biases/norms like a real UNet or transformer, plus an integer buffer),
then measures, each as the best of ``--repeat`` runs:

- ``read``: one memory-mapped pass over every input file that touches every value (the limit);
- ``naive``: ``safetensors.torch.load_file`` on each file, then whole-tensor FP32 accumulation
  (what timm/fairseq averaging scripts and musubi-tuner's post-hoc EMA do; no output written);
- ``ckpt-ema merge`` with 1 and with 4 targets, with and without ``--no-hash``, through the real CLI (``python -m ckpt_ema``) as a
  subprocess, writing its outputs into the temporary folder. ``startup`` is ``ckpt-ema plan`` on the
  same series (Python + torch import, header parsing, planning): the ``pass`` columns subtract it.
  Peak anonymous RSS (``RssAnon`` of the process and its children, sampled every 5 ms from /proc) is
  reported for every ckpt-ema run; the page cache and the mapped files are not anonymous memory.

Examples:
    python benchmarks/bench.py                        # 8 x 256 MB, and 8 x 128 MB for linearity
    python benchmarks/bench.py --size-mb 1024,4096    # the larger setting, for manual runs
    python benchmarks/bench.py --json bench.json --dir /mnt/nvme/tmp
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
TARGETS_1 = ["--decay", "0.999"]
TARGETS_4 = ["--decay", "0.999", "--decay", "0.9999", "--sigma-rel", "0.05", "--sigma-rel", "0.1"]
STEP_GAP = 1000


# ----------------------------------------------------------------------------------------------
# the synthetic series
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


def make_series(folder: Path, count: int, size_bytes: int, seed: int = 0) -> list[Path]:
    """``count`` BF16 checkpoints ``step-N.safetensors`` (N = 1000, 2000, ...) drifting like a training run."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shapes = layout(size_bytes)
    weights = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    paths = []
    for i in range(count):
        step = STEP_GAP * (i + 1)
        for w in weights.values():
            w.add_(torch.randn(w.shape, generator=generator), alpha=1e-3)
        tensors = {name: w.to(torch.bfloat16) for name, w in weights.items()}
        tensors["step_counter"] = torch.tensor([step], dtype=torch.int64)
        path = folder / f"step-{step:06d}.safetensors"
        save_file(tensors, str(path), metadata={"step": str(step)})
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# the measured runs
# ----------------------------------------------------------------------------------------------


def read_pass(paths: list[Path]) -> float:
    """Map each file and touch every 32-bit word (so every BF16 value) with a max-reduction (all cores)."""
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        words = torch.frombuffer(mm, dtype=torch.int32, count=len(mm) // 4)
        int(words.max())
        del words
        mm.close()
    return time.perf_counter() - start


def naive_pass(paths: list[Path], coefficients: list[float], in_place: bool = True) -> float:
    """Load each checkpoint whole, add ``c * tensor`` into FP32 accumulators (no output written).

    ``in_place``: ``acc.add_(tensor.float(), alpha=c)``, the fastest way to write it; otherwise
    ``acc = acc + c * tensor.float()``, as averaging scripts do (musubi-tuner's post-hoc EMA, fairseq).
    """
    start = time.perf_counter()
    acc: dict[str, torch.Tensor] = {}
    for path, coef in zip(paths, coefficients):
        state = load_file(str(path))
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                acc[name] = tensor
            elif name not in acc:
                acc[name] = tensor.to(torch.float32).mul_(coef)
            elif in_place:
                acc[name].add_(tensor.to(torch.float32), alpha=coef)
            else:
                acc[name] = acc[name] + coef * tensor.float()
        del state
    result = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in acc.items()}
    del result, acc
    return time.perf_counter() - start


class _NullSink:
    def write(self, name: str, data: torch.Tensor) -> None:
        pass


def engine_pass(series: Path, targets: list[str], kernel: str) -> float:
    """The engine alone, in this process: ckpt-ema's MergePass with the outputs discarded."""
    from ckpt_ema import plan_merge
    from ckpt_ema.engine.merge_pass import MergePass

    options: dict[str, list[float]] = {}
    for flag, value in zip(targets[::2], targets[1::2]):
        options.setdefault(flag.lstrip("-").replace("-", "_"), []).append(float(value))
    plan = plan_merge([series], **options)
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


def run_cli(args: list[str]) -> tuple[float, int]:
    """Run ``python -m ckpt_ema ARGS``; return (seconds, peak anonymous RSS in bytes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt_ema", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_anon_kb(proc.pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"ckpt-ema {' '.join(args)} failed:\n{stderr.decode(errors='replace')}")
    return elapsed, peak * 1024


def best(runs: int, fn, *args):
    """Best time of ``runs`` calls; for ckpt-ema runs also the largest peak RSS seen."""
    results = [fn(*args) for _ in range(runs)]
    if isinstance(results[0], tuple):
        return min(r[0] for r in results), max(r[1] for r in results)
    return min(results), None


def bench_size(folder: Path, count: int, size_mb: int, repeat: int, extra: list[str]) -> dict[str, object]:
    series = folder / f"series-{size_mb}mb"
    print(f"generating {count} x {size_mb} MB BF16 checkpoints in {series} ...", file=sys.stderr, flush=True)
    paths = make_series(series, count, size_mb << 20)
    input_bytes = sum(p.stat().st_size for p in paths)
    out = folder / f"out-{size_mb}mb"
    # Warm the page cache (every measured run reads cached data, as the limit assumes).
    read_pass(paths)
    sys.path.insert(0, str(ROOT))
    from ckpt_ema import plan_merge

    coefficients = list(plan_merge([series], decay=[0.999]).outputs[0].coefficients)

    rows: dict[str, dict[str, float | None]] = {}
    print("  read ...", file=sys.stderr, flush=True)
    rows["read"] = {"seconds": best(repeat, read_pass, paths)[0]}
    print("  naive ...", file=sys.stderr, flush=True)
    rows["naive"] = {"seconds": best(repeat, naive_pass, paths, coefficients)[0]}
    rows["naive, script-style"] = {"seconds": best(repeat, naive_pass, paths, coefficients, False)[0]}
    from ckpt_ema.engine import fused

    print("  engine ...", file=sys.stderr, flush=True)
    for kernel in ["torch"] + (["fused"] if fused.AVAILABLE else []):
        for label, targets in (("1 target", TARGETS_1), ("4 targets", TARGETS_4)):
            engine_pass(series, targets, kernel)  # warm-up (numba compiles or loads its cache)
            rows[f"engine {kernel} {label}"] = {"seconds": best(repeat, engine_pass, series, targets, kernel)[0]}
    print("  ckpt-ema ...", file=sys.stderr, flush=True)
    startup, startup_rss = best(repeat, run_cli, ["plan", str(series), *TARGETS_1])
    rows["startup"] = {"seconds": startup, "peak_rss": startup_rss}
    runs = [
        (f"ckpt-ema {n}{suffix}", t, flags)
        for suffix, flags in (("", []), (" --no-hash", ["--no-hash"]))
        for n, t in (("1 target", TARGETS_1), ("4 targets", TARGETS_4))
    ]
    for label, targets, flags in runs:
        dest = out / ("one.safetensors" if targets is TARGETS_1 else "four")
        args = ["merge", str(series), *targets, "-o", str(dest), "--force", "-q", *flags, *extra]
        seconds, rss = best(repeat, run_cli, args)
        rows[label] = {"seconds": seconds, "pass_seconds": max(seconds - startup, 1e-9), "peak_rss": rss}
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(series, ignore_errors=True)

    read_s, naive_s = rows["read"]["seconds"], rows["naive"]["seconds"]
    for row in rows.values():
        t = row.get("pass_seconds") or row["seconds"]
        row["gb_per_s"] = input_bytes / t / 1e9
        row["x_read"] = t / read_s
        row["naive_x"] = naive_s / t
        row["script_x"] = rows["naive, script-style"]["seconds"] / t
    one, four = rows["ckpt-ema 1 target"], rows["ckpt-ema 4 targets"]
    engine_ratios = {
        kernel: rows[f"engine {kernel} 4 targets"]["seconds"] / rows[f"engine {kernel} 1 target"]["seconds"]
        for kernel in ("torch", "fused")
        if f"engine {kernel} 1 target" in rows
    }
    return {
        "count": count,
        "size_mb": size_mb,
        "input_bytes": input_bytes,
        "tensors_per_checkpoint": len(layout(size_mb << 20)) + 1,
        "rows": rows,
        "four_over_one": four["pass_seconds"] / one["pass_seconds"],
        "four_over_one_no_hash": rows["ckpt-ema 4 targets --no-hash"]["pass_seconds"]
        / rows["ckpt-ema 1 target --no-hash"]["pass_seconds"],
        "engine_four_over_one": engine_ratios,
    }


def print_table(result: dict[str, object]) -> None:
    rows = result["rows"]
    print(
        f"\n{result['count']} x {result['size_mb']} MB BF16 ({result['input_bytes'] / 1e9:.2f} GB read, "
        f"{result['tensors_per_checkpoint']} tensors per checkpoint)"
    )
    header = (
        f"{'':30} {'wall s':>7} {'pass s':>7} {'GB/s':>6} {'x read':>6} {'naive/x':>7} {'script/x':>8} "
        f"{'peak anon RSS':>13}"
    )
    print(header)
    print("-" * len(header))
    for label, row in rows.items():
        rss = f"{row['peak_rss'] / 2**20:10.0f} MB" if row.get("peak_rss") is not None else ""
        if label == "startup":
            print(
                f"{'startup (ckpt-ema plan)':30} {row['seconds']:7.3f} {'':>7} {'':>6} {'':>6} {'':>7} {'':>8} {rss:>13}"
            )
            continue
        pass_s = row.get("pass_seconds", row["seconds"])
        print(
            f"{label:30} {row['seconds']:7.3f} {pass_s:7.3f} {row['gb_per_s']:6.2f} {row['x_read']:6.1f} "
            f"{row['naive_x']:7.2f} {row['script_x']:8.2f} {rss:>13}"
        )
    print(
        f"4 targets / 1 target: ckpt-ema pass {result['four_over_one']:.2f}"
        f" (--no-hash {result['four_over_one_no_hash']:.2f})",
        end="",
    )
    for kernel, ratio in result["engine_four_over_one"].items():
        print(f", engine {kernel} {ratio:.2f}", end="")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-mb", default="128,256", help="checkpoint sizes in MB, comma-separated (default 128,256)"
    )
    parser.add_argument("--count", type=int, default=8, help="checkpoints per series (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the best is kept (default 3)")
    parser.add_argument(
        "--dir", type=Path, help="where to write the series (default: /dev/shm if it fits, else TMPDIR)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--merge-args", default="", help="extra arguments for every ckpt-ema merge run")
    args = parser.parse_args()
    sizes = [int(s) for s in args.size_mb.split(",") if s]
    needed = args.count * max(sizes) * (1 << 20) * 3.5  # series + 1 + 4 outputs
    base = args.dir
    if base is None:
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 2 * needed else None
    results = []
    with tempfile.TemporaryDirectory(prefix="ckpt-ema-bench-", dir=base) as tmp:
        for size in sizes:
            results.append(bench_size(Path(tmp), args.count, size, args.repeat, args.merge_args.split()))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; folder {base or tempfile.gettempdir()}"
    )
    for result in results:
        print_table(result)
    if len(results) > 1:
        speeds = ", ".join(f"{r['size_mb']} MB: {r['rows']['ckpt-ema 1 target']['gb_per_s']:.2f} GB/s" for r in results)
        print(f"\nlinearity (1 target): {speeds}")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
