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

if TYPE_CHECKING:
    from webchat.metrics import ChatStats


class Member(Protocol):
    """What the hub needs from a connection."""

    chat_id: int

    def deliver(self, data: bytes) -> bool:
        """
        Send ``data`` (one or more whole frames); return ``False`` if it could
        not be taken because the member is already on its way out.
        """


class Hub:
    """
    The open connections of one server, the ids they are known by, and the
    messages of the current reactor turn that they have not been sent yet.

    Ids count up from 1 and are never reused for the life of the hub, so
    ``id 7`` in a chat log always means the same person.
    """

    def __init__(self, reactor: Any, stats: ChatStats) -> None:
        self._reactor = reactor
        self._stats = stats
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
        """Send each member what this turn owes it, in one write; return deliveries."""
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
        # Only a sender needs bytes of its own: everything but its frames.
        own: dict[int, bytes] = {}
        own_count: dict[int, int] = {}
        for sender_id in senders:
            if sender_id in self._members:
                others = [frame for who, frame, _ in pending if who != sender_id]
                own[sender_id] = b"".join(others)
                own_count[sender_id] = len(pending) - len(others)

        total = len(pending)
        copies = 0
        sent = 0
        for chat_id, member in list(self._members.items()):
            data = own.get(chat_id, everything)
            if data and member.deliver(data):
                sent += len(data)
                copies += total - own_count.get(chat_id, 0)

        stats = self._stats
        done = perf_counter()
        for _, _, arrived in pending:
            stats.fanout_seconds.observe(done - arrived)
        stats.deliveries += copies
        stats.bytes_sent += sent
        return copies
