"""The old ``Hub`` API over one room, for bench/flush_cost.py until it moves.

Fan-out now lives in ``webchat.room`` (issue #12); this keeps the hot-path
benchmark comparing versions of the code the way it always has: frames
built by the caller, ``broadcast`` then ``flush``.  Nothing in the server
uses it; it goes when the benchmark imports ``webchat.rooms`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from webchat.codecs import Message
from webchat.memory import release_free_heap
from webchat.metrics import ChatStats
from webchat.room import Member
from webchat.rooms import LOBBY, Rooms


class _Prebuilt:
    """A codec for frames the caller has built already."""

    name = "prebuilt"

    def encode(self, message: Message) -> bytes:
        return message.text


_PREBUILT = _Prebuilt()


class Hub:
    """One room of prebuilt frames, with the server's id counter."""

    def __init__(
        self,
        reactor: Any,
        stats: ChatStats,
        release_memory: Callable[[], object] = release_free_heap,
    ) -> None:
        self._rooms = Rooms(reactor, stats, release_memory)
        self._next_id = 1

    def allocate_id(self) -> int:
        chat_id = self._next_id
        self._next_id += 1
        return chat_id

    def join(self, member: Member) -> None:
        self._rooms.join(LOBBY, member, _PREBUILT)

    def leave(self, member: Member) -> bool:
        room = self._rooms.get(LOBBY)
        return room is not None and self._rooms.leave(room, member)

    def __len__(self) -> int:
        return len(self._rooms)

    def __iter__(self) -> Iterator[Member]:
        return iter(self._rooms)

    def broadcast(self, sender: Member | None, frame: bytes) -> int:
        room = self._rooms.get(LOBBY)
        return room.publish(sender, frame) if room is not None else 0

    def flush(self) -> int:
        return self._rooms.flush()
