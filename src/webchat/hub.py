"""Who is connected, and sender-excluded fan-out.

The hub knows nothing about WebSockets: a member is anything with an ``id``
and a ``deliver(frame)`` method.  That keeps the one rule of the chat — every
message goes to everyone *but* its sender, in the order it arrived — in one
small place that a test can drive without a socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


class Member(Protocol):
    """What the hub needs from a connection."""

    chat_id: int

    def deliver(self, frame: object) -> bool:
        """
        Queue ``frame`` for this member; return ``False`` if it could not be
        taken because the member is already on its way out.
        """


class Hub:
    """
    The set of open connections of one server, and the ids they are known by.

    Ids count up from 1 and are never reused for the life of the hub, so
    ``id 7`` in a chat log always means the same person.
    """

    def __init__(self) -> None:
        self._next_id = 1
        # dict keeps insertion order: members hear messages in join order,
        # which makes fan-out deterministic for tests and logs.
        self._members: dict[int, Member] = {}

    def allocate_id(self) -> int:
        """Hand out the next connection id."""
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

    def broadcast(self, sender: Member | None, frame: object) -> int:
        """
        Hand ``frame`` to every member except ``sender``.

        Returns how many members took it.  A member that refuses (it is
        closing) costs nobody else anything, and least of all the sender.
        """
        delivered = 0
        for member in list(self._members.values()):
            if member is sender:
                continue
            if member.deliver(frame):
                delivered += 1
        return delivered
