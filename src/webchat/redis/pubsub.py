"""The relay between nodes: publish this node's messages, deliver the others'.

One Twisted process uses one core.  To use more, run several webchat
processes ("nodes") behind a balancer and let each publish the messages its
own clients send to one Redis channel; every node delivers what the *other*
nodes published to its own clients.  ``RedisRelay`` is that service: it keeps
two links to Redis open (``link.py``: one for commands, one subscribed to the
channel), wraps each message in an envelope (``envelope.py``) and hands out
connection ids unique across the nodes (``ids.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from webchat.logtext import escape_for_log
from webchat.redis.envelope import (
    Envelope,
    MalformedEnvelopeError,
    check_node_id,
    decode_envelope,
    default_node_id,
    envelope_prefix,
    payload_for_log,
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
from webchat.redis.url import DEFAULT_CHANNEL, check_channel, parse_redis_url

#: PUBLISHes sent but not yet answered before publish() refuses more: what a
#: stalled Redis may cost in memory (about this many messages).
MAX_IN_FLIGHT = 10_000
#: At most one "malformed message" log line per this many seconds.
MALFORMED_LOG_INTERVAL = 60.0


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

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._up = False
        self.ids.disconnected()
        closing = [self._publisher.stop(), self._subscriber.stop()]
        return DeferredList(closing).addCallback(lambda _: None)

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

    def publish(self, chat_id: int, text: bytes) -> bool:
        """
        Send ``text`` from connection ``chat_id`` to the other nodes.

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
                b"%b%d %b" % (self._prefix, chat_id, text),
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
        if isinstance(payload, bytes) and payload.startswith(self._prefix):
            return  # our own, echoed back by Redis
        try:
            envelope = decode_envelope(payload)
        except MalformedEnvelopeError as e:
            self._dropped_malformed(payload, str(e))
            return
        if too_large(envelope, self.max_text_size):
            self._dropped_oversized(envelope)
            return
        self.received += 1
        try:
            self.on_envelope(envelope)
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
