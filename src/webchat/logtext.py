"""Make untrusted text safe to put in a log line.

Chat text goes into log lines, and a log line is only trustworthy if nobody
but the server can start one: a raw newline in a message would let any
participant forge ``New connection!`` lines or hide their own.  So every
character that could move the cursor, end a line or confuse a terminal is
written as a Python-style escape, the backslash itself included (otherwise
``\\n`` typed by a user and an escaped newline would look the same).
"""

from __future__ import annotations

import re

#: How many characters of user text a log line carries before it is cut.
LOG_TEXT_LIMIT = 200

# C0 controls, DEL, C1 controls, the Unicode line/paragraph separators, the
# bidi overrides that can reorder what a reader sees, and the backslash.
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_for_log(text: str, limit: int = LOG_TEXT_LIMIT) -> str:
    """
    Return ``text`` cut to ``limit`` characters and escaped onto one line.

    A cut is marked with a trailing ``…[N chars]`` so a reader knows the log
    does not show the whole message.
    """
    suffix = ""
    if len(text) > limit:
        suffix = f"…[{len(text)} chars]"
        text = text[:limit]
    return _UNSAFE.sub(_escape_one, text) + suffix


class LogText:
    """
    Message bytes for a log event, decoded and escaped only if the event is
    ever formatted.

    The per-message log line is the one on the hot path: with its level
    filtered out (or the observer dropping it) no user text is decoded,
    escaped or cut at all.
    """

    __slots__ = ("_payload",)

    def __init__(self, payload: bytes) -> None:
        self._payload = payload

    def __str__(self) -> str:
        return escape_for_log(self._payload.decode("utf-8", "replace"))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return repr(str(self))
