"""Server-to-client WebSocket frames, built once per message.

A chat message goes to every other client as the same bytes: the frame is
built here once and the same ``bytes`` object is handed to every recipient.
Server frames are never masked (RFC 6455, 5.1), so no per-recipient work is
left but the write itself.
"""

from __future__ import annotations

import struct

_TEXT_FIN = 0x81
_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def text_frame(*parts: bytes) -> bytes:
    """One final text frame whose payload is ``parts`` joined."""
    length = sum(len(part) for part in parts)
    if length < 126:
        head = _SHORT.pack(_TEXT_FIN, length)
    elif length < 1 << 16:
        head = _MEDIUM.pack(_TEXT_FIN, 126, length)
    else:
        head = _LONG.pack(_TEXT_FIN, 127, length)
    return b"".join((head, *parts))
