"""The envelope: one chat message, or one presence change, between nodes.

docs/protocol.md ("Between nodes") has the long form.  Everything a node
tells the others is one Redis message on the channel, ``wc2``'s words
separated by single spaces (SP), a chat message's text after the first LF::

    wc2 <node> m <room> <id> <ts> <name> LF <text>     a chat message
    wc2 <node> s <room> <offset> <epoch> <id> <ts> <name> LF <text>
                                                       one kept in Redis (d:
                                                       delayed by an outage)
    wc2 <node> j <version> <room> <id> <name>[ LF <user>]  joined
    wc2 <node> n <version> <room> <id> <name>[ LF <user>]  renamed
    wc2 <node> l <version> <room> <id>                 left
    wc2 <node> t <room> <id> <name>[ LF <user>]        is typing
    wc2 <node> h <version>                             heartbeat
    wc2 <node> k <user> LF <reason>                    disconnect the user
                                                       (the server API)
    wc2 <node> x <version>                             stopped: all gone

* ``wc2`` names the format and its version; ``wc1`` (no rooms, no names,
  no presence) is still read, into the lobby, so an upgraded node hears the
  old ones; a ``wc1`` node drops ``wc2`` as malformed.
* ``<node>``: the publishing node's id, 1-64 characters of ``A-Z a-z 0-9
  . _ : -``.  Redis echoes a node's own messages back to it; this is how it
  recognises and skips them.
* ``<room>``: a room name (``[A-Za-z0-9._-]{1,64}``): never a space.
* ``<id>``: a connection id, decimal, 1 to 2**53 - 1, no sign and no
  leading zeros.  ``<ts>``: the server time in ms, decimal.
* ``<version>``: the node's presence version, counting up by one per
  join, rename or leave; a receiver that sees one skipped reads the node's
  presence hash (``webchat.redis.presence``).
* ``<name>``: a member's name (``check_name``): never a control
  character, so never an LF; it may hold spaces, and runs to the LF or the
  end of the payload.
* ``<text>``: the message exactly as the client sent it: UTF-8, possibly
  empty, spaces and newlines included; it runs to the end of the payload.
* ``<user>``: a signed member's user id (--auth: the token's ``sub``),
  after an LF that ends the name: 1-MAX_USER_CHARS printable characters.
  Anonymous members' events are as before, byte for byte; a node older
  than this drops a signed member's event as malformed (its name would
  hold an LF).

Why not JSON: every node decodes every other node's messages, and JSON with
the same fields costs 7x as much to encode and more to decode (without any
checks) than this format with its checks (docs/protocol.md has the
measurements); it would also turn the text into ``str`` and back on both
sides.  This format keeps the text as the
bytes from the sender's socket to the receivers' frames, and a node spots its
own echo by comparing a prefix.
"""

from __future__ import annotations

import os
import random
import re
import socket
from typing import Any, NamedTuple

from webchat.events import BadEvent, check_name
from webchat.limits import MAX_NAME_CHARS, MAX_USER_CHARS
from webchat.logtext import escape_for_log

#: The envelope's first word: its format and version.
ENVELOPE_VERSION = b"wc2"
#: The previous format (``wc1 <node> <id> <text>``, lobby only): still read.
LEGACY_VERSION = b"wc1"
#: Where a ``wc1`` message goes: it had no rooms.
LEGACY_ROOM = "lobby"
#: Largest connection id any node hands out, and an envelope may carry
#: (exact in JavaScript too).
MAX_CHAT_ID = (1 << 53) - 1

_NODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_NODE_ID_BYTES = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_ROOM_BYTES = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_EPOCH_BYTES = re.compile(rb"[A-Za-z0-9_-]{1,64}")
_SURROGATE = re.compile("[\udc80-\udcff]")
#: Largest ``ts`` (ms) or presence version an envelope may carry.
_MAX_NUMBER = (1 << 53) - 1


class Envelope(NamedTuple):
    """One chat message from another node."""

    #: The node that published it.
    node: str
    #: The sender's connection id.
    chat_id: int
    #: The message, UTF-8 (checked), as the sender's client sent it.
    text: bytes
    #: The room it was said in, the sender's name ("" from a ``wc1`` node:
    #: ``guest-N`` then) and the sending node's time in ms (0 from ``wc1``).
    room: str = LEGACY_ROOM
    name: str = ""
    ts: int = 0
    #: Kinds ``s`` and ``d`` (a message kept in the room's Redis Stream,
    #: issue #14): its offset and the room's epoch, and whether it was said
    #: during a Redis outage and appended after it (``d``).  0 and "" else.
    offset: int = 0
    epoch: str = ""
    delayed: bool = False


#: Presence kinds by their letter on the wire, and back.
PRESENCE_KINDS = {
    b"j": "join",
    b"n": "name",
    b"l": "leave",
    b"t": "typing",
    b"h": "beat",
    b"x": "gone",
}
_KIND_LETTER = {kind: letter for letter, kind in PRESENCE_KINDS.items()}


