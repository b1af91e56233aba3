"""Folder checkpoints: Hugging Face models (single file or sharded with an index), Trainer
``checkpoint-N/`` folders, diffusers pipelines (one folder per component) and OneTrainer backups.

A folder holds at most one model at its top level (``model.safetensors``, or shards listed by
``*.index.json``) and any number of component folders (``unet/``, ``text_encoder/``, ``lora/`` ...), each
holding one model the same way. Tensors of a component are named ``component/name``. Everything else is
either trainer state (optimizer, scheduler, RNG, the trainer's own EMA: ignored, with the reason shown
by ``inspect``) or a file the model needs to load (``config.json``, tokenizer files, ``model_index.json``,
``scheduler/``: copied unchanged from the newest checkpoint into a folder output).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from ckpt_ema.errors import InputError
from ckpt_ema.io.accelerate import accelerate_step_records, is_accelerate_state
from ckpt_ema.io.dcp import is_dcp_folder
from ckpt_ema.io.deepspeed import is_deepspeed_folder
from ckpt_ema.io.links import inside
from ckpt_ema.io.safetensors_file import safetensors_weight_file
from ckpt_ema.io.source import CheckpointSource, FileNote, Part, WeightFile
from ckpt_ema.io.torch_pickle import torch_weight_file

# Files a trainer writes to resume training; never averaged, never copied.
TRAINER_FILES = (
    (re.compile(r"^optimizer(_\d+)?\.(pt|bin|safetensors)$"), "optimizer state"),
    (re.compile(r"^scheduler(_\d+)?\.(pt|bin)$"), "learning-rate scheduler state"),
    (re.compile(r"^scaler(_\d+)?\.pt$"), "AMP grad-scaler state"),
    (re.compile(r"^(rng_state|random_states)(_\d+)?\.(pth|pkl)$"), "random-number generator state"),
    (re.compile(r"^training_args\.bin$"), "training arguments (a pickle, never loaded)"),
    (re.compile(r"^trainer_state\.json$"), "Trainer state (its global_step is read)"),
    (re.compile(r"^meta\.json$"), "OneTrainer progress (its global_step is read)"),
    (re.compile(r"^train_state\.json$"), "kohya resume state"),
    (re.compile(r"^pytorch_model_fsdp.*$"), "FSDP shard of the training state"),
)
TRAINER_FOLDERS = {
    "optimizer": "optimizer state",
    "ema": "the trainer's own EMA (OneTrainer ema.pt is an unnamed list of tensors; raw weights are averaged)",
    "onetrainer_config": "OneTrainer configuration (not part of the model)",
}
WEIGHT_NAME = re.compile(
    r"^(model|diffusion_pytorch_model|pytorch_model|adapter_model|lora|tf_model|flax_model)"
    r"(-\d{5}-of-\d{5})?(\.[\w]+)?\.(safetensors|bin)$"
)
# accelerate's save_state with several prepared models: model.safetensors, model_1.safetensors, ...
ACCELERATE_MODELS = re.compile(r"^(model|pytorch_model)(_\d+)?\.(safetensors|bin)$")
MARKER_FILES = ("model_index.json", "config.json", "meta.json", "trainer_state.json", "adapter_config.json")
CHECKPOINT_FOLDER_NAME = re.compile(r"(^checkpoint-\d+$)|(-backup-\d+-\d+-\d+$)")


def is_checkpoint_folder(path: Path) -> bool:
    """A folder that is one checkpoint (as opposed to a folder holding a series of checkpoints)."""
    if CHECKPOINT_FOLDER_NAME.search(path.name):
        return True
    names = {p.name for p in path.iterdir()}
    if any(m in names for m in MARKER_FILES) or any(n.endswith(".index.json") for n in names):
        return True
    if is_dcp_folder(path) or is_deepspeed_folder(path):
        return True
    return any(WEIGHT_NAME.match(n) for n in names)


def trainer_file_reason(name: str) -> str | None:
    for pattern, reason in TRAINER_FILES:
        if pattern.match(name):
            return reason
    return None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: cannot read JSON ({exc})") from None
    except RecursionError:
        raise InputError(f"{path}: cannot read JSON (nested too deeply)") from None


def _weight_map(index_path: Path, index: object) -> dict[str, str]:
    """An index's ``weight_map`` (tensor name -> shard file name), checked: a non-empty map of names to
    plain file names of the index's own folder."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index_path}: not a sharded-checkpoint index (no 'weight_map')")
    if not weight_map:
        raise InputError(f"{index_path}: its 'weight_map' is empty (no tensors); not a usable index")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(
                f"{index_path}: 'weight_map' maps {tensor!r} to {type(shard).__name__} {_short(shard)}; "
                "expected the name of a shard file"
            )
        if not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise InputError(f"{index_path}: 'weight_map' names {shard!r}, not a file name in {index_path.parent}")
    return weight_map


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _weight_file(root: Path, path: Path, relpath: str) -> WeightFile:
    """One weight file of the checkpoint ``root``; a link to a file outside it is refused (io.links)."""
    inside(root, path)
    if path.suffix == ".safetensors":
        return safetensors_weight_file(path, relpath)
    return torch_weight_file(path, relpath)[0]


