"""Where a room's messages are remembered, so a joiner or a reconnect catches up.

Every chat message of a room gets an *offset* (1, 2, 3, ... per room) and
the room has an *epoch*: an opaque name for one continuous history.  The
epoch changes whenever that history is lost and the offsets start again
(memory: a restart, or the room's history expired; SQLite: the database was
lost), so a client that remembers ``(epoch, offset)`` can ask for exactly
what it missed and be told honestly when that is no longer possible
(docs/protocol.md, "History and resuming").

A store is the small interface below.  The node assigns offsets itself
(``Room.publish``), synchronously, for the memory and SQLite stores; a store
is handed each flushed turn's messages once (``append``: never per member,
never blocking) and answers reads either at once (a list) or later (a
``Deferred`` of one: SQLite from its thread, Redis over the network).  The
room holds a reading member's live traffic until the answer is written
(``Room.hold``), so the replay and the live stream meet without a gap or a
duplicate.

Stores: ``MemoryHistory`` (a bounded ring per room, the default),
``SQLiteHistory`` (``--history-db``, a file written from one thread) and,
with ``--redis``, ``webchat.redis.streams.StreamHistory``: Redis numbers
the messages (the same offsets on every node), so the room takes each
message's offset as given, and a room's epoch and offset may come later.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

from webchat.codecs import Message

#: What an epoch may be: short, and safe in a URL, a log line and a Redis key.
EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: What a ``since`` on the URL may be: a plain decimal, no sign, at most 15
#: digits (exact in JavaScript).
SINCE = re.compile(r"[0-9]{1,15}")


def new_epoch() -> str:
    """A fresh epoch: 12 URL-safe characters, unguessable and never reused."""
    return secrets.token_urlsafe(9)


@dataclass
class HistoryCounts:
    """What /metrics shows of a store (no per-room labels)."""

    #: Rooms whose history (or numbering) is kept.
    rooms: int = 0
    #: Messages held in memory, and the bytes of their text.
    messages: int = 0
    bytes: int = 0
    #: Messages that could not be written (SQLite: a full or read-only disk).
    write_failures: int = 0


class HistoryStore(Protocol):
    """Where rooms' messages are kept; see the module's docstring."""

    #: Messages kept per room (--history); 0: none, only the numbering.
    limit: int

    def open_room(self, room: str) -> tuple[str, int] | Deferred[tuple[str, int]]:
        """
        ``room`` is being opened (its first member joins): its epoch and the
        last offset it gave out, 0 for a room whose history begins now; now,
        or later (Redis: its joiners are held until then, ``Room.opening``).
        """

    def append(self, room: str, messages: Sequence[Message]) -> None:
        """
        Keep one flushed turn's chat messages of ``room``, in offset order.
        Called once per turn, not per member; must not block the reactor.
        """

    def read(
        self, room: str, after: int, upto: int
    ) -> Sequence[Message] | Deferred[Sequence[Message]]:
        """
        The messages of ``room`` with ``after < offset <= upto`` still kept
        (not evicted, younger than the TTL), oldest first: now, or later.
        """

    def room_closed(self, room: str) -> None:
        """``room``'s last member left: keep its history for the TTL."""

    @property
    def stats(self) -> HistoryCounts:
        """The numbers /metrics shows."""
