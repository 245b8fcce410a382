"""Who is online on the other nodes: presence across a cluster.

Each node keeps its own members where the others can read them, a Redis
hash per node (``webchat:<channel>:presence:<node>``: field ``<id>`` =
``<room> <name>``, with ``LF <user>`` after it for a signed member, field
``_v`` = the node's presence *version*), and tells the others of every
change on the channel (``j``, ``n``, ``l`` envelopes), the hash write
and the PUBLISH in one Lua script, so the hash is never behind an event
anyone has seen.  Every ``timeout / 3`` seconds it beats
(``h <version>``) and refreshes the hash's TTL (``timeout``).

``RemotePresence`` is the receiving side's bookkeeping, with no Redis and
no sockets in it (tests/test_presence.py drives it with a ``Clock``):

* an event whose version is the next one is applied; an older one is
  stale and dropped; a skipped version (events lost while a link was down)
  or a node not seen before asks for the node's hash (a *snapshot*), which
  replaces what was known of it;
* a node not heard from (any payload counts) for ``timeout`` seconds is
  dead: its members leave.  A node that stops cleanly says ``x`` and its
  members leave at once;
* at most ``max_members`` remote members and ``max_nodes`` nodes are kept,
  whatever anyone publishes on the channel; the rest is dropped and counted.

What a member's joining, leaving and renaming means to the chat (JSON
events to the room's members here) is the ``PresenceListener``'s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from twisted.logger import Logger

from webchat.limits import MAX_REMOTE_MEMBERS, MAX_REMOTE_NODES, PRESENCE_TIMEOUT
from webchat.redis.envelope import (
    MalformedEnvelopeError,
    PresenceEvent,
    _chat_id,
    _name_and_user,
    _room,
)

#: Snapshots asked for and not yet answered, at most: a flood of made-up
#: node ids on the channel costs Redis this many HGETALLs at a time.
MAX_SNAPSHOTS_IN_FLIGHT = 32
#: At most one "not taken" log line per this many seconds.
DROP_LOG_INTERVAL = 60.0


class PresenceListener(Protocol):
    """
    What the chat does when a member of another node comes, goes or types;
    ``user`` is a signed member's user id (--auth), "" for anonymous ones.
    """

    def remote_joined(
        self, room: str, chat_id: int, name: str, user: str = ""
    ) -> None: ...

    def remote_left(
        self, room: str, chat_id: int, name: str, user: str = ""
    ) -> None: ...

    def remote_renamed(
        self, room: str, chat_id: int, old: str, name: str, user: str = ""
    ) -> None: ...

    def remote_typing(
        self, room: str, chat_id: int, name: str, user: str = ""
    ) -> None: ...


class _Node:
    """What is known of one other node."""

    __slots__ = ("heard_at", "members", "version")

    def __init__(self, version: int, heard_at: float) -> None:
        self.version = version
        self.heard_at = heard_at
        #: Its members: id -> (room, name, user); user "" = anonymous.
        self.members: dict[int, tuple[str, str, str]] = {}


def parse_snapshot(
    reply: Any,
) -> tuple[int, dict[int, tuple[str, str, str]], int]:
    """
    A node's presence hash as HGETALL returns it (a flat list, or a dict):
    (version, members, malformed fields skipped).  Version 0: no hash.
    """
    if isinstance(reply, dict):
        pairs = list(reply.items())
    else:
        items = list(reply or ())
        pairs = list(zip(items[::2], items[1::2], strict=False))
    version = 0
    members: dict[int, tuple[str, str, str]] = {}
    bad = 0
    for field, value in pairs:
        try:
            if not isinstance(field, bytes) or not isinstance(value, bytes):
                raise MalformedEnvelopeError("not bytes")
            if field == b"_v":
                version = int(value) if value.isdigit() else 0
                continue
            room, sep, name = value.partition(b" ")
            if not sep:
                raise MalformedEnvelopeError("no name")
            members[_chat_id(field)] = (_room(room), *_name_and_user(name))
        except (MalformedEnvelopeError, ValueError):
            bad += 1
    return version, members, bad


class RemotePresence:
    """The members of the other nodes, by node and by room (module docstring)."""

    def __init__(
        self,
        clock: Any,
        request_snapshot: Callable[[str], object],
        *,
        timeout: float = PRESENCE_TIMEOUT,
        max_members: int = MAX_REMOTE_MEMBERS,
        max_nodes: int = MAX_REMOTE_NODES,
    ) -> None:
        self._clock = clock
        #: Asks Redis for a node's hash; the answer comes to ``snapshot``.
        self._request_snapshot = request_snapshot
        self.timeout = timeout
        self.max_members = max_members
        self.max_nodes = max_nodes
        self.listener: PresenceListener | None = None
        self._nodes: dict[str, _Node] = {}
        #: room -> id -> (name, user), for rosters and names.
        self._rooms: dict[str, dict[int, tuple[str, str]]] = {}
        #: room -> case-folded name -> how many remote members hold it.
        self._names: dict[str, Counter[str]] = {}
        #: Which node a remote id belongs to: no node may claim another's.
        self._owner: dict[int, str] = {}
        #: Nodes whose snapshot is asked for; and those to ask again once
        #: it comes (something newer was seen meanwhile).
        self._asked: set[str] = set()
        self._ask_again: set[str] = set()
        #: Remote members known now (the gauge).
        self.members = 0
        #: What was dropped, by reason: "over_cap", "malformed", "conflict",
        #: "busy" (too many snapshots in flight).
        self.dropped: Counter[str] = Counter()
        self._log = Logger(namespace="webchat", source=self)
        self._drop_logged_at: float | None = None

    # -- what arrives ---------------------------------------------------------------

    def heard(self, node: str) -> None:
        """Something came from ``node``: it is alive."""
        state = self._nodes.get(node)
        if state is not None:
            state.heard_at = self._clock.seconds()

    def event(self, event: PresenceEvent) -> None:
        """A presence event of another node, from the channel."""
        node = event.node
        state = self._nodes.get(node)
        kind = event.kind
        if kind == "typing":
            if state is not None and state.members.get(event.chat_id) == (
                event.room,
                event.name,
                event.user,
            ):
                listener = self.listener
                if listener is not None:
                    listener.remote_typing(
                        event.room, event.chat_id, event.name, event.user
                    )
            return
        if kind == "gone":
            if state is not None:
                self.forget(node)
            return
        if state is None:
            # Its hash says all (the event included: the hash is written first).
            self.ask(node)
            return
        state.heard_at = self._clock.seconds()
        if event.version <= state.version:
            return  # already in a snapshot
        if kind == "beat":
            self.ask(node)  # it changed, and we missed it
            return
        skipped = event.version != state.version + 1
        state.version = event.version
        if kind == "leave":
            self._leave(node, state, event.chat_id)
        else:
            self._set(node, state, event.chat_id, event.room, event.name, event.user)
        if skipped:
            self.ask(node)

    def snapshot(self, node: str, reply: Any, ttl_ms: int | None = None) -> None:
        """
        ``node``'s hash, as Redis answered the request (``ttl_ms``: its PTTL,
        which says when the node last beat).  No hash: the node is gone.
        """
        self._asked.discard(node)
        again = node in self._ask_again
        self._ask_again.discard(node)
        version, members, bad = parse_snapshot(reply)
        self.dropped["malformed"] += bad
        state = self._nodes.get(node)
        if not version:
            if state is not None:
                self.forget(node)
            return
        now = self._clock.seconds()
        heard_at = now
        if ttl_ms is not None and ttl_ms > 0:
            heard_at = now - max(0.0, self.timeout - ttl_ms / 1000)
        if state is None:
            if len(self._nodes) >= self.max_nodes:
                self._drop("over_cap", f"more than {self.max_nodes} other nodes")
                return
            state = self._nodes[node] = _Node(0, heard_at)
        elif version < state.version:
            # Older than an event applied since it was asked for: ask again.
            self.ask(node)
            return
        state.heard_at = max(state.heard_at, heard_at)
        state.version = version
        for chat_id in [i for i in state.members if i not in members]:
            self._leave(node, state, chat_id)
        for chat_id, (room, name, user) in members.items():
            self._set(node, state, chat_id, room, name, user)
        if again:
            self.ask(node)

    def ask(self, node: str) -> None:
        """Ask for ``node``'s snapshot (once at a time)."""
        if node in self._asked:
            self._ask_again.add(node)
            return
        if len(self._asked) >= MAX_SNAPSHOTS_IN_FLIGHT:
            self.dropped["busy"] += 1
            return
        self._asked.add(node)
        self._request_snapshot(node)

    def snapshot_failed(self, node: str) -> None:
        """The request went unanswered (Redis went): the next beat asks again."""
        self._asked.discard(node)
        self._ask_again.discard(node)

    # -- time -------------------------------------------------------------------------

    def expire(self) -> list[str]:
        """Forget every node not heard from within the timeout; return them."""
        deadline = self._clock.seconds() - self.timeout
        dead = [node for node, s in self._nodes.items() if s.heard_at < deadline]
        for node in dead:
            self.forget(node)
        return dead

    def forget(self, node: str) -> None:
        """``node`` is gone: all its members leave."""
        state = self._nodes.pop(node, None)
        if state is None:
            return
        for chat_id in list(state.members):
            self._leave(node, state, chat_id)

    # -- what the chat asks ---------------------------------------------------------

    def roster(self, room: str) -> list[dict[str, object]]:
        """The room's members on other nodes, as the JSON events list them."""
        return [
            {"id": chat_id, "name": name, "user": user}
            if user
            else {"id": chat_id, "name": name}
            for chat_id, (name, user) in self._rooms.get(room, {}).items()
        ]

    def rooms(self) -> dict[str, int]:
        """How many members other nodes have in each room (the server API)."""
        return {room: len(members) for room, members in self._rooms.items() if members}

    def user_of(self, chat_id: int) -> str:
        """The user id of member ``chat_id`` of another node ("" if none known)."""
        node = self._owner.get(chat_id)
        state = self._nodes.get(node) if node is not None else None
        member = state.members.get(chat_id) if state is not None else None
        return member[2] if member is not None else ""

    def name_taken(self, room: str, folded: str) -> bool:
        """Whether a member of another node has this (case-folded) name in ``room``."""
        names = self._names.get(room)
        return names is not None and folded in names

    def is_remote(self, chat_id: int) -> bool:
        return chat_id in self._owner

    @property
    def nodes(self) -> list[str]:
        return list(self._nodes)

    # -- bookkeeping ------------------------------------------------------------------

    def _set(
        self, node: str, state: _Node, chat_id: int, room: str, name: str, user: str
    ) -> None:
        owner = self._owner.get(chat_id)
        if owner is not None and owner != node:
            self._drop("conflict", f"node {node} claims member {chat_id} of {owner}")
            return
        old = state.members.get(chat_id)
        if old == (room, name, user):
            return
        listener = self.listener
        if old is not None and old[0] == room:
            self._unname(room, old[1])
            self._rooms[room][chat_id] = (name, user)
            self._names.setdefault(room, Counter())[name.casefold()] += 1
            state.members[chat_id] = (room, name, user)
            if listener is not None:
                listener.remote_renamed(room, chat_id, old[1], name, user)
            return
        if old is not None:
            self._leave(node, state, chat_id)
        if self.members >= self.max_members:
            self._drop(
                "over_cap", f"more than {self.max_members} members of other nodes"
            )
            return
        state.members[chat_id] = (room, name, user)
        self._owner[chat_id] = node
        self._rooms.setdefault(room, {})[chat_id] = (name, user)
        self._names.setdefault(room, Counter())[name.casefold()] += 1
        self.members += 1
        if listener is not None:
            listener.remote_joined(room, chat_id, name, user)

    def _drop(self, reason: str, why: str) -> None:
        """Count what is not taken; say so at most once a minute."""
        self.dropped[reason] += 1
        now = self._clock.seconds()
        last = self._drop_logged_at
        if last is not None and now - last < DROP_LOG_INTERVAL:
            return
        self._drop_logged_at = now
        self._log.warn(
            "Presence of other nodes not taken: {why} (counted in "
            "webchat_redis_presence_dropped_total; at most one such line a minute)",
            why=why,
        )

    def _leave(self, node: str, state: _Node, chat_id: int) -> None:
        old = state.members.pop(chat_id, None)
        if old is None:
            return
        room, name, user = old
        del self._owner[chat_id]
        in_room = self._rooms[room]
        del in_room[chat_id]
        if not in_room:
            del self._rooms[room]
        self._unname(room, name)
        self.members -= 1
        if self.listener is not None:
            self.listener.remote_left(room, chat_id, name, user)

    def _unname(self, room: str, name: str) -> None:
        names = self._names[room]
        folded = name.casefold()
        names[folded] -= 1
        if names[folded] <= 0:
            del names[folded]
        if not names:
            del self._names[room]
