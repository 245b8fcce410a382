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
from urllib.parse import unquote_plus

#: How many characters of user text a log line carries before it is cut.
LOG_TEXT_LIMIT = 200

# The backslash; C0 controls, DEL and C1 controls; and every character of
# Unicode's categories Cf (format: invisible, such as the bidi marks and
# overrides that reorder what a reader sees, U+200B zero width space, U+FEFF,
# U+00AD soft hyphen, the tag characters) and Zl/Zp (U+2028, U+2029, which
# some viewers take for a new line).  Python's re knows no \p{Cf}, so the
# ranges are spelled out (Unicode 14, as Python 3.11's unicodedata has it);
# tests/test_logtext.py checks them against the running Python's unicodedata.
_UNSAFE = re.compile(
    "[\\\\\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f"
    "\u0890\u0891\u08e2\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f]"
)

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


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


#: What a redacted query value is written as.
REDACTED = "[redacted]"

#: Query parameters whose values are secrets: never in a log line.
_SECRET_PARAMETERS = frozenset({"token"})

#: One query parameter in any text (a path, a URL, a whole access log line).
_PARAMETER = re.compile(r'([?&;])([^&;=#?\s"]+)=([^&;#\s"]*)')


def _redact_one(match: re.Match[str]) -> str:
    separator, key, _ = match.groups()
    if unquote_plus(key).strip().lower() in _SECRET_PARAMETERS:
        return f"{separator}{key}={REDACTED}"
    return match.group()


def redact_query(text: str) -> str:
    """
    ``text`` (a request path with its query, a URL, a whole access log
    line) with the value of every ``token=`` query parameter replaced by
    ``[redacted]``.

    A token in the query is a bearer secret (browsers cannot send one in a
    header), and request targets reach log lines: the access log (the
    request and its Referer), a refused room's name.  The parameter's name
    is compared as a server reads it (percent-decoded, any case), so
    ``?%74oken=`` is caught too.
    """
    if "=" not in text:
        return text
    return _PARAMETER.sub(_redact_one, text)
