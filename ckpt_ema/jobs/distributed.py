"""Merging on several processes or machines with torch.distributed: each rank reads only its tensors.

``torchrun --nproc-per-node N -m ckpt_ema merge ...`` starts N copies of the command; each plans from the
headers (the same plan everywhere), takes its share of the tensors (:func:`split_tensors`: balanced by
bytes, largest first, each rank's share kept in file order), runs the one streaming pass on that share
and writes it as one shard of a Hugging Face sharded checkpoint::

    OUT/model-00001-of-0000N.safetensors ... OUT/model-0000N-of-0000N.safetensors
    OUT/model.safetensors.index.json          {"metadata": {"total_size": ...}, "weight_map": {...}}

(``OUT/NAME/...`` per target when there are several). The ranks only exchange one flag (gloo backend, CPU):
every shard is written to a temporary file first, and they are renamed into place only when every rank
has finished; then rank 0 writes the index. Each tensor is computed exactly as in a single process (the
engine's sums do not depend on how tensors are grouped), so the shards hold the same bytes.

With several machines, the inputs and ``OUT`` must be on a filesystem every machine sees.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ckpt_ema.engine.merge_pass import MergePass
from ckpt_ema.errors import OutputError
from ckpt_ema.output import dcp as dcp_output
from ckpt_ema.output.layouts import output_metadata, writes_dcp
from ckpt_ema.output.writer import SafetensorsWriter, write_json_atomic
from ckpt_ema.plan.model import Plan, TensorPlan

INDEX_NAME = "model.safetensors.index.json"


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world()[1] > 1


def split_tensors(tensors: Sequence[TensorPlan], ranks: int) -> list[list[TensorPlan]]:
    """Each rank's tensors: largest first to the least loaded rank (ties: lowest rank), then in plan order."""
    heap = [(0, rank) for rank in range(ranks)]
    owner: dict[str, int] = {}
    for tensor in sorted(tensors, key=lambda t: (-t.nbytes, t.name)):
        load, rank = heapq.heappop(heap)
        owner[tensor.name] = rank
        heapq.heappush(heap, (load + tensor.nbytes, rank))
    return [[t for t in tensors if owner[t.name] == rank] for rank in range(ranks)]


def file_names(plan: Plan, fmt: str | None = None) -> list[str]:
    """The files a distributed run writes into each output folder: the index and one shard per rank
    (a DCP output: ``.metadata``, the provenance and one ``__R_0.distcp`` per rank)."""
    _, ranks = world()
    if writes_dcp(plan, fmt):
        return [dcp_output.METADATA_NAME, dcp_output.PROVENANCE_NAME, *map(dcp_output.data_file_name, range(ranks))]
    return [INDEX_NAME, *(shard_name(r, ranks) for r in range(ranks))]


def describe_files(job: ShardedMerge) -> str:
    """What a finished distributed run wrote into each folder, for the summary line."""
    if job.dcp:
        return f"DCP: {job.ranks} x __R_0.distcp + {dcp_output.METADATA_NAME}"
    return f"{job.ranks} shards + {INDEX_NAME}"


def shard_name(rank: int, ranks: int) -> str:
    return f"model-{rank + 1:05d}-of-{ranks:05d}.safetensors"