class PresenceEvent(NamedTuple):
    """A presence change (or a heartbeat) of another node."""

    node: str
    #: "join", "name", "leave", "typing", "beat" or "gone".
    kind: str
    #: The node's presence version after the change (0 for typing).
    version: int = 0
    room: str = ""
    chat_id: int = 0
    name: str = ""
    #: A signed member's user id (--auth); "" = anonymous.
    user: str = ""


class Disconnect(NamedTuple):
    """The app asked for every connection of ``user`` to be closed (4002)."""

    node: str
    #: The user (a JWT ``sub``): 1-256 characters, no whitespace or controls.
    user: str
    #: Why, as the app said it (UTF-8, may be empty).
    reason: str


_USER = re.compile(r"[^\s\x00-\x1f\x7f]{1,256}")


def encode_disconnect(node: str, user: str, reason: str) -> bytes:
    """``wc2 <node> k <user> LF <reason>``: every node closes ``user``'s connections."""
    return b"%bk %b\n%b" % (
        envelope_prefix(node),
        user.encode("utf-8"),
        reason.encode("utf-8"),
    )


def _disconnect(node_id: str, rest: bytes) -> Disconnect:
    head, newline, reason = rest.partition(b"\n")
    try:
        user, why = head.decode("utf-8"), reason.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEnvelopeError("disconnect is not valid UTF-8") from None
    if not newline or _USER.fullmatch(user) is None:
        raise MalformedEnvelopeError("disconnect needs a user, LF")
    return Disconnect(node_id, user, why)


class MalformedEnvelopeError(ValueError):
    """A payload on the channel that is not an envelope this node can read."""


def envelope_prefix(node: str) -> bytes:
    """
    What every envelope ``node`` publishes starts with: the node builds its
    envelopes on it, and spots its own echo by it.
    """
    return b"%b %b " % (ENVELOPE_VERSION, node.encode("ascii"))


def encode_envelope(
    node: str,
    chat_id: int,
    text: bytes,
    room: str = LEGACY_ROOM,
    name: str = "",
    ts: int = 0,
) -> bytes:
    """The payload that carries ``text`` from connection ``chat_id`` of ``node``."""
    return b"%b m %b %d %d %b\n%b" % (
        envelope_prefix(node)[:-1],
        room.encode("ascii"),
        chat_id,
        ts,
        (name or f"guest-{chat_id}").encode("utf-8"),
        text,
    )


def encode_presence(event: PresenceEvent) -> bytes:
    """The payload of a presence event (``webchat.redis.presence`` sends them)."""
    head = envelope_prefix(event.node) + _KIND_LETTER[event.kind]
    kind = event.kind
    if kind in ("beat", "gone"):
        return b"%b %d" % (head, event.version)
    name = event.name.encode("utf-8")
    if event.user:
        name += b"\n" + event.user.encode("utf-8")
    room = event.room.encode("ascii")
    if kind == "typing":
        return b"%b %b %d %b" % (head, room, event.chat_id, name)
    if kind == "leave":
        return b"%b %d %b %d" % (head, event.version, room, event.chat_id)
    return b"%b %d %b %d %b" % (head, event.version, room, event.chat_id, name)


def decode_envelope(payload: bytes) -> Envelope | PresenceEvent | Disconnect:
    """
    Read a payload from the channel: a chat message (``Envelope``) or a
    presence event; raise ``MalformedEnvelopeError`` saying what is wrong.
    """
    if not isinstance(payload, bytes):
        raise MalformedEnvelopeError(f"not a byte string: {type(payload).__name__}")
    parts = payload.split(b" ", 3)
    if len(parts) != 4:
        raise MalformedEnvelopeError("fewer than four space-separated fields")
    version, node, kind, rest = parts
    if version == LEGACY_VERSION:
        return _legacy(node, kind, rest)
    if version != ENVELOPE_VERSION:
        raise MalformedEnvelopeError("unknown format or version")
    if _NODE_ID_BYTES.fullmatch(node) is None:
        raise MalformedEnvelopeError("invalid node id")
    node_id = node.decode("ascii")
    if kind in (b"s", b"d"):
        return _stream_message(node_id, kind == b"d", rest)
    if kind == b"k":
        return _disconnect(node_id, rest)
    if kind == b"m":
        head, newline, text = rest.partition(b"\n")
        fields = head.split(b" ", 3)
        if not newline or len(fields) != 4:
            raise MalformedEnvelopeError("a message needs room, id, ts, name, LF")
        room, chat_id, ts, name = fields
        _check_text(text)
        return Envelope(
            node_id,
            _chat_id(chat_id),
            text,
            _room(room),
            _name(name),
            _number(ts, "ts", zero=True),
        )
    presence = PRESENCE_KINDS.get(kind)
    if presence is None:
        raise MalformedEnvelopeError("unknown kind")
    if presence in ("beat", "gone"):
        return PresenceEvent(node_id, presence, _number(rest, "version"))
    if presence == "typing":
        fields = rest.split(b" ", 2)
        if len(fields) != 3:
            raise MalformedEnvelopeError("typing needs room, id, name")
        room, chat_id, name = fields
        name, user = _name_and_user(name)
        return PresenceEvent(
            node_id, presence, 0, _room(room), _chat_id(chat_id), name, user
        )
    if presence == "leave":
        fields = rest.split(b" ")
        if len(fields) != 3:
            raise MalformedEnvelopeError("leave needs version, room, id")
        number, room, chat_id = fields
        name = b""
    else:
        fields = rest.split(b" ", 3)
        if len(fields) != 4:
            raise MalformedEnvelopeError(f"{presence} needs version, room, id, name")
        number, room, chat_id, name = fields
    name_text, user = _name_and_user(name) if presence != "leave" else ("", "")
    return PresenceEvent(
        node_id,
        presence,
        _number(number, "version"),
        _room(room),
        _chat_id(chat_id),
        name_text,
        user,
    )


