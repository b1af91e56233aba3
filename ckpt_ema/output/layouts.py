"""Output layouts: a single safetensors file, or a folder that mirrors the newest input checkpoint.

A folder output has the newest checkpoint's layout: the same models and components, each sharded the same
way (same file names, same tensors in each shard) with a fresh index (``weight_map`` and ``total_size``),
and the files the model needs to load (``config.json``, tokenizer files, ``model_index.json``,
``scheduler/``) copied unchanged. Torch-pickle weights in a folder are written as safetensors
(``pytorch_model.bin`` becomes ``model.safetensors``), which every loader prefers.

The folder is built in a temporary folder next to the destination (``.NAME.ckpt-ema-tmp-PID``), each file
by its own ``SafetensorsWriter``, and renamed into place only when every file is complete: a folder
output appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ckpt_ema.errors import OutputError
from ckpt_ema.io import CheckpointSource
from ckpt_ema.io.dcp import MEGATRON_FILES
from ckpt_ema.io.links import inside, walk_copy
from ckpt_ema.output.configs import config_dtype_name, copy_config
from ckpt_ema.output.dcp import DcpWriter, ObjectCopy, megatron_tracker
from ckpt_ema.output.lightning import SUFFIX as LIGHTNING_SUFFIX
from ckpt_ema.output.lightning import LightningCheckpointWriter
from ckpt_ema.output.shards import INDEX_NAME, shard_names, split_shards
from ckpt_ema.output.writer import (
    OutputWriter,
    SafetensorsWriter,
    WriteOptions,
    copy_file,
    remove_stale_temps,
    replace_folder,
    temp_path_for,
)
from ckpt_ema.plan.model import OutputPlan, Plan, TensorPlan
from ckpt_ema.plan.pieces import plan_pieces
from ckpt_ema.series.load import checkpoint_stem

FORMATS = ("safetensors", "folder", "dcp")
SAFETENSORS_SUFFIX = ".safetensors"
# metadata that describes the exact bytes of the newest input, wrong for the output
STALE_METADATA = ("modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash")


def carried_metadata(plan: Plan) -> dict[str, str]:
    """The newest input's metadata for the output (spec §6), with ``modelspec.merged_from`` naming the
    inputs when the files carry modelspec (kohya, OneTrainer) and hashes of the input's bytes dropped."""
    carried = {
        k: v
        for k, v in plan.newest.source.metadata.items()
        if not k.startswith("ckpt_ema.") and k not in STALE_METADATA
    }
    if any(k.startswith("modelspec.") for k in carried):
        carried["modelspec.merged_from"] = ", ".join(checkpoint_stem(c.path) for c in plan.checkpoints)
    return carried


def output_metadata(plan: Plan, output: OutputPlan) -> dict[str, str]:
    """The newest input's metadata, then ``format: pt`` and the ``ckpt_ema.*`` provenance (spec §6)."""
    carried = carried_metadata(plan)
    return {**carried, "format": "pt", **plan.provenance(output)}


def writes_dcp(plan: Plan, fmt: str | None) -> bool:
    """Whether the outputs are DCP folders (``--format dcp``, and by default for DCP checkpoints)."""
    if fmt not in (None, *FORMATS):
        raise OutputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt == "dcp" or (fmt is None and plan.newest.source.output_format == "dcp")


def writes_export_folder(plan: Plan, fmt: str | None, output: str | os.PathLike) -> bool:
    """Whether the safetensors output of a model with no Hugging Face layout of its own (DCP, DeepSpeed) is a
    Hugging Face folder (``model.safetensors``, or shards and an index; ``output/shards.py``): yes unless
    ``output`` names a ``.safetensors`` file (then one file), always with ``--format folder``."""
    if not plan.newest.source.exports_folder or writes_dcp(plan, fmt):
        return False
    return fmt == "folder" or Path(output).suffix.lower() != SAFETENSORS_SUFFIX


def writes_folder(plan: Plan, fmt: str | None) -> bool:
    """Whether the outputs are folders mirroring the inputs (folder checkpoints, unless ``--format safetensors``)."""
    source = plan.newest.source
    if fmt not in (None, *FORMATS):
        raise OutputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if writes_dcp(plan, fmt):
        return False
    if fmt == "folder" and source.exports_folder:  # a Hugging Face folder (writes_export_folder)
        return True
    if fmt == "folder" and not source.is_folder:
        raise OutputError(
            f"--format folder: the checkpoints are single files ({source.path.name}); their output is one "
            ".safetensors file"
        )
    if fmt == "safetensors" and source.is_folder and len(source.parts) > 1:
        names = ", ".join(p.name or "(top level)" for p in source.parts)
        raise OutputError(
            f"--format safetensors: {source.path} holds {len(source.parts)} models ({names}); choose one with --component"
        )
    return source.is_folder if fmt is None else fmt == "folder"


