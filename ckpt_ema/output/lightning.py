"""A Lightning ``.ckpt`` output that ``LightningModule.load_from_checkpoint`` loads.

The file holds what ``load_from_checkpoint`` reads: ``state_dict`` (the EMA), ``hyper_parameters`` and
``hparams_name`` (so the module is rebuilt with the arguments it was trained with), ``pytorch-lightning_version``,
``epoch`` and ``global_step``, all from the newest input, plus the provenance under ``ckpt_ema``. There is no
optimizer, scheduler, loop or callback state: it is a model to load, not a run to resume.

``torch.save`` needs the whole state dict, so the tensors are gathered in memory (one output's size), then the
file is written to a temporary name in the destination folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ckpt_ema.errors import OutputError
from ckpt_ema.io.safetensors_format import DTYPES
from ckpt_ema.io.torch_pickle import LIGHTNING_KEYS
from ckpt_ema.output.writer import temp_path_for
from ckpt_ema.plan.model import TensorPlan

SUFFIX = ".ckpt"  # LIGHTNING_KEYS, what load_from_checkpoint reads besides state_dict, come from the newest input


class LightningCheckpointWriter:
    """Gathers one output's tensors (written in plan order, possibly in chunks) and saves them as a ``.ckpt``."""

    def __init__(
        self,
        path: str | os.PathLike,
        tensors: Sequence[TensorPlan],
        extras: Mapping[str, object],
        metadata: Mapping[str, str],
    ) -> None:
        self.path = Path(path)
        self.temp_path = temp_path_for(self.path)
        self._extras = {k: extras[k] for k in LIGHTNING_KEYS if k in extras}
        self._metadata = dict(metadata)
        self._plans = {t.name: t for t in tensors}
        # each tensor's values in its storage type (BF16 as uint16: safetensors_format.DTYPES), filled in order
        self._arrays = {t.name: np.empty(t.shape, dtype=DTYPES[t.out_dtype][0]) for t in tensors}
        self._filled = {name: 0 for name in self._arrays}

    def write(self, name: str, data: np.ndarray) -> None:
        """Append (part of) tensor ``name``; ``data`` is contiguous in the output dtype."""
        flat = self._arrays[name].reshape(-1)
        start = self._filled[name]
        flat[start : start + data.size] = data.reshape(-1)
        self._filled[name] = start + data.size

    def commit(self) -> None:
        import torch

        from ckpt_ema.io.torch_edge import to_torch

        missing = [n for n, a in self._arrays.items() if self._filled[n] != a.size]
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} tensors were not written")
        state_dict = OrderedDict((n, to_torch(a, self._plans[n].out_dtype)) for n, a in self._arrays.items())
        state = {**self._extras, "state_dict": state_dict, "ckpt_ema": self._metadata}
        try:
            torch.save(state, self.temp_path)
            os.replace(self.temp_path, self.path)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)
