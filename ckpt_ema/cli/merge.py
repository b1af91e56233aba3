"""``ckpt-ema merge`` and ``ckpt-ema plan``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ckpt_ema.cli import main
from ckpt_ema.cli.common import (
    allow_overflow_option,
    plan_from,
    progress_bar,
    run_pass,
    say,
    series_options,
    user_errors,
    warn,
)
from ckpt_ema.jobs import distributed
from ckpt_ema.jobs.estimate import EstimateJob
from ckpt_ema.jobs.integrity import DEFAULT_HASH, HASH_ALGORITHMS
from ckpt_ema.jobs.merge import MergeJob
from ckpt_ema.math.estimate import Estimate
from ckpt_ema.output.layouts import FORMATS
from ckpt_ema.output.paths import output_paths
from ckpt_ema.plan.model import Plan
from ckpt_ema.report.plots import plot_weights, require_matplotlib
from ckpt_ema.report.text import (
    describe_estimate,
    describe_output,
    describe_plan,
    describe_step_sources,
    estimate_json,
)


@main.command()
@series_options
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Output file (one target) or folder (several targets; folder checkpoints give folders).",
)
@click.option("--force", is_flag=True, help="Replace existing output files.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(list(FORMATS)),
    help="Output as one .safetensors file, as a folder like the inputs, or as a torch.distributed.checkpoint "
    "folder (default: like the inputs; DCP for DCP inputs).",
)
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    help="DCP and DeepSpeed checkpoints written as safetensors into a folder: the largest shard of the "
    "Hugging Face folder (model-0000K-of-0000N.safetensors + index), e.g. 500MB, 2GiB [default: 5GB].",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@click.option(
    "--verify",
    is_flag=True,
    help="Read each output back and check it (tensors, metadata, data, no NaN/Inf) before it replaces anything.",
)
@click.option("--strict", is_flag=True, help="Treat every warning (NaN/Inf, diverged checkpoint, ...) as an error.")
@allow_overflow_option
@click.option(
    "--hash/--no-hash",
    "hash_inputs",
    default=True,
    show_default=True,
    help="Record each input's hash (and check for diverged checkpoints) while streaming; "
    "--no-hash runs at the engine's speed.",
)
@click.option(
    "--hash-algorithm",
    type=click.Choice(list(HASH_ALGORITHMS)),
    default=DEFAULT_HASH,
    show_default=True,
    help="blake3 (fast: hidden behind the disk) or sha256 (the ids the Hugging Face Hub shows for LFS files).",
)
@click.option(
    "--estimate/--no-estimate",
    default=True,
    show_default=True,
    help="Estimate each output's error against the per-step EMA (docs/estimate.md) from statistics "
    "gathered in the same pass.",
)
@user_errors
def merge(
    output: Path,
    force: bool,
    quiet: bool,
    fmt: str | None,
    verify: bool,
    strict: bool,
    hash_inputs: bool,
    allow_overflow: bool,
    hash_algorithm: str,
    estimate: bool,
    max_shard_size: str | None,
    **options: Any,
) -> None:
    """Write the EMA of a checkpoint series for each target, in one pass over the files.

    \b
    Examples:
      ckpt-ema merge runs/*.safetensors --decay 0.999 -o ema.safetensors
      ckpt-ema merge runs/ --decay 0.99 --decay 0.999 --sigma-rel 0.10 -o out/
      ckpt-ema merge runs/ --half-life 500 --init base.safetensors -o ema.safetensors
    """
    plan = plan_from(options)
    if distributed.is_distributed():  # under torchrun: this rank's share, as one shard per target
        if max_shard_size is not None:  # each rank writes one shard of its own
            raise click.UsageError("--max-shard-size: not available under torchrun yet (each rank writes one shard)")
        sharded = _merge_distributed(plan, output, force, quiet, fmt, verify, strict, allow_overflow)
        if sharded.rank == 0 and options["as_json"]:  # one document for the whole run
            reasons: list[str | None] = ["not computed under torchrun"] * len(plan.outputs)
            _report(plan, [None] * len(plan.outputs) if estimate else None, reasons, True, quiet, sharded.folders)
        elif sharded.rank == 0 and not quiet:
            for out, folder in zip(plan.outputs, sharded.folders):
                say(f"wrote {folder}/ ({distributed.describe_files(sharded)}; {describe_output(plan, out)})")
        return
    paths = output_paths(plan, output, force=force, fmt=fmt)
    for warning in () if strict else plan.warnings:  # with --strict, MergeJob refuses them
        say(f"warning: {warning}", err=True)

    job = MergeJob(
        plan, paths, on_warning=warn, fmt=fmt, verify=verify, strict=strict, hash_inputs=hash_inputs,
        allow_overflow=allow_overflow, hash_algorithm=hash_algorithm, estimate=estimate, max_shard_size=max_shard_size,
    )  # fmt: skip
    with job:
        run_pass(job, job.total_bytes, "merge", quiet)
        job.commit()
    estimates = job.estimates() if estimate else None
    _report(plan, estimates, job.reasons(), options["as_json"], quiet, paths)


def _report(
    plan: Plan,
    estimates: list[Estimate | None] | None,
    reasons: list[str | None],
    as_json: bool,
    quiet: bool,
    paths: list[Path] | None,
) -> None:
    """The summary of merge (``paths``) or of plan --estimate: one line per output, or the JSON."""
    if as_json:
        summary = plan.to_json()
        for k, entry in enumerate(summary["outputs"]):
            if paths is not None:
                entry["path"] = str(paths[k])
            if estimates is not None:
                entry["estimate"] = estimate_json(estimates[k], reasons[k])
        click.echo(json.dumps(summary, indent=2))
    elif not quiet and paths is not None:
        click.echo(describe_step_sources(plan), err=True)
        for k, (out, path) in enumerate(zip(plan.outputs, paths)):
            detail = f"; {describe_estimate(estimates[k], reasons[k])}" if estimates is not None else ""
            say(f"wrote {path}  ({describe_output(plan, out)}{detail})")
    elif not quiet and estimates is not None:
        for k, out in enumerate(plan.outputs):
            say(f"{out.name}: {describe_estimate(estimates[k], reasons[k])}")


def _merge_distributed(
    plan: Plan,
    output: Path,
    force: bool,
    quiet: bool,
    fmt: str | None,
    verify: bool,
    strict: bool,
    allow_overflow: bool,
) -> distributed.ShardedMerge:
    """``torchrun ... -m ckpt_ema merge``: see ckpt_ema/jobs/distributed.py. Rank 0 draws the progress bar."""
    rank, _ = distributed.world()
    distributed.init()
    job, ok = None, False
    try:
        for warning in plan.warnings if rank == 0 and not strict else ():
            say(f"warning: {warning}", err=True)
        job = distributed.ShardedMerge(plan, output, force, warn, fmt, verify, strict, allow_overflow)
        with progress_bar(job.total_bytes, f"merge rank {rank}", quiet or rank > 0) as bar:
            for done in job:
                bar.update(done)
        ok = True
    finally:
        distributed.finish(job, ok)
        distributed.shutdown()
    assert job is not None
    return job


@main.command("plan")
@series_options
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    metavar="PNG",
    help="Also draw each checkpoint's coefficient against its step, per target, into this PNG (needs matplotlib).",
)
@click.option(
    "--estimate",
    is_flag=True,
    help="Also read the data (one pass, nothing written) and estimate each output's error against the "
    "per-step EMA (docs/estimate.md).",
)
@user_errors
def plan_command(plot: Path | None, estimate: bool, **options: Any) -> None:
    """Show what merge would compute, reading only the files' headers (with --estimate, also the data).

    \b
    Example:
      ckpt-ema plan runs/*.safetensors --half-life 500 --sigma-rel 0.1
      ckpt-ema plan runs/ --decay 0.999 --sigma-rel 0.1 --plot weights.png
      ckpt-ema plan runs/ --decay 0.999 --estimate
    """
    if plot is not None:
        require_matplotlib()
    plan = plan_from(options)
    if estimate:
        job = EstimateJob(plan, on_warning=warn)
        run_pass(job, job.total_bytes, "estimate", options["as_json"])
        if not options["as_json"]:
            click.echo(describe_plan(plan))
        estimates = job.estimates()
        _report(plan, estimates, job.reasons(), options["as_json"], False, None)
    elif options["as_json"]:
        click.echo(json.dumps(plan.to_json(), indent=2))
    else:
        click.echo(describe_plan(plan))
    if plot is not None:
        plot_weights(plan, plot)
        say(f"wrote {plot}", err=options["as_json"])
