"""The command-line reference, ``docs/cli.md``, generated from the ``--help`` of every command.

``python -m ckpt_ema.cli.reference > docs/cli.md`` (``make docs``) walks the click group, so a new command
or option appears without editing a list; ``tests/test_docs.py`` fails when the file differs from what
this prints. The help is formatted at a fixed width, so the output does not depend on the terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import click

from ckpt_ema.cli import main as cli

# Characters per line of help text, whatever the terminal (COLUMNS is not read): click's own width on a
# terminal of 80 columns or more, so each block is what ``--help`` prints there.
WIDTH = 78
PROG = "ckpt-ema"

HEADER = """\
# Command-line reference

Generated from the `--help` of every command by `python -m ckpt_ema.cli.reference` (`make docs`);
do not edit by hand. A test fails when this file is out of date. For what the commands are for, see the
[README](../README.md) and the [manual](usage.md).
"""


def _contexts(command: click.Command, ctx: click.Context) -> Iterator[click.Context]:
    """``ctx`` and the context of every visible subcommand below it, depth first, in the group's order."""
    yield ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            yield from _contexts(sub, click.Context(sub, info_name=name, parent=ctx, **sub.context_settings))


def _anchor(title: str) -> str:
    """The GitHub anchor of a heading made of ``title`` in backticks (letters, digits and hyphens)."""
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def render() -> str:
    """The whole of ``docs/cli.md``: a list of the commands, then each command's ``--help``."""
    settings = {**cli.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    root = click.Context(cli, info_name=PROG, **settings)
    contexts = list(_contexts(cli, root))
    out = [HEADER]
    for ctx in contexts:
        summary = ctx.command.get_short_help_str(limit=WIDTH)
        out.append(f"- [`{ctx.command_path}`](#{_anchor(ctx.command_path)}): {summary}")
    out.append("")
    for ctx in contexts:
        help_text = "\n".join(line.rstrip() for line in ctx.get_help().splitlines())
        out += [f"## `{ctx.command_path}`", "", "```text", help_text, "```", ""]
    return "\n".join(out)


def _main() -> None:
    sys.stdout.buffer.write(render().encode("utf-8"))  # UTF-8 whatever the locale (help text has σ, ≈)


if __name__ == "__main__":
    _main()
