"""``ckpt-ema batch``: re-average many old runs, one series per run folder."""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from ckpt_ema.cli import main
from ckpt_ema.cli.common import (
    allow_overflow_option,
    plan_options,
    progress_bar,
    say,
    say_lines,
    series_options,
    split_target_lists,
    target_values,
    user_errors,
    warn,
)
from ckpt_ema.jobs.batch import RunTask, execute, prepare, run_tasks
from ckpt_ema.plan.targets import parse_targets
from ckpt_ema.report.escape import printable


class _Stopped(Exception):
    """Raised in the worker threads once the batch is interrupted."""


@main.command()
@series_options
@click.option(
    "-o", "--output", "out_root", required=True, type=click.Path(path_type=Path), help="OUT_ROOT: one folder per run."
)
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True, help="Runs computed at once.")
@click.option("--force", is_flag=True, help="Recompute outputs that already exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@allow_overflow_option
@user_errors
def batch(out_root: Path, jobs: int, force: bool, quiet: bool, allow_overflow: bool, **options: Any) -> None:
    """Re-average many runs: each RUN_DIR is a series of checkpoints, and its EMAs go to
    OUT_ROOT/<run name>/<target>.safetensors.

    Target options take comma lists and can be repeated. A run that fails (a corrupt file, no steps, ...)
    is reported at the end and does not stop the others; the exit code is then 1. Outputs that already
    exist are skipped unless --force, so an interrupted batch can simply be run again.

    \b
    Examples:
      ckpt-ema batch runs/*/ --decay 0.999,0.9999 --sigma-rel 0.05,0.1 -o ema/
      ckpt-ema batch old/run-a old/run-b --half-life 2000 --init base.safetensors -o ema/ --jobs 2
    """
    if options["steps"] is not None:
        raise click.UsageError("--steps cannot be used with batch: each run has its own steps")
    split_target_lists(options)
    parse_targets(**target_values(options))  # bad targets: stop now
    tasks = run_tasks(options.pop("inputs"), out_root)
    run_options = plan_options(options)
    del run_options["steps"]  # refused above: each run has its own steps
    for task in tasks:
        prepare(task, force=force, **run_options)
        for warning in task.plan.warnings if task.plan is not None else ():
            say(f"warning: {task.name}: {warning}", err=True)
    pending = [t for t in tasks if t.plan is not None]
    with progress_bar(sum(t.total_bytes for t in pending), "batch", quiet) as bar:
        lock = threading.Lock()
        stop = threading.Event()

        def advance(done: int) -> None:
            if stop.is_set():  # Ctrl-C in the main thread: the other runs stop too (their temp files removed)
                raise _Stopped()
            with lock:
                bar.update(done)

        def run(task: RunTask) -> None:
            execute(task, advance, lambda message: warn(f"{task.name}: {message}"), allow_overflow)
            if task.error:
                tqdm.write(printable(f"{task.name}: failed: {task.error}"), file=sys.stderr)

        if jobs == 1:
            for task in pending:
                run(task)
        else:
            pool = ThreadPoolExecutor(max_workers=jobs)
            try:
                for future in [pool.submit(run, task) for task in pending]:
                    future.result()
            except BaseException:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown()
    if options["as_json"]:
        click.echo(json.dumps([_task_json(t) for t in tasks], indent=2))
    else:
        say_lines(describe_batch(tasks, out_root))
    failed = [t for t in tasks if t.error is not None]
    if failed:
        names = ", ".join(t.name for t in failed)
        raise click.ClickException(printable(f"{len(failed)} of {len(tasks)} runs failed: {names}"))


for _param in batch.params:  # the shared INPUTS argument: here each one is a run folder
    if _param.name == "inputs":
        _param.metavar = "RUN_DIR..."


def describe_batch(tasks: list[RunTask], out_root: Path) -> list[str]:
    """The summary table: one row per run (status, outputs written and skipped, seconds, reason)."""
    rows = [["run", "status", "written", "skipped", "time", "reason"]]
    for t in tasks:
        reason = t.error or ("already written (--force to redo)" if t.status == "skipped" else "")
        rows.append([t.name, t.status, str(len(t.written)), str(len(t.skipped)), f"{t.seconds:.1f}s", reason])
    widths = [max(len(r[k]) for r in rows) for k in range(5)]
    lines = ["  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), *(c.rjust(w) for c, w in zip(r[2:5], widths[2:])), r[5]]).rstrip() for r in rows]  # fmt: skip
    counts = {s: sum(t.status == s for t in tasks) for s in ("done", "skipped", "failed")}
    lines.append("")
    lines.append(
        f"{len(tasks)} runs: {counts['done']} done, {counts['skipped']} already complete, {counts['failed']} failed; "
        f"outputs in {out_root}/<run>/"
    )
    return lines


def _task_json(t: RunTask) -> dict[str, Any]:
    return {
        "run": t.name,
        "path": str(t.run_dir),
        "output": str(t.out_dir),
        "status": t.status,
        "written": [str(p) for p in t.written],
        "skipped": [str(p) for p in t.skipped],
        "error": t.error,
        "seconds": t.seconds,
    }
