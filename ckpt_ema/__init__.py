"""ckpt-ema: post-hoc EMA of training checkpoints (classic and EDM2 power-function), streamed in FP32."""

__version__ = "0.1.0"

from ckpt_ema.errors import CkptEmaError, InputError, OutputError, SeriesError, StepError, TargetError  # noqa: E402
from ckpt_ema.jobs.merge import MergeJob, merge, merge_to_state_dict, output_paths, plan_merge  # noqa: E402
from ckpt_ema.math.ema import (  # noqa: E402
    classic_coefficients,
    gamma_to_sigma_rel,
    per_checkpoint_coefficients,
    power_coefficients,
    sigma_rel_to_gamma,
)
from ckpt_ema.plan.model import Plan, plan_ema  # noqa: E402
from ckpt_ema.plan.targets import Target, parse_target, parse_targets  # noqa: E402
from ckpt_ema.series.load import load_series  # noqa: E402

__all__ = [
    "__version__",
    "CkptEmaError",
    "InputError",
    "MergeJob",
    "OutputError",
    "Plan",
    "SeriesError",
    "StepError",
    "Target",
    "TargetError",
    "classic_coefficients",
    "gamma_to_sigma_rel",
    "load_series",
    "merge",
    "merge_to_state_dict",
    "output_paths",
    "parse_target",
    "parse_targets",
    "per_checkpoint_coefficients",
    "plan_ema",
    "plan_merge",
    "power_coefficients",
    "sigma_rel_to_gamma",
]
