"""ckpt-ema: post-hoc EMA of training checkpoints (classic and EDM2 power-function), streamed in FP32.

The public Python API is re-exported here lazily, so that ``import ckpt_ema.math.ema`` (pure float64 math)
does not import torch::

    >>> from ckpt_ema import plan_merge, merge, merge_to_state_dict
    >>> plan = plan_merge(["runs/"], decay=[0.999], sigma_rel=[0.1])   # headers only
    >>> plan.coefficient_matrix()                                       # (outputs x checkpoints)
    >>> merge(["runs/"], "ema.safetensors", decay=[0.999])              # -> [Path("ema.safetensors")]

Layers, top to bottom (imports run down, checked by tests/test_architecture.py): ``cli`` -> ``jobs`` ->
``report`` -> ``output`` | ``engine`` -> ``plan`` -> ``series`` -> ``io`` -> ``math``. Docstrings cite the
math and conventions of docs/spec.md as "spec §N".
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from ckpt_ema import _moved  # noqa: E402  (the 0.1 module paths, e.g. ckpt_ema.kernels, still import)

_moved.install()

# public name -> the module that defines it
_EXPORTS = {
    "MergeJob": "ckpt_ema.jobs.merge",
    "merge": "ckpt_ema.jobs.merge",
    "merge_to_state_dict": "ckpt_ema.jobs.merge",
    "output_paths": "ckpt_ema.output.paths",
    "plan_merge": "ckpt_ema.jobs.merge",
    "CkptEmaError": "ckpt_ema.errors",
    "InputError": "ckpt_ema.errors",
    "OutputError": "ckpt_ema.errors",
    "SeriesError": "ckpt_ema.errors",
    "StepError": "ckpt_ema.errors",
    "TargetError": "ckpt_ema.errors",
    "classic_coefficients": "ckpt_ema.math.ema",
    "gamma_to_sigma_rel": "ckpt_ema.math.ema",
    "per_checkpoint_coefficients": "ckpt_ema.math.ema",
    "power_coefficients": "ckpt_ema.math.ema",
    "sigma_rel_to_gamma": "ckpt_ema.math.ema",
    "Plan": "ckpt_ema.plan.model",
    "plan_ema": "ckpt_ema.plan.ema",
    "load_series": "ckpt_ema.series.load",
    "Target": "ckpt_ema.plan.targets",
    "parse_target": "ckpt_ema.plan.targets",
    "parse_targets": "ckpt_ema.plan.targets",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from ckpt_ema.errors import CkptEmaError, InputError, OutputError, SeriesError, StepError, TargetError  # noqa: F401
    from ckpt_ema.jobs.merge import MergeJob, merge, merge_to_state_dict, plan_merge  # noqa: F401
    from ckpt_ema.math.ema import (  # noqa: F401
        classic_coefficients,
        gamma_to_sigma_rel,
        per_checkpoint_coefficients,
        power_coefficients,
        sigma_rel_to_gamma,
    )
    from ckpt_ema.output.paths import output_paths  # noqa: F401
    from ckpt_ema.plan.ema import plan_ema  # noqa: F401
    from ckpt_ema.plan.model import Plan  # noqa: F401
    from ckpt_ema.plan.targets import Target, parse_target, parse_targets  # noqa: F401
    from ckpt_ema.series.load import load_series  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt_ema' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
