"""``ckpt-ema sweep``: every candidate EMA in one pass, scored by the user's evaluation command.

Also the helpers the sweep, batch and doctor commands share: comma lists for targets, the progress bar.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from ckpt_ema.cli import main
from ckpt_ema.cli.common import (
    allow_overflow_option,
    plan_from,
    run_pass,
    say,
    say_lines,
    series_options,
    split_target_lists,
    user_errors,
    warn,
)
from ckpt_ema.errors import OutputError
from ckpt_ema.jobs.merge import MergeJob
from ckpt_ema.jobs.sweep import (
    SweepResult,
    candidates_from_plan,
    describe_sweep,
    discard_others,
    evaluate,
    pick_best,
    sweep_json,
)
from ckpt_ema.output.paths import paths_in_folder
from ckpt_ema.output.writer import write_json_atomic
from ckpt_ema.report.escape import printable
from ckpt_ema.report.plots import plot_scores, require_matplotlib


def make_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file; -o must be a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None


@main.command()
@series_options
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Folder for the candidates and sweep.json."
)
@click.option("--eval", "eval_command", metavar="CMD", help="Score each candidate: a command with {path}, e.g. 'python eval.py {path}'; the score is the last number it prints. It runs without a shell, {path} as one argument however it is quoted; for pipes, call sh yourself with the path as $1: sh -c '... \"$1\" | ...' sh {path}.")  # fmt: skip
@click.option("--minimize/--maximize", default=True, show_default=True, help="Whether a lower or a higher score is better.")  # fmt: skip
@click.option(
    "--keep",
    type=click.Choice(["all", "best"]),
    default="all",
    show_default=True,
    help="best: delete the other candidates' files after scoring (needs --eval).",
)
@click.option("--plot", is_flag=True, help="Also write OUTPUT/sweep.png: score against half-life (needs matplotlib).")
@click.option("--force", is_flag=True, help="Replace existing candidate files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@allow_overflow_option
@user_errors
def sweep(
    output: Path,
    eval_command: str | None,
    minimize: bool,
    keep: str,
    plot: bool,
    force: bool,
    quiet: bool,
    allow_overflow: bool,
    **options: Any,
) -> None:
    """Write many EMA candidates in one pass, score each with your evaluation, and pick the best.

    Each target option takes a comma list and can be repeated. The candidates go to OUTPUT/ named after
    their targets (decay-0.99.safetensors, sigma_rel-0.1.safetensors, ...); OUTPUT/sweep.json records
    them with their coefficients and scores.

    \b
    Examples:
      ckpt-ema sweep runs/ --decay 0.99,0.995,0.999 --sigma-rel 0.05,0.1,0.2 -o sweep/
      ckpt-ema sweep runs/ --sigma-rel 0.05,0.1 -o sweep/ --eval "python eval.py {path}" --keep best
      ckpt-ema sweep runs/ --half-life 100,500 -o sweep/ --eval "./score.sh {path}" --maximize --plot
    """
    if keep == "best" and not eval_command:
        raise click.UsageError("--keep best needs --eval (the scores decide which candidate is best)")
    if eval_command is not None and "{path}" not in eval_command:
        raise click.UsageError("--eval: the command must contain {path}, replaced by each candidate's path")
    if eval_command is not None:
        try:
            shlex.split(eval_command)
        except ValueError as exc:
            raise click.UsageError(f"--eval: cannot split the command into words ({exc})") from None
    if plot and not eval_command:
        raise click.UsageError("--plot needs --eval (it plots the scores)")
    if plot:
        require_matplotlib()  # before the pass, not after it
    split_target_lists(options)
    plan = plan_from(options)
    make_folder(output)
    paths = paths_in_folder(plan, output, force=force)
    for warning in plan.warnings:
        say(f"warning: {warning}", err=True)
    with MergeJob(plan, paths, on_warning=warn, allow_overflow=allow_overflow) as job:
        run_pass(job, job.total_bytes, "sweep", quiet)
        job.commit()

    result = SweepResult(plan, candidates_from_plan(plan, paths), eval_command, maximize=not minimize)
    deleted: list[Path] = []
    if eval_command:
        for candidate in tqdm(result.candidates, desc="eval", disable=True if quiet else None, file=sys.stderr):
            candidate.score, candidate.error = evaluate(eval_command, candidate.path)
            if candidate.error:
                tqdm.write(printable(f"eval failed for {candidate.name}: {candidate.error}"), file=sys.stderr)
        result.best = pick_best(result.candidates, result.maximize)
        if keep == "best":
            deleted = discard_others(result)
    write_json_atomic(output / "sweep.json", sweep_json(result))
    if plot and result.best is not None:
        scored = result.candidates
        plot_scores(
            [c.half_life for c in scored],
            [c.score for c in scored],
            [c.name for c in scored],
            [c.kind for c in scored],
            result.best,
            output / "sweep.png",
            ylabel=f"score ({result.direction}d)",
        )
    if options["as_json"]:
        click.echo(json.dumps(sweep_json(result), indent=2))
    else:
        say_lines(describe_sweep(result))
        removed = f" ({len(deleted)} deleted by --keep best)" if deleted else ""
        plotted = f" and {output / 'sweep.png'}" if plot and result.best is not None else ""
        say()
        say(f"wrote {len(paths)} candidates{removed}, {output / 'sweep.json'}{plotted}")
        if result.best is not None:
            best = result.candidates[result.best]
            say(f"best: {best.name} (score {best.score:.6g}, {result.direction}d) -> {best.path}")
    if eval_command and result.best is None:
        raise click.ClickException(
            printable(f"every evaluation failed; see the messages above and {output / 'sweep.json'}")
        )
