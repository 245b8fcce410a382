"""Room names to rooms, and the one end-of-turn flush they all share.

A room exists while somebody is in it: it is made on first join and let
go when the last member has left and its last turn has gone out, so a
server's memory follows its open rooms, not every name ever asked for.

All rooms with messages in this reactor turn are flushed by a single
``callLater(0)``: one timer per turn however many rooms are busy, not one
per room.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from time import thread_time
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from webchat.codecs import SEED, Codec
from webchat.history import new_epoch
from webchat.logtext import escape_for_log
from webchat.memory import release_free_heap
from webchat.room import SLICE_CHECK, SLICE_SECONDS, Member, Room

if TYPE_CHECKING:
    from webchat.history import HistoryStore
    from webchat.metrics import ChatStats

log = Logger(namespace="webchat")

#: The room of ``/``, ``/ws`` and ``/ws/``: where the seed's page lands.
LOBBY = "lobby"
#: What a room name may be (``/ws/<room>``, ``/r/<room>``).
ROOM_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def room_of_path(path: str) -> str | None:
    """
    The room a WebSocket request path asks for, or None if it names none
    that may exist: ``/``, ``/ws``, ``/ws/`` → the lobby, ``/ws/<room>`` → room.
    The path is the raw one, so percent-encoded junk is simply not a name.
    """
    if path in ("", "/", "/ws", "/ws/"):
        return LOBBY
    if path.startswith("/ws/"):
        name = path[4:]
        if ROOM_NAME.fullmatch(name):
            return name
    return None


class Rooms:
    """The open rooms of one server."""

    def __init__(
        self,
        reactor: Any,
        stats: ChatStats,
        release_memory: Callable[[], object] = release_free_heap,
        delivery_failed: Callable[[Member], bool] | None = None,
        history: HistoryStore | None = None,
    ) -> None:
        self._reactor = reactor
        #: Where rooms' messages are kept, their epochs and offsets with them.
        self.history = history
        self._stats = stats
        self._release_memory = release_memory
        #: What to do with a member whose delivery raised (see ``Room``).
        self.delivery_failed = delivery_failed
        #: Whether a member of another node has a name in a room (--redis):
        #: (room, case-folded name) -> bool; names here avoid those too.
        self.names_elsewhere: Callable[[str, str], bool] | None = None
        #: Called with a room whose epoch and offset came later (Redis),
        #: once its joiners have been greeted.
        self.on_opened: Callable[[Room], object] | None = None
        #: What rooms time a slice of a pass over their members with (the
        #: server's CPU time), how long one may take, and every how many
        #: members the clock is read (``Room.flush``); set before rooms are
        #: made (tests: a fake clock, read after every member).
        self.timer: Callable[[], float] = thread_time
        self.slice_seconds = SLICE_SECONDS
        self.slice_check = SLICE_CHECK
        self._rooms: dict[str, Room] = {}
        #: Rooms with messages this turn, in the order they got their first.
        self._busy: list[Room] = []
        self._flush_call: Any = None

    def join(
        self,
        name: str,
        member: Member,
        codec: Codec = SEED,
        member_name: str = "",
        exact: bool = False,
    ) -> Room:
        """
        Put ``member`` in room ``name`` (made now if need be), named
        ``member_name`` (see ``Room.join``); return the room.
        """
        room = self.open_room(name)
        room.join(member, codec, member_name, exact)
        return room

    def open_room(self, name: str) -> Room:
        """
        Room ``name``, made now if need be (its epoch and offset from the
        history).  One made for the server API's message alone is closed
        again at the end of the turn, once the message is kept.
        """
        room = self._rooms.get(name)
        if room is None:
            opened: tuple[str, int] | Deferred[tuple[str, int]] = (new_epoch(), 0)
            if self.history is not None:
                opened = self.history.open_room(name)
            epoch, offset = ("", 0) if isinstance(opened, Deferred) else opened
            room = self._rooms[name] = Room(
                name,
                self._stats,
                self._schedule,
                self._release_memory,
                self._member_failed,
                self._reactor.seconds,
                self.history,
                epoch,
                offset,
                self.timer,
                self.slice_seconds,
                self.slice_check,
            )
            room.names_elsewhere = self.names_elsewhere
            if isinstance(opened, Deferred):
                # Known later (Redis): joiners wait for it (``Room.opening``).
                room.opening = []
                opened.addCallbacks(
                    self._opened,
                    self._not_opened,
                    callbackArgs=(room,),
                    errbackArgs=(room,),
                )
        return room

    def _opened(self, opened: tuple[str, int], room: Room) -> None:
        """
        ``room``'s epoch and last offset have come: the offset its joiners'
        history runs up to, unless its live messages have already gone past.
        """
        epoch, offset = opened
        if not room.epoch:
            room.epoch = epoch
        if room.epoch == epoch and offset > room.offset:
            room.advance(offset)
        self._open(room)

    def _not_opened(self, failure: Failure, room: Room) -> None:
        """
        Redis could not say: the room starts an epoch of its own, for now
        (the first kept message brings the room's own).  Said only when
        Redis answered wrongly: that Redis is away the relay logs, once.
        """
        if type(failure.value).__name__ != "ConnectionError":  # txredisapi's too
            log.warn(
                "Could not read the history of room {room}: {error}",
                room=room.name,
                error=escape_for_log(str(failure.value)),
            )
        if not room.epoch:
            room.epoch = new_epoch()
        self._open(room)

    def _open(self, room: Room) -> None:
        waiting, room.opening = room.opening or [], None
        on_opened = self.on_opened
        if on_opened is not None:
            waiting.append(lambda: on_opened(room))
        for then in waiting:
            try:
                then()
            except Exception:
                log.failure(
                    "An error has occurred: opening room {room}", room=room.name
                )

    def leave(self, room: Room, member: Member) -> bool:
        """Take ``member`` out of ``room``; return whether it was still there."""
        left = room.leave(member)
        if room.idle and self._rooms.get(room.name) is room:
            self._close(room)
        return left

    def _close(self, room: Room) -> None:
        """``room`` is empty and owes nothing: let it go (its history stays)."""
        del self._rooms[room.name]
        if self.history is not None:
            self.history.room_closed(room.name)

    def get(self, name: str) -> Room | None:
        return self._rooms.get(name)

    def __len__(self) -> int:
        """Members in all rooms: the server's open chat connections."""
        return sum(len(room) for room in self._rooms.values())

    def __iter__(self) -> Iterator[Member]:
        """Every member of every room."""
        return iter([member for room in list(self._rooms.values()) for member in room])

    @property
    def names(self) -> list[str]:
        return list(self._rooms)

    @property
    def open(self) -> int:
        """Rooms open now."""
        return len(self._rooms)

    def __contains__(self, name: object) -> bool:
        return name in self._rooms

    def members(self, codec: Codec) -> int:
        """Members speaking ``codec``, in all rooms (for the metrics)."""
        return sum(room.count(codec) for room in self._rooms.values())

    def _member_failed(self, member: Member) -> bool:
        """Hand a member whose delivery raised to the owner; False: nobody took it."""
        if self.delivery_failed is None:
            return False
        return bool(self.delivery_failed(member))

    def _schedule(self, room: Room) -> None:
        """
        ``room`` has its first message this turn, or more of a pass to serve:
        flush it at the turn's end.
        """
        self._busy.append(room)
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self.flush)

    def flush(self) -> int:
        """
        Send every busy room's turn (a slice of its pass over its members: a
        room with more to serve is busy again in the next turn); return
        deliveries.
        """
        self._flush_call = None
        busy, self._busy = self._busy, []
        copies = 0
        for room in busy:
            copies += room.flush()
            if room.idle and self._rooms.get(room.name) is room:
                self._close(room)
        return copies
