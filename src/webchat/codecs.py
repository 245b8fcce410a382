"""Wire formats: how one chat message becomes the bytes a member is sent.

A room queues *messages* (who sent what, when it arrived), not frames, so
that one room can serve members that speak different formats.  At the end
of a turn the room asks each codec in use among its members to encode the
turn's messages once; every member of that codec then gets those shared
bytes, less its own messages.  Adding a wire format (JSON events, say) is
a new codec here and a choice in admission: the room does not change.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple, Protocol

from webchat.frames import text_frame

#: The subprotocol a client offers to be spoken to in JSON events; the
#: version is in the name so the format can evolve (docs/protocol.md).
JSON_SUBPROTOCOL = "webchat.v1.json"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class Message(NamedTuple):
    """One message as a room queues it."""

    #: The id the message is shown as from (``id N:``): the sender's
    #: connection id, here or on another node; 0 for the server (a message
    #: from the app through the server API: ``server: text`` for the seed's
    #: clients, ``"server": true`` in JSON).
    sender_id: int
    #: The text as the sender sent it (UTF-8, already validated).
    text: bytes
    #: ``perf_counter()`` at arrival, for the fan-out latency histogram.
    arrived: float
    #: The member of this room that sent it, who is not sent it back; 0 when
    #: the sender is not a member here (server, API, another node).
    member_id: int
    #: The room's name, and the sender's name as the JSON events show them.
    room: str = ""
    name: str = ""
    #: Server time in ms when it was received, and the room's offset: its
    #: message number, 1, 2, ... within the room's epoch (webchat.history);
    #: 0 for one said here while Redis was away (--redis): it has none yet,
    #: and JSON shows ``"offset": null``.
    ts: int = 0
    offset: int = 0
    #: A presence event (join, leave, name, typing), as one whole JSON text
    #: frame already: it rides in the turn so its order with the messages is
    #: kept, and codecs without events (the seed's) skip it.
    event: bytes | None = None
    #: Said on another node during a Redis outage and kept after it
    #: (--redis): JSON marks it ``"delayed": true``.
    delayed: bool = False
    #: The sender's user id (its token's ``sub``, --auth); "" = anonymous,
    #: and JSON then has no ``user`` field at all.
    user: str = ""


class Codec(Protocol):
    """A wire format: one message in, one or more whole frames out."""

    #: A short name, for admission to choose by, for logs and metrics.
    name: str
    #: The subprotocol the server answers with, or None (none offered).
    subprotocol: str | None

    def encode(self, message: Message) -> bytes:
        """The bytes of ``message`` in this format: whole frames only."""

    def encode_history(self, message: Message) -> bytes:
        """``message`` sent again from history (on join, on resume)."""


class SeedCodec:
    """
    The seed's format: a text frame ``id N: text``, byte for byte what the
    PHP Ratchet server sent (docs/protocol.md).
    """

    name = "seed"
    subprotocol = None

    def encode(self, message: Message) -> bytes:
        if message.event is not None:
            return b""  # the seed's clients never heard of presence
        if not message.sender_id:
            # The app's, through the server API: no connection said it.
            return text_frame(b"server: ", message.text)
        return text_frame(b"id %d: " % message.sender_id, message.text)

    #: The seed's clients are sent history (--history-for-text-clients) as
    #: the lines they would have heard live.
    encode_history = encode


class JsonCodec:
    """
    JSON events (``webchat.v1.json``): one compact JSON object per text
    frame.  A message is encoded once per turn like the seed's; presence
    events come already encoded.
    """

    name = "json"
    subprotocol = JSON_SUBPROTOCOL

    def encode(self, message: Message) -> bytes:
        if message.event is not None:
            return message.event
        return event_frame(message_event(message))

    def encode_history(self, message: Message) -> bytes:
        event = message_event(message)
        event["history"] = True
        return event_frame(event)


def message_event(message: Message) -> dict[str, Any]:
    """``message`` as a JSON ``message`` event (a dict, not yet encoded)."""
    event: dict[str, Any] = {
        "type": "message",
        "room": message.room,
        "id": message.sender_id,
        "name": message.name,
    }
    if message.user:
        event["user"] = message.user
    elif not message.sender_id:
        event["server"] = True  # the app's, through the server API
    event |= {
        "text": message.text.decode("utf-8"),
        "ts": message.ts,
        "offset": message.offset or None,
    }
    if message.delayed:
        event["delayed"] = True
    return event


def event_frame(event: dict[str, Any]) -> bytes:
    """One JSON event as a whole text frame (compact, UTF-8, fields in order)."""
    return text_frame(b"", _dumps(event).encode("utf-8"))


#: The seed's codec: what a client that offers no subprotocol speaks.
SEED = SeedCodec()
#: JSON events, for a client that offers ``webchat.v1.json``.
JSON = JsonCodec()
