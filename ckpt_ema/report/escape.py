"""Text from files, made safe to print: every character a terminal could act on is shown as an escape.

Tensor names, metadata (kohya ``ss_*``), Lightning version strings and file names come from files that may
come from anywhere. Printed raw, an ANSI escape recolours or clears the terminal, sets its title, or
hides text; a ``\\r`` or ``\\n`` forges a line (``warning: ... ok``). ``printable`` shows each such
character as ``\\x1b``, ``\\r``, ``\\u202e``, ..., so a message stays one line and says what the file holds.
JSON output needs none of this: ``json.dumps`` escapes control characters itself.
"""

from __future__ import annotations

import re

# C0 controls (tab kept), DEL, C1 controls, Unicode bidirectional overrides and isolates, line and
# paragraph separators, and lone surrogates (undecodable bytes of a file name, which print would refuse).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_KEEP_NEWLINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, keep_newlines: bool = False) -> str:
    """``text`` with control characters escaped; newlines too unless ``keep_newlines`` (for text whose
    lines ckpt-ema itself joined; anything from a file is escaped before it is joined)."""
    return (_UNSAFE_KEEP_NEWLINES if keep_newlines else _UNSAFE).sub(_escape, text)


def printable_lines(lines: list[str]) -> str:
    """Lines built by ckpt-ema, each escaped on its own (a newline inside one is from a file), joined."""
    return "\n".join(printable(line) for line in lines)
