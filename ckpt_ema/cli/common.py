"""Pieces shared by the commands: option groups, parameter types, error handling."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from ckpt_ema.errors import CkptEmaError, Terminated, raise_terminated, stop_line
from ckpt_ema.jobs.merge import abort_live_jobs, plan_merge
from ckpt_ema.math.ema import INTERPOLATIONS
from ckpt_ema.plan.kinds import OPTIONS as TARGET_OPTIONS
from ckpt_ema.plan.model import OUTPUT_DTYPES, Plan
from ckpt_ema.report.escape import printable, printable_lines
from ckpt_ema.series.lengths import check_per_step, whole_steps_of


class StepList(click.ParamType):
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


class NumberList(click.ParamType):
    """``0.05,0.10``: a list of numbers, checked later where their meaning is known."""

    name = "X0,X1,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> list[str]:
        if isinstance(value, list):
            return value
        return split_lists([value])


def split_lists(values: Iterable[str]) -> list[str]:
    """Repeated options that may each hold a comma list: ``("0.9,0.95", "0.99")`` -> ``["0.9", "0.95", "0.99"]``."""
    return [part for value in values for part in str(value).replace(" ", "").split(",") if part]


def progress_bar(total: int, desc: str, quiet: bool = False) -> tqdm:
    """A bytes progress bar on stderr, silent when piped (or with ``quiet``)."""
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=True if quiet else None, file=sys.stderr)


def run_pass(job: Iterable[int], total: int, desc: str, quiet: bool = False) -> None:
    """Run a streaming pass (an iterable of bytes read) under a progress bar."""
    with progress_bar(total, desc, quiet) as bar:
        for done in job:
            bar.update(done)


def warn(message: str) -> None:
    """A warning on stderr that does not break a progress bar (escaped, like everything printed)."""
    tqdm.write(printable(f"warning: {message}"), file=sys.stderr)


def say(line: str = "", err: bool = False) -> None:
    """Print one line; any control character in it (from a file name, a tensor name, metadata) is shown
    escaped, so that nothing a file holds can act on the terminal or forge a line (report.escape)."""
    click.echo(printable(line), err=err)


def say_lines(lines: Iterable[str], err: bool = False) -> None:
    """Print lines ckpt-ema composed, each escaped on its own."""
    click.echo(printable_lines(list(lines)), err=err)


allow_overflow_option = click.option(
    "--allow-overflow",
    is_flag=True,
    help="Write values beyond the output dtype's range (e.g. --dtype fp16 of weights over 65504) as inf, "
    "with a warning naming the tensors, instead of refusing.",
)

reader_options = [
    click.option(
        "--component",
        multiple=True,
        metavar="NAME",
        help="Folder checkpoints (diffusers, OneTrainer): average only this component, e.g. unet (repeatable).",
    ),
    click.option("--key", metavar="KEY", help="Torch files: the key of the state dict (default: searched, and shown)."),
    click.option(
        "--allow-mixed-runs",
        is_flag=True,
        help="Accept kohya files from different training sessions (ss_session_id).",
    ),
]


def series_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Inputs and targets, shared by ``merge`` and ``plan``."""
    options = [
        click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path)),
        *[
            click.option(option.flag, option.key, multiple=True, metavar=option.metavar, help=option.help)
            for option in TARGET_OPTIONS
        ],
        click.option(
            "--at",
            metavar="STEP",
            help="The EMA as of this step (a checkpoint's; or in tokens/samples: 2Btokens); later ones are ignored.",
        ),
        click.option(
            "--tokens-per-step",
            metavar="N",
            help="Tokens per optimizer step, for lengths in tokens (default: the trainer's record, if any).",
        ),
        click.option(
            "--samples-per-step",
            metavar="N",
            help="Samples per optimizer step (the global batch), for lengths in samples (default: kohya's record).",
        ),
        click.option("--steps", type=StepList(), help="Steps of the inputs, in the order given (overrides detection)."),
        click.option(
            "--every",
            metavar="N",
            help="The inputs are N steps apart, in name order, the first at step N (overrides detection); "
            "also in tokens or samples (2Mtokens, with --tokens-per-step).",
        ),
        click.option("--first", metavar="STEP", help="With --every: the step of the first input (or tokens, samples)."),
        click.option("--per-checkpoint", is_flag=True, help="Each checkpoint is one EMA update (ignores step counts)."),
        click.option(
            "--init",
            type=click.Path(path_type=Path),
            metavar="PATH",
            help="Weights at step 0, e.g. the base model a fine-tune started from.",
        ),
        click.option(
            "--interp",
            type=click.Choice(list(INTERPOLATIONS)),
            default="linear",
            show_default=True,
            help="How weights move between checkpoints.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(list(OUTPUT_DTYPES)),
            default="auto",
            show_default=True,
            help="Dtype of averaged tensors in the output (auto: the inputs' dtype, FP32 for a reconstruction "
            "from EMA snapshots).",
        ),
        click.option(
            "--tracked-sigma-rel",
            type=NumberList(),
            default="",
            metavar="S0,S1,...",
            help="The inputs are EMA snapshots of these power EMAs (EDM2, ema-pytorch PostHocEMA, in the "
            "trainer's order); each target is reconstructed from them.",
        ),
        click.option(
            "--tracked-gamma",
            type=NumberList(),
            default="",
            metavar="G0,G1,...",
            help="As --tracked-sigma-rel, by gamma.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout."),
        *reader_options,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def split_target_lists(options: dict[str, Any]) -> None:
    """``--decay 0.9,0.99 --decay 0.999`` in place: every target option accepts comma lists and repetition."""
    for option in TARGET_OPTIONS:
        options[option.key] = split_lists(options.get(option.key) or ())


