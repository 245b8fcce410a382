"""Who is connected, and sender-excluded fan-out, batched per reactor turn.

The hub knows nothing about WebSockets: a member is anything with a
``chat_id`` and a ``deliver(data)`` method.  That keeps the one rule of the
chat — every message goes to everyone *but* its sender, in the order it
arrived — in one small place that a test can drive without a socket.

Why batching: a chat server's real work is fan-out, one message in and N
copies out, and per copy the cost is the write and its system call, not the
bytes.  So messages are not sent as they arrive.  They are queued, and at
the end of the current reactor iteration (``callLater(0)``: after every
socket that was readable in this turn has been read, before the reactor
waits again) each member is handed, in one write, everything it is owed
from that turn.  Under light load a turn carries one message and this adds
no latency; under heavy load a turn carries many, and the cost per delivery
falls with every message that shares the write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from webchat.memory import release_free_heap

if TYPE_CHECKING:
    from webchat.metrics import ChatStats

#: Turns bigger than this (bytes) reach their senders as views of the one
#: joined buffer, a write per run of other people's frames, instead of as a
#: copy without the sender's own: below it a copy costs less than the extra
#: writes, above it the copies are what costs (in memory and in time).
SLICE_ABOVE = 64 * 1024
#: After a turn bigger than this (bytes) the C heap's free memory is handed
#: back to the system (``webchat.memory``): a chat turn is rarely more than a
#: few KB, and after a burst of MBs glibc would keep tens of MB resident.
RELEASE_ABOVE = 4 * 1024 * 1024


class Member(Protocol):
    """What the hub needs from a connection."""

    chat_id: int

    def deliver(self, data: bytes | memoryview) -> bool:
        """
        Send ``data`` (one or more whole frames); return ``False`` if it could
        not be taken because the member is on its way out (or is now).
        """


class Hub:
    """
    The open connections of one server, the ids they are known by, and the
    messages of the current reactor turn that they have not been sent yet.

    Ids count up from 1 and are never reused for the life of the hub, so
    ``id 7`` in a chat log always means the same person.
    """

    def __init__(
        self,
        reactor: Any,
        stats: ChatStats,
        release_memory: Callable[[], object] = release_free_heap,
    ) -> None:
        self._reactor = reactor
        self._stats = stats
        self._release_memory = release_memory
        self._next_id = 1
        #: Where ids come from when several nodes share the chat (the Redis
        #: relay's allocator); ``None`` for this process's own counter.
        self.id_source: Callable[[], int] | None = None
        # dict keeps insertion order: members hear messages in join order,
        # which makes fan-out deterministic for tests and logs.
        self._members: dict[int, Member] = {}
        # This turn's messages: (sender id or 0, frame, perf_counter at arrival).
        self._pending: list[tuple[int, bytes, float]] = []
        self._flush_call: Any = None

    def allocate_id(self) -> int:
        """Hand out the next connection id."""
        if self.id_source is not None:
            return self.id_source()
        chat_id = self._next_id
        self._next_id += 1
        return chat_id

    def join(self, member: Member) -> None:
        self._members[member.chat_id] = member

    def leave(self, member: Member) -> bool:
        """Forget ``member``; return whether it was still here."""
        return self._members.pop(member.chat_id, None) is not None

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[Member]:
        return iter(list(self._members.values()))

    def broadcast(self, sender: Member | None, frame: bytes) -> int:
        """
        Queue ``frame`` for every member except ``sender``, to go out at the
        end of this reactor turn; return how many members that is now.
        """
        sender_id = sender.chat_id if sender is not None else 0
        self._pending.append((sender_id, frame, perf_counter()))
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self.flush)
        members = len(self._members)
        return members - 1 if sender_id in self._members else members

    def flush(self) -> int:
        """
        Send each member what this turn owes it, in one write (a sender in a
        big turn: one per run of other people's frames); return deliveries.
        """
        self._flush_call = None
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        if len(pending) == 1:
            sender_id, everything, _ = pending[0]
            senders = {sender_id}
        else:
            everything = b"".join([frame for _, frame, _ in pending])
            senders = {sender_id for sender_id, _, _ in pending}

        total = len(pending)
        copies = 0
        sent = 0
        for chat_id, member in list(self._members.items()):
            if chat_id in senders:
                # A sender is owed everything but its own frames.  That is
                # worked out here, when its turn comes, and let go before the
                # next member's: a copy per sender held for the whole loop
                # grows with senders x bytes (150 senders of 60 KB: 1.3 GB).
                if total > 1:
                    got, size = self._deliver_without(
                        member, chat_id, pending, everything
                    )
                    copies += got
                    sent += size
            elif member.deliver(everything):
                sent += len(everything)
                copies += total

        stats = self._stats
        done = perf_counter()
        for _, _, arrived in pending:
            stats.fanout_seconds.observe(done - arrived)
        stats.deliveries += copies
        stats.bytes_sent += sent
        if len(everything) > RELEASE_ABOVE:
            del pending, everything  # the turn's frames go first
            self._release_memory()
        return copies

    @staticmethod
    def _deliver_without(
        member: Member,
        sender_id: int,
        pending: list[tuple[int, bytes, float]],
        everything: bytes,
    ) -> tuple[int, int]:
        """
        Give ``member`` this turn's frames except those from ``sender_id``;
        return (frames, bytes) it took.

        A small turn is copied without the sender's frames, one write as
        for everybody else.  A big one is not copied at all: the member is
        handed the runs of ``everything`` between its own frames, as views,
        a write each.  Either way the turn's memory stays what was received
        plus one sender's share at a time.
        """
        if len(everything) <= SLICE_ABOVE:
            others = [frame for who, frame, _ in pending if who != sender_id]
            data = b"".join(others)
            if data and member.deliver(data):
                return len(others), len(data)
            return 0, 0
        view = memoryview(everything)
        copies = size = 0
        start = end = count = 0
        for who, frame, _ in pending:
            if who != sender_id:
                end += len(frame)
                count += 1
                continue
            if end > start:
                if not member.deliver(view[start:end]):
                    return copies, size
                copies += count
                size += end - start
            start = end = end + len(frame)
            count = 0
        if end > start and member.deliver(view[start:end]):
            copies += count
            size += end - start
        return copies, size