class ShardedMerge:
    """This rank's share of a distributed merge; iterate to run the pass, then :meth:`finish`.

    Args:
        plan: the whole plan (every rank builds the same one from the headers).
        folders: one output folder per target (:func:`ckpt_ema.output.paths.sharded_output_folders`).
        on_warning: called with NaN/Inf warnings about this rank's tensors.
        fmt: ``"dcp"`` for a DCP output (the default for DCP inputs): each rank writes its ``__R_0.distcp``
            and rank 0 the ``.metadata``; else Hugging Face shards.
    """

    def __init__(
        self,
        plan: Plan,
        folders: Sequence[Path],
        on_warning: Callable[[str], None] | None = None,
        fmt: str | None = None,
    ) -> None:
        if plan.newest.source.is_folder:
            raise OutputError(
                f"{plan.newest.path}: folder checkpoints are not supported in distributed runs yet; "
                "run without torchrun"
            )
        self.rank, self.ranks = world()
        self.plan = plan
        self.folders = list(folders)
        self.shares = split_tensors(plan.tensors, self.ranks)
        self.tensors = self.shares[self.rank]
        self.dcp = writes_dcp(plan, fmt)
        self.writers: list[SafetensorsWriter | dcp_output.DcpDataFile] = []
        try:
            for folder, output in zip(self.folders, plan.outputs):
                folder.mkdir(parents=True, exist_ok=True)
                if self.dcp:
                    path = folder / dcp_output.data_file_name(self.rank)
                    self.writers.append(dcp_output.DcpDataFile(path, self.tensors))
                else:
                    path = folder / shard_name(self.rank, self.ranks)
                    self.writers.append(SafetensorsWriter(path, self.tensors, output_metadata(plan, output)))
        except BaseException:
            self.abort()
            raise
        self.merge_pass = MergePass(plan, self.writers, on_warning=on_warning, tensors=self.tensors)
        self.total_bytes = self.merge_pass.total_bytes

    def __iter__(self) -> Iterator[int]:
        return iter(self.merge_pass)

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()


def finish(job: ShardedMerge | None, ok: bool) -> None:
    """Agree with the other ranks: if every rank's pass succeeded, rename every shard into place and let
    rank 0 write the indexes; otherwise remove this rank's temporary files and raise ``OutputError``.

    Every rank must call this once, also after an error (``job`` is None if it could not be created).
    """
    import torch
    import torch.distributed as dist

    failed = torch.tensor([0 if ok and job is not None else 1])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if int(failed):
        if job is not None:
            job.abort()
        if ok:
            raise OutputError("another rank of the distributed run failed (see its message); no output written")
        return  # this rank's own error is on its way up
    assert job is not None
    if job.dcp:
        _finish_dcp(job)
        return
    for writer in job.writers:
        writer.commit()  # type: ignore[union-attr]
    dist.barrier()
    if job.rank == 0:
        for folder in job.folders:
            write_index(folder, job.shares)
    dist.barrier()


def _finish_dcp(job: ShardedMerge) -> None:
    """Every rank's ``__R_0.distcp`` into place (an old ``.metadata`` removed first), then rank 0 gathers where
    each tensor was written and writes ``.metadata`` last: only then is the folder a checkpoint."""
    import torch.distributed as dist

    for writer in job.writers:
        writer.close()  # type: ignore[union-attr]
    if job.rank == 0:
        for folder in job.folders:
            (folder / dcp_output.METADATA_NAME).unlink(missing_ok=True)
    dist.barrier()
    for writer in job.writers:
        writer.rename()  # type: ignore[union-attr]
    stored: list[list[list[dcp_output.StoredTensor]]] = [[] for _ in range(job.ranks)]
    dist.all_gather_object(stored, [list(w.stored) for w in job.writers])  # type: ignore[union-attr]
    if job.rank == 0:
        for k, (folder, output) in enumerate(zip(job.folders, job.plan.outputs)):
            dcp_output.write_provenance(folder, output_metadata(job.plan, output))
            dcp_output.write_metadata(folder, [t for rank in stored for t in rank[k]], folder)
    dist.barrier()


def write_index(folder: Path, shares: Sequence[Sequence[TensorPlan]]) -> Path:
    """``model.safetensors.index.json``: ``metadata.total_size`` (bytes of tensor data) and ``weight_map``."""
    weight_map = {t.name: shard_name(rank, len(shares)) for rank, share in enumerate(shares) for t in share}
    total = sum(t.nbytes for share in shares for t in share)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path = folder / INDEX_NAME
    write_json_atomic(path, index)
    return path


def init() -> None:
    """Join torchrun's process group (gloo: CPU only, no GPU needed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
