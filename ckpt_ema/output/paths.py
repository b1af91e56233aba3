"""Where outputs go: the one policy for every command (merge, sweep, batch, torchrun merges).

One target writes ``-o`` itself; several write into the folder ``-o``, one file (or folder) each, named
after the target. An output never replaces an input (or a hard link to one), never lands inside a folder
checkpoint of the series, and replaces an existing output only with ``--force``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ckpt_ema.errors import OutputError
from ckpt_ema.io.links import kind_of
from ckpt_ema.output.layouts import writes_dcp, writes_export_folder, writes_folder
from ckpt_ema.plan.model import Plan
from ckpt_ema.series.discover import file_id

SUFFIX = ".safetensors"


def output_paths(plan: Plan, output: str | os.PathLike, force: bool = False, fmt: str | None = None) -> list[Path]:
    """Where each output goes: ``output`` itself for one target, ``output/NAME.safetensors`` for several.

    An existing folder (or a path ending in ``/``) is always taken as the folder to write into. Refuses
    to write over an input (or a hard link to one), or over an existing file without ``force``.
    Folder checkpoints give folder outputs (``output``, or ``output/NAME/``) unless ``fmt="safetensors"``;
    so do DCP and DeepSpeed checkpoints written as safetensors, unless ``output`` names a ``.safetensors`` file.
    """
    if fmt == "folder" and plan.newest.source.exports_folder and Path(output).suffix.lower() == SUFFIX:
        raise OutputError(f"{output}: --format folder writes a Hugging Face folder; give a folder name")
    if writes_folder(plan, fmt) or writes_dcp(plan, fmt) or writes_export_folder(plan, fmt, output):
        return _outside_checkpoint_folders(plan, folder_output_paths(plan, output, force))
    out = Path(output)
    as_folder = len(plan.outputs) > 1 or out.is_dir() or str(output).endswith(os.sep)
    if len(plan.outputs) > 1 and out.suffix == SUFFIX and not out.is_dir():
        raise OutputError(
            f"{out}: {len(plan.outputs)} targets are written into a folder, one file each; "
            f"give a folder (e.g. -o {out.with_suffix('')}/), not a file name"
        )
    paths = [out / f"{o.name}{SUFFIX}" for o in plan.outputs] if as_folder else [out]
    inputs = [c.path for c in plan.checkpoints + plan.ignored]
    input_ids = {file_id(p): p for p in inputs}
    for path in paths:
        if path.exists() and path.is_dir():
            raise OutputError(f"{path}: is a folder; give a file name for the output")
        if path.exists() and file_id(path) in input_ids:
            raise OutputError(f"{path}: is an input ({input_ids[file_id(path)]}); choose another output")
        _refuse_odd_files(path, force)
        if path.exists() and not force:
            raise OutputError(f"{path}: already exists; pass --force to replace it")
    return _outside_checkpoint_folders(plan, paths)


def _outside_checkpoint_folders(plan: Plan, paths: list[Path]) -> list[Path]:
    """Refuse outputs inside a folder checkpoint of the series: an input is never added to."""
    folders = [c.path.resolve() for c in plan.checkpoints + plan.ignored if c.path.is_dir()]
    for path in paths:
        resolved = path.resolve()
        for folder in folders:
            if folder in resolved.parents:
                raise OutputError(f"{path}: is inside the checkpoint folder {folder}; choose another output")
    return paths


def folder_output_paths(plan: Plan, output: str | os.PathLike, force: bool) -> list[Path]:
    """``output`` itself for one target, ``output/NAME/`` for several; never an input or a folder holding one."""
    out = Path(output)
    if out.suffix.lower() == ".safetensors":
        raise OutputError(
            f"{out}: the checkpoints are folders ({plan.newest.path.name}), so the EMA is a folder like them; "
            "give a folder name, or pass --format safetensors for one file"
        )
    paths = [out / o.name for o in plan.outputs] if len(plan.outputs) > 1 else [out]
    return _checked_folders(plan, paths, force, "a folder checkpoint's EMA is a folder")


def _checked_folders(plan: Plan, paths: list[Path], force: bool, why: str) -> list[Path]:
    """Folder outputs: never an input or a folder holding one, a file or an odd file (links, devices: see
    ``_refuse_odd_files``), and an existing folder only with ``force`` (it is replaced whole)."""
    inputs = [c.path.resolve() for c in plan.checkpoints + plan.ignored]
    for path in paths:
        resolved = path.resolve()
        for input_path in inputs:
            if resolved == input_path or resolved in input_path.parents:
                raise OutputError(f"{path}: would replace the input {input_path}; choose another output")
        _refuse_odd_files(path, force)
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path}: is a file; {why}")
        if path.exists() and not force:
            raise OutputError(f"{path}: already exists; pass --force to replace it")
    return paths


def _refuse_odd_files(path: Path, force: bool) -> None:
    """A symbolic link at the output path is replaced (the link itself, never its target) only with
    ``--force``, even when it leads nowhere; a FIFO, device or socket is never replaced."""
    try:
        info = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(info.st_mode):
        if not force:
            where = os.readlink(path)
            missing = "" if path.exists() else ", which does not exist"
            raise OutputError(f"{path}: is a symbolic link (to {where}{missing}); pass --force to replace the link")
    elif not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise OutputError(
            f"{path}: is {kind_of(info.st_mode)}, not a regular file; ckpt-ema never replaces one, choose another output"
        )


def output_mode(plan: Plan) -> int:
    """The permission bits of the outputs: those every input file has (the most restrictive of them),
    without execute bits. Inputs readable only by their owner (0600) give outputs readable only by them."""
    mode = 0o666
    for checkpoint in plan.checkpoints + plan.ignored:
        for weight_file in checkpoint.source.files:
            try:
                mode &= os.stat(weight_file.path).st_mode
            except OSError:
                pass  # gone since it was planned: the pass will say so
    return mode & 0o666


def paths_in_folder(plan: Plan, folder: Path, force: bool = False) -> list[Path]:
    """Each output's path inside ``folder``, named after its target (also for a single output)."""
    if len(plan.outputs) == 1:
        name = plan.outputs[0].name + ("" if writes_folder(plan, None) or writes_dcp(plan, None) else SUFFIX)
        return output_paths(plan, folder / name, force=force)
    return output_paths(plan, folder, force=force)


def sharded_output_folders(plan: Plan, output: str | os.PathLike, force: bool) -> list[Path]:
    """A distributed run's folders: ``output`` for one target, ``output/NAME`` for several, checked as every
    folder output is (an existing one replaced whole, only with ``force``; never an input, a link without
    ``force``, a device; never inside a checkpoint folder of the series)."""
    out = Path(output)
    folders = [out / o.name for o in plan.outputs] if len(plan.outputs) > 1 else [out]
    checked = _checked_folders(plan, folders, force, "a distributed run writes a folder")
    return _outside_checkpoint_folders(plan, checked)
