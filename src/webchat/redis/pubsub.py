"""The relay between nodes: publish this node's messages, deliver the others'.

One Twisted process uses one core.  To use more, run several webchat
processes ("nodes") behind a balancer and let each publish the messages its
own clients send to one Redis channel; every node delivers what the *other*
nodes published to its own clients.  ``RedisRelay`` is that service: it keeps
two links to Redis open (``link.py``: one for commands, one subscribed to the
channel), wraps each message in an envelope (``envelope.py``) and hands out
connection ids unique across the nodes (``ids.py``).  It also keeps this
node's members where the others can see them, and tracks theirs
(``presence.py``).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from webchat.limits import OUTAGE_BUFFER, PRESENCE_TIMEOUT
from webchat.logtext import escape_for_log
from webchat.redis.envelope import (
    Disconnect,
    Envelope,
    MalformedEnvelopeError,
    PresenceEvent,
    check_node_id,
    decode_envelope,
    default_node_id,
    encode_disconnect,
    encode_presence,
    envelope_prefix,
    payload_for_log,
    stream_envelope_parts,
    too_large,
)
from webchat.redis.ids import ID_BLOCK, IdAllocator
from webchat.redis.link import (
    CONNECT_TIMEOUT,
    PING_INTERVAL,
    PING_TIMEOUT,
    RETRY_INITIAL,
    RETRY_MAX,
    Link,
    failure_reason,
    is_refusal,
)
from webchat.redis.presence import RemotePresence
from webchat.redis.streams import RoomStreams
from webchat.redis.url import DEFAULT_CHANNEL, check_channel, parse_redis_url

#: PUBLISHes sent but not yet answered before publish() refuses more: what a
#: stalled Redis may cost in memory (about this many messages).
MAX_IN_FLIGHT = 10_000
#: At most one "malformed message" log line per this many seconds.
MALFORMED_LOG_INTERVAL = 60.0
#: SCAN rounds at most when reading every node's presence hash on link up.
MAX_SCAN_ROUNDS = 1000

# The presence scripts (docs/protocol.md, "Presence").  Each changes this
# node's hash and PUBLISHes the event in one step, so no node can see an
# event and then read a hash older than it.

#: (A TTL of 0: --presence-timeout 0, the hash never expires.)
#: A join, rename (ARGV[5] = "room name") or leave (ARGV[5] = ""), unless
#: the hash is gone (Redis lost it): then 0, and the node writes it whole.
#: KEYS[1]: the hash; ARGV: ttl ms, channel, version, id, value, payload.
_CHANGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[5] == '' then redis.call('HDEL', KEYS[1], ARGV[4])
else redis.call('HSET', KEYS[1], ARGV[4], ARGV[5]) end
redis.call('HSET', KEYS[1], '_v', ARGV[3])
if ARGV[1] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[6])
return 1
"""
#: The whole hash, written anew, then a beat with its version.
#: ARGV: ttl ms, channel, version, beat payload, then id, value pairs.
_SYNC = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '_v', ARGV[3])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[1] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[4])
return 1
"""
#: The heartbeat: the hash lives on; 0 if it is gone (write it whole then).
#: ARGV: ttl ms, channel, payload.
_BEAT = """
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
#: A clean stop: the hash goes, and the others hear so.  ARGV: channel, payload.
_GONE = """
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""
#: Another node's hash, and how long it has left (when it last beat).
_SNAPSHOT = """
return {redis.call('PTTL', KEYS[1]), redis.call('HGETALL', KEYS[1])}
"""


class RedisRelay(Service):
    """
    Publishes this node's chat messages to Redis and hands the other nodes'
    messages to ``on_envelope``.

    A Twisted service: start it (or make it a child of the chat's service)
    and it connects, and keeps connecting, by itself; stopping it closes both
    connections.  Nothing it does waits for Redis: ``publish()`` writes and
    returns, and when Redis is away the chat goes on serving this node's own
    clients while the relay counts what it could not pass on.

    Counters (plain ints, for /metrics): ``published`` (PUBLISHes sent),
    ``received`` (envelopes from other nodes handed to ``on_envelope``),
    ``relay_failures`` (messages that did not reach Redis, or may not have:
    refused by ``publish()`` or failed after it), ``reconnects`` (times the
    link came back after being lost), ``malformed`` (payloads dropped),
    ``oversized`` (envelopes dropped for text over ``max_text_size``).
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        channel: str = DEFAULT_CHANNEL,
        node_id: str | None = None,
        *,
        on_envelope: Callable[[Envelope], None],
        max_text_size: int = 0,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
        id_block: int = ID_BLOCK,
        max_in_flight: int = MAX_IN_FLIGHT,
        rng: random.Random | None = None,
        password: str | None = None,
        presence_timeout: float = PRESENCE_TIMEOUT,
        outage_buffer: int = OUTAGE_BUFFER,
    ) -> None:
        self.reactor = reactor
        self._log = Logger(namespace="webchat", source=self)
        self.address = parse_redis_url(url)
        if password is not None:
            # From --redis-password-file: kept out of the URL, hence out of ps.
            self.address = replace(self.address, password=password)
        #: The URL without its password, as log lines show it.
        self.url = self.address.display
        self.channel = check_channel(channel)
        self.rng = rng or random.Random()
        self.node_id = check_node_id(node_id) if node_id else default_node_id()
        self.on_envelope = on_envelope
        #: Largest text an envelope may carry (--max-message-size); 0 = any.
        self.max_text_size = max_text_size
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_in_flight = max_in_flight
        # Built now, so a bad --redis (an unreadable CA file) fails at start.
        self.endpoint = self.address.endpoint(reactor, connect_timeout)
        #: This node's connection ids, unique across the nodes on this channel.
        self.ids = IdAllocator(reactor, self.channel, block_size=id_block, rng=rng)

        self.published = 0
        self.received = 0
        self.relay_failures = 0
        self.reconnects = 0
        self.malformed = 0
        self.oversized = 0

        #: Seconds a node may go unheard before its members count as gone;
        #: this node beats every third of it.
        self.presence_timeout = presence_timeout
        #: The other nodes' members (its ``listener`` is the chat).
        self.presence = RemotePresence(
            reactor, self._request_snapshot, timeout=presence_timeout
        )
        #: This node's own members, id -> (room, name), and its version.
        self._mine: dict[int, tuple[str, str, str]] = {}
        # Starts at the time in ms, so a node restarted under the same
        # --node-id goes on above the versions the others saw of it.
        self._version = int(reactor.seconds() * 1000)
        #: Set when the hash may be out of date (a change Redis did not take).
        self._dirty = True
        self._presence_prefix = f"webchat:{self.channel}:presence:".encode()
        self._presence_key = self._presence_prefix + self.node_id.encode("ascii")
        self._ttl_ms = int(presence_timeout * 1000)
        self._beat_loop: LoopingCall | None = None
        self._presence_refused = False
        #: The rooms' Redis Streams, once ``keep_history`` is called, and who
        #: is handed the kept messages (``s``/``d`` envelopes, this node's
        #: own included: the channel's order is their offset order).
        self.streams: RoomStreams | None = None
        self.on_stream: Callable[[Envelope], None] | None = None
        #: Messages said here that Redis could not keep (it was away), in
        #: order, to append when it is back (``keep_later``): room, id,
        #: name, ts, text, user.  At most ``outage_buffer``;
        #: ``outage_dropped`` counts those past it.
        self.outage_buffer = outage_buffer
        self.later: deque[tuple[str, int, str, int, bytes, str]] = deque()
        self.outage_dropped = 0
        self._dropping = False
        #: Called when the link is up again, before the late messages are
        #: appended (the chat's history forgets what it heard: it may have
        #: missed some).
        self.on_link_up: Callable[[], None] | None = None
        #: Who closes a user's connections here when another node's server
        #: API asks (``k`` envelopes): (user, reason).
        self.on_disconnect: Callable[[str, str], object] | None = None

        self._channel_bytes = self.channel.encode("ascii")
        self._prefix = envelope_prefix(self.node_id)
        self._publisher = Link(self, "publisher")
        self._subscriber = Link(self, "subscriber")
        self._in_flight = 0
        self._up = False
        self._was_up = False
        self._outage = False
        self._failure_logged = False
        #: Set while messages are not being relayed, and said so in the log.
        self._not_relaying = False
        self._failures_at_outage = 0
        self._malformed_logged_at: float | None = None
        self._malformed_unlogged = 0

    # -- lifetime -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._log.info(
            "Relaying the chat through Redis at {url}, channel {channel}, "
            "as node {node}",
            url=self.url,
            channel=self.channel,
            node=self.node_id,
        )
        self._publisher.start()
        self._subscriber.start()
        if self.presence_timeout > 0:
            self._beat_loop = LoopingCall(self._beat)
            self._beat_loop.clock = self.reactor
            self._beat_loop.start(self.presence_timeout / 3, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._beat_loop is not None and self._beat_loop.running:
            self._beat_loop.stop()
        # The others forget this node's members at once, not after the timeout.
        gone = self._say_gone()

        def close(_: object) -> Deferred[None]:
            self._up = False
            self.ids.disconnected()
            closing = [self._publisher.stop(), self._subscriber.stop()]
            return DeferredList(closing).addCallback(lambda _: None)

        return gone.addBoth(close)

    def _say_gone(self) -> Deferred[Any]:
        protocol = self._publisher.protocol
        if protocol is None:
            return succeed(None)
        self._version += 1
        payload = encode_presence(PresenceEvent(self.node_id, "gone", self._version))
        try:
            d = protocol.execute_command(
                b"EVAL", _GONE, 1, self._presence_key, self._channel_bytes, payload
            )
        except Exception:
            return succeed(None)
        # A Redis that does not answer must not hold the shutdown up.
        timer = self.reactor.callLater(self.ping_timeout, d.cancel)

        def done(result: object) -> None:
            if timer.active():
                timer.cancel()

        return d.addBoth(done)

    @property
    def state(self) -> str:
        """
        ``"up"``: both connections work.  ``"connecting"``: (re)connecting and
        no attempt has failed yet.  ``"down"``: stopped, or an attempt failed
        and the next one waits for its backoff.
        """
        if self._up:
            return "up"
        if not self.running or self._outage:
            return "down"
        return "connecting"

    # -- publishing ---------------------------------------------------------------

    def publish(
        self,
        chat_id: int,
        text: bytes,
        room: str = "lobby",
        name: str = "",
        ts: int = 0,
    ) -> bool:
        """
        Send ``text`` from connection ``chat_id``, called ``name``, said in
        ``room`` at ``ts`` (ms), to the other nodes.

        Fire and forget: returns at once, True if the message was handed to
        Redis, False (and counted in ``relay_failures``) if it could not be.
        ``text`` must be UTF-8, as every chat message is.
        """
        protocol = self._publisher.protocol
        if protocol is None:
            self._not_relayed("Redis is down")
            return False
        if self._in_flight >= self.max_in_flight:
            self._not_relayed(
                f"Redis is not keeping up ({self._in_flight} PUBLISHes unanswered)"
            )
            return False
        try:
            d = protocol.execute_command(
                b"PUBLISH",
                self._channel_bytes,
                b"%bm %b %d %d %b\n%b"
                % (
                    self._prefix,
                    room.encode("ascii"),
                    chat_id,
                    ts,
                    (name or f"guest-{chat_id}").encode("utf-8"),
                    text,
                ),
            )
        except Exception as e:  # the connection went in this very turn
            self._not_relayed(f"Redis is down ({escape_for_log(str(e))})")
            return False
        self._in_flight += 1
        self.published += 1
        d.addBoth(self._published)
        if self._not_relaying:
            self._relaying_again()
        return True

    def disconnect_user(self, user: str, reason: str) -> Deferred[Any]:
        """
        Ask every other node to close ``user``'s connections (4002): one
        PUBLISH of a ``k`` envelope; fails at once while Redis is away.
        """
        protocol = self._publisher.protocol
        if protocol is None:
            return fail(ConnectionError("Redis is away"))
        self.published += 1
        return protocol.execute_command(
            b"PUBLISH",
            self._channel_bytes,
            encode_disconnect(self.node_id, user, reason),
        )

    def _published(self, result: Any) -> None:
        self._in_flight -= 1
        if isinstance(result, Failure):
            reason = failure_reason(result)
            if is_refusal(result):
                self._not_relayed(f"Redis refused to publish ({reason})")
            else:  # the connection went before the answer: it may have arrived
                self.relay_failures += 1

    def _not_relayed(self, why: str) -> None:
        self.relay_failures += 1
        if self._not_relaying or not self.running:
            return
        self._not_relaying = True
        self._failures_at_outage = self.relay_failures - 1
        self._log.error(
            "{why}: messages are not being relayed to other nodes",
            why=why,
        )

    def _relaying_again(self) -> None:
        self._not_relaying = False
        self._log.info(
            "Redis is back: relaying again ({count} message(s) were not relayed)",
            count=self.relay_failures - self._failures_at_outage,
        )

    # -- receiving ----------------------------------------------------------------

    def message_received(self, payload: Any) -> None:
        """A message on the channel (the subscriber connection calls this)."""
        prefix = self._prefix
        if isinstance(payload, bytes) and payload.startswith(prefix):
            # Our own, echoed back by Redis: only a kept message's echo
            # matters (it brings the offset Redis gave it).
            if payload[len(prefix) : len(prefix) + 2] not in (b"s ", b"d "):
                return
        try:
            envelope = decode_envelope(payload)
        except MalformedEnvelopeError as e:
            self._dropped_malformed(payload, str(e))
            return
        if isinstance(envelope, Disconnect):
            self.presence.heard(envelope.node)
            if self.on_disconnect is not None:
                try:
                    self.on_disconnect(envelope.user, envelope.reason)
                except Exception:
                    self._log.failure(
                        "An error has occurred: a disconnect from node {node} failed",
                        node=envelope.node,
                    )
            return
        if isinstance(envelope, PresenceEvent):
            try:
                self.presence.heard(envelope.node)
                self.presence.event(envelope)
            except Exception:
                self._log.failure(
                    "An error has occurred: presence from node {node} failed",
                    node=envelope.node,
                )
            return
        self.presence.heard(envelope.node)
        if too_large(envelope, self.max_text_size):
            self._dropped_oversized(envelope)
            return
        handler = self.on_stream if envelope.offset else self.on_envelope
        if handler is None:
            return
        self.received += 1
        try:
            handler(envelope)
        except Exception:
            # One bad message must not cost the subscriber connection.
            self._log.failure(
                "An error has occurred: delivering a message from node {node} failed",
                node=envelope.node,
            )

    def _may_log_drop(self) -> bool:
        """
        Whether a dropped payload gets its log line: one a minute at most, for
        malformed and oversized ones together, so a rogue publisher cannot
        flood the log; the lines say how many went unlogged.
        """
        now = self.reactor.seconds()
        last = self._malformed_logged_at
        if last is not None and now - last < MALFORMED_LOG_INTERVAL:
            self._malformed_unlogged += 1
            return False
        self._malformed_logged_at = now
        return True

    def _unlogged_drops(self) -> str:
        more = self._malformed_unlogged
        self._malformed_unlogged = 0
        return f" (and {more} more since the last such line)" if more else ""

    def _dropped_oversized(self, envelope: Envelope) -> None:
        self.oversized += 1
        if not self._may_log_drop():
            return
        self._log.warn(
            "Dropped an oversized message from Redis channel {channel}: "
            "connection {id} on node {node}: {size} bytes, over "
            "--max-message-size ({limit}){more}",
            channel=self.channel,
            id=envelope.chat_id,
            node=envelope.node,
            size=len(envelope.text),
            limit=self.max_text_size,
            more=self._unlogged_drops(),
        )

    def _dropped_malformed(self, payload: Any, error: str) -> None:
        self.malformed += 1
        if not self._may_log_drop():
            return
        self._log.warn(
            "Dropped a malformed message from Redis channel {channel}: "
            "{error}: {payload}{more}",
            channel=self.channel,
            error=error,
            payload=payload_for_log(payload),
            more=self._unlogged_drops(),
        )

    def command(self, *args: Any) -> Deferred[Any]:
        """
        Run one Redis command on the command connection (``streams.py``);
        fails at once with ``ConnectionError`` while Redis is away.
        """
        protocol = self._publisher.protocol
        if protocol is None:
            from twisted.internet.defer import fail

            return fail(ConnectionError("Redis is down"))
        return protocol.execute_command(*args)

    # -- history in Redis Streams (issue #14) -----------------------------------------

    def keep_history(self, limit: int, ttl: float) -> RoomStreams:
        """Keep rooms' messages in Redis Streams (``append_message``)."""
        self.streams = RoomStreams(
            self.command, self.channel, limit=limit, ttl=ttl, clock=self.reactor.seconds
        )
        return self.streams

    def append_message(
        self,
        room: str,
        chat_id: int,
        name: str,
        ts: int,
        text: bytes,
        user: str = "",
        delayed: bool = False,
    ) -> Deferred[tuple[int, str]]:
        """
        Keep ``text`` (from ``user``, if signed) in ``room``'s Stream and
        PUBLISH it with its offset, to every node, this one included
        (``on_stream``); fires with (offset, epoch), or fails at once while
        Redis is away.
        """
        if self.streams is None:
            raise RuntimeError("keep_history() first")
        name = name or f"guest-{chat_id}"
        parts = stream_envelope_parts(
            self.node_id, room, chat_id, ts, name, text, delayed
        )
        d = self.streams.append(
            room, chat_id, name, ts, text, self._channel_bytes, parts, user
        )
        if self._publisher.protocol is not None:
            self.published += 1  # a PUBLISH too, inside the script
        return d

    def keep_later(
        self, room: str, chat_id: int, name: str, ts: int, text: bytes, user: str = ""
    ) -> bool:
        """
        Redis could not keep this message (it is away): keep it here until
        it is back, then append it, marked delayed; False if the buffer is
        full (counted, and logged once per outage).
        """
        self._not_relayed(
            "Redis is down"
            if self._publisher.protocol is None
            else "Redis did not keep a message"
        )
        if len(self.later) >= self.outage_buffer:
            self.outage_dropped += 1
            if not self._dropping:
                self._dropping = True
                self._log.error(
                    "Outage buffer full ({count} messages): what is said here "
                    "reaches no other node and is not kept until Redis is back",
                    count=self.outage_buffer,
                )
            return False
        self.later.append((room, chat_id, name, ts, text, user))
        return True

    def _append_later(self) -> None:
        """Redis is back: append what was said here meanwhile, in order."""
        later, self.later = self.later, deque()
        dropped, self._dropping = self._dropping, False
        if later or dropped:
            self._log.info(
                "Appending {count} message(s) said during the Redis outage "
                "({dropped} dropped in all, past --outage-buffer)",
                count=len(later),
                dropped=self.outage_dropped,
            )
        for message in later:
            d = self.append_message(*message, delayed=True)
            d.addErrback(self._not_appended_later, message)

    def _not_appended_later(
        self, failure: Failure, message: tuple[str, int, str, int, bytes, str]
    ) -> None:
        # Gone again (or refused): kept for the next time it is back.
        self.keep_later(*message)

    # -- presence: this node's members ----------------------------------------------

    def member_joined(self, room: str, chat_id: int, name: str, user: str = "") -> None:
        """
        A client of this node joined ``room`` as ``name`` (signed as
        ``user``, --auth; "" = anonymous): tell the others.
        """
        self._mine[chat_id] = (room, name, user)
        self._change("join", room, chat_id, name, user)

    def member_renamed(self, room: str, chat_id: int, name: str) -> None:
        user = self._mine[chat_id][2] if chat_id in self._mine else ""
        self._mine[chat_id] = (room, name, user)
        self._change("name", room, chat_id, name, user)

    def member_left(self, room: str, chat_id: int) -> None:
        if self._mine.pop(chat_id, None) is not None:
            self._change("leave", room, chat_id, "")

    def member_typing(self, room: str, chat_id: int, name: str, user: str = "") -> None:
        """Typing is not kept anywhere: a PUBLISH, lost if Redis is away."""
        protocol = self._publisher.protocol
        if protocol is None:
            return
        payload = encode_presence(
            PresenceEvent(self.node_id, "typing", 0, room, chat_id, name, user)
        )
        try:
            d = protocol.execute_command(b"PUBLISH", self._channel_bytes, payload)
        except Exception:
            return
        d.addErrback(lambda _: None)

    def _change(
        self, kind: str, room: str, chat_id: int, name: str, user: str = ""
    ) -> None:
        self._version += 1
        protocol = self._publisher.protocol
        if protocol is None or self._dirty:
            self._dirty = True  # written whole once Redis is back
            return
        event = PresenceEvent(
            self.node_id, kind, self._version, room, chat_id, name, user
        )
        value = b"" if kind == "leave" else _member_value(room, name, user)
        try:
            d = protocol.execute_command(
                b"EVAL",
                _CHANGE,
                1,
                self._presence_key,
                self._ttl_ms,
                self._channel_bytes,
                self._version,
                chat_id,
                value,
                encode_presence(event),
            )
        except Exception:
            self._dirty = True
            return
        d.addCallbacks(self._changed, self._presence_failed)

    def _changed(self, result: Any) -> None:
        if _as_int(result) == 0:
            self._sync()  # the hash was gone: Redis lost it

    def _presence_failed(self, failure: Failure) -> None:
        self._dirty = True
        if is_refusal(failure) and not self._presence_refused:
            self._presence_refused = True
            self._log.error(
                "Redis refused a presence update: {error}",
                error=failure_reason(failure),
            )

    def _sync(self) -> None:
        """Write this node's hash whole, and tell the others to read it."""
        protocol = self._publisher.protocol
        if protocol is None:
            self._dirty = True
            return
        self._dirty = False
        self._version += 1
        beat = encode_presence(PresenceEvent(self.node_id, "beat", self._version))
        fields: list[Any] = []
        for chat_id, (room, name, user) in self._mine.items():
            fields += [chat_id, _member_value(room, name, user)]
        try:
            d = protocol.execute_command(
                b"EVAL",
                _SYNC,
                1,
                self._presence_key,
                self._ttl_ms,
                self._channel_bytes,
                self._version,
                beat,
                *fields,
            )
        except Exception:
            self._dirty = True
            return
        d.addErrback(self._presence_failed)

    def _beat(self) -> None:
        """Every timeout / 3: forget the nodes gone quiet, and say we are here."""
        for node in self.presence.expire():
            self._log.info(
                "Node {node} not heard from for {timeout:g} s: its members left",
                node=node,
                timeout=self.presence_timeout,
            )
        protocol = self._publisher.protocol
        if protocol is None or not self._up:
            return
        if self._dirty:
            self._sync()
            return
        beat = encode_presence(PresenceEvent(self.node_id, "beat", self._version))
        try:
            d = protocol.execute_command(
                b"EVAL",
                _BEAT,
                1,
                self._presence_key,
                self._ttl_ms,
                self._channel_bytes,
                beat,
            )
        except Exception:
            return
        d.addCallbacks(self._changed, self._presence_failed)

    # -- presence: the other nodes' ---------------------------------------------------

    def _request_snapshot(self, node: str) -> None:
        protocol = self._publisher.protocol
        if protocol is None:
            self.presence.snapshot_failed(node)
            return
        key = self._presence_prefix + node.encode("ascii")
        try:
            d = protocol.execute_command(b"EVAL", _SNAPSHOT, 1, key)
        except Exception:
            self.presence.snapshot_failed(node)
            return

        def answered(reply: Any) -> None:
            ttl, fields = (
                reply if isinstance(reply, list) and len(reply) == 2 else (0, [])
            )
            self.presence.snapshot(node, fields, _as_int(ttl))

        def failed(failure: Failure) -> None:
            self.presence.snapshot_failed(node)

        d.addCallbacks(answered, failed)

    def _read_every_node(self, cursor: bytes = b"0", rounds: int = 0) -> None:
        """SCAN for every node's hash and read each: after an outage, or at start."""
        protocol = self._publisher.protocol
        if protocol is None or rounds >= MAX_SCAN_ROUNDS:
            return
        try:
            d = protocol.execute_command(
                b"SCAN", cursor, b"MATCH", self._presence_prefix + b"*", b"COUNT", 100
            )
        except Exception:
            return

        def found(reply: Any) -> None:
            if not isinstance(reply, list) or len(reply) != 2:
                return
            next_cursor, keys = reply
            for key in keys or ():
                if not isinstance(key, bytes):
                    continue
                node = key[len(self._presence_prefix) :].decode("ascii", "replace")
                if node != self.node_id:
                    self.presence.ask(node)
            if isinstance(next_cursor, int):
                next_cursor = b"%d" % next_cursor
            if next_cursor not in (b"0", None):
                self._read_every_node(next_cursor, rounds + 1)

        d.addCallbacks(found, lambda _: None)

    # -- what the links report ----------------------------------------------------

    def link_up(self, link: Link) -> None:
        if link is self._publisher:
            self.ids.connected(link.protocol.execute_command)
        if self._up or not (self._publisher.protocol and self._subscriber.protocol):
            return
        self._up = True
        self._outage = False
        self._failure_logged = False
        if self._was_up:
            self.reconnects += 1
        self._was_up = True
        self._log.info("Redis link up ({url})", url=self.url)
        if self._not_relaying:
            self._relaying_again()
        # Events were missed while the link was down, on both sides.
        self._sync()
        self._read_every_node()
        if self.streams is not None:
            if self.on_link_up is not None:
                self.on_link_up()
            self._append_later()

    def link_lost(self, link: Link, reason: str) -> None:
        if link is self._publisher:
            self.ids.disconnected()
        if self._up:
            self._up = False
            self._log.warn(
                "Redis link lost: {reason} ({role} connection)",
                reason=reason,
                role=link.role,
            )

    def link_failed(self, link: Link, reason: str, delay: float) -> None:
        self._outage = True
        if not self._failure_logged:
            self._failure_logged = True
            self._log.warn(
                "Redis connection failed: {reason} (retrying in {delay:.1f} s)",
                reason=reason,
                delay=delay,
            )


def _member_value(room: str, name: str, user: str = "") -> bytes:
    """
    A member's field value in a presence hash: ``<room> <name>``, and
    ``LF <user>`` after it for a signed member (--auth).
    """
    value = b"%b %b" % (room.encode("ascii"), name.encode("utf-8"))
    return value + b"\n" + user.encode("utf-8") if user else value


def _as_int(value: Any) -> int:
    """A Redis integer reply, however txredisapi handed it over (0 if none)."""
    if isinstance(value, int):
        return value
    if isinstance(value, bytes) and value.lstrip(b"-").isdigit():
        return int(value)
    return 0