def _scan_part(folder: Path, name: str, ignored: list[FileNote]) -> tuple[Part | None, set[str]]:
    """The model in ``folder`` (None if none) and the file names it uses; notes skipped duplicates."""
    rel = f"{name}/" if name else ""
    root = folder.parent if name else folder  # components are folders of the checkpoint
    files = sorted(p for p in folder.iterdir() if p.is_file())
    names = {p.name for p in files}
    indexes = [p for p in files if p.name.endswith((".safetensors.index.json", ".bin.index.json"))]
    # prefer safetensors over pickles of the same model, and the plain over a variant (fp16, ema)
    indexes.sort(key=lambda p: (not p.name.endswith(".safetensors.index.json"), p.name.count(".")))
    used: set[str] = set()
    if indexes:
        index_path = indexes[0]
        for other in indexes[1:]:
            ignored.append(FileNote(rel + other.name, f"another copy of the model ({index_path.name} is read)"))
        index = _read_json(index_path)
        weight_map = _weight_map(index_path, index)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in names]
        if missing:
            raise InputError(f"{index_path}: lists shards that are missing: {', '.join(missing)}")
        weight_files = [_weight_file(root, folder / s, rel + s) for s in shards]
        for weight_file in weight_files:
            expected = {t for t, s in weight_map.items() if s == Path(weight_file.relpath).name}
            if set(weight_file.tensors) != expected:
                raise InputError(
                    f"{weight_file.path}: its tensors do not match {index_path.name}'s weight_map "
                    f"({len(weight_file.tensors)} in the file, {len(expected)} in the map)"
                )
        used = {index_path.name, *shards}
        found = index.get("metadata") if isinstance(index, dict) else None
        meta: dict[str, object] = found if isinstance(found, dict) else {}
        part = Part(name, weight_files, index_path.name, {k: v for k, v in meta.items() if k != "total_size"})
        for other in files:
            if other.name not in used and other.suffix in (".safetensors", ".bin") and WEIGHT_NAME.match(other.name):
                ignored.append(FileNote(rel + other.name, f"another copy of the model ({index_path.name} is read)"))
                used.add(other.name)
        return part, used
    candidates = [
        p
        for p in files
        if not trainer_file_reason(p.name)
        and (p.suffix == ".safetensors" or (p.suffix == ".bin" and WEIGHT_NAME.match(p.name)))
    ]
    if not candidates:
        return None, used
    candidates.sort(key=lambda p: (p.suffix != ".safetensors", p.name.count("."), p.name))
    chosen = candidates[0]
    plain = [p for p in candidates if p.name.count(".") == 1 and p.suffix == ".safetensors"]
    if len(plain) > 1 and not name and all(ACCELERATE_MODELS.match(p.name) for p in plain):
        return None, used  # accelerate's models, one part each: see _accelerate_parts
    if len(plain) > 1:
        raise InputError(
            f"{folder}: several weight files ({', '.join(p.name for p in plain)}) and no index; "
            "pass the file you mean instead of the folder"
        )
    for other in candidates[1:]:
        ignored.append(FileNote(rel + other.name, f"another copy or variant of the model ({chosen.name} is read)"))
    used = {p.name for p in candidates}
    return Part(name, [_weight_file(root, chosen, rel + chosen.name)]), used


def _other_files(folder: Path, rel: str, used: set[str], ignored: list[FileNote], copied: list[str]) -> None:
    """Files beside a model's weights: trainer state is ignored, the rest (configs, tokenizers) copied."""
    for entry in sorted(folder.iterdir()):
        if not entry.is_file() or entry.name in used:
            continue
        reason = trainer_file_reason(entry.name)
        if reason:
            ignored.append(FileNote(rel + entry.name, reason))
        elif entry.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
            ignored.append(FileNote(rel + entry.name, "a pickle that is not the model's weights (never loaded)"))
        else:
            copied.append(rel + entry.name)


