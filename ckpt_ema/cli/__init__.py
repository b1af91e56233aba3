"""The ``ckpt-ema`` command line: the only package that imports click or tqdm.

Each command lives in its own module and registers itself on ``main``.
"""

from __future__ import annotations

import click

from ckpt_ema import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpt-ema")
def main() -> None:
    """Post-hoc EMA of training checkpoints: choose the EMA decay after training."""


from ckpt_ema.cli import inspect  # noqa: E402, F401, I001  (registers inspect)
from ckpt_ema.cli import merge  # noqa: E402, F401  (registers merge, plan)
from ckpt_ema.cli import sweep  # noqa: E402, F401  (registers sweep)
from ckpt_ema.cli import batch  # noqa: E402, F401  (registers batch)
from ckpt_ema.cli import doctor  # noqa: E402, F401  (registers doctor)
