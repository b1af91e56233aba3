"""The optimizer step of an accelerate ``save_state()`` folder, from the state accelerate saved beside the model.

accelerate's ``ProjectConfiguration(automatic_checkpoint_naming=True)`` names its folders
``checkpoints/checkpoint_{save index}``: the number counts saves, never steps. The folder records the step in
two places, both read with ``torch.load(weights_only=True, mmap=True)``:

* ``optimizer.bin``: Adam-family optimizers keep a per-parameter ``step`` (the number of updates it took part
  in); when every parameter has the same count, that is the optimizer step;
* ``scheduler.bin``: a learning-rate scheduler's ``last_epoch`` counts its ``step()`` calls: once per optimizer
  step on one process, but accelerate steps it once per process otherwise, so it is used only without the
  optimizer's count and only when the folder holds one process's RNG state (no ``random_states_1.pkl``).

``random_states_0.pkl`` also holds a ``step``, but it counts ``accumulate()`` calls (micro-batches), and its
numpy random state needs more than plain tensors to load, so it is not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ckpt_ema.errors import InputError
from ckpt_ema.io.torch_pickle import is_tensor, load_pickle

OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
RNG_FILE = "random_states_0.pkl"


def is_accelerate_state(folder: Path) -> bool:
    """A folder ``Accelerator.save_state()`` wrote: its RNG file and an optimizer or scheduler file."""
    return (folder / RNG_FILE).is_file() and any((folder / n).is_file() for n in (OPTIMIZER_FILE, SCHEDULER_FILE))


def accelerate_step_records(folder: Path) -> list[tuple[str, int]]:
    """``[(source, step)]`` from the optimizer's per-parameter ``step`` (if all equal), else the scheduler's
    ``last_epoch``; empty when neither says (e.g. plain SGD and no scheduler)."""
    optimizer = folder / OPTIMIZER_FILE
    if optimizer.is_file():
        step = _optimizer_step(optimizer)
        if step is not None:
            return [(f"accelerate {OPTIMIZER_FILE} 'step'", step)]
    scheduler = folder / SCHEDULER_FILE
    if scheduler.is_file() and not (folder / "random_states_1.pkl").exists():
        state = _load(scheduler)
        last = state.get("last_epoch") if isinstance(state, Mapping) else None
        if isinstance(last, int) and not isinstance(last, bool) and last >= 0:
            return [(f"accelerate {SCHEDULER_FILE} 'last_epoch'", last)]
    return []


def _optimizer_step(path: Path) -> int | None:
    state = _load(path)
    per_param = state.get("state") if isinstance(state, Mapping) else None
    if not isinstance(per_param, Mapping) or not per_param:
        return None
    counts = set()
    for entry in per_param.values():
        step = entry.get("step") if isinstance(entry, Mapping) else None
        if is_tensor(step) and step.numel() == 1:
            step = float(step.item())
        if not isinstance(step, (int, float)) or isinstance(step, bool) or step != int(step):
            return None
        counts.add(int(step))
    return counts.pop() if len(counts) == 1 else None


def _load(path: Path) -> object:
    try:
        return load_pickle(path)
    except InputError:
        return None  # state that cannot be read safely says nothing about the step
