"""The module paths of ckpt-ema 0.1 (``ckpt_ema.kernels``, ``ckpt_ema.api``, ...), kept importable.

The modules moved into subpackages (see ``ckpt_ema/__init__.py``); importing an old path gives a module
with the same public names as the new one and a ``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence

MOVED = {
    "ckpt_ema.api": "ckpt_ema.jobs.merge",
    "ckpt_ema.kernels": "ckpt_ema.math.ema",
    "ckpt_ema.reconstruct": "ckpt_ema.math.reconstruct",
    "ckpt_ema.safetensors_format": "ckpt_ema.io.safetensors_format",
    "ckpt_ema.readers": "ckpt_ema.io",
    "ckpt_ema.readers.base": "ckpt_ema.io.source",
    "ckpt_ema.readers.folder": "ckpt_ema.io.folder",
    "ckpt_ema.readers.safetensors_file": "ckpt_ema.io.safetensors_file",
    "ckpt_ema.readers.torch_pickle": "ckpt_ema.io.torch_pickle",
    "ckpt_ema.steps": "ckpt_ema.series.steps",
    "ckpt_ema.posthoc": "ckpt_ema.plan.posthoc",
    "ckpt_ema.targets": "ckpt_ema.plan.targets",
    "ckpt_ema.fused": "ckpt_ema.engine.fused",
    "ckpt_ema.writer": "ckpt_ema.output.writer",
    "ckpt_ema.layouts": "ckpt_ema.output.layouts",
    "ckpt_ema.integrity": "ckpt_ema.jobs.integrity",
    "ckpt_ema.distributed": "ckpt_ema.jobs.distributed",
    "ckpt_ema.sweep": "ckpt_ema.jobs.sweep",
    "ckpt_ema.batch": "ckpt_ema.jobs.batch",
    "ckpt_ema.doctor": "ckpt_ema.jobs.doctor",
    "ckpt_ema.plotting": "ckpt_ema.report.plots",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname == "ckpt_ema.readers")

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        new = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} is now {new}; import it from there", DeprecationWarning, stacklevel=2)
        target = importlib.import_module(new)
        module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
        module.__doc__ = target.__doc__


def install() -> None:
    """Make the old module paths importable (once)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
