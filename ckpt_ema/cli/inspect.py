"""``ckpt-ema inspect``: what the tool understood of each checkpoint, before it reads any tensor data."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from ckpt_ema.cli import main
from ckpt_ema.cli.common import (
    plan_from,
    plan_options,
    say,
    say_lines,
    series_options,
    split_target_lists,
    target_values,
    user_errors,
)
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.io import CheckpointSource, FileNote, is_lora_alpha, open_checkpoint
from ckpt_ema.io.links import copy_problems
from ckpt_ema.math.reconstruct import tracked_gammas
from ckpt_ema.series.discover import discover_inputs
from ckpt_ema.series.load import Checkpoint, checkpoint_step, load_series
from ckpt_ema.series.snapshots import load_snapshots
from ckpt_ema.series.steps import StepInfo


def describe_source(source: CheckpointSource, info: StepInfo | None = None) -> dict[str, Any]:
    """A checkpoint's format, step (``info``, or found from the checkpoint alone), tensors and files, as plain
    data (headers only)."""
    try:
        info = info or checkpoint_step(source.path, source)
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
        "refused": copy_problems(source.path, source.copied) if source.is_folder else [],
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
    same = previous is not None and all(previous.get(k) == entry[k] for k in ("ignored", "copied", "refused"))
    if same and (entry["ignored"] or entry["copied"]) and not entry["refused"]:
        counts = f"{len(entry['ignored'])} ignored, {len(entry['copied'])} copied"
        lines.append(f"  files       as above ({counts})")
        return lines
    for item in entry["ignored"]:
        lines.append(f"  ignored     {item['path']}: {item['reason']}")
    if entry["copied"]:
        lines.append(f"  copied      {', '.join(entry['copied'])}  (into a folder output, from the newest)")
    for problem in entry["refused"]:
        lines.append(f"  refused     {problem}")
    return lines


@main.command("inspect")
@series_options
@user_errors
def inspect_command(**options: Any) -> None:
    """List the checkpoints found, each one's step and where it came from, format, dtypes, size,
    and the files that are ignored and why. Reads headers only. Exits 1 when the inputs do not form a
    series that merge would accept. Takes every option plan takes (--steps, --every, --init,
    --tracked-sigma-rel, --key, --component, targets, ...), so that it checks the series plan would read.

    \b
    Examples:
      ckpt-ema inspect output/            # a folder of checkpoint files or checkpoint-N/ folders
      ckpt-ema inspect workspace/backup/ --component unet
      ckpt-ema inspect train/ --every 500  # timm: checkpoint-N is an epoch
      ckpt-ema inspect post-hoc-ema-checkpoints/ --tracked-sigma-rel 0.05,0.28
    """
    split_target_lists(options)
    inputs, as_json = options["inputs"], options["as_json"]
    kwargs = plan_options(options)  # checks --every/--steps/--first usage first
    skipped: list[FileNote] = []
    paths = discover_inputs(inputs, skipped)
    try:
        series = _series(inputs, kwargs, skipped)
        if any(target_values(options).values()):
            plan_from(options)  # the targets, --at, --interp, --dtype as plan checks them
        entries = [describe_source(c.source, c.step_info) for c in series]
        ok = True
        snapshots = "snapshots" if kwargs["tracked_sigma_rel"] or kwargs["tracked_gamma"] else "checkpoints"
        verdict = f"ok: {len(series)} {snapshots}, steps {series[0].step} to {series[-1].step}, same tensors"
        if entries[-1]["refused"]:  # only the newest checkpoint's files are copied
            ok = False
            verdict = (
                "problem: a folder output copies the newest checkpoint's files, and some are refused (see above); "
                "fix them, or merge with --format safetensors"
            )
    except CkptEmaError as exc:
        entries = _each_alone(paths, kwargs)
        unreadable = sum("unreadable" in e for e in entries)
        ok = False
        verdict = f"problem: {unreadable} checkpoint(s) cannot be read (see above)" if unreadable else f"problem: {exc}"
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


def _series(inputs: Any, kwargs: dict[str, Any], skipped: list[FileNote]) -> list[Checkpoint]:
    """The series as plan reads it (raw checkpoints, or EMA snapshots with --tracked-*), sorted by step."""
    if kwargs["tracked_sigma_rel"] or kwargs["tracked_gamma"]:
        gammas = tracked_gammas(kwargs["tracked_sigma_rel"], kwargs["tracked_gamma"])
        return load_snapshots(inputs, gammas, kwargs["steps"])
    notes: list[FileNote] = []
    series = load_series(
        inputs,
        steps=kwargs["steps"],
        every=kwargs["every"],
        first=kwargs["first"],
        init=kwargs["init"],
        per_checkpoint=kwargs["per_checkpoint"],
        key=kwargs["key"],
        component=kwargs["component"],
        allow_mixed_runs=kwargs["allow_mixed_runs"],
        skipped=notes,
    )
    known = {n.relpath for n in skipped}
    skipped.extend(n for n in notes if n.relpath not in known)
    return series


def _each_alone(paths: list[Path], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Each checkpoint on its own, its step found from it alone (when the series as a whole is refused)."""
    entries = []
    for path in paths:
        try:
            entries.append(describe_source(open_checkpoint(path, kwargs["key"], kwargs["component"])))
        except CkptEmaError as exc:  # shown in its place
            entries.append({"path": str(path), "step": None, "unreadable": str(exc)})
    entries.sort(key=lambda e: (e["step"] is None, e["step"] if e["step"] is not None else 0, e["path"]))
    return entries