def open_output(
    plan: Plan,
    path: Path,
    metadata: Mapping[str, str],
    fmt: str | None,
    options: WriteOptions | None = None,
) -> OutputWriter:
    """The sink that writes one output: a ``SafetensorsWriter``, a ``FolderWriter``, a ``DcpWriter``, or for a
    ``.ckpt`` path of Lightning inputs a ``LightningCheckpointWriter``."""
    if writes_dcp(plan, fmt):
        source = plan.newest.source
        copies = dcp_copies(source)
        tracker = megatron_tracker(path) if copies else None  # a Megatron checkpoint, named as an iteration
        pieces = plan_pieces(plan, chunked=True)
        return DcpWriter(path, pieces, metadata, options, copies, dcp_objects(source), tracker)
    if writes_export_folder(plan, fmt, path):
        return ExportFolderWriter(path, plan, metadata, options)
    if writes_folder(plan, fmt):
        return FolderWriter(path, plan, metadata, options)
    source = plan.newest.source
    if path.suffix.lower() == LIGHTNING_SUFFIX:
        if not source.lightning:
            raise OutputError(
                f"{path}: a .ckpt output is a Lightning checkpoint, and {source.path.name} is not one; "
                "name the output .safetensors"
            )
        return LightningCheckpointWriter(path, plan.tensors, source.lightning, metadata)
    prefix = source.parts[0].prefix if source.is_folder else ""
    if not prefix:
        return SafetensorsWriter(path, plan.tensors, metadata, options)
    return _Unprefixed(SafetensorsWriter(path, [_strip(t, prefix) for t in plan.tensors], metadata, options), prefix)


def dcp_copies(source: CheckpointSource) -> dict[str, Path]:
    """The newest DCP checkpoint's files that a DCP output carries (Megatron-core's ``metadata.json`` and
    ``common.pt``), by name, each resolved with the links rule of ``io/links.py`` (never out of the checkpoint)."""
    return {name: inside(source.path, source.path / name) for name in source.copied if name in MEGATRON_FILES}


def dcp_objects(source: CheckpointSource) -> list[ObjectCopy]:
    """The newest DCP checkpoint's non-tensor model entries (Megatron's ``*._extra_state``), for a DCP output."""
    return [
        ObjectCopy(entry.fqn, inside(source.path, source.path / entry.relpath), entry.offset, entry.length)
        for entry in source.objects
    ]


def _strip(tensor: TensorPlan, prefix: str) -> TensorPlan:
    return replace(tensor, name=tensor.name[len(prefix) :])


class _Unprefixed:
    """A single-file output of one component: tensor names without ``component/``."""

    def __init__(self, writer: SafetensorsWriter, prefix: str) -> None:
        self.writer, self.prefix, self.path = writer, prefix, writer.path

    def write(self, name: str, data: np.ndarray) -> None:
        self.writer.write(name[len(self.prefix) :], data)

    def commit(self) -> None:
        self.writer.commit()

    def abort(self) -> None:
        self.writer.abort()


def output_file_name(relpath: str) -> str:
    """Weight files are written as safetensors: ``pytorch_model-00001-of-00002.bin`` -> ``model-00001-of-00002.safetensors``."""
    folder, _, name = relpath.rpartition("/")
    if not name.endswith(".safetensors"):
        stem = name.rsplit(".", 1)[0]
        if stem.startswith("pytorch_model"):
            stem = "model" + stem[len("pytorch_model") :]
        name = stem + ".safetensors"
    return f"{folder}/{name}" if folder else name