def open_folder(path: Path, component: Sequence[str] | None = None) -> CheckpointSource:
    """Read a folder checkpoint's layout and headers (no tensor data)."""
    ignored: list[FileNote] = []
    copied: list[str] = []
    parts: list[Part] = []
    top_part, used = _scan_part(path, "", ignored)
    if top_part is not None:
        parts.append(top_part)
    else:
        accelerate_parts = _accelerate_parts(path)
        parts.extend(accelerate_parts)
        used |= {f.relpath for p in accelerate_parts for f in p.files}
    entries = sorted(path.iterdir())
    folders = {p.name: p for p in entries if p.is_dir()}
    _other_files(path, "", used, ignored, copied)
    for entry in entries:
        name = entry.name
        if not entry.is_dir() or name.startswith("."):
            continue
        if name in TRAINER_FOLDERS:
            ignored.append(FileNote(name + "/", TRAINER_FOLDERS[name]))
            continue
        if name.endswith("_ema") and name[: -len("_ema")] in folders:
            raw = name[: -len("_ema")]
            ignored.append(FileNote(name + "/", f"the trainer's own EMA of {raw}/; the raw {raw}/ is averaged"))
            continue
        part, part_used = _scan_part(entry, name, ignored)
        if part is None:
            copied.append(name + "/")
        else:
            parts.append(part)
            _other_files(entry, name + "/", part_used, ignored, copied)
    if not parts:
        raise InputError(f"{path}: folder holds no model weights (.safetensors, or pytorch_model*.bin)")
    if component:
        names = [p.name for p in parts]
        unknown = [c for c in component if c not in names]
        if unknown:
            raise InputError(f"{path}: no component {', '.join(map(repr, unknown))} (found: {', '.join(names)})")
        for part in parts:
            if part.name not in component:  # copied whole from the newest checkpoint
                if part.folder:
                    copied[:] = [c for c in copied if not c.startswith(part.folder + "/")]
                copied.extend([part.folder + "/"] if part.folder else [f.relpath for f in part.files])
                if not part.name and part.index_name:
                    copied.append(part.index_name)
        parts = [p for p in parts if p.name in component]
    step_records = folder_step_records(path)
    described = _describe(path, parts)
    first = parts[0].files[0]
    source = CheckpointSource(path, described, parts, metadata=first.metadata, is_folder=True)
    source.step_records = step_records
    source.ignored = ignored
    source.copied = copied
    return source


def folder_step_records(path: Path) -> list[tuple[str, int]]:
    """The trainer's records of a checkpoint folder's step, as ``[(source, step)]``: Hugging Face's
    ``trainer_state.json``, OneTrainer's ``meta.json``; for an accelerate ``save_state()`` folder whose name is
    not ``checkpoint-N`` (``checkpoint_3`` counts saves), the optimizer's or the scheduler's count."""
    records: list[tuple[str, int]] = []
    trainer_state = path / "trainer_state.json"
    if trainer_state.is_file():
        state = _read_json(trainer_state)
        if isinstance(state, dict) and isinstance(state.get("global_step"), int):
            records.append(("trainer_state.json 'global_step'", state["global_step"]))
    meta = path / "meta.json"
    if meta.is_file():
        progress = _read_json(meta)
        progress = progress.get("train_progress") if isinstance(progress, dict) else None
        if isinstance(progress, dict) and isinstance(progress.get("global_step"), int):
            records.append(("OneTrainer meta.json 'global_step'", progress["global_step"]))
    if not records and not CHECKPOINT_FOLDER_NAME.search(path.name) and is_accelerate_state(path):
        records = accelerate_step_records(path)
    return records


def _accelerate_parts(folder: Path) -> list[Part]:
    """accelerate's ``model.safetensors``, ``model_1.safetensors``, ...: one part each, named by the file."""
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and ACCELERATE_MODELS.match(p.name) and p.suffix == ".safetensors"),
        key=lambda p: (len(p.name), p.name),
    )
    return [Part(p.name.split(".")[0], [_weight_file(folder, p, p.name)], in_root=True) for p in files]


def _describe(path: Path, parts: list[Part]) -> str:
    names = {p.name for p in parts}
    if (path / "meta.json").is_file():
        kind = "OneTrainer backup"
    elif parts and all(p.in_root for p in parts):
        kind = "accelerate save_state folder"
    elif (path / "model_index.json").is_file() or (len(parts) > 1 or "" not in names):
        kind = "diffusers-style folder"
    else:
        kind = "Hugging Face folder"
    pieces = []
    for part in parts:
        label = part.name or "model"
        count = len(part.files)
        pieces.append(
            f"{label}: {count} shards" if count > 1 else f"{label}: {part.files[0].relpath.rsplit('/', 1)[-1]}"
        )
    return f"{kind} ({'; '.join(pieces)})"
