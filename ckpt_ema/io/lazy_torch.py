"""``torch``, imported on first use: for modules that need torch for some formats (DCP, DeepSpeed) but are
imported on every start of the command line, where ``import torch`` would add about a second.

    if TYPE_CHECKING:
        import torch
    else:
        from ckpt_ema.io.lazy_torch import torch
"""

from __future__ import annotations

import importlib
from typing import Any


class _LazyTorch:
    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("torch"), name)


torch: Any = _LazyTorch()
