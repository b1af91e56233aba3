"""The items of a pass: each tensor whole, or cut into blocks where the checkpoints store it in chunks.

A tensor saved sharded (``torch.distributed.checkpoint``: one chunk per shard) is merged block by block,
so that no buffer (and, under torchrun, no rank) ever holds the whole tensor:

- every checkpoint stores it in *runs of whole rows* (sharded on dim 0, as FSDP2 shards every parameter;
  a tensor stored whole counts as one run): the blocks are cut where any checkpoint's chunks end, so each
  block is a contiguous run of one chunk in every checkpoint (read by byte range), in the tensor's own
  element order (any output format takes them);
- every checkpoint has the *same chunks* (2-D meshes, tensor parallelism on dim 1, ...) and the output
  keeps chunks (a DCP folder): the blocks are the chunks, each merged chunk to chunk;
- otherwise (chunk layouts that differ between checkpoints, or a whole-tensor output such as safetensors
  for chunks that are not runs of rows): bands of whole rows of at most ``BAND_ELEMENTS``, each copied
  together from the chunks it crosses. Memory stays bounded by a band, not the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ckpt_ema.io.source import Region, whole_region
from ckpt_ema.plan.model import Plan, TensorPlan

BAND_ELEMENTS = 1 << 22  # elements of a band of rows copied together from several chunks


@dataclass(frozen=True)
class Piece:
    """One item of a pass: block ``offsets``/``sizes`` of ``tensor`` (the whole tensor: offsets 0, its shape)."""

    tensor: TensorPlan
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def region(self) -> Region:
        return self.offsets, self.sizes

    @property
    def whole(self) -> bool:
        return self.sizes == tuple(self.tensor.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def nbytes(self) -> int:
        """Bytes of the block in the output."""
        return self.numel * (self.tensor.nbytes // max(1, math.prod(self.tensor.shape)))

    @property
    def flat(self) -> TensorPlan:
        """The block as a 1-D tensor of the same name (what the engine's spans are made of)."""
        return TensorPlan(self.tensor.name, (self.numel,), self.tensor.is_float, self.tensor.out_dtype)


def whole(tensor: TensorPlan) -> Piece:
    offsets, sizes = whole_region(tensor.shape)
    return Piece(tensor, offsets, sizes)


def used_inputs(plan: Plan) -> list[int]:
    """The checkpoints a pass reads: those with a non-zero coefficient in some output."""
    coefficients = plan.coefficient_matrix()
    return [j for j in range(len(plan.checkpoints)) if coefficients[:, j].any()]


def tensor_pieces(plan: Plan, tensor: TensorPlan, chunked: bool, used: Sequence[int] | None = None) -> list[Piece]:
    """The blocks ``tensor`` is merged by, in order (see the module's docstring).

    ``chunked``: the output keeps chunks (a DCP folder), so blocks may come in chunk order rather than in
    the tensor's element order. ``used``: the checkpoints read (default: :func:`used_inputs`).
    """
    shape = tuple(tensor.shape)
    if not shape or not math.prod(shape):
        return [whole(tensor)]
    readers = (used if used is not None else used_inputs(plan)) if tensor.is_float else [len(plan.checkpoints) - 1]
    layouts = [plan.checkpoints[j].source.chunks(tensor.name) for j in readers]
    if all(layout is None for layout in layouts):
        return [whole(tensor)]
    rest = shape[1:]
    if all(layout is None or all(s[1:] == rest for _, s in layout) for layout in layouts):
        cuts = {0, shape[0]}
        for layout in layouts:
            cuts.update(o[0] + s[0] for o, s in layout or ())
        return _rows(tensor, sorted(cuts))
    if chunked and all(layout == layouts[0] for layout in layouts):
        return [Piece(tensor, o, s) for o, s in layouts[0] or ()]
    band = max(1, BAND_ELEMENTS // max(1, math.prod(rest)))
    return _rows(tensor, [*range(0, shape[0], band), shape[0]])


def _rows(tensor: TensorPlan, cuts: Sequence[int]) -> list[Piece]:
    rest = tuple(tensor.shape[1:])
    zeros = (0,) * len(rest)
    return [Piece(tensor, (a, *zeros), (b - a, *rest)) for a, b in zip(cuts, cuts[1:]) if b > a]


def plan_pieces(plan: Plan, tensors: Sequence[TensorPlan] | None = None, chunked: bool = False) -> list[Piece]:
    """Every piece of ``tensors`` (default: the plan's), tensor by tensor in their order."""
    tensors = plan.tensors if tensors is None else tensors
    if not any(f.chunked is not None for c in plan.checkpoints for f in c.source.files):
        return [whole(t) for t in tensors]  # no format with chunks: every tensor whole (the common case, fast)
    used = used_inputs(plan)
    return [p for t in tensors for p in tensor_pieces(plan, t, chunked, used)]
