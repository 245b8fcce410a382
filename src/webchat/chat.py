"""The chat of one server: its connections, their rooms, other nodes, shutdown.

``WebChatFactory`` is Autobahn's factory, and the user's design card holds:
it tracks every protocol instance, and each ``WebChatProtocol`` reports
``onConnect``/``onOpen``/``onMessage``/``onClose`` back to it.  What it does
with each report is short, because the work lives elsewhere:

* ``onConnect`` → ``admit``: ``webchat.admission`` decides (origin, caps),
  giving the address, room and codec, or the HTTP refusal.
* ``onOpen`` → ``register``: the connection gets its id and joins its room
  (``webchat.rooms``), with the "New connection!" log line; a JSON client
  is sent its welcome and the room's history (``webchat.history``), or
  what it missed when it asked to resume (``_replay``).
* ``onMessage`` → ``relay``: the sender's room publishes it
  (``webchat.room``); with ``--redis``, Redis numbers and keeps it first,
  and every node's room, this one's included, publishes it when it comes
  back (``deliver_kept``), or at once while Redis is away.
* ``onClose`` → ``unregister``: leaves the room, with the close's log lines
  and counters.

Ids are the server's (or, with ``--redis``, the cluster's), not a room's,
so ``id 7`` means one person everywhere.  ``reactor`` is kept on the
factory (never imported here) so tests can run several servers in one
process, or hand in a fake clock.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    FirstError,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from webchat.access import AccessPolicy
from webchat.admission import Admission
from webchat.auth import TokenError, TokenVerifier
from webchat.codecs import JSON, SEED, Message, event_frame
from webchat.connection import (
    _CLOSED,
    _OPEN,
    ERROR_CLOSE_CODES,
    SERVER_FAULT_CODES,
    WebChatProtocol,
)
from webchat.events import BadEvent, check_name, check_resume, parse_event
from webchat.history import HistoryStore
from webchat.history.memory import MemoryHistory
from webchat.limits import (
    BAD_EVENTS_MAX,
    BAD_EVENTS_WINDOW,
    CATCH_UP_ATTEMPTS,
    CATCH_UP_RETRY,
    MAX_HISTORY_ROOMS,
    TYPING_INTERVAL,
    Limits,
)
from webchat.logtext import LogText, escape_for_log
from webchat.metrics import ChatStats
from webchat.room import Member, Room, member_entry
from webchat.rooms import Rooms

if TYPE_CHECKING:
    from webchat.redis import Envelope, RedisRelay
    from webchat.redis.streams import StreamHistory
    from webchat.webhooks import AppEvents

#: Error codes that are a person's (or a page's) mistake, not garbage: they
#: do not count towards the bad events that close a connection.
_MISTAKES = frozenset(
    {"bad_name", "name_taken", "name_locked", "message_too_big", "bad_resume"}
)

#: How each error close is counted (``WebChatFactory.dropped``).
_DROP_KIND = {
    1002: "protocol_error",
    1003: "unsupported_data",
    1007: "invalid_utf8",
    1009: "message_too_big",
    1011: "internal_error",
}

log = Logger(namespace="webchat")

#: Past any offset a room can reach: "to the end" in a read of its history.
MAX_OFFSET = (1 << 53) - 1

#: A message that is not acked (the seed's clients): ``relay``'s ``ref``.
_NO_ACK = object()


class _Unechoed:
    """
    A message of a member's that Redis has not numbered yet (``_keep``):
    compared by identity, as two alike messages are still two.
    """

    __slots__ = ("ref", "text", "ts")

    def __init__(self, ref: object, ts: int, text: bytes) -> None:
        self.ref = ref
        self.ts = ts
        self.text = text


def _close_code(protocol: WebChatProtocol) -> int:
    """The code a connection ended with: the server's, else the client's, else 1006."""
    if protocol.drop_reason is not None and protocol.localCloseCode is None:
        return 1006  # dropped without a close frame (dead peer)
    return protocol.localCloseCode or protocol.remoteCloseCode or 1006


class WebChatFactory(WebSocketServerFactory):
    """
    The chat of one server: tracks its connections, admits them (through
    ``Admission``) into rooms, hands each message to the sender's room,
    shares the chat with other nodes, and shuts down.

    ``reactor`` is kept on the factory (never imported here) so tests can run
    several servers in one process, or hand in a fake clock.
    """

    protocol = WebChatProtocol
    log = txaio.make_logger(level="error")

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        quiet: bool = False,
        limits: Limits | None = None,
        access: AccessPolicy | None = None,
        history: HistoryStore | None = None,
        history_for_text_clients: bool = False,
        auth: str = "off",
        verifier: TokenVerifier | None = None,
    ) -> None:
        # "webchat", not Autobahn's name and version, in the 101's Server:.
        super().__init__(reactor=reactor, server="webchat")
        self.stats = ChatStats()
        limits = limits or Limits()
        if history is None:
            history = MemoryHistory(
                reactor.seconds,
                limit=limits.history,
                ttl=limits.history_ttl,
                max_bytes=limits.history * limits.max_message_size,
                max_rooms=MAX_HISTORY_ROOMS,
            )
        self.rooms = Rooms(
            reactor,
            self.stats,
            delivery_failed=self._delivery_failed,
            history=history,
        )
        #: Whether seed-format clients are sent history too (as ``id N:`` lines).
        self.history_for_text_clients = history_for_text_clients
        self._next_id = 1
        #: Where ids come from when several nodes share the chat (the Redis
        #: relay's allocator); ``None`` for this process's own counter.
        self.id_source: Callable[[], int] | None = None
        self.quiet = quiet
        self.limits = limits
        self.access = access or AccessPolicy()
        #: Every connection from TCP accept to close, open or still handshaking.
        self.connections: set[WebChatProtocol] = set()
        self.admission = Admission(
            self.access, self.limits, self.stats.refused, auth, verifier
        )
        #: Open connections with an identity, by user (``connections_of``).
        #: (Ordered sets, as dicts: one user may hold many connections.)
        self._by_user: dict[str, dict[WebChatProtocol, None]] = {}
        #: When signed connections' tokens run out (exp plus the leeway, on
        #: the reactor's clock): the connections whose token ends at each
        #: time, those times as a heap, and one timer for the earliest (see
        #: ``_expire_at``).
        self._deadlines: dict[float, dict[WebChatProtocol, None]] = {}
        self._deadline_heap: list[float] = []
        self._expiry_timer: IDelayedCall | None = None
        self._expiry_timer_at: float | None = None
        #: When the server started, for /healthz's uptime.
        self.started_at = reactor.seconds()
        #: Set at shutdown: new handshakes get 503 and /healthz says so.
        self.draining = False
        #: The Redis relay to other nodes, when there is one (``attach_link``).
        self.link: RedisRelay | None = None
        #: The rooms' history in Redis, when Redis keeps it (``attach_link``).
        self.kept: StreamHistory | None = None
        #: Rooms reading what they missed while Redis was away, and the
        #: kept messages that came meanwhile (``_catch_up``).
        self._catching_up: dict[str, list[Envelope]] = {}
        #: Rooms whose catch-up read is in flight.
        self._reading: set[str] = set()
        #: What the app hears of (--webhook-url): comings, goings, messages.
        self.app_events: AppEvents | None = None
        size = self.limits.max_message_size
        self.setProtocolOptions(
            # Without failByDrop=False Autobahn answers a protocol violation by
            # dropping TCP, and the client never learns the close code.
            failByDrop=False,
            # RFC 6455 only: Autobahn also speaks the 2011 draft (version 8),
            # which no browser sends and nothing here is tested against.
            versions=[13],
            maxMessagePayloadSize=size,
            maxFramePayloadSize=size,
            # The site's handshake deadline covers the whole opening handshake,
            # and our own keepalive (on self.reactor) replaces Autobahn's.
            openHandshakeTimeout=0,
            autoPingInterval=0,
            # Let "Origin: null" through to admit(): our policy decides it
            # (and logs and counts a refusal), not Autobahn's bare 400.
            allowNullOrigin=True,
            # Each close we start sets its own timeout (sendCloseFrame): the
            # shutdown grace for 1001, Limits.close_timeout for closes for cause.
            closeHandshakeTimeout=0,
        )
        # Autobahn copies every option onto every new connection, and
        # pretty-prints the lot for a debug line even when debug is off: a
        # third of what accepting a connection costs, and 2 KB a connection.
        # Instead the options live on a protocol class of this factory's own,
        # whose empty CONFIG_ATTRS leaves nothing to copy.  (So options are
        # fixed from now on: set them above, never later.)
        options: dict[str, Any] = {
            # staticmethod: a function option (perMessageCompressionAccept)
            # must not turn into a method of the class.
            name: staticmethod(value) if callable(value) else value
            for name in WebChatProtocol.CONFIG_ATTRS
            for value in (getattr(self, name),)
        }
        options["CONFIG_ATTRS"] = ()
        self.protocol = type("WebChatProtocol", (WebChatProtocol,), options)

    @property
    def refused(self) -> Counter[str]:
        """Handshakes refused, by reason."""
        return self.stats.refused

    @property
    def per_address(self) -> Counter[str]:
        """Admitted connections still open, by address."""
        return self.admission.per_address

    @property
    def dropped(self) -> Counter[str]:
        """Connections the server ended for cause, by kind."""
        return self.stats.dropped

    # -- what the protocols report -------------------------------------------------

    def admit(self, protocol: WebChatProtocol, request: Any) -> None:
        """Let a handshake proceed, or raise ``ConnectionDeny`` with the HTTP status."""
        headers = request.headers
        peer = protocol.client_address
        params = request.params or {}
        token = None
        if self.admission.auth != "off":
            # Read only when tokens are: with --auth off nobody's is looked at.
            tokens = params.get("token")
            token = tokens[0] if tokens else None
        protocol.client_address = self.admission.client_address(peer, headers)
        protocol.admitted = self.admission.admit(
            peer,
            headers,
            tls=ISSLTransport.providedBy(protocol.transport),
            draining=self.draining,
            connections=len(self.connections),
            path=request.path,
            rooms=self.rooms,
            rooms_open=self.rooms.open,
            token=token,
        )
        names = params.get("name")
        if protocol.admitted.codec is JSON:
            if names and protocol.admitted.identity is None:
                protocol.wanted_name = names[0]
            since, epoch = params.get("since"), params.get("epoch")
            if since or epoch:
                protocol.wanted_resume = (
                    since[0] if since else None,
                    epoch[0] if epoch else None,
                )

    def connections_of(self, user: str) -> list[WebChatProtocol]:
        """This node's open connections of ``user`` (the token's ``sub``)."""
        return list(self._by_user.get(user, ()))

    def _expire_at(self, protocol: WebChatProtocol, expires: float) -> None:
        """
        Close ``protocol`` when a token expiring at ``expires`` no longer
        passes admission (``exp`` plus the verifier's leeway), on the
        factory's clock; a ``refresh`` moves it on.

        One timer serves every connection, not one each: a timer per
        connection was six more objects for the garbage collector to walk
        per signed connection (docs/benchmarks.md, issue #15), and the
        connections of one moment mostly share their deadline anyway.
        """
        self._drop_deadline(protocol)
        verifier = self.admission.verifier
        leeway = verifier.leeway if verifier is not None else 0.0
        deadline = expires + leeway
        sharing = self._deadlines.get(deadline)
        if sharing is None:
            sharing = self._deadlines[deadline] = {}
            heapq.heappush(self._deadline_heap, deadline)
        sharing[protocol] = None
        protocol.token_deadline = deadline
        self._schedule_expiry()

    def _drop_deadline(self, protocol: WebChatProtocol) -> None:
        """``protocol``'s token no longer ends it (closed, refreshed, expired)."""
        deadline = protocol.token_deadline
        if deadline is None:
            return
        protocol.token_deadline = None
        sharing = self._deadlines.get(deadline)
        if sharing is not None:
            sharing.pop(protocol, None)
            if not sharing:
                # Its time stays in the heap, skipped when it comes up.
                del self._deadlines[deadline]
        if not self._deadlines:
            self._deadline_heap.clear()
            self._schedule_expiry()

    def _schedule_expiry(self) -> None:
        """The timer at the earliest deadline with a connection, or none."""
        heap = self._deadline_heap
        while heap and heap[0] not in self._deadlines:
            heapq.heappop(heap)
        first = heap[0] if heap else None
        if first == self._expiry_timer_at:
            return
        timer = self._expiry_timer
        if timer is not None and timer.active():
            timer.cancel()
        self._expiry_timer = self._expiry_timer_at = None
        if first is not None:
            delay = max(first - self.reactor.seconds(), 0.0)
            self._expiry_timer = self.reactor.callLater(
                delay, self._deadline_reached, first
            )
            self._expiry_timer_at = first

    def _deadline_reached(self, deadline: float) -> None:
        """Every connection whose token ends at ``deadline`` or before: closed."""
        self._expiry_timer = self._expiry_timer_at = None
        heap = self._deadline_heap
        while heap and heap[0] <= deadline:
            for protocol in list(self._deadlines.pop(heapq.heappop(heap), ())):
                protocol.token_deadline = None
                self._token_expired(protocol)
        self._schedule_expiry()

    def _token_expired(self, protocol: WebChatProtocol) -> None:
        """Its token ran out: say so (JSON), close 4001, log it once."""
        if protocol.state != _OPEN:
            return
        identity = protocol.identity
        log.info(
            "Connection {id} from {peer}: token of user {user} expired",
            id=protocol.chat_id,
            peer=escape_for_log(protocol.client_address),
            user=escape_for_log(identity.user if identity is not None else "-"),
        )
        if protocol.admitted is not None and protocol.admitted.codec is JSON:
            self._tell(
                protocol,
                event_frame(
                    {
                        "type": "error",
                        "code": "token_expired",
                        "reason": "token expired",
                    }
                ),
            )
        protocol.close_with(4001, "token expired")

    def _refresh_event(self, sender: WebChatProtocol, token: str) -> None:
        """
        A fresh token before the old one expires: for the same user and
        still granting the room, it moves the expiry on (``refreshed``);
        otherwise ``bad_token``, and the connection lasts as long as before.
        """
        identity = sender.identity
        verifier = self.admission.verifier
        if identity is None or verifier is None:
            raise BadEvent("bad_token", "this connection has no token to refresh")
        try:
            fresh = verifier.verify(token)
        except TokenError as e:
            raise BadEvent("bad_token", e.reason) from None
        if fresh.user != identity.user:
            raise BadEvent("bad_token", "the token is for another user")
        room = sender.room
        if room is not None and not fresh.may_join(room.name):
            raise BadEvent("bad_token", "the token does not grant this room")
        # The name stays the one the connection opened with: others know it so.
        sender.identity = replace(fresh, name=identity.name)
        self._expire_at(sender, fresh.expires)
        exp: float | int = fresh.expires
        if exp == int(exp):
            exp = int(exp)
        self._tell(sender, event_frame({"type": "refreshed", "exp": exp}))

    def _forget_user(self, protocol: WebChatProtocol) -> None:
        self._drop_deadline(protocol)
        identity = protocol.identity
        if identity is None:
            return
        held = self._by_user.get(identity.user)
        if held is not None and protocol in held:
            del held[protocol]
            if not held:
                del self._by_user[identity.user]

    def allocate_id(self) -> int:
        """
        Hand out the next connection id.  Ids count up from 1 and are never
        reused for the life of the server, so ``id 7`` in a chat log always
        means the same person.
        """
        if self.id_source is not None:
            return self.id_source()
        chat_id = self._next_id
        self._next_id += 1
        return chat_id

    def register(self, protocol: WebChatProtocol) -> None:
        admitted = protocol.admitted
        if admitted is None:
            raise RuntimeError("a connection opened without being admitted")
        protocol.chat_id = self.allocate_id()
        name = ""
        bad_name: BadEvent | None = None
        identity = protocol.identity = admitted.identity
        if identity is not None:
            # Signed by the app: their name is theirs, ?name= is not read.
            name = identity.display_name
            self._by_user.setdefault(identity.user, {})[protocol] = None
            self._expire_at(protocol, identity.expires)
        elif protocol.wanted_name is not None:
            try:
                name = check_name(protocol.wanted_name)
            except BadEvent as e:
                bad_name = e
            protocol.wanted_name = None
        if identity is not None:
            here = self.rooms.get(admitted.room)
            if here is not None:
                self._make_way(here, name, identity.user)
        room = self.rooms.join(
            admitted.room, protocol, admitted.codec, name, exact=identity is not None
        )
        protocol.room = room
        self.stats.opened += 1
        protocol.opened_at = self.reactor.seconds()
        log.info(
            "New connection! ({id}) from {peer} in room {room}",
            id=protocol.chat_id,
            peer=escape_for_log(protocol.client_address),
            room=room.name,
        )
        member = member_entry(protocol)
        if self.link is not None:
            self.link.member_joined(
                room.name,
                protocol.chat_id,
                protocol.chat_name,
                identity.user if identity is not None else "",
            )
        if self.app_events is not None:
            self.app_events.opened(_user_of(protocol), room.name)
        if admitted.codec is JSON:
            # The welcome, the errors about the URL right after it, then the
            # history: all before any live event (see _replay).
            errors = []
            if bad_name is not None:
                errors.append(self._error(protocol, bad_name))
            resume = None
            wanted, protocol.wanted_resume = protocol.wanted_resume, None
            if wanted is not None:
                try:
                    resume = check_resume(*wanted)
                except BadEvent as e:
                    errors.append(self._error(protocol, e))
            since, epoch = resume if resume is not None else (None, "")
            self._when_open(
                protocol,
                room,
                lambda: self._replay(
                    protocol, room, self._welcome(protocol, room), since, epoch, errors
                ),
            )
        elif self.history_for_text_clients:
            self._when_open(
                protocol, room, lambda: self._replay(protocol, room, None, None, "")
            )
        room.publish_event(
            event_frame({"type": "join", "room": room.name, "member": member}),
            protocol.chat_id,
        )

    def _when_open(
        self, protocol: WebChatProtocol, room: Room, greet: Callable[[], None]
    ) -> None:
        """
        ``greet`` ``protocol`` now, or once its room's epoch and offset are
        known (a room opened from Redis), holding its live traffic meanwhile.
        """
        if room.opening is None:
            greet()
            return
        room.hold(protocol, self.limits.max_send_buffer)

        def opened() -> None:
            if room.member(protocol.chat_id) is protocol:  # still here
                greet()

        room.opening.append(opened)

    def _welcome(self, protocol: WebChatProtocol, room: Room) -> dict[str, Any]:
        limits = self.limits
        rate: float | int = limits.rate_limit
        if rate == int(rate):
            rate = int(rate)
        members = self._roster(room)
        welcome: dict[str, Any] = {
            "type": "welcome",
            **member_entry(protocol),  # its id, name, and user if signed
            "room": room.name,
            "members": members,
        }
        if self.admission.auth != "off":
            # Signed users, each once with their connection count.
            welcome["users"] = users_of(members)
        return {
            **welcome,
            "limits": {
                "max_text_bytes": limits.max_text_bytes,
                "max_message_size": limits.max_message_size,
                "rate_limit": rate,
                "rate_burst": limits.rate_burst,
            },
            "offset": room.flushed,
            "epoch": room.epoch,
        }

    def _roster(self, room: Room) -> list[dict[str, object]]:
        """The room's members here, then those on other nodes (--redis)."""
        members = room.roster()
        if self.link is not None:
            here = {member["id"] for member in members}
            members += [
                member
                for member in self.link.presence.roster(room.name)
                if member["id"] not in here
            ]
        return members

    # -- history: on join, on resume ------------------------------------------------

    def _replay(
        self,
        protocol: WebChatProtocol,
        room: Room,
        head: dict[str, Any] | None,
        since: int | None,
        epoch: str,
        extra: list[bytes] | tuple[bytes, ...] = (),
    ) -> None:
        """
        Send ``protocol`` ``head`` (its welcome or resumed event, with
        ``recovered`` when it asked to resume from ``since`` in ``epoch``),
        ``extra`` frames, then the history it is owed, then live traffic.

        History runs up to the room's last *flushed* offset: what this turn
        still queues reaches the member live.  A store that answers later
        (a thread, the network) has the member's live traffic held by the
        room meanwhile (``Room.hold``), so nothing overtakes the replay and
        nothing is sent twice.
        """
        upto = room.flushed
        store = self.rooms.history
        limit = store.limit if store is not None else 0
        recovered: bool | None = None
        if since is not None and epoch == room.epoch and since <= upto:
            after = since
        else:
            after = max(upto - limit, 0)
            if since is not None:
                recovered = False  # another epoch, or an offset never given out
        codec = protocol.admitted.codec if protocol.admitted else SEED

        def frames(messages: Sequence[Message]) -> list[bytes]:
            nonlocal recovered
            messages = [m for m in messages if after < m.offset <= upto]
            if since is not None and recovered is None:
                # Offsets have no gaps: all were there if all were found.
                recovered = len(messages) == upto - since
            out = []
            if head is not None:
                if since is not None:
                    head["recovered"] = recovered
                    self.stats.resumes["true" if recovered else "false"] += 1
                out.append(event_frame(head))
            out.extend(extra)
            encode = codec.encode_history
            out.extend(encode(message) for message in messages)
            self.stats.history_replayed += len(messages)
            return out

        if store is None or not limit or after >= upto:
            answer: Sequence[Message] | Deferred[Sequence[Message]] = []
        else:
            try:
                answer = store.read(room.name, after, upto)
            except Exception:
                log.failure("An error has occurred: reading history failed")
                answer = []
        if not isinstance(answer, Deferred):
            if room.holding(protocol):  # held while its room opened
                if not room.release(protocol, frames(answer)):
                    protocol.close_with(1008, "too slow", kind="too_slow")
                return
            # One write for the welcome and the whole replay, not one each.
            data = b"".join(frames(answer))
            if data:
                protocol.deliver(data)
            return
        room.hold(protocol, self.limits.max_send_buffer)

        def failed(failure: Failure) -> list[Message]:
            log.failure(
                "An error has occurred: reading history of room {room} failed",
                failure,
                room=room.name,
            )
            return []

        def answered(messages: Sequence[Message]) -> None:
            if not room.release(protocol, frames(messages)):
                protocol.close_with(1008, "too slow", kind="too_slow")

        answer.addErrback(failed).addCallback(answered).addErrback(
            lambda failure: log.failure(
                "An error has occurred: replaying history failed", failure
            )
        )

    def _said(
        self,
        room: str,
        sender: WebChatProtocol | None,
        text: bytes,
        offset: int | None,
        ts: int,
        *,
        chat_id: int = 0,
        name: str = "",
    ) -> None:
        """Tell the app (``message`` webhook) what ``sender`` said in ``room``."""
        assert self.app_events is not None
        if not self.app_events.messages_wanted:
            return
        data: dict[str, Any] = {
            "room": room,
            "id": sender.chat_id if sender is not None else chat_id,
            "name": sender.chat_name if sender is not None else name,
        }
        user = _user_of(sender) if sender is not None else None
        if user is not None:
            data["user"] = user
        data["text"] = text.decode("utf-8", "replace")
        data["offset"] = offset
        data["ts"] = ts
        self.app_events.message(data)

    def _tell(self, protocol: WebChatProtocol, frame: bytes) -> None:
        """Send one event to one member, behind anything its room holds for it."""
        room = protocol.room
        if room is None or not room.tell(protocol, frame):
            protocol.deliver(frame)

    def now_ms(self) -> int:
        """The server's time in ms, from the factory's clock (JSON ``ts``)."""
        return int(self.reactor.seconds() * 1000)

    def unregister(self, protocol: WebChatProtocol) -> None:
        room = protocol.room
        self._forget_user(protocol)
        if not protocol.chat_id or room is None or not self.rooms.leave(room, protocol):
            return  # never opened, or already gone
        if self.link is not None:
            self.link.member_left(room.name, protocol.chat_id)
        if self.app_events is not None:
            self.app_events.closed(_user_of(protocol), room.name)
        if len(room):
            member = member_entry(protocol)
            room.publish_event(
                event_frame({"type": "leave", "room": room.name, "member": member}),
                protocol.chat_id,
            )
        code = _close_code(protocol)
        self.stats.closed[code] += 1
        error = None
        server_fault = False
        if protocol.drop_reason is not None:
            kind, error = protocol.drop_reason
            self.dropped[kind] += 1
            server_fault = protocol.localCloseCode in SERVER_FAULT_CODES
        elif protocol.localCloseCode in ERROR_CLOSE_CODES:
            local = protocol.localCloseCode
            reason = protocol.localCloseReason or b""
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            error = f"{local} {reason}".strip()
            self.dropped[_DROP_KIND.get(local, f"close_{local}")] += 1
            server_fault = local in SERVER_FAULT_CODES
        if error is not None:
            # error: our fault, someone should look; warn: the client's doing.
            emit = log.error if server_fault else log.warn
            emit(
                "An error has occurred: connection {id} from {peer}: {error}",
                id=protocol.chat_id,
                peer=escape_for_log(protocol.client_address),
                error=escape_for_log(error),
            )
        log.info(
            "Connection {id} has disconnected: {peer}, code {code}, "
            "after {duration:.1f} s",
            id=protocol.chat_id,
            peer=escape_for_log(protocol.client_address),
            code=code,
            duration=max(self.reactor.seconds() - protocol.opened_at, 0.0),
        )

    def forget(self, protocol: WebChatProtocol) -> None:
        """The TCP connection is gone: release what it held against the caps."""
        self.connections.discard(protocol)
        self._forget_user(protocol)
        if protocol.admitted is not None:
            self.admission.release(protocol.admitted.address)

    def _delivery_failed(self, protocol: WebChatProtocol) -> bool:
        """A delivery to ``protocol`` raised (a bug): end just that connection."""
        protocol.close_with(1011, "internal error")
        return True

    # -- JSON events ----------------------------------------------------------------

    def receive_event(self, sender: WebChatProtocol, payload: bytes) -> None:
        """A JSON client's event (docs/protocol.md): act on it, or say why not."""
        try:
            event = parse_event(payload)
            if event.type == "message":
                self._message_event(sender, event.value, event.ref)
            elif event.type == "name":
                self._name_event(sender, event.value)
            elif event.type == "resume":
                self._resume_event(sender, event.since, event.value)
            elif event.type == "refresh":
                self._refresh_event(sender, event.value)
            else:
                self._typing_event(sender)
        except BadEvent as e:
            self.reject(sender, e)

    def _message_event(
        self, sender: WebChatProtocol, text: str, ref: str | int | None
    ) -> None:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadEvent("bad_event", "text is not valid Unicode", ref) from None
        most = self.limits.max_text_bytes
        if most and len(data) > most:
            raise BadEvent("message_too_big", f"text is over {most} bytes (UTF-8)", ref)
        if self.keeps_in_redis:
            self.relay(sender, data, ref)  # acked when Redis has numbered it
            return
        self.relay(sender, data)
        room = sender.room
        offset, ts = (room.offset, room.ts) if room is not None else (0, self.now_ms())
        self._tell(
            sender, event_frame({"type": "ack", "ref": ref, "offset": offset, "ts": ts})
        )

    def _resume_event(self, sender: WebChatProtocol, since: int, epoch: str) -> None:
        room = sender.room
        if room is None:
            return
        if room.holding(sender):
            raise BadEvent("bad_event", "a resume is already under way")
        head = {
            "type": "resumed",
            "room": room.name,
            "offset": room.flushed,
            "epoch": room.epoch,
        }
        self._replay(sender, room, head, since, epoch)

    def _name_event(self, sender: WebChatProtocol, raw: str) -> None:
        if sender.identity is not None:
            raise BadEvent("name_locked", "your name is the one your app signed")
        name = check_name(raw)
        room = sender.room
        if room is None:
            return
        old = sender.chat_name
        if not room.rename(sender, name):
            raise BadEvent("name_taken", "someone in this room has that name")
        if name == old:
            return
        self._renamed(room, sender, old)
        log.info(
            "Connection {id} is now called {name} in room {room}",
            id=sender.chat_id,
            name=escape_for_log(name),
            room=room.name,
        )

    def _renamed(self, room: Room, member: Member, old: str) -> None:
        """Tell the room (and the other nodes) ``member`` was ``old``."""
        if self.link is not None:
            self.link.member_renamed(room.name, member.chat_id, member.chat_name)
        room.publish_event(
            event_frame(
                {
                    "type": "name",
                    "room": room.name,
                    "id": member.chat_id,
                    "old": old,
                    "name": member.chat_name,
                }
            )
        )

    def _make_way(self, room: Room, name: str, user: str) -> None:
        """
        Signed names win: an anonymous member here holding ``name``, which
        signed ``user`` is joining with (on this node or another), is renamed
        to the next free ``name-2``-style name, with the ordinary ``name``
        event, so no two members show one name with only one of them signed.
        """
        holder = room.holder(name)
        if holder is None or getattr(holder, "identity", None) is not None:
            return  # free, or signed: signed members may share a name
        old = holder.chat_name
        if not room.rename(holder, room.free_name(old)):
            return  # cannot happen: free_name is free
        self._renamed(room, holder, old)
        log.info(
            "Connection {id} is now called {name} in room {room}: "
            "signed user {user} has the name {old}",
            id=holder.chat_id,
            name=escape_for_log(holder.chat_name),
            room=room.name,
            user=escape_for_log(user),
            old=escape_for_log(old),
        )

    def _typing_event(self, sender: WebChatProtocol) -> None:
        now = self.reactor.seconds()
        room = sender.room
        if room is None or now - sender.typed_at < TYPING_INTERVAL:
            return  # at most one every TYPING_INTERVAL, the rest dropped
        sender.typed_at = now
        if self.link is not None:
            identity = sender.identity
            self.link.member_typing(
                room.name,
                sender.chat_id,
                sender.chat_name,
                identity.user if identity is not None else "",
            )
        room.publish_event(
            event_frame(
                {
                    "type": "typing",
                    "room": room.name,
                    **member_entry(sender),
                }
            ),
            sender.chat_id,
        )

    def reject(self, protocol: WebChatProtocol, error: BadEvent) -> None:
        """
        Tell a JSON client why its event was not acted on (logged once,
        counted); too many bad events in a row close it with 1008.
        """
        self._tell(protocol, self._error(protocol, error))
        if error.code in _MISTAKES:
            return  # a person's mistake, not garbage
        now = self.reactor.seconds()
        recent = protocol.bad_events
        if recent is None:
            recent = protocol.bad_events = deque(maxlen=BAD_EVENTS_MAX)
        recent.append(now)
        if len(recent) == BAD_EVENTS_MAX and now - recent[0] <= BAD_EVENTS_WINDOW:
            protocol.close_with(1008, "too many bad events", kind="bad_events")

    def _error(self, protocol: WebChatProtocol, error: BadEvent) -> bytes:
        """The ``error`` event for ``error``, logged once and counted."""
        self.stats.bad_events[error.code] += 1
        event: dict[str, object] = {
            "type": "error",
            "code": error.code,
            "reason": error.reason,
        }
        if error.ref is not None:
            event["ref"] = error.ref
        log.warn(
            "Connection {id} from {peer}: {code} ({reason})",
            id=protocol.chat_id,
            peer=escape_for_log(protocol.client_address),
            code=error.code,
            reason=error.reason,
        )
        return event_frame(event)

    def relay(
        self, sender: WebChatProtocol, payload: bytes, ref: object = _NO_ACK
    ) -> int:
        """
        Hand ``payload`` to the sender's room (everyone else there gets it as
        its codec says: ``id N: payload``) and to the other nodes; return how
        many here get it.

        With rooms kept in Redis it goes to Redis first, and to the room when
        it comes back numbered (``deliver_kept``), with its ack (``ref``);
        while Redis is away, to the room at once (no offset) and to the
        outage buffer.
        """
        room = sender.room
        if self.keeps_in_redis and room is not None:
            self.stats.messages_received += 1
            return self._keep(sender, room, payload, ref)
        count = room.publish(sender, payload) if room is not None else 0
        self.stats.messages_received += 1
        if self.app_events is not None and room is not None:
            self._said(room.name, sender, payload, room.offset or None, room.ts)
        if self.link is not None and room is not None:
            self.link.publish(
                sender.chat_id, payload, room.name, sender.chat_name, room.ts
            )
        if self.quiet:
            pass
        elif self.link is not None:
            log.info(
                "Connection {id} sending message {text} to {count} other "
                "connection(s) here, and published to the other nodes",
                id=sender.chat_id,
                text=LogText(payload),
                count=count,
            )
        else:
            log.info(
                "Connection {id} sending message {text} to {count} other "
                "connection(s) in room {room}",
                id=sender.chat_id,
                text=LogText(payload),
                count=count,
                room=room.name if room is not None else "-",
            )
        return count

    # -- rooms kept in Redis (--redis) ------------------------------------------------

    @property
    def keeps_in_redis(self) -> bool:
        """Whether Redis numbers and keeps the rooms' messages (--redis)."""
        return self.kept is not None

    def _keep(
        self, sender: WebChatProtocol, room: Room, payload: bytes, ref: object
    ) -> int:
        """Have Redis number and keep ``payload``; it comes back to every node."""
        assert self.link is not None
        ts = self.now_ms()
        entry = _Unechoed(ref, ts, payload)
        if sender.unechoed is None:
            sender.unechoed = deque()
        sender.unechoed.append(entry)
        if self.link.state != "up":
            # Its echo could not come back (the subscriber may be the one
            # down): an outage for this message.
            d: Deferred[Any] = fail(ConnectionError("the Redis link is down"))
        else:
            d = self.link.append_message(
                room.name,
                sender.chat_id,
                sender.chat_name,
                ts,
                payload,
                _user_of(sender) or "",
            )
        d.addErrback(self._not_kept, sender, room, entry)
        return max(len(room) - 1, 0)

    def _not_kept(
        self,
        failure: Failure,
        sender: WebChatProtocol,
        room: Room,
        entry: _Unechoed,
    ) -> None:
        """
        Redis did not take it (away, or gone before it answered): this
        node's members get it now, with no offset, and the others when Redis
        is back (the outage buffer).  Should Redis have kept it after all
        (the link went between its doing so and its answer), it may be
        delivered twice: see docs/scaling.md.
        """
        assert self.link is not None
        unechoed = sender.unechoed
        if unechoed is None or not any(e is entry for e in unechoed):
            return  # it came back after all
        unechoed.remove(entry)  # the first equal is itself: identity
        count = 0
        if self.rooms.get(room.name) is room:
            count = room.publish(sender, entry.text, offset=0, ts=entry.ts)
        if self.app_events is not None:
            self._said(room.name, sender, entry.text, None, entry.ts)
        self.link.keep_later(
            room.name,
            sender.chat_id,
            sender.chat_name,
            entry.ts,
            entry.text,
            _user_of(sender) or "",
        )
        if entry.ref is not _NO_ACK:
            self._tell(
                sender,
                event_frame(
                    {"type": "ack", "ref": entry.ref, "offset": None, "ts": entry.ts}
                ),
            )
        if not self.quiet:
            log.info(
                "Connection {id} sending message {text} to {count} other "
                "connection(s) here; Redis is away, kept for the other nodes",
                id=sender.chat_id,
                text=LogText(entry.text),
                count=count,
            )

    def deliver_kept(self, envelope: Envelope) -> None:
        """
        A message Redis numbered and kept, from any node, this one included,
        in offset order: everyone in its room here gets it, but its sender;
        the sender gets its ack.  This node's own delayed ones (said during
        an outage) were delivered here when said: they only move the room's
        offset on.
        """
        assert self.link is not None
        if self.kept is not None:
            self.kept.seen(envelope.room, envelope.epoch, envelope.offset)
        room = self.rooms.get(envelope.room)
        if room is None:
            return
        waiting = self._catching_up.get(room.name)
        if waiting is None and room.opening is not None:
            # After its joiners' welcome and history (_deliver_waiting).
            waiting = self._catching_up[room.name] = []
        if waiting is not None:
            waiting.append(envelope)  # after what the room missed (_catch_up)
            return
        up = self.link.state == "up"
        if not up or (
            envelope.epoch == room.epoch and envelope.offset > room.offset + 1
        ):
            # Heard out of turn: the subscriber came back before the rest of
            # the link (a catch-up is still to come), or kept messages went
            # unheard.  Delivering it would move the room's offset past the
            # ones missed, and the catch-up, which reads after that offset,
            # would skip them: read them first, this one after.
            self._catching_up[room.name] = [envelope]
            if up:
                self._catch_up(room)
            return
        self._deliver_kept(room, envelope)

    def _deliver_waiting(self, room: Room) -> None:
        """``room`` has opened: the kept messages that came meanwhile."""
        if self.rooms.get(room.name) is not room:
            self._catching_up.pop(room.name, None)
            return
        for envelope in self._catching_up.pop(room.name, []):
            self._deliver_kept(room, envelope)

    def _deliver_kept(self, room: Room, envelope: Envelope) -> None:
        assert self.link is not None
        own = envelope.node == self.link.node_id
        sender = room.member(envelope.chat_id) if own else None
        if not envelope.delayed:
            self._acked(sender, envelope.offset, envelope.ts)
            if own and self.app_events is not None:
                # Its sender's node tells the app (once in the cluster).
                self._said(
                    envelope.room,
                    sender,
                    envelope.text,
                    envelope.offset,
                    envelope.ts,
                    chat_id=envelope.chat_id,
                    name=envelope.name,
                )
        if envelope.epoch != room.epoch:
            room.epoch = envelope.epoch  # Redis lost the room: a new history
        elif envelope.offset <= room.offset:
            return  # a joiner's history has it already (the room just opened)
        if own and envelope.delayed:
            room.advance(envelope.offset)
            return
        count = room.publish(
            sender,
            envelope.text,
            sender_id=envelope.chat_id,
            name=envelope.name,
            offset=envelope.offset,
            ts=envelope.ts or None,
            delayed=envelope.delayed,
            user="" if own else self._remote_user(envelope.chat_id),
        )
        if self.quiet:
            return
        if not envelope.chat_id:
            _log_server_message(room.name, envelope.text, count)
        elif own:
            log.info(
                "Connection {id} sending message {text} to {count} other "
                "connection(s) here, and published to the other nodes",
                id=envelope.chat_id,
                text=LogText(envelope.text),
                count=count,
            )
        else:
            _log_from_node(envelope, count)

    def _acked(self, sender: object, offset: int, ts: int) -> None:
        """``sender``'s oldest message not yet back is: its ack, if it has one."""
        if not isinstance(sender, WebChatProtocol) or not sender.unechoed:
            return
        entry = sender.unechoed.popleft()
        if entry.ref is not _NO_ACK:
            self._tell(
                sender,
                event_frame(
                    {"type": "ack", "ref": entry.ref, "offset": offset, "ts": ts}
                ),
            )

    def _link_back(self) -> None:
        """
        Redis is back: what the nodes kept while this one did not hear
        (its link was down longer than theirs) goes to the open rooms here,
        before anything newer, and rooms are asked of Redis again.
        """
        if self.kept is None:
            return
        self.kept.forget()
        for room in list(self._rooms_open()):
            self._catch_up(room)

    def _rooms_open(self) -> list[Room]:
        return [room for name in self.rooms.names if (room := self.rooms.get(name))]

    def _catch_up(self, room: Room, attempt: int = 1) -> None:
        """
        Read what ``room`` missed from Redis (its epoch and last offset, and
        the kept messages after the room's offset) and deliver it, marked
        delayed, holding the room's newer kept messages meanwhile.  Sent
        before this node appends its own delayed ones: the reply has none of
        them.

        A message the reply shares with what the channel brought meanwhile
        was heard live: it is not marked delayed (a gap in the channel, or
        the race between the reply and the channel, delays only the ones
        before it).  A read that fails (Redis still loading its data after
        a restart, say) is tried again while the link is up, up to
        ``CATCH_UP_ATTEMPTS`` times, the newer messages still held: handing
        them out first would move the room past the ones it missed.
        """
        assert self.kept is not None
        if room.opening is not None or room.name in self._reading:
            return
        streams = self.kept.streams
        self._reading.add(room.name)
        self._catching_up.setdefault(room.name, [])
        after = room.offset
        answers = [
            streams.open_room(room.name),
            streams.read(room.name, after, MAX_OFFSET),
        ]

        def caught_up(results: list[Any]) -> None:
            (epoch, offset), missed = results
            if self.rooms.get(room.name) is not room:
                return
            if epoch != room.epoch:
                # Redis lost the room (or it opened while Redis was away):
                # its history in Redis is another one, numbered from there.
                room.epoch = epoch
                room.advance(offset)
                return
            # offset -> delayed, as the channel said it.
            heard = {
                envelope.offset: envelope.delayed
                for envelope in self._catching_up.get(room.name, ())
                if envelope.epoch == epoch
            }
            for message in missed:
                if message.offset <= room.offset:
                    continue
                # One of this node's whose echo the link lost: acked now.
                sender = room.member(message.sender_id)
                self._acked(sender, message.offset, message.ts)
                room.publish(
                    sender,
                    message.text,
                    sender_id=message.sender_id,
                    name=message.name,
                    offset=message.offset,
                    ts=message.ts or None,
                    delayed=heard.get(message.offset, True),
                    # Kept with it; else (kept before entries carried it)
                    # as its node's presence says, if it is still there.
                    user=message.user or self._remote_user(message.sender_id),
                )

        def failed(failure: Failure) -> bool:
            if isinstance(failure.value, FirstError):
                failure = failure.value.subFailure  # which of the two answers
            again = (
                attempt < CATCH_UP_ATTEMPTS
                and self.link is not None
                and self.link.state == "up"
            )
            log.warn(
                "Could not read what room {room} missed while Redis was away: "
                "{error}{again}",
                room=room.name,
                error=escape_for_log(str(failure.value)),
                again=f" (trying again in {CATCH_UP_RETRY:g} s)" if again else "",
            )
            return again

        def then(retry: object) -> object:
            self._reading.discard(room.name)
            if self.rooms.get(room.name) is not room:
                self._catching_up.pop(room.name, None)
            elif retry is True:
                self.reactor.callLater(
                    CATCH_UP_RETRY, self._catch_up_again, room, attempt + 1
                )
            else:
                for envelope in self._catching_up.pop(room.name, []):
                    self._deliver_kept(room, envelope)
            return retry if isinstance(retry, Failure) else None

        d = gatherResults(answers, consumeErrors=True)
        d.addCallbacks(caught_up, failed).addBoth(then).addErrback(
            lambda failure: log.failure(
                "An error has occurred: catching up room {room}",
                failure,
                room=room.name,
            )
        )

    def _catch_up_again(self, room: Room, attempt: int) -> None:
        """A failed catch-up's next try, unless the room has gone meanwhile."""
        if self.rooms.get(room.name) is room:
            self._catch_up(room, attempt)

    # -- the server API (webchat.api) ----------------------------------------------

    def server_message(self, room_name: str, text: bytes, name: str) -> Deferred[int]:
        """
        The app says ``text`` (UTF-8, checked) in ``room_name`` as ``name``:
        every member there gets it (``server: text`` / ``"server": true``),
        and the room's history keeps it, as its next offset, which the
        Deferred fires with.

        With --redis it goes through the room's Stream like any message, so
        every node delivers it once with the same offset; while Redis is away
        it fails with ``ConnectionError`` (the API answers 503: the app
        retries, with its idempotency key), rather than reaching one node's
        members only.
        """
        self.stats.messages_received += 1
        if self.keeps_in_redis:
            assert self.link is not None
            if self.link.state != "up":
                return fail(ConnectionError("Redis is away"))
            d = self.link.append_message(room_name, 0, name, self.now_ms(), text)
            return d.addCallback(lambda kept: kept[0])
        room = self.rooms.open_room(room_name)
        count = room.publish(None, text, 0, name=name)
        if not self.quiet:
            _log_server_message(room.name, text, count)
        return succeed(room.offset)

    def room_counts(self) -> dict[str, int]:
        """Members of every room open here, plus those other nodes told of."""
        counts = {room.name: len(room) for room in self._rooms_open()}
        if self.link is not None:
            for name, members in self.link.presence.rooms().items():
                counts[name] = counts.get(name, 0) + members
        return {name: count for name, count in counts.items() if count}

    def members_of(self, room_name: str) -> list[dict[str, object]]:
        """
        The members of ``room_name`` here and on other nodes, as the JSON
        events list them (with ``user`` when they have an identity).
        """
        members: list[dict[str, object]] = []
        room = self.rooms.get(room_name)
        if room is not None:
            members = room.roster()
        if self.link is not None:
            here = {member["id"] for member in members}
            members += [
                member
                for member in self.link.presence.roster(room_name)
                if member["id"] not in here
            ]
        return members

    def disconnect_user(self, user: str, reason: str) -> int:
        """
        Close this node's connections of ``user`` with 4002 (JSON ones are
        told why first, in an ``error`` event); return how many.  The API
        asks every other node too (--redis).
        """
        close_reason = _fit_close_reason(f"disconnected by the app: {reason}")
        count = 0
        for protocol in self.connections_of(user):
            if protocol.state != _OPEN or protocol.room is None:
                continue
            if protocol.admitted is not None and protocol.admitted.codec is JSON:
                self._tell(
                    protocol,
                    event_frame(
                        {"type": "error", "code": "disconnected", "reason": reason}
                    ),
                )
            protocol.close_with(4002, close_reason)
            count += 1
        if count:
            log.info(
                "Disconnected {count} connection(s) of user {user} at the app's "
                "request: {reason}",
                count=count,
                user=escape_for_log(user),
                reason=escape_for_log(reason),
            )
        return count

    # -- other nodes (--redis) -----------------------------------------------------

    def attach_link(self, link: RedisRelay) -> None:
        """
        Share this chat with other nodes through ``link``: publish what local
        clients say, deliver what other nodes' clients say, and take
        connection ids from the cluster-wide allocator.
        """
        self.link = link
        self.id_source = link.ids.next_id
        if link.streams is not None:
            # Redis numbers and keeps the rooms' messages (keep_history).
            # Imported here: only a chat with Redis needs txredisapi.
            from webchat.redis.streams import StreamHistory

            self.kept = StreamHistory(link.streams)
            self.rooms.history = self.kept
            link.on_stream = self.deliver_kept
            link.on_link_up = self._link_back
            self.rooms.on_opened = self._deliver_waiting
        link.presence.listener = self
        # Another node's server API asks: this node's connections of the user.
        link.on_disconnect = self.disconnect_user
        # A name is free in a room only if no member of another node has it.
        self.rooms.names_elsewhere = link.presence.name_taken

    def deliver_remote(self, envelope: Envelope) -> None:
        """
        A message from a client of another node: everyone in its room here
        gets it (nobody, if nobody here is in that room).
        """
        room = self.rooms.get(envelope.room)
        if room is None:
            return
        count = room.publish(
            None,
            envelope.text,
            sender_id=envelope.chat_id,
            name=envelope.name,
            ts=envelope.ts or None,
            user=self._remote_user(envelope.chat_id),
        )
        if not self.quiet:
            _log_from_node(envelope, count)

    def _remote_user(self, chat_id: int) -> str:
        """
        The user id of member ``chat_id`` of another node, as its presence
        says ("" if anonymous or not known): messages between nodes do not
        carry it, so their envelope stays as it was.
        """
        if self.link is None:
            return ""
        return self.link.presence.user_of(chat_id)

    # What members of other nodes do (``RemotePresence`` calls these): JSON
    # members of the room here hear of it, as of a member of this node.

    def remote_joined(self, room: str, chat_id: int, name: str, user: str = "") -> None:
        here = self.rooms.get(room) if user else None
        if here is not None:
            self._make_way(here, name, user)
        self._remote_event(
            room, {"type": "join", "member": _member(chat_id, name, user)}
        )

    def remote_left(self, room: str, chat_id: int, name: str, user: str = "") -> None:
        self._remote_event(
            room, {"type": "leave", "member": _member(chat_id, name, user)}
        )

    def remote_renamed(
        self, room: str, chat_id: int, old: str, name: str, user: str = ""
    ) -> None:
        event: dict[str, object] = {"type": "name", "id": chat_id, "old": old}
        self._remote_event(room, {**event, **_member(chat_id, name, user)})

    def remote_typing(self, room: str, chat_id: int, name: str, user: str = "") -> None:
        self._remote_event(room, {"type": "typing", **_member(chat_id, name, user)})

    def _remote_event(self, name: str, event: dict[str, object]) -> None:
        room = self.rooms.get(name)
        if room is None:
            return  # nobody here to tell
        kind = event.pop("type")
        room.publish_event(event_frame({"type": kind, "room": name, **event}))

    # -- shutdown ------------------------------------------------------------------

    def close_all(
        self,
        code: int = 1001,
        reason: str = "server shutting down",
        grace: float | None = None,
    ) -> Deferred[int]:
        """
        Start the closing handshake with every client and wait for it.

        Fires with how many finished cleanly within ``grace`` seconds; the
        rest are dropped then, so a dead peer cannot hold shutdown hostage.
        """
        if grace is None:
            grace = self.limits.shutdown_grace
        protocols = list(self.rooms)
        if not protocols:
            return succeed(0)
        for protocol in protocols:
            # The timer below drops whoever has not answered within the grace.
            protocol.close_with(code, reason, timeout=0)
        done: Deferred[int] = Deferred()
        finished = DeferredList([p.is_closed for p in protocols], consumeErrors=True)

        def finish(_: object = None) -> None:
            # Reached twice when the grace runs out: dropping the stragglers
            # completes the list of closes too.
            if done.called:
                return
            if timer.active():
                timer.cancel()
            done.callback(sum(1 for p in protocols if p.wasClean))

        def on_timeout() -> None:
            for protocol in protocols:
                if protocol.state != _CLOSED:
                    protocol.dropConnection(abort=True)
            finish()

        timer = self.reactor.callLater(grace, on_timeout)
        finished.addCallback(finish)
        return done


def _user_of(member: object) -> str | None:
    """The user (JWT ``sub``) a room member is; None when anonymous."""
    identity = getattr(member, "identity", None)
    return identity.user if identity is not None else None


def _fit_close_reason(reason: str, most: int = 123) -> str:
    """``reason`` cut to ``most`` bytes of UTF-8, never inside a character."""
    return reason.encode("utf-8")[:most].decode("utf-8", "ignore")


def _log_server_message(room: str, text: bytes, count: int) -> None:
    """The line a message from the app (the server API) is logged with."""
    log.info(
        "Server API sending message {text} to {count} connection(s) in room {room}",
        text=LogText(text),
        count=count,
        room=room,
    )


def _member(chat_id: int, name: str, user: str) -> dict[str, object]:
    """A member of another node as JSON events show one (``member_entry``)."""
    if user:
        return {"id": chat_id, "name": name, "user": user}
    return {"id": chat_id, "name": name}


def users_of(members: list[dict[str, object]]) -> list[dict[str, object]]:
    """
    The signed users among ``members`` (roster entries), each once, in the
    order they first appear, with their name and how many connections they
    have in the room (one per tab, per device).
    """
    users: dict[object, dict[str, object]] = {}
    for member in members:
        user = member.get("user")
        if user is None:
            continue
        entry = users.get(user)
        if entry is None:
            users[user] = {"user": user, "name": member["name"], "connections": 1}
        else:
            entry["connections"] += 1  # type: ignore[operator]
    return list(users.values())


def _log_from_node(envelope: Envelope, count: int) -> None:
    """The line a message from a client of another node is logged with."""
    log.info(
        "Connection {id} on node {node} sending message {text} to {count} "
        "connection(s) here",
        id=envelope.chat_id,
        node=envelope.node,
        text=LogText(envelope.text),
        count=count,
    )
