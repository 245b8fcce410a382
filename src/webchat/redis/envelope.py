"""The envelope: one chat message on its way between nodes.

docs/protocol.md ("Between nodes") has the long form.  Each accepted chat
message is published once, as one Redis message on the channel::

    wc1 SP <node> SP <id> SP <text>

* ``wc1`` names the format and its version.  A later, incompatible format
  gets a new first word (``wc2``); a node drops what it cannot read.
* ``<node>``: the publishing node's id, 1-64 characters of ``A-Z a-z 0-9
  . _ : -``.  Redis echoes a node's own messages back to it; this is how it
  recognises and skips them.
* ``<id>``: the sender's connection id, decimal, 1 to 2**53 - 1, no sign and
  no leading zeros.
* ``<text>``: the message exactly as the client sent it: UTF-8, possibly
  empty, spaces and newlines included; it runs to the end of the payload.

Why not JSON: every node decodes every other node's messages, and JSON costs
3.0 µs to encode and 2.3 µs to decode (with checks) where this format costs
0.2 and 1.0 (docs/protocol.md has the measurements); it would also turn the
text into ``str`` and back on both sides.  This format keeps the text as the
bytes from the sender's socket to the receivers' frames, and a node spots its
own echo by comparing a prefix.
"""

from __future__ import annotations

import os
import random
import re
import socket
from typing import Any, NamedTuple

from webchat.logtext import escape_for_log

#: The envelope's first word: its format and version.
ENVELOPE_VERSION = b"wc1"
#: Largest connection id any node hands out, and an envelope may carry
#: (exact in JavaScript too).
MAX_CHAT_ID = (1 << 53) - 1

_NODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_NODE_ID_BYTES = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_SURROGATE = re.compile("[\udc80-\udcff]")


class Envelope(NamedTuple):
    """One chat message from another node."""

    #: The node that published it.
    node: str
    #: The sender's connection id.
    chat_id: int
    #: The message, UTF-8 (checked), as the sender's client sent it.
    text: bytes


class MalformedEnvelopeError(ValueError):
    """A payload on the channel that is not an envelope this node can read."""


def envelope_prefix(node: str) -> bytes:
    """
    What every envelope ``node`` publishes starts with: the node builds its
    envelopes on it, and spots its own echo by it.
    """
    return b"%b %b " % (ENVELOPE_VERSION, node.encode("ascii"))


def encode_envelope(node: str, chat_id: int, text: bytes) -> bytes:
    """The payload that carries ``text`` from connection ``chat_id`` of ``node``."""
    return b"%b %b %d %b" % (ENVELOPE_VERSION, node.encode("ascii"), chat_id, text)


def decode_envelope(payload: bytes) -> Envelope:
    """Read an envelope; raise ``MalformedEnvelopeError`` saying what is wrong."""
    if not isinstance(payload, bytes):
        raise MalformedEnvelopeError(f"not a byte string: {type(payload).__name__}")
    parts = payload.split(b" ", 3)
    if len(parts) != 4:
        raise MalformedEnvelopeError("fewer than four space-separated fields")
    version, node, chat_id, text = parts
    if version != ENVELOPE_VERSION:
        raise MalformedEnvelopeError("unknown format or version")
    if _NODE_ID_BYTES.fullmatch(node) is None:
        raise MalformedEnvelopeError("invalid node id")
    # isdigit() on bytes is ASCII-only; no leading zeros keeps one spelling per id.
    if not chat_id.isdigit() or chat_id[:1] == b"0" or len(chat_id) > 16:
        raise MalformedEnvelopeError("invalid connection id")
    number = int(chat_id)
    if number > MAX_CHAT_ID:
        raise MalformedEnvelopeError("connection id out of range")
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as e:
        # Relayed as a WebSocket text frame, it would make browsers close 1007.
        raise MalformedEnvelopeError("text is not valid UTF-8") from e
    return Envelope(node.decode("ascii"), number, text)


def too_large(envelope: Envelope, max_text_size: int) -> bool:
    """
    Whether the text is over ``max_text_size`` (--max-message-size; 0 = any).

    A node checks its own clients' messages, but anyone who can PUBLISH on
    the channel could otherwise hand every client here a message of any size.
    """
    return 0 < max_text_size < len(envelope.text)


def payload_for_log(payload: Any) -> str:
    """A dropped payload as a log line shows it: escaped, bytes that are not
    UTF-8 as ``\\xNN`` like control characters."""
    if isinstance(payload, bytes):
        return _SURROGATE.sub(
            _byte_escape, escape_for_log(payload.decode("utf-8", "surrogateescape"))
        )
    return escape_for_log(repr(payload))


def _byte_escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()) - 0xDC00:02x}"


def check_node_id(node_id: str) -> str:
    """A node id: 1-64 characters of ``A-Z a-z 0-9 . _ : -``."""
    if _NODE_ID.fullmatch(node_id) is None:
        raise ValueError(
            f"invalid node id {escape_for_log(node_id)!r}: use 1-64 of "
            "A-Z a-z 0-9 . _ : -"
        )
    return node_id


def default_node_id(rng: random.Random | None = None) -> str:
    """
    ``host-pid-random``: unique, and says in Redis's ``CLIENT LIST`` and in
    the envelopes which process a connection or message belongs to.
    """
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "node"
    token = (rng or random.SystemRandom()).getrandbits(32)
    return f"{host}-{os.getpid()}-{token:08x}"
