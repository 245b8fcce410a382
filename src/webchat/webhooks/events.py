"""What happens in the chat that the app hears of, and when.

``AppEvents`` is told of every connection that opens or closes and every
message said, and turns them into webhook events for the sender:

* ``user.online``: an authenticated user's first connection (in the
  cluster, with --redis) opened;
* ``user.offline``: their last one closed and none opened again within
  ``offline_delay`` seconds, so a page reload is neither;
* ``room.vacated``: a room's last member (in the cluster) left;
* ``message``: a member said something (only when asked for: busy).

Who counts the connections is a *tally*: ``LocalTally`` in this process,
or ``webchat.webhooks.redis_tally.RedisTally`` shared by the nodes, which
makes each event the business of exactly one node.  A tally answers at
once or with a Deferred; either way the answers come in the order asked.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from webchat.logtext import escape_for_log

log = Logger(namespace="webchat")

#: At shutdown, how long (seconds) to wait for the chat's closed connections
#: to report their close, checking every SETTLE_POLL seconds.
SETTLE_TIMEOUT = 2.0
SETTLE_POLL = 0.01

#: Every event type, and those sent unless --webhook-events says otherwise
#: (``message`` is busy: an app must ask for it).
EVENT_TYPES = ("user.online", "user.offline", "room.vacated", "message")
DEFAULT_EVENTS = ("user.online", "user.offline", "room.vacated")


def parse_event_types(value: str) -> frozenset[str]:
    """``--webhook-events``: a comma-separated list of EVENT_TYPES."""
    wanted = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in wanted if name not in EVENT_TYPES]
    if unknown:
        raise ValueError(
            f"unknown event type {unknown[0]!r} (use {', '.join(EVENT_TYPES)})"
        )
    if not wanted:
        raise ValueError(f"no event types given (use {', '.join(EVENT_TYPES)})")
    return frozenset(wanted)


def new_event_id() -> str:
    """
    A fresh event id: random, so unique across nodes and across restarts of
    a node under the same --node-id (a counter would start over, and a
    receiver de-duplicating by id would drop the new events as old).
    """
    return uuid.uuid4().hex


def event_body(event_id: str, kind: str, ts_ms: int, data: dict[str, Any]) -> bytes:
    """The request body: ``{"id","type","ts","data"}`` as compact UTF-8 JSON."""
    event = {"id": event_id, "type": kind, "ts": ts_ms, "data": data}
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


class Tally(Protocol):
    """Counts connections by user and by room; each answer may be a Deferred."""

    def user_opened(self, user: str) -> bool | Deferred[bool]:
        """One more connection of ``user``: whether they just came online."""

    def user_closed(self, user: str) -> bool | Deferred[bool]:
        """One fewer: whether that was their last (``user_check`` later)."""

    def user_check(self, user: str) -> bool | Deferred[bool]:
        """Still none? Then they are offline: ``True`` once, to one asker."""

    def room_opened(self, room: str) -> Deferred[None] | None:
        """One more member of ``room``."""

    def room_closed(self, room: str) -> bool | Deferred[bool]:
        """One fewer: whether the room is now empty (vacated), to one asker."""

    def reap(self) -> tuple[list[str], list[str]] | Deferred[Any]:
        """Users gone offline and rooms vacated with nodes that died."""


class LocalTally:
    """The counts of one process: no other node to agree with."""

    def __init__(self) -> None:
        #: user -> [open connections, announced online]
        self._users: dict[str, list[Any]] = {}
        self._rooms: dict[str, int] = {}

    def user_opened(self, user: str) -> bool:
        state = self._users.setdefault(user, [0, False])
        state[0] += 1
        came = not state[1]
        state[1] = True
        return came

    def user_closed(self, user: str) -> bool:
        state = self._users.get(user)
        if state is None:
            return False
        state[0] = max(state[0] - 1, 0)
        return state[0] == 0

    def user_check(self, user: str) -> bool:
        state = self._users.get(user)
        if state is None or state[0] > 0:
            return False
        del self._users[user]
        return bool(state[1])

    def room_opened(self, room: str) -> None:
        self._rooms[room] = self._rooms.get(room, 0) + 1

    def room_closed(self, room: str) -> bool:
        count = self._rooms.get(room, 0) - 1
        if count > 0:
            self._rooms[room] = count
            return False
        return self._rooms.pop(room, None) is not None

    def reap(self) -> tuple[list[str], list[str]]:
        return [], []


class AppEvents(MultiService):
    """
    Turns the chat's comings, goings and messages into webhook events, and
    hands them to ``sender.enqueue``.  A sender that is a service (the
    ``WebhookSender``) becomes a child of this one, so it stops (drains)
    after this one has settled the offline checks still pending.

    ``wanted``: the event types to send.  ``clock`` times the offline delay
    and, with a tally that has one, the reaping of dead nodes every
    ``reap_interval`` seconds (0: never).
    """

    def __init__(
        self,
        clock: IReactorTime,
        sender: Any,
        wanted: Iterable[str],
        *,
        offline_delay: float,
        tally: Tally | None = None,
        reap_interval: float = 0.0,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.sender = sender
        self._enqueue: Callable[[str, bytes], bool] = sender.enqueue
        if IService.providedBy(sender):
            sender.setServiceParent(self)
        self.wanted = frozenset(wanted)
        self.offline_delay = offline_delay
        self.tally: Tally = tally if tally is not None else LocalTally()
        self.reap_interval = reap_interval
        self._users_wanted = bool(self.wanted & {"user.online", "user.offline"})
        self._rooms_wanted = "room.vacated" in self.wanted
        #: Users whose last connection closed, checked again at the delay.
        self._offline_checks: dict[str, IDelayedCall] = {}
        #: Tally answers not in yet (settled before the sender stops).
        self._pending: set[Deferred[Any]] = set()
        self._reaper: LoopingCall | None = None
        #: Changes the tally could not count since it last answered.
        self._uncounted = 0
        #: Set once the chat has drained: no more offline delays.
        self._stopping = False
        #: Connections opened and not closed yet (``opened`` - ``closed``).
        self._open = 0

    @property
    def messages_wanted(self) -> bool:
        return "message" in self.wanted

    # -- lifetime -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.reap_interval > 0:
            self._reaper = LoopingCall(self._reap)
            self._reaper.clock = self.clock
            self._reaper.start(self.reap_interval, now=False)

    def stopService(self) -> Deferred[None]:
        """
        The chat has drained: the users whose offline check is pending are
        checked now (the node will not be here to check later; with a
        shared tally the other nodes do it when they reap this one), then
        the sender drains.
        """
        if not self.running or self._stopping:
            return succeed(None)  # stopped already (ChatService stops it first)
        self._stopping = True
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        # The chat's closing connections report their close when their TCP
        # connection ends, a little after their closing handshake: wait
        # for them (briefly: the chat dropped the stragglers already).
        settled: Deferred[None] = Deferred()
        deadline = self.clock.seconds() + SETTLE_TIMEOUT

        def poll() -> None:
            if self._open > 0 and self.clock.seconds() < deadline:
                self.clock.callLater(SETTLE_POLL, poll)
            else:
                settled.callback(None)

        poll()
        return settled.addCallback(lambda _: self._settle())

    def _settle(self) -> Deferred[None]:
        """Settle the offline checks and tally answers still pending; stop."""
        shared = getattr(self.tally, "shared", False)
        for user, call in list(self._offline_checks.items()):
            if call.active():
                call.cancel()
            if shared:
                # The other nodes reap this one once it is gone: a user
                # back on one of them by then (a rolling restart) is no event.
                self._offline_checks.pop(user)
            else:
                self._check_offline(user)
        pending = DeferredList(list(self._pending), consumeErrors=True)
        return pending.addBoth(lambda _: MultiService.stopService(self))

    # -- what the chat reports ------------------------------------------------------

    def opened(self, user: str | None, room: str) -> None:
        """A connection opened in ``room``, authenticated as ``user`` (or not)."""
        self._open += 1
        if self._rooms_wanted:
            self._ask(self.tally.room_opened, room, None)
        if user is not None and self._users_wanted:
            self._ask(self.tally.user_opened, user, self._came_online)

    def closed(self, user: str | None, room: str) -> None:
        """A connection that ``opened`` has closed."""
        self._open -= 1
        if user is not None and self._users_wanted:
            self._ask(self.tally.user_closed, user, self._last_closed)
        if self._rooms_wanted:
            self._ask(self.tally.room_closed, room, self._room_closed)

    def message(self, data: dict[str, Any]) -> None:
        """A message was said: ``data`` is the event's (docs/webhooks.md)."""
        if self.messages_wanted:
            self.emit("message", data)

    # -- the events -----------------------------------------------------------------

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        if kind not in self.wanted:
            return
        event_id = new_event_id()
        ts = int(self.clock.seconds() * 1000)
        self._enqueue(event_id, event_body(event_id, kind, ts, data))

    def _came_online(self, user: str, came: bool) -> None:
        if came:
            self.emit("user.online", {"user": user})

    def _last_closed(self, user: str, last: bool) -> None:
        if not last or user in self._offline_checks:
            return
        if self._stopping and getattr(self.tally, "shared", False):
            return  # the other nodes reap this one once it is gone
        if self.offline_delay <= 0 or self._stopping or not self.running:
            self._check_offline(user)
            return
        self._offline_checks[user] = self.clock.callLater(
            self.offline_delay, self._check_offline, user
        )

    def _check_offline(self, user: str) -> None:
        self._offline_checks.pop(user, None)
        self._ask(self.tally.user_check, user, self._went_offline)

    def _went_offline(self, user: str, gone: bool) -> None:
        if gone:
            self.emit("user.offline", {"user": user})

    def _room_closed(self, room: str, vacated: bool) -> None:
        if vacated:
            self.emit("room.vacated", {"room": room})

    def _reap(self) -> None:
        def reaped(result: Any) -> None:
            users, rooms = result
            for user in users:
                self.emit("user.offline", {"user": user})
            for room in rooms:
                self.emit("room.vacated", {"room": room})

        self._ask(lambda _: self.tally.reap(), None, lambda _, result: reaped(result))

    def _ask(
        self,
        question: Callable[[Any], Any],
        subject: Any,
        then: Callable[[Any, Any], None] | None,
    ) -> None:
        """Ask the tally; act on its answer, now or when it comes."""
        try:
            answer = question(subject)
        except Exception:
            log.failure("An error has occurred: counting for webhook events")
            return
        if not isinstance(answer, Deferred):
            if then is not None:
                then(subject, answer)
            return
        d = answer
        self._pending.add(d)

        def answered(answer: Any) -> None:
            if self._uncounted:
                log.info(
                    "Webhook events: counting in Redis again ({count} change(s) "
                    "could not be counted; their events may be lost)",
                    count=self._uncounted,
                )
                self._uncounted = 0
            if then is not None:
                then(subject, answer)

        def failed(failure: Failure) -> None:
            # Redis away or refusing: this change is not counted, and its
            # event may be lost (docs/webhooks.md).  Logged once an outage.
            dropped = getattr(self.sender, "dropped", None)
            if dropped is not None:
                dropped["redis"] += 1
            if not self._uncounted:
                log.warn(
                    "Webhook events: cannot count in Redis ({error}); events "
                    "may be lost until it answers again",
                    error=escape_for_log(str(failure.value)),
                )
            self._uncounted += 1

        d.addCallbacks(answered, failed)
        d.addErrback(
            lambda failure: log.failure(
                "An error has occurred: a webhook event", failure
            )
        )
        d.addBoth(lambda _: self._pending.discard(d))


__all__ = [
    "DEFAULT_EVENTS",
    "EVENT_TYPES",
    "AppEvents",
    "LocalTally",
    "Tally",
    "event_body",
    "new_event_id",
    "parse_event_types",
]
