"""The ``ckpt-ema`` command line: the only module that imports click or tqdm."""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from . import __version__
from .api import MergeJob, output_paths, plan_merge
from .errors import CkptEmaError
from .plan import OUTPUT_DTYPES, Plan
from .report import describe_output, describe_plan


class _StepList(click.ParamType):
    """``100,200,300``: one step per input."""

    name = "S0,S1,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            steps = [int(part) for part in str(value).replace(" ", "").split(",") if part]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of whole steps", param, ctx)
        if any(s < 0 for s in steps):
            self.fail("steps must be >= 0", param, ctx)
        return steps


class _Terminated(Exception):
    """SIGTERM arrived; unwinds like Ctrl-C so temporary files are removed."""


def _series_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Inputs and targets, shared by ``merge`` and ``plan``."""
    options = [
        click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path)),
        click.option(
            "--decay", multiple=True, metavar="BETA", help="Classic EMA decay per optimizer step, e.g. 0.999."
        ),
        click.option(
            "--half-life", "half_life", multiple=True, metavar="STEPS", help="Classic EMA by its half-life in steps."
        ),
        click.option(
            "--sigma-rel",
            "sigma_rel",
            multiple=True,
            metavar="SIGMA",
            help="Power-function EMA (EDM2) by relative width, 0 < SIGMA < 0.2887.",
        ),
        click.option("--gamma", multiple=True, metavar="GAMMA", help="Power-function EMA by its exponent (> 0)."),
        click.option(
            "--at",
            type=click.IntRange(min=0),
            metavar="STEP",
            help="The EMA as of this step (a checkpoint's); later ones are ignored.",
        ),
        click.option(
            "--steps", type=_StepList(), help="Steps of the inputs, in the order given (overrides detection)."
        ),
        click.option("--per-checkpoint", is_flag=True, help="Each checkpoint is one EMA update (ignores step counts)."),
        click.option(
            "--init",
            type=click.Path(path_type=Path),
            metavar="PATH",
            help="Weights at step 0, e.g. the base model a fine-tune started from.",
        ),
        click.option(
            "--interp",
            type=click.Choice(["linear", "hold"]),
            default="linear",
            show_default=True,
            help="How weights move between checkpoints.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(list(OUTPUT_DTYPES)),
            default="same",
            show_default=True,
            help="Dtype of averaged tensors in the output.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _plan_from(options: dict[str, Any]) -> Plan:
    return plan_merge(
        options["inputs"],
        decay=options["decay"],
        half_life=options["half_life"],
        sigma_rel=options["sigma_rel"],
        gamma=options["gamma"],
        at=options["at"],
        steps=options["steps"],
        init=options["init"],
        interp=options["interp"],
        per_checkpoint=options["per_checkpoint"],
        dtype=options["dtype"],
    )


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ckpt-ema errors into one line and exit 1; Ctrl-C into exit 130, SIGTERM into exit 143."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def on_sigterm(signum: int, frame: Any) -> None:
            raise _Terminated()

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return command(*args, **kwargs)
        except CkptEmaError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("ckpt-ema: interrupted; no output written, temporary files removed", err=True)
            sys.exit(130)
        except _Terminated:
            click.echo("ckpt-ema: terminated; no output written, temporary files removed", err=True)
            sys.exit(143)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpt-ema")
def main() -> None:
    """Post-hoc EMA of training checkpoints: choose the EMA decay after training."""


@main.command()
@_series_options
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Output file (one target) or folder (several).",
)
@click.option("--force", is_flag=True, help="Replace existing output files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@_user_errors
def merge(output: Path, force: bool, quiet: bool, **options: Any) -> None:
    """Write the EMA of a checkpoint series for each target, in one pass over the files.

    \b
    Examples:
      ckpt-ema merge runs/*.safetensors --decay 0.999 -o ema.safetensors
      ckpt-ema merge runs/ --decay 0.99 --decay 0.999 --sigma-rel 0.10 -o out/
      ckpt-ema merge runs/ --half-life 500 --init base.safetensors -o ema.safetensors
    """
    plan = _plan_from(options)
    paths = output_paths(plan, output, force=force)
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)

    def warn(message: str) -> None:
        tqdm.write(f"warning: {message}", file=sys.stderr)

    with MergeJob(plan, paths, on_warning=warn) as job:
        with tqdm(
            total=job.total_bytes,
            unit="B",
            unit_scale=True,
            desc="merge",
            disable=True if quiet else None,
            file=sys.stderr,
        ) as bar:
            for done in job:
                bar.update(done)
        job.commit()
    if options["as_json"]:
        summary = plan.to_json()
        for entry, path in zip(summary["outputs"], paths):  # type: ignore[union-attr]
            entry["path"] = str(path)
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        for out, path in zip(plan.outputs, paths):
            click.echo(f"wrote {path}  ({describe_output(plan, out)})")


@main.command("plan")
@_series_options
@_user_errors
def plan_command(**options: Any) -> None:
    """Show what merge would compute, reading only the files' headers.

    \b
    Example:
      ckpt-ema plan runs/*.safetensors --half-life 500 --sigma-rel 0.1
    """
    plan = _plan_from(options)
    if options["as_json"]:
        click.echo(json.dumps(plan.to_json(), indent=2))
    else:
        click.echo(describe_plan(plan))
