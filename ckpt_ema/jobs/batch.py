"""Re-average many old runs: each run folder is a series, its outputs go to ``OUT_ROOT/<run name>/``.

A run is planned from its headers (``jobs.merge.plan_merge``), reduced to the outputs not written yet, and written
by one ``jobs.merge.MergeJob`` pass. A run that fails (corrupt file, no steps, ...) is recorded with its reason and
does not stop the others. Outputs are written atomically, so an existing one is complete and is skipped
unless ``force``: an interrupted batch can simply be run again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ckpt_ema.engine.merge_pass import bytes_read
from ckpt_ema.errors import CkptEmaError, InputError
from ckpt_ema.jobs.merge import MergeJob, plan_merge
from ckpt_ema.output.paths import paths_in_folder
from ckpt_ema.plan.model import Plan


@dataclass
class RunTask:
    """One run of the batch: its folder, where its outputs go, and what is left to compute."""

    name: str
    run_dir: Path
    out_dir: Path
    plan: Plan | None = None  # only the outputs still to write; None when the run failed or is complete
    paths: list[Path] = field(default_factory=list)  # where the plan's outputs go
    skipped: list[Path] = field(default_factory=list)  # outputs already written
    written: list[Path] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    total_bytes: int = 0  # what the pass will read, for a progress bar

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "done" if self.written else "skipped"


def run_tasks(run_dirs: Sequence[str | os.PathLike], out_root: str | os.PathLike) -> list[RunTask]:
    """One task per run folder, named after the folder; raise ``InputError`` for a non-folder or a repeated name."""
    tasks: list[RunTask] = []
    seen: dict[str, Path] = {}
    for run_dir in run_dirs:
        path = Path(run_dir)
        if not path.is_dir():
            raise InputError(f"{path}: not a folder; batch takes run folders (each one a series of checkpoints)")
        name = Path(os.path.abspath(path)).name
        if name in seen:
            raise InputError(
                f"{seen[name]} and {path} have the same name {name!r}: their outputs would both go to "
                f"{Path(out_root) / name}; rename one or run them in two batches"
            )
        seen[name] = path
        tasks.append(RunTask(name, path, Path(out_root) / name))
    return tasks


def prepare(task: RunTask, force: bool = False, **options: object) -> None:
    """Plan the run (headers only) and keep the outputs not written yet; a failure is stored in ``task.error``.

    ``options`` are those of :func:`ckpt_ema.jobs.merge.plan_merge` (targets, ``init``, ``interp``, ``dtype``, ...).
    """
    try:
        plan = plan_merge([task.run_dir], **options)  # type: ignore[arg-type]
        paths = paths_in_folder(plan, task.out_dir, force=True)
        todo = [i for i, path in enumerate(paths) if force or not path.exists()]
        task.skipped = [p for i, p in enumerate(paths) if i not in todo]
        if todo:
            done = [plan.outputs[i].name for i in range(len(paths)) if i not in todo]
            warnings = tuple(w for w in plan.warnings if not any(w.startswith(f"{name}: ") for name in done))
            task.plan = replace(plan, outputs=tuple(plan.outputs[i] for i in todo), warnings=warnings)
            task.paths = [paths[i] for i in todo]
            task.total_bytes = bytes_read(task.plan)
    except Exception as exc:  # any failure is this run's alone: reported, and the others go on
        task.error = _reason(exc)


def execute(
    task: RunTask,
    on_bytes: Callable[[int], None] = lambda n: None,
    on_warning: Callable[[str], None] | None = None,
    allow_overflow: bool = False,
) -> None:
    """Write the run's missing outputs in one pass; a failure is stored in ``task.error`` (no file left).
    ``allow_overflow``: see ``MergeJob``."""
    if task.plan is None or task.error is not None:
        return
    start = time.perf_counter()
    try:
        with MergeJob(task.plan, task.paths, on_warning=on_warning, allow_overflow=allow_overflow) as job:
            for done in job:
                on_bytes(done)
            task.written = job.commit()
    except Exception as exc:  # any failure is this run's alone: reported, and the others go on
        task.error = _reason(exc)
    task.seconds = time.perf_counter() - start


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CkptEmaError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    return f"unexpected error ({type(exc).__name__}: {exc}); please report it"
