"""``ckpt-ema inspect``: what the tool understood of each checkpoint, before it reads any tensor data."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from ckpt_ema.cli import main
from ckpt_ema.cli.common import reader_options, say, say_lines, user_errors
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.io import CheckpointSource, FileNote, is_lora_alpha, open_checkpoint
from ckpt_ema.series.discover import discover_inputs
from ckpt_ema.series.load import checkpoint_step, load_series


def describe_source(source: CheckpointSource) -> dict[str, Any]:
    """A checkpoint's format, step, tensors and files, as plain data (headers only)."""
    try:
        info = checkpoint_step(source.path, source)
        step: dict[str, Any] = {"step": info.step, "source": info.source, "ambiguous": info.ambiguous}
    except CkptEmaError as exc:
        step = {"step": None, "error": str(exc)}
    tensors = source.tensors.values()
    dtypes = Counter(t.dtype for t in tensors)
    return {
        "path": str(source.path),
        "format": source.format,
        **step,
        "records": [{"source": s, "step": v} for s, v in source.step_records],
        "tensors": len(source.tensors),
        "float_tensors": sum(t.is_float for n, t in source.tensors.items() if not is_lora_alpha(n)),
        "parameters": sum(t.numel for t in tensors),
        "dtypes": dict(sorted(dtypes.items())),
        "bytes": source.nbytes,
        "files": [f.relpath for f in source.files],
        "components": [p.name for p in source.parts if p.name],
        "ignored": [{"path": n.relpath, "reason": n.reason} for n in source.ignored],
        "copied": list(source.copied),
        "notes": list(source.notes),
        "session": source.metadata.get("ss_session_id"),
    }


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _text(entry: dict[str, Any], previous: dict[str, Any] | None = None) -> list[str]:
    if "unreadable" in entry:
        return [entry["path"], f"  unreadable  {entry['unreadable']}"]
    lines = [entry["path"], f"  format      {entry['format']}"]
    if entry["step"] is None:
        lines.append(f"  step        none: {entry['error']}")
    else:
        flag = "  (ambiguous: kohya names epochs this way)" if entry["ambiguous"] else ""
        lines.append(f"  step        {entry['step']}  from {entry['source']}{flag}")
    dtypes = ", ".join(f"{k} x{v}" for k, v in entry["dtypes"].items())
    lines.append(
        f"  tensors     {entry['tensors']} ({entry['float_tensors']} averaged; {dtypes}), "
        f"{entry['parameters']:,} values, {_size(entry['bytes'])} in {len(entry['files'])} file(s)"
    )
    if entry["components"]:
        lines.append(f"  components  {', '.join(entry['components'])}")
    if entry["session"]:
        lines.append(f"  session     ss_session_id {entry['session']}")
    for note in entry["notes"]:
        lines.append(f"  note        {note}")
    same = previous is not None and all(previous.get(k) == entry[k] for k in ("ignored", "copied"))
    if same and (entry["ignored"] or entry["copied"]):
        counts = f"{len(entry['ignored'])} ignored, {len(entry['copied'])} copied"
        lines.append(f"  files       as above ({counts})")
        return lines
    for item in entry["ignored"]:
        lines.append(f"  ignored     {item['path']}: {item['reason']}")
    if entry["copied"]:
        lines.append(f"  copied      {', '.join(entry['copied'])}  (into a folder output, from the newest)")
    return lines


def _reader_options(command: Any) -> Any:
    for option in reversed(reader_options):
        command = option(command)
    return command


@main.command("inspect")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@_reader_options
@user_errors
def inspect_command(inputs: tuple[Path, ...], as_json: bool, **options: Any) -> None:
    """List the checkpoints found, each one's step and where it came from, format, dtypes, size,
    and the files that are ignored and why. Reads headers only. Exits 1 when the inputs do not form a
    series that merge would accept.

    \b
    Examples:
      ckpt-ema inspect output/            # a folder of checkpoint files or checkpoint-N/ folders
      ckpt-ema inspect workspace/backup/ --component unet
    """
    component = options["component"] or None
    skipped: list[FileNote] = []
    paths = discover_inputs(inputs, skipped)
    entries = []
    for path in paths:
        try:
            entries.append(describe_source(open_checkpoint(path, options["key"], component)))
        except CkptEmaError as exc:  # shown in its place; the series is then not checked
            entries.append({"path": str(path), "step": None, "unreadable": str(exc)})
    entries.sort(key=lambda e: (e["step"] is None, e["step"] if e["step"] is not None else 0, e["path"]))
    unreadable = sum("unreadable" in e for e in entries)
    if unreadable:
        verdict, ok = f"problem: {unreadable} checkpoint(s) cannot be read (see above)", False
    else:
        try:
            series = load_series(
                inputs, key=options["key"], component=component, allow_mixed_runs=options["allow_mixed_runs"]
            )
            verdict = f"ok: {len(series)} checkpoints, steps {series[0].step} to {series[-1].step}, same tensors"
            ok = True
        except CkptEmaError as exc:
            verdict, ok = f"problem: {exc}", False
    if as_json:
        summary = {
            "checkpoints": entries,
            "skipped": [{"path": n.relpath, "reason": n.reason} for n in skipped],
            "series": {"ok": ok, "message": verdict},
        }
        click.echo(json.dumps(summary, indent=2))
        if not ok:
            sys.exit(1)
        return
    for previous, entry in zip([None, *entries], entries):
        say_lines(_text(entry, previous))
    for note in skipped:
        say(f"skipped {note.relpath}: {note.reason}")
    say(f"series: {verdict}")
    if not ok:
        sys.exit(1)