def target_values(options: dict[str, Any]) -> dict[str, Any]:
    """The target options of a command's options, by key (``decay``, ``half_life``, ...)."""
    return {option.key: options[option.key] for option in TARGET_OPTIONS}


def plan_options(options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`plan_merge` from the options of ``series_options``."""
    if options.get("every") is not None and options.get("steps") is not None:
        raise click.UsageError("--steps and --every both give the steps; pass one of them")
    if options.get("first") is not None and options.get("every") is None:
        raise click.UsageError("--first needs --every (the spacing of the checkpoints in steps)")
    tokens = check_per_step("--tokens-per-step", options.get("tokens_per_step"))
    samples = check_per_step("--samples-per-step", options.get("samples_per_step"))
    every = whole_steps_of("--every", options.get("every"), tokens, samples)
    first = whole_steps_of("--first", options.get("first"), tokens, samples)
    if every is not None and every < 1:
        raise click.BadParameter(f"{options['every']}: the spacing must be at least 1 step", param_hint="--every")
    return {
        "every": every,
        "first": first,
        **target_values(options),
        "at": options["at"],
        "tokens_per_step": options["tokens_per_step"],
        "samples_per_step": options["samples_per_step"],
        "steps": options["steps"],
        "init": options["init"],
        "interp": options["interp"],
        "per_checkpoint": options["per_checkpoint"],
        "dtype": options["dtype"],
        "key": options["key"],
        "component": options["component"] or None,
        "allow_mixed_runs": options["allow_mixed_runs"],
        "tracked_sigma_rel": options["tracked_sigma_rel"],
        "tracked_gamma": options["tracked_gamma"],
    }


def plan_from(options: dict[str, Any]) -> Plan:
    return plan_merge(options["inputs"], **plan_options(options))


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ckpt-ema errors into one line and exit 1; Ctrl-C into exit 130, SIGTERM into exit 143.

    On Ctrl-C or SIGTERM every job still writing is aborted (its temporary files removed) before the line
    is printed, with further signals held off meanwhile, whatever moment the signal arrived at.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
        try:
            return command(*args, **kwargs)
        except CkptEmaError as exc:
            raise click.ClickException(printable(str(exc))) from None
        except (KeyboardInterrupt, Terminated) as exc:
            _without_signals(abort_live_jobs)
            line, code = stop_line(exc)
            click.echo(line, err=True)
            sys.exit(code)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def _without_signals(action: Callable[[], None]) -> None:
    """Run ``action`` with Ctrl-C and SIGTERM ignored (a second Ctrl-C must not stop the cleanup)."""
    try:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals go to the main thread anyway
        previous = {}
    try:
        action()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