class FolderWriter:
    """Writes one output folder mirroring the newest checkpoint; ``commit`` renames it into place."""

    def __init__(
        self, path: Path, plan: Plan, metadata: Mapping[str, str], options: WriteOptions | None = None
    ) -> None:
        self.path = path
        self._options = options or WriteOptions()
        self._folder_mode = self._options.folder_mode
        self.temp = temp_path_for(path)
        source: CheckpointSource = plan.newest.source
        self._writers: list[SafetensorsWriter] = []
        self._route: dict[str, tuple[SafetensorsWriter, str]] = {}
        self._indexes: list[tuple[Path, dict[str, object]]] = []
        self._dtypes: dict[str, set[str]] = {}  # part folder -> output dtypes of its float tensors
        try:
            remove_stale_temps(path.parent)
            self.temp.mkdir(mode=self._folder_mode)
            self._open_writers(source, plan.tensors, metadata)
            self._copy_files(source)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        except BaseException:
            self.abort()
            raise

    def _open_writers(
        self, source: CheckpointSource, tensors: Sequence[TensorPlan], metadata: Mapping[str, str]
    ) -> None:
        by_file: dict[int, list[TensorPlan]] = {}
        for tensor in tensors:
            by_file.setdefault(source.file_number(tensor.name), []).append(tensor)
        number = 0
        for part in source.parts:
            weight_map: dict[str, str] = {}
            total = 0
            for weight_file in part.files:
                inner = [_strip(t, part.prefix) for t in by_file.get(number, [])]
                self._dtypes.setdefault(part.folder, set()).update(t.out_dtype for t in inner if t.is_float)
                number += 1
                relpath = output_file_name(weight_file.relpath)
                destination = self.temp / relpath
                self._make_folders(destination.parent)
                writer = SafetensorsWriter(destination, inner, metadata, self._options)
                self._writers.append(writer)
                for tensor in inner:
                    self._route[part.prefix + tensor.name] = (writer, tensor.name)
                    weight_map[tensor.name] = relpath.rpartition("/")[2]
                    total += tensor.nbytes
            if part.index_name is not None:
                index_name = output_file_name(part.index_name.removesuffix(".index.json")) + ".index.json"
                index_path = self.temp / (f"{part.folder}/{index_name}" if part.folder else index_name)
                body = {
                    "metadata": {**part.index_metadata, "total_size": total},
                    "weight_map": dict(sorted(weight_map.items())),
                }
                self._indexes.append((index_path, body))

    def _make_folders(self, folder: Path) -> None:
        """``folder`` inside the temporary folder, and its parents, with the outputs' folder mode."""
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for each in reversed(missing):
            each.mkdir(mode=self._folder_mode)

    def _copied(self, source: CheckpointSource) -> list[str]:
        return list(source.copied)

    def _copy_files(self, source: CheckpointSource) -> None:
        """The newest checkpoint's configs and tokenizer files; links are followed only inside it."""
        for relpath in self._copied(source):
            destination = self.temp / relpath.rstrip("/")
            self._make_folders(destination.parent)
            folder, _, name = relpath.rpartition("/")
            if name == "config.json" and folder in self._dtypes:  # says the dtype the weights are written in
                origin = inside(source.path, source.path / relpath)  # links only inside the checkpoint
                if copy_config(origin, destination, config_dtype_name(self._dtypes[folder])):
                    continue
            self._copy(source.path, source.path / relpath.rstrip("/"), destination)

    def _copy(self, root: Path, origin: Path, destination: Path) -> None:
        for relative, real in walk_copy(root, origin):  # a link leaving the checkpoint is refused, never copied
            target = destination / relative
            if real is None:
                if not target.exists():
                    target.mkdir(mode=self._folder_mode)
            else:
                copy_file(real, target, self._options.mode)

    def write(self, name: str, data: np.ndarray) -> None:
        writer, inner = self._route[name]
        writer.write(inner, data)

    def commit(self) -> None:
        """Finish every file, write the indexes, then rename the folder into place (replacing an old one)."""
        try:
            for writer in self._writers:
                writer.commit()
            for index_path, body in self._indexes:
                _write_new(index_path, (json.dumps(body, indent=2) + "\n").encode("utf-8"), self._options.mode)
            replace_folder(self.temp, self.path)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: cannot finish writing ({exc.strerror or exc})") from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for writer in self._writers:
            writer.abort()
        shutil.rmtree(self.temp, ignore_errors=True)


class ExportFolderWriter(FolderWriter):
    """A Hugging Face folder for a model that has no such layout (DCP, DeepSpeed): ``model.safetensors``, or
    ``model-0000K-of-0000N.safetensors`` of at most ``options.max_shard_bytes`` each and the index, as
    ``save_pretrained`` and ``zero_to_fp32`` write them (``output/shards.py``), with the checkpoint's
    ``config.json`` and tokenizer files if it has them. Each tensor streams into its slot of its shard (a DCP
    tensor sharded on dim 0 arrives piece by piece); ``commit`` renames the folder into place."""

    def _open_writers(
        self, source: CheckpointSource, tensors: Sequence[TensorPlan], metadata: Mapping[str, str]
    ) -> None:
        shards = split_shards(tensors, self._options.max_shard_bytes)
        names = shard_names(len(shards))
        self._dtypes[""] = {t.out_dtype for t in tensors if t.is_float}
        weight_map: dict[str, str] = {}
        for name, shard in zip(names, shards):
            writer = SafetensorsWriter(self.temp / name, shard, metadata, self._options)
            self._writers.append(writer)
            for tensor in shard:
                self._route[tensor.name] = (writer, tensor.name)
                weight_map[tensor.name] = name
        if len(shards) > 1:
            body = {
                "metadata": {"total_size": sum(t.nbytes for t in tensors)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            self._indexes.append((self.temp / INDEX_NAME, body))

    def _copied(self, source: CheckpointSource) -> list[str]:
        return [name for name in source.copied if name not in MEGATRON_FILES]


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file of permission ``mode``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, mode), "wb") as f:
        f.write(data)
