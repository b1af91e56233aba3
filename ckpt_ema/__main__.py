"""``python -m ckpt_ema``: the same as the ``ckpt-ema`` command."""

from ckpt_ema.cli import main

if __name__ == "__main__":
    main()
