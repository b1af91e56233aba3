"""The DCP row of `make bench`: a torch.distributed.checkpoint series, merged to DCP and to safetensors.

A series of ``count`` DCP folders of ``size_mb`` MB of BF16 weights each (the layout of ``bench.layout``),
written with ``torch.distributed.checkpoint.save`` together with an AdamW-like optimizer state of the same
size (the moments, which ckpt-ema skips), then, each as the best of ``repeat`` runs:

- ``read``: one memory-mapped pass touching every value of the ``.distcp`` files (the limit; it reads the
  optimizer entries too, so it is a pessimistic limit: ckpt-ema reads only the model's third);
- ``read model bytes``: the same pass over the model entries' byte ranges only (what a merge must read);
- ``ckpt-ema DCP -> DCP`` and ``DCP -> safetensors``: the CLI (``--no-hash``, one target) as a subprocess.
"""

from __future__ import annotations

import mmap
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_dcp_series(folder: Path, count: int, size_bytes: int, layout: dict[str, tuple[int, ...]]) -> list[Path]:
    """``folder/step-N/`` DCP checkpoints: BF16 model weights under ``model``, FP32 moments under ``optimizer``."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(count):
        model = {name: torch.randn(shape, generator=generator).bfloat16() for name, shape in layout.items()}
        moments = {name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in layout.items()}
        path = folder / f"step-{(index + 1) * 1000}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ...": one process, as meant
            dcp.save({"model": model, "optimizer": {"exp_avg": moments}}, checkpoint_id=str(path))
        paths.append(path)
    return paths


def _touch(path: Path, ranges: list[tuple[int, int]] | None = None) -> None:
    import torch

    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    for start, length in ranges or [(0, len(mm))]:
        begin = start + (-start % 4)
        words = torch.frombuffer(mm, dtype=torch.int32, count=(start + length - begin) // 4, offset=begin)
        if words.numel():
            int(words.max())
        del words
    mm.close()


def model_ranges(paths: list[Path]) -> list[tuple[Path, list[tuple[int, int]]]]:
    """Each ``.distcp`` file and the byte ranges of its model entries (from ``.metadata``)."""
    sys.path.insert(0, str(ROOT))
    from ckpt_ema.io.dcp import model_tensors, read_metadata

    result = []
    for checkpoint in paths:
        by_file: dict[str, list[tuple[int, int]]] = {}
        for tensor in model_tensors(checkpoint, read_metadata(checkpoint))[0].values():
            for chunk in tensor.chunks:
                by_file.setdefault(chunk.relpath, []).append((chunk.offset, chunk.length))
        result.extend((checkpoint / relpath, sorted(ranges)) for relpath, ranges in by_file.items())
    return result


def read_pass(files: list[tuple[Path, list[tuple[int, int]] | None]]) -> float:
    """Touch every 32-bit word of the files (or of the given byte ranges only)."""
    start = time.perf_counter()
    for path, ranges in files:
        _touch(path, ranges)
    return time.perf_counter() - start


def bench_dcp(folder: Path, count: int, size_mb: int, repeat: int, layout_fn, run_cli, best) -> dict[str, object]:
    """Measure the DCP rows; ``layout_fn``, ``run_cli`` and ``best`` are bench.py's own helpers."""
    series = folder / f"dcp-{size_mb}mb"
    print(f"generating {count} x {size_mb} MB BF16 DCP checkpoints in {series} ...", file=sys.stderr, flush=True)
    paths = make_dcp_series(series, count, size_mb << 20, layout_fn(size_mb << 20))
    sys.path.insert(0, str(ROOT))
    from ckpt_ema.io.dcp import open_dcp

    model_bytes = sum(sum(t.nbytes for t in open_dcp(p).tensors.values()) for p in paths)
    file_bytes = sum(f.stat().st_size for p in paths for f in p.glob("*.distcp"))
    every = [(f, None) for p in paths for f in sorted(p.glob("*.distcp"))]
    model = model_ranges(paths)
    read_pass(every)  # warm the page cache
    rows: dict[str, dict[str, float | None]] = {
        "read (all .distcp bytes)": {"seconds": best(repeat, read_pass, every)[0], "bytes": file_bytes},
        "read (model entries only)": {"seconds": best(repeat, read_pass, model)[0], "bytes": model_bytes},
    }
    startup, startup_rss = best(repeat, run_cli, ["plan", str(series), "--decay", "0.999"])
    rows["startup (ckpt-ema plan)"] = {"seconds": startup, "peak_rss": startup_rss}
    out = folder / f"dcp-out-{size_mb}mb"
    for label, dest, fmt in (
        ("ckpt-ema DCP -> DCP", out / "ema", "dcp"),
        ("ckpt-ema DCP -> safetensors", out / "ema.safetensors", "safetensors"),
    ):
        args = ["merge", str(series), "--decay", "0.999", "-o", str(dest), "--format", fmt, "--force", "-q"]
        seconds, rss = best(repeat, run_cli, [*args, "--no-hash"])
        rows[label] = {"seconds": seconds, "pass_seconds": max(seconds - startup, 1e-9), "peak_rss": rss}
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(series, ignore_errors=True)
    for label, row in rows.items():
        if label.startswith("startup"):
            continue
        seconds = row.get("pass_seconds") or row["seconds"]
        row["gb_per_s"] = float(row.get("bytes") or model_bytes) / seconds / 1e9  # type: ignore[arg-type]
    return {"count": count, "size_mb": size_mb, "model_bytes": model_bytes, "file_bytes": file_bytes, "rows": rows}


def print_dcp(result: dict[str, object]) -> None:
    rows: dict[str, dict[str, float]] = result["rows"]  # type: ignore[assignment]
    print(
        f"\nDCP: {result['count']} x {result['size_mb']} MB BF16 model weights "
        f"({result['model_bytes'] / 1e9:.2f} GB of model entries read, {result['file_bytes'] / 1e9:.2f} GB of "
        ".distcp files with the optimizer moments)"
    )
    header = f"{'':32} {'wall s':>7} {'pass s':>7} {'GB/s':>6} {'peak anon RSS':>13}"
    print(header)
    print("-" * len(header))
    for label, row in rows.items():
        rss = f"{row['peak_rss'] / 2**20:10.0f} MB" if row.get("peak_rss") is not None else ""
        pass_s = f"{row['pass_seconds']:7.3f}" if "pass_seconds" in row else ""
        speed = f"{row['gb_per_s']:6.2f}" if "gb_per_s" in row else ""
        print(f"{label:32} {row['seconds']:7.3f} {pass_s:>7} {speed:>6} {rss:>13}")
