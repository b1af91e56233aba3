"""``ckpt-ema doctor``: why did my EMA not learn? Plain numbers about the run, the decay and the dtype."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ckpt_ema.cli import main
from ckpt_ema.cli.common import StepList, reader_options, run_pass, say, say_lines, user_errors
from ckpt_ema.jobs.doctor import FORMATS, TARGET_SIG, Checkup, describe_diagnosis


def _reader_options(command: Any) -> Any:
    for option in reversed(reader_options[:2]):  # --component, --key
        command = option(command)
    return command


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--decay", metavar="BETA", help="The EMA decay per step (the trainer's, or one you consider).")
@click.option(
    "--dtype",
    type=click.Choice(list(FORMATS)),
    help="The dtype the EMA is kept in (default: the --ema file's, else the checkpoints').",
)
@click.option(
    "--ema",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="The EMA the trainer saved at the last checkpoint's step: compared with an FP32 EMA of the same decay.",
)
@click.option("--init", type=click.Path(path_type=Path), metavar="PATH", help="Weights at step 0 (the base model).")
@click.option("--steps", type=StepList(), help="Steps of the inputs, in the order given (overrides detection).")
@click.option(
    "--target-sig",
    type=float,
    default=TARGET_SIG,
    show_default=True,
    help="For the next run: the checkpoint spacing at which the EMA of --decay is predicted within this sig "
    "of the per-step EMA (docs/estimate.md).",
)
@click.option("--json", "as_json", is_flag=True, help="Print every number as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_reader_options
@user_errors
def doctor(
    inputs: tuple[Path, ...],
    decay: str | None,
    dtype: str | None,
    ema: Path | None,
    init: Path | None,
    steps: list[int] | None,
    target_sig: float,
    as_json: bool,
    quiet: bool,
    key: str | None,
    component: tuple[str, ...],
) -> None:
    """Diagnose an EMA from the raw checkpoints: the half-life against the run, the share of the start left
    in the EMA, the share of per-step updates that round to zero in the EMA's dtype, and, with --ema, how
    far the trainer's EMA moved compared with an FP32 EMA. Ends with a sweep command worth running.

    \b
    Examples:
      ckpt-ema doctor runs/ --decay 0.999 --dtype bf16
      ckpt-ema doctor --ema ema.safetensors runs/ --decay 0.999 --init base.safetensors
    """
    checkup = Checkup(inputs, decay=decay, dtype=dtype, ema=ema, init=init, steps=steps, key=key,
                      component=component or None, target_sig=target_sig)  # fmt: skip
    for warning in checkup.base.warnings if checkup.base else ():
        say(f"warning: {warning}", err=True)
    run_pass(checkup, checkup.total_bytes, "doctor", quiet)
    diagnosis = checkup.result()
    if as_json:
        click.echo(json.dumps(diagnosis.to_json(), indent=2))
    else:
        say_lines(describe_diagnosis(diagnosis))
