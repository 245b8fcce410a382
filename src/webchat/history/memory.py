"""The default history: a bounded ring of messages per room, in this process.

Each room keeps its last ``limit`` messages (``--history``) and at most
``max_bytes`` of their text (``limit`` x ``--max-message-size``: a cap that
the count alone already implies, kept so the bound is stated in one place).
A room's ring outlives the room: an emptied room keeps its history, epoch
and numbering until its newest message is older than the TTL, so a lone
member that drops and reconnects still recovers.  Idle rooms past the TTL are
swept lazily (at most once a second, when a room opens or a turn is kept),
and when more than ``max_rooms`` rooms have history the idle room emptied
longest ago is forgotten first.  Open rooms are never forgotten: their
number is bounded by ``--max-rooms``.

Messages are kept as the room queued them (``webchat.codecs.Message``):
storing a turn is one ``deque.extend``, no copy and nothing per member.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice

from webchat.codecs import Message
from webchat.history import HistoryCounts, new_epoch
from webchat.limits import HISTORY, HISTORY_TTL, MAX_HISTORY_ROOMS

#: Seconds between two sweeps of idle rooms for expiry.
SWEEP_INTERVAL = 1.0


class _Ring:
    """One room's kept messages, epoch and numbering."""

    __slots__ = ("bytes", "epoch", "last", "messages", "newest_ms", "open")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        #: The last offset given out in this epoch.
        self.last = 0
        #: Server time (ms) of the newest message, for the TTL.
        self.newest_ms = 0
        self.messages: deque[Message] = deque()
        self.bytes = 0
        self.open = True


class MemoryHistory:
    """A ring of messages per room; see the module's docstring."""

    def __init__(
        self,
        clock: Callable[[], float],
        limit: int = HISTORY,
        ttl: float = HISTORY_TTL,
        max_bytes: int = 0,
        max_rooms: int = MAX_HISTORY_ROOMS,
        epochs: Callable[[], str] = new_epoch,
    ) -> None:
        self._clock = clock
        self.limit = limit
        #: Seconds a message is kept and served; 0 = no age limit.
        self.ttl = ttl
        #: Bytes of text one room may keep; 0 = only the count bounds it.
        self.max_bytes = max_bytes
        self.max_rooms = max_rooms
        self._epochs = epochs
        self._rooms: dict[str, _Ring] = {}
        #: Rooms with no members, in the order they emptied (a dict as an
        #: ordered set): expiry and eviction candidates.
        self._idle: dict[str, None] = {}
        self._swept_at = float("-inf")
        self.counts = HistoryCounts()

    # -- the HistoryStore interface -------------------------------------------------

    def open_room(self, room: str) -> tuple[str, int]:
        self._sweep()
        ring = self._rooms.get(room)
        if ring is None:
            self._make_space()
            ring = self._rooms[room] = _Ring(self._epochs())
        else:
            self._idle.pop(room, None)
        ring.open = True
        return ring.epoch, ring.last

    def append(self, room: str, messages: Sequence[Message]) -> None:
        if not messages:
            return
        ring = self._rooms.get(room)
        if ring is None:  # never opened here (a store shared by several nodes)
            self._make_space()
            ring = self._rooms[room] = _Ring(self._epochs())
        newest = messages[-1]
        ring.last = newest.offset
        ring.newest_ms = newest.ts
        if self.limit:
            ring.messages.extend(messages)
            if len(messages) == 1:
                size = len(newest.text)
            else:
                size = sum(len(message.text) for message in messages)
            ring.bytes += size
            counts = self.counts
            counts.messages += len(messages)
            counts.bytes += size
            self._trim(ring, newest.ts)
        if self._idle:
            self._sweep()

    def read(self, room: str, after: int, upto: int) -> list[Message]:
        ring = self._rooms.get(room)
        if ring is None or not ring.messages or upto <= after:
            return []
        kept = ring.messages
        first = kept[0].offset
        start = max(after + 1 - first, 0)
        oldest_ms = self._oldest_ms()
        found = []
        for message in islice(kept, start, None):
            if message.offset > upto:
                break
            if message.ts >= oldest_ms:
                found.append(message)
        return found

    def room_closed(self, room: str) -> None:
        ring = self._rooms.get(room)
        if ring is None:
            return
        ring.open = False
        if not ring.last:
            # Nothing was ever said: nothing to keep, nothing to resume.
            self._forget(room)
            return
        self._idle.pop(room, None)
        self._idle[room] = None
        self._sweep()

    @property
    def stats(self) -> HistoryCounts:
        self.counts.rooms = len(self._rooms)
        return self.counts

    # -- bounds ---------------------------------------------------------------------

    def _oldest_ms(self) -> float:
        """The server time (ms) before which messages are past the TTL."""
        if not self.ttl:
            return float("-inf")
        return (self._clock() - self.ttl) * 1000

    def _trim(self, ring: _Ring, now_ms: int) -> None:
        """
        Drop a ring's oldest messages past its count, bytes or age (measured
        from ``now_ms``, the newest message's time: no clock call per turn).
        """
        kept = ring.messages
        limit = self.limit
        max_bytes = self.max_bytes
        oldest_ms = now_ms - self.ttl * 1000 if self.ttl else float("-inf")
        counts = self.counts
        while kept and (
            len(kept) > limit
            or (max_bytes and ring.bytes > max_bytes)
            or kept[0].ts < oldest_ms
        ):
            size = len(kept.popleft().text)
            ring.bytes -= size
            counts.messages -= 1
            counts.bytes -= size

    def _sweep(self) -> None:
        """Forget idle rooms whose newest message is past the TTL."""
        if not self.ttl or not self._idle:
            return
        now = self._clock()
        if now - self._swept_at < SWEEP_INTERVAL:
            return
        self._swept_at = now
        oldest_ms = (now - self.ttl) * 1000
        for room in list(self._idle):
            if self._rooms[room].newest_ms < oldest_ms:
                self._forget(room)

    def _make_space(self) -> None:
        """At the cap, forget the idle room emptied longest ago."""
        if self.max_rooms and len(self._rooms) >= self.max_rooms and self._idle:
            self._forget(next(iter(self._idle)))

    def _forget(self, room: str) -> None:
        ring = self._rooms.pop(room)
        self._idle.pop(room, None)
        self.counts.messages -= len(ring.messages)
        self.counts.bytes -= ring.bytes
