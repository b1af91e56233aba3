"""What a torch file in the legacy (pre-1.6, non-zip) format would import when loaded, found without loading it.

ckpt-ema never loads such a file (it cannot be memory-mapped, and loading is where a pickle runs code). To
say *why* it is refused, the pickle's opcodes are only listed (``pickletools.genops``, which executes
nothing): a legacy file is four pickles in a row (magic number, protocol version, system info, then the
object), and every ``GLOBAL``/``STACK_GLOBAL`` of the object names something it would import. Anything
beyond what torch's own ``weights_only`` loader allows (tensors, storages, ``OrderedDict``...) is code.
"""

from __future__ import annotations

import pickletools
from pathlib import Path
from typing import IO

LEGACY_PICKLES = 4  # magic number, protocol version, sys info, the object
MAX_OPCODES = 5_000_000  # a state dict has a few opcodes per tensor; bounds the scan of a hostile file
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def _allowed() -> set[str]:
    """What torch's weights_only unpickler accepts (``module.name``); a minimal set if torch hides it."""
    try:
        from torch import _weights_only_unpickler

        return {str(name) for name in _weights_only_unpickler._get_allowed_globals()}
    except (ImportError, AttributeError):
        return {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"}


def code_globals(path: Path) -> list[str]:
    """The globals (``posix.system``, ``builtins.exec``, ...) a legacy torch file imports beyond plain tensors.

    Returns an empty list for a file that only holds tensors, or that cannot be scanned (then nothing is
    claimed about it).
    """
    found: list[str] = []
    try:
        with open(path, "rb") as f:
            for _ in range(LEGACY_PICKLES):
                found += _globals_of_one_pickle(f)
    except (OSError, ValueError, EOFError, UnicodeDecodeError):
        pass  # not a well-formed pickle stream: report what was found so far
    allowed = _allowed()
    storages = {name for name in found if name.startswith("torch.") and name.endswith("Storage")}
    return sorted({name for name in found if name not in allowed and name not in storages})


def _globals_of_one_pickle(f: IO[bytes]) -> list[str]:
    names: list[str] = []
    recent: list[object] = []  # the last values pushed, enough to follow STACK_GLOBAL's two strings
    memo: dict[int, object] = {}
    for count, (opcode, arg, _) in enumerate(pickletools.genops(f)):
        if count > MAX_OPCODES:
            break
        name = opcode.name
        if name == "GLOBAL" and isinstance(arg, str):
            names.append(arg.replace(" ", ".", 1))
            recent.append(None)
        elif name == "STACK_GLOBAL":
            module, attribute = (recent[-2:] + [None, None])[:2] if len(recent) >= 2 else (None, None)
            names.append(f"{module}.{attribute}" if isinstance(module, str) and isinstance(attribute, str) else "?")
            recent.append(None)
        elif name in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else None)
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in _PUT_OPS and isinstance(arg, int):
            memo[arg] = recent[-1] if recent else None
        elif name in _GET_OPS and isinstance(arg, int):
            recent.append(memo.get(arg))
        elif opcode.stack_after:
            recent.append(None)
        del recent[:-4]
    return names
