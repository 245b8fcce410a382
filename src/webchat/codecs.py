"""Wire formats: how one chat message becomes the bytes a member is sent.

A room queues *messages* (who sent what, when it arrived), not frames, so
that one room can serve members that speak different formats.  At the end
of a turn the room asks each codec in use among its members to encode the
turn's messages once; every member of that codec then gets those shared
bytes, less its own messages.  Adding a wire format (JSON events, say) is
a new codec here and a choice in admission: the room does not change.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from webchat.frames import text_frame


class Message(NamedTuple):
    """One message as a room queues it."""

    #: The id the message is shown as from (``id N:``): the sender's
    #: connection id, here or on another node; 0 for the server.
    sender_id: int
    #: The text as the sender sent it (UTF-8, already validated).
    text: bytes
    #: ``perf_counter()`` at arrival, for the fan-out latency histogram.
    arrived: float
    #: The member of this room that sent it, who is not sent it back; 0 when
    #: the sender is not a member here (server, API, another node).
    member_id: int


class Codec(Protocol):
    """A wire format: one message in, one or more whole frames out."""

    #: A short name, for admission to choose by and for logs.
    name: str

    def encode(self, message: Message) -> bytes:
        """The bytes of ``message`` in this format: whole frames only."""


class SeedCodec:
    """
    The seed's format: a text frame ``id N: text``, byte for byte what the
    PHP Ratchet server sent (docs/protocol.md).
    """

    name = "seed"

    def encode(self, message: Message) -> bytes:
        return text_frame(b"id %d: " % message.sender_id, message.text)


#: The one codec every connection speaks today.
SEED = SeedCodec()