def stream_envelope_parts(
    node: str, room: str, chat_id: int, ts: int, name: str, text: bytes, delayed: bool
) -> tuple[bytes, bytes, bytes]:
    """
    A kept message's envelope around its offset and epoch, which only the
    Redis script that appends it knows (``webchat.redis.streams``)::

        wc2 <node> s|d <room> <offset> <epoch> <id> <ts> <name> LF <text>
    """
    head = envelope_prefix(node) + (b"d " if delayed else b"s ")
    return (
        head + room.encode("ascii") + b" ",
        b" ",
        b" %d %d %b\n%b" % (chat_id, ts, name.encode("utf-8"), text),
    )


def _stream_message(node_id: str, delayed: bool, rest: bytes) -> Envelope:
    head, newline, text = rest.partition(b"\n")
    fields = head.split(b" ", 5)
    if not newline or len(fields) != 6:
        raise MalformedEnvelopeError(
            "a kept message needs room, offset, epoch, id, ts, name, LF"
        )
    room, offset, epoch, chat_id, ts, name = fields
    if _EPOCH_BYTES.fullmatch(epoch) is None:
        raise MalformedEnvelopeError("invalid epoch")
    _check_text(text)
    return Envelope(
        node_id,
        # 0: a message from the app (the server API), said by no connection.
        _chat_id(chat_id) if chat_id != b"0" else 0,
        text,
        _room(room),
        _name(name),
        _number(ts, "ts", zero=True),
        _number(offset, "offset"),
        epoch.decode("ascii"),
        delayed,
    )


def _legacy(node: bytes, chat_id: bytes, text: bytes) -> Envelope:
    """``wc1 <node> <id> <text>``: a not yet upgraded node's message, to the lobby."""
    if _NODE_ID_BYTES.fullmatch(node) is None:
        raise MalformedEnvelopeError("invalid node id")
    number = _chat_id(chat_id)
    _check_text(text)
    return Envelope(node.decode("ascii"), number, text)


def _number(digits: bytes, what: str, zero: bool = False) -> int:
    # isdigit() on bytes is ASCII-only; no leading zeros keeps one spelling.
    if not digits.isdigit() or len(digits) > 16:
        raise MalformedEnvelopeError(f"invalid {what}")
    if digits[:1] == b"0" and not (zero and digits == b"0"):
        raise MalformedEnvelopeError(f"invalid {what}")
    number = int(digits)
    if number > _MAX_NUMBER:
        raise MalformedEnvelopeError(f"{what} out of range")
    return number


def _chat_id(digits: bytes) -> int:
    if not digits.isdigit() or digits[:1] == b"0" or len(digits) > 16:
        raise MalformedEnvelopeError("invalid connection id")
    number = int(digits)
    if number > MAX_CHAT_ID:
        raise MalformedEnvelopeError("connection id out of range")
    return number


def _room(room: bytes) -> str:
    if _ROOM_BYTES.fullmatch(room) is None:
        raise MalformedEnvelopeError("invalid room")
    return room.decode("ascii")


def _name(raw: bytes) -> str:
    """
    A member's name as ``check_name`` would accept it, unchanged: a JSON
    client shows it, so a node's names are checked like its own clients'.
    """
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEnvelopeError("name is not valid UTF-8") from None
    # The fast path: printable (no control, format or separator character but
    # the space) and short is always a good name, if trimmed.
    if 0 < len(name) <= MAX_NAME_CHARS and name.isprintable():
        if name[0] != " " and name[-1] != " ":
            return name
    try:
        if check_name(name) == name:
            return name
    except BadEvent:
        pass
    raise MalformedEnvelopeError("invalid name")


def _name_and_user(raw: bytes) -> tuple[str, str]:
    """``<name>[ LF <user>]``: a member's name, and its user id or ""."""
    name, newline, user = raw.partition(b"\n")
    return _name(name), _user(user) if newline else ""


def _user(raw: bytes) -> str:
    """A signed member's user id, as admission accepts one (``is_user_id``)."""
    try:
        user = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEnvelopeError("user is not valid UTF-8") from None
    if not 0 < len(user) <= MAX_USER_CHARS or not user.isprintable():
        raise MalformedEnvelopeError("invalid user")
    return user


def _check_text(text: bytes) -> None:
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as e:
        # Relayed as a WebSocket text frame, it would make browsers close 1007.
        raise MalformedEnvelopeError("text is not valid UTF-8") from e


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
