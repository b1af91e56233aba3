"""``ckpt-ema merge`` under torchrun with one rank made to fail at a chosen moment.

    torchrun --nproc-per-node 2 -m tests.torchrun_fault RANK MOMENT -- merge SERIES --decay 0.9 -o OUT

``MOMENT``: ``write`` (the rank's first write of a chunk fails, as on a full disk) or ``verify`` (its
``--verify`` read-back finds different bytes). The other ranks run unchanged.
"""

from __future__ import annotations

import os
import sys

from ckpt_ema.errors import OutputError
from ckpt_ema.output import dcp as dcp_output


def main() -> None:
    rank, moment = int(sys.argv[1]), sys.argv[2]
    args = sys.argv[sys.argv.index("--") + 1 :]

    def fail(*a: object, **k: object) -> None:
        raise OutputError(f"injected failure at {moment} on rank {rank}")

    if int(os.environ["RANK"]) == rank:
        if moment == "write":
            dcp_output.DcpDataFile.write = fail  # type: ignore[method-assign,assignment]
        else:
            dcp_output.verify_data_file = fail  # type: ignore[assignment]
    from ckpt_ema.cli import main as cli

    cli(args, prog_name="ckpt-ema")


if __name__ == "__main__":
    main()
