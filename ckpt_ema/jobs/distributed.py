"""Merging on several processes or machines with torch.distributed: each rank reads only its share.

``torchrun --nproc-per-node N -m ckpt_ema merge ...`` starts N copies of the command; each plans from the
headers (the same plan everywhere), takes its share and runs the one streaming pass on it:

- **DCP output** (the default for DCP inputs): the share is of *pieces* (``plan.pieces``: a tensor the
  checkpoints store in chunks is cut into blocks, each one contiguous run of one chunk in every
  checkpoint), balanced by bytes, the pieces of one tensor to different ranks (:func:`split_pieces`).
  Each rank reads only its pieces' bytes and writes them as the chunks of its own ``__R_0.distcp``; rank 0
  writes the ``.metadata`` describing every chunk of every rank. No rank reads a whole tensor that was
  stored sharded (unless there are more pieces of it than ranks... then no rank reads more than its share).
- **Safetensors output**: the share is of whole tensors (:func:`split_tensors`), written as one shard of a
  Hugging Face sharded checkpoint (``model-0000R-of-0000N.safetensors`` and ``model.safetensors.index.json``).

Each output folder is built in one temporary folder (``.OUT.ckpt-ema-tmp-PID``, PID of rank 0) and renamed
into place by rank 0 only when every rank has written (and with ``--verify`` read back) its files: the
ranks exchange a flag, nothing else but the temporary folders' names and where each chunk was written.
Rank 0 holds the output's lock (``output/lock.py``) from before the temporary folder exists until the
rename; files get the inputs' most restrictive permissions (``output_mode``). Each tensor is computed
exactly as in a single process (the engine's sums do not depend on how tensors are cut), so the output
holds the same bytes. With several machines, the inputs and the output must be on a filesystem every
machine sees.
"""

from __future__ import annotations

import heapq
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ckpt_ema.engine.merge_pass import MergePass, ReadObserver
from ckpt_ema.errors import OutputError, StrictError
from ckpt_ema.jobs.integrity import check_inputs_unchanged
from ckpt_ema.jobs.merge import check_overflows
from ckpt_ema.output import dcp as dcp_output
from ckpt_ema.output.layouts import output_metadata, writes_dcp, writes_folder
from ckpt_ema.output.lock import OutputLock
from ckpt_ema.output.paths import output_mode, sharded_output_folders
from ckpt_ema.output.writer import (
    SafetensorsWriter,
    WriteOptions,
    check_free_space,
    remove_stale_temps,
    replace_folder,
    temp_path_for,
    write_json_atomic,
)
from ckpt_ema.plan.model import Plan, TensorPlan
from ckpt_ema.plan.pieces import Piece, plan_pieces

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


def split_pieces(pieces: Sequence[Piece], ranks: int) -> list[list[Piece]]:
    """Each rank's pieces, in plan order: tensors largest first, each tensor's pieces (largest first) to the
    least loaded ranks, one piece per rank until every rank has one of that tensor."""
    groups: dict[str, list[int]] = {}
    for i, piece in enumerate(pieces):
        groups.setdefault(piece.name, []).append(i)
    heap = [(0, rank) for rank in range(ranks)]
    owner = [0] * len(pieces)
    total = {name: sum(pieces[i].nbytes for i in members) for name, members in groups.items()}
    for name in sorted(groups, key=lambda n: (-total[n], n)):
        order = sorted(groups[name], key=lambda i: (-pieces[i].nbytes, i))
        for start in range(0, len(order), ranks):
            batch = order[start : start + ranks]
            taken = [heapq.heappop(heap) for _ in batch]  # distinct ranks, least loaded first
            for (load, rank), i in zip(taken, batch):
                owner[i] = rank
                heapq.heappush(heap, (load + pieces[i].nbytes, rank))
    return [[p for i, p in enumerate(pieces) if owner[i] == rank] for rank in range(ranks)]


def shard_name(rank: int, ranks: int) -> str:
    return f"model-{rank + 1:05d}-of-{ranks:05d}.safetensors"


def describe_files(job: ShardedMerge) -> str:
    """What a finished distributed run wrote into each folder, for the summary line."""
    if job.dcp:
        return f"DCP: {job.ranks} x __R_0.distcp + {dcp_output.METADATA_NAME}"
    return f"{job.ranks} shards + {INDEX_NAME}"


class ShardedMerge:
    """This rank's share of a distributed merge; iterate to run the pass, then :func:`finish` (every rank).

    Creating it is a collective step: every rank must create one (the ranks exchange whether they could,
    and rank 0's temporary folders), then run the pass and call :func:`finish`, also after an error.

    Args:
        plan: the whole plan (every rank builds the same one from the headers).
        output, force: ``-o`` and ``--force`` (``output/NAME/`` per target when there are several).
        on_warning: called with NaN/Inf warnings about this rank's pieces.
        fmt: ``--format`` (DCP by default for DCP inputs; ``"safetensors"``: Hugging Face shards).
        verify: each rank reads back the files it wrote before anything is renamed (rank 0 also ``.metadata``).
        strict: every warning is an error (``StrictError``), on whichever rank it arises; nothing is written.
        allow_overflow: values beyond the output dtype's range are written as inf (else refused).
        observer: shown every piece of a file the pass reads (``ReadObserver``).
    """

    def __init__(
        self,
        plan: Plan,
        output: str | os.PathLike,
        force: bool = False,
        on_warning: Callable[[str], None] | None = None,
        fmt: str | None = None,
        verify: bool = False,
        strict: bool = False,
        allow_overflow: bool = False,
        observer: ReadObserver | None = None,
    ) -> None:
        self.rank, self.ranks = world()
        self.plan = plan
        self.strict, self.allow_overflow, self.verify = strict, allow_overflow, verify
        self._on_warning = on_warning or (lambda message: None)
        self.dcp = writes_dcp(plan, fmt)
        self.folders: list[Path] = []
        self.temps: list[Path] = []
        self.writers: list[SafetensorsWriter | dcp_output.DcpDataFile] = []
        self._locks: list[OutputLock] = []
        self.options = WriteOptions(verify=verify, mode=output_mode(plan))
        error: BaseException | None = None
        temps: list[str] = []
        try:
            if plan.newest.source.is_folder:
                raise OutputError(
                    f"{plan.newest.path}: folder checkpoints are not supported in distributed runs yet; "
                    "run without torchrun"
                )
            if fmt == "folder" or (writes_folder(plan, fmt) and not self.dcp):
                raise OutputError("--format folder: not available under torchrun; use --format safetensors or dcp")
            for warning in plan.warnings if strict else ():
                self._warn(warning)
            self.folders = sharded_output_folders(plan, output, force)
            if self.dcp:
                self.shares = split_pieces(plan_pieces(plan, chunked=True), self.ranks)
                self.pieces = self.shares[self.rank]
            else:
                self.tensor_shares = split_tensors(plan.tensors, self.ranks)
                self.pieces = plan_pieces(plan, self.tensor_shares[self.rank])
            if self.rank == 0:
                temps = [str(t) for t in self._prepare()]
        except BaseException as exc:  # deferred: every rank must reach the exchange below
            error = exc
        ok, temps = _exchange(error is None, temps)
        if error is not None or not ok:
            self.abort()
            if error is not None:
                raise error
            raise OutputError("another rank of the distributed run failed (see its message); no output written")
        self.temps = [Path(t) for t in temps]
        try:
            for temp, output_plan in zip(self.temps, plan.outputs):
                if self.dcp:
                    path = temp / dcp_output.data_file_name(self.rank)
                    self.writers.append(
                        dcp_output.DcpDataFile(path, self.pieces, digest=verify, mode=self.options.mode)
                    )
                else:
                    path = temp / shard_name(self.rank, self.ranks)
                    tensors = self.tensor_shares[self.rank]
                    self.writers.append(
                        SafetensorsWriter(path, tensors, output_metadata(plan, output_plan), self.options)
                    )
            self.merge_pass = MergePass(
                plan, self.writers, on_warning=self._warn, pieces=self.pieces, chunked=self.dcp, observer=observer
            )
        except BaseException:
            self.abort()
            raise
        self.total_bytes = self.merge_pass.total_bytes

    def _prepare(self) -> list[Path]:
        """Rank 0: take each output's lock, check the free space, create the temporary folders."""
        for folder in self.folders:
            folder.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(folder.parent)
            lock = OutputLock(folder)
            lock.acquire()
            self._locks.append(lock)
        check_free_space([(folder, sum(t.nbytes for t in self.plan.tensors)) for folder in self.folders])
        temps = []
        for folder in self.folders:
            temp = temp_path_for(folder)
            temp.mkdir(mode=self.options.folder_mode)
            self.temps.append(temp)  # removed by abort() from here on
            temps.append(temp)
        return temps

    def _warn(self, message: str) -> None:
        if self.strict:
            raise StrictError(f"{message} (--strict: no output written)")
        self._on_warning(message)

    def __len__(self) -> int:
        return len(self.merge_pass)

    def __iter__(self) -> Iterator[int]:
        return iter(self.merge_pass)

    def _finish_files(self) -> None:
        """This rank's part of the end, before the ranks agree: overflows refused (unless allowed), the inputs
        unchanged, every file complete, flushed, renamed to its name in the temporary folder and (with
        ``--verify``) read back."""
        check_overflows(self.plan, self.merge_pass.overflows, self.allow_overflow, self._warn)
        check_inputs_unchanged(self.plan)
        for writer in self.writers:
            if isinstance(writer, dcp_output.DcpDataFile):
                writer.close()
                writer.rename()
                if writer.digest is not None:
                    dcp_output.verify_data_file(writer, writer.digest.digest())
            else:
                writer.commit()

    def abort(self) -> None:
        """Remove this rank's files; rank 0 also the temporary folders, and releases the locks."""
        merge_pass = getattr(self, "merge_pass", None)
        if merge_pass is not None:
            merge_pass.close()  # its write thread stops before the files are closed under it
        for writer in self.writers:
            writer.abort()
        if self.rank == 0:
            for temp in self.temps:
                shutil.rmtree(temp, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []


def _exchange(ok: bool, payload: list[str]) -> tuple[bool, list[str]]:
    """Every rank's flag (all of them ok?) and rank 0's ``payload``: one ``all_gather_object``."""
    import torch.distributed as dist

    gathered: list[tuple[bool, list[str]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (ok, payload))
    return all(g is not None and g[0] for g in gathered), (gathered[0] or (False, []))[1]


def _agree(ok: bool) -> bool:
    """Whether every rank is ok (one flag, ``all_reduce`` MAX of the failures)."""
    import torch
    import torch.distributed as dist

    failed = torch.tensor([0 if ok else 1])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    return not int(failed)


def finish(job: ShardedMerge | None, ok: bool) -> None:
    """Agree with the other ranks: if every rank wrote its files, rank 0 writes the ``.metadata`` (or the
    index) and renames each temporary folder into place; otherwise every rank removes its files and
    ``OutputError`` is raised (or this rank's own error, which is on its way up when ``ok`` is False).

    Every rank must call this once, also after an error (``job`` is None if it could not be created).
    """
    import torch.distributed as dist

    error: BaseException | None = None
    if ok and job is not None:
        try:
            job._finish_files()
        except BaseException as exc:
            error = exc
    mine = ok and job is not None and error is None
    if not _agree(mine):
        if job is not None:
            job.abort()
        if error is not None:
            raise error
        if ok:
            raise OutputError("another rank of the distributed run failed (see its message); no output written")
        return  # this rank's own error is on its way up
    assert job is not None
    stored: list[list[list[dcp_output.StoredTensor]]] = [[] for _ in range(job.ranks)]
    if job.dcp:
        dist.all_gather_object(stored, [list(w.stored) for w in job.writers])  # type: ignore[union-attr]
    if job.rank == 0:
        try:
            _commit(job, stored)
        except BaseException as exc:
            error = exc
    if not _agree(error is None):  # rank 0's commit
        job.abort()
        if error is not None:
            raise error
        raise OutputError("rank 0 could not finish the output (see its message); no output written")
    job._release()


def _commit(job: ShardedMerge, stored: Sequence[Sequence[Sequence[dcp_output.StoredTensor]]]) -> None:
    """Rank 0: the ``.metadata`` and provenance (DCP) or the index into each temporary folder, then the renames."""
    mode = job.options.mode
    for k, (temp, folder, output) in enumerate(zip(job.temps, job.folders, job.plan.outputs)):
        if job.dcp:
            chunks = [t for rank in stored for t in rank[k]]
            dcp_output.write_provenance(temp, output_metadata(job.plan, output), job.options)
            dcp_output.write_metadata(temp, chunks, folder, mode)
            if job.verify:
                dcp_output.verify_metadata(temp, chunks)
        else:
            write_index(temp, job.tensor_shares, mode)
    for temp, folder in zip(job.temps, job.folders):
        replace_folder(temp, folder)


def write_index(folder: Path, shares: Sequence[Sequence[TensorPlan]], mode: int = 0o644) -> Path:
    """``model.safetensors.index.json``: ``metadata.total_size`` (bytes of tensor data) and ``weight_map``."""
    weight_map = {t.name: shard_name(rank, len(shares)) for rank, share in enumerate(shares) for t in share}
    total = sum(t.nbytes for share in shares for t in share)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path = folder / INDEX_NAME
    write_json_atomic(path, index, mode)
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
