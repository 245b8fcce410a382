"""Several chat processes, one chat: relaying messages through Redis pub/sub.

One Twisted process uses one core.  To use more, run several webchat
processes ("nodes") behind a balancer and let each publish the messages its
own clients send to one Redis channel; every node delivers what the *other*
nodes published to its own clients.  This module is the Redis side of that:
a ``RedisRelay`` service that keeps two connections to Redis open (one for
commands, one subscribed to the channel), and an ``IdAllocator`` that hands
out connection ids that are unique across all the nodes.

Envelope (docs/protocol.md ("Between nodes") has the long form)
---------------------------------------------------

Each accepted chat message is published once, as one Redis message on the
channel (``webchat`` unless ``channel`` says otherwise)::

    wc1 SP <node> SP <id> SP <text>

* ``wc1`` names the format and its version.  A later, incompatible format
  gets a new first word (``wc2``); a node drops what it cannot read.
* ``<node>``: the publishing node's id, 1-64 characters of ``A-Z a-z 0-9
  . _ : -``.  Redis echoes a node's own messages back to it; this is how it
  recognises and skips them.
* ``<id>``: the sender's connection id, decimal, 1 to 2**53 - 1, no sign and
  no leading zeros.
* ``<text>``: the message exactly as the client sent it: UTF-8, possibly
  empty, spaces and newlines included; it runs to the end of the payload.

Why not JSON: every node decodes every other node's messages, and JSON costs
3.0 µs to encode and 2.3 µs to decode (with checks) where this format costs
0.2 and 1.0 (docs/protocol.md ("Between nodes") has the details); it would also turn the
text into ``str`` and back on both sides.  This format keeps the text as the
bytes from the sender's socket to the receivers' frames, and a node spots its
own echo by comparing a prefix.

Connection ids across nodes
---------------------------

A connection gets its id when it opens, and the chat cannot wait for Redis
then, so ``IdAllocator.next_id()`` is synchronous.  It hands out ids from
blocks reserved ahead of need with ``INCRBY webchat:<channel>:ids <block>``
(the next block is reserved when half of the current one is used), so ids are
unique across nodes and roughly increasing.  When Redis is unreachable and
the blocks at hand run out, ids come from ranges no Redis-allocated id and no
other node can reach (all ids stay below 2**53, exact in JavaScript too):

* ``1 .. 2**52 - 1``: reserved from Redis.
* ``2**52 + n * 2**32 + c``: fallback ids of node number ``n`` (1 .. 2**19 - 1,
  from ``INCR webchat:<channel>:nodes`` when the node first reaches Redis), ``c``
  counting up from 0 for the life of the process.
* ``2**52 + 2**51 + r * 2**32 + c``: fallback ids of a node that has not
  reached Redis once since it started, so has no node number: ``r`` is drawn
  at random (0 .. 2**19 - 1) at start.  Only here can two nodes collide, and
  only if two such nodes draw the same ``r`` (for 4 nodes, about 1 in 90,000).

If Redis loses the counter (a restart without persistence), ``INCRBY`` starts
over at 1.  A node notices when a block comes back at or below the highest id
it was ever given, says so in the log, and moves the counter (atomically, in
a small Lua script) past ``unix time * 2**20``: above every id ever reserved,
as long as the cluster opened fewer than a million connections a second.  Ids
are long after that, but never repeat.
"""

from __future__ import annotations

import os
import random
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from webchat.logtext import escape_for_log

#: The pub/sub channel (and the middle of the id keys' names) by default.
DEFAULT_CHANNEL = "webchat"
#: Seconds between PINGs on each connection: how a dead link is noticed ...
PING_INTERVAL = 5.0
#: ... and how long an answer may take before the connection is dropped.
PING_TIMEOUT = 5.0
#: Seconds a connection attempt (TCP, TLS, AUTH, SELECT, SUBSCRIBE) may take.
CONNECT_TIMEOUT = 5.0
#: Reconnect backoff: the first wait, in seconds; it doubles from there ...
RETRY_INITIAL = 0.1
#: ... up to this.  Each wait is drawn between half the ceiling and all of it.
RETRY_MAX = 5.0
#: A link that stayed up this long starts its next backoff from the beginning.
STABLE_AFTER = 10.0
#: Connection ids reserved from Redis at a time.
ID_BLOCK = 100
#: PUBLISHes sent but not yet answered before publish() refuses more: what a
#: stalled Redis may cost in memory (about this many messages).
MAX_IN_FLIGHT = 10_000
#: At most one "malformed message" log line per this many seconds.
MALFORMED_LOG_INTERVAL = 60.0

#: The envelope's first word: its format and version.
ENVELOPE_VERSION = b"wc1"
#: Ids reserved from Redis stay below this; fallback ids start here.
REDIS_ID_LIMIT = 1 << 52
#: Fallback ids of a node without a node number start here.
PROVISIONAL_BASE = REDIS_ID_LIMIT + (1 << 51)
#: Node numbers and random provisional slots are below this.
NODE_SLOTS = 1 << 19
#: Fallback ids one node can hand out in each slot.
FALLBACK_PER_NODE = 1 << 32
#: Largest connection id any node hands out, and an envelope may carry.
MAX_CHAT_ID = (1 << 53) - 1

_NODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_NODE_ID_BYTES = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_CHANNEL = re.compile(r"[A-Za-z0-9._:-]{1,100}")

#: Move a counter up to at least ARGV[1] (never down), then INCRBY ARGV[2].
#: ARGV[1] is SET as the string it came as: Lua would print a large number as
#: 1.8e+15, which INCRBY would then refuse.
_RAISE_COUNTER = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return redis.call('INCRBY', KEYS[1], ARGV[2])
"""


# -- the envelope ------------------------------------------------------------------


class Envelope(NamedTuple):
    """One chat message from another node."""

    #: The node it was sent to.
    node: str
    #: The sender's connection id.
    chat_id: int
    #: The message, UTF-8 (checked), as the sender's client sent it.
    text: bytes


class MalformedEnvelopeError(ValueError):
    """A payload on the channel that is not an envelope this node can read."""


def encode_envelope(node: str, chat_id: int, text: bytes) -> bytes:
    """The payload that carries ``text`` from connection ``chat_id`` of ``node``."""
    return b"%b %b %d %b" % (ENVELOPE_VERSION, node.encode("ascii"), chat_id, text)


def decode_envelope(payload: bytes) -> Envelope:
    """Read an envelope; raise ``MalformedEnvelopeError`` saying what is wrong."""
    if not isinstance(payload, bytes):
        raise MalformedEnvelopeError(f"not a byte string: {type(payload).__name__}")
    parts = payload.split(b" ", 3)
    if len(parts) != 4:
        raise MalformedEnvelopeError("fewer than four space-separated fields")
    version, node, chat_id, text = parts
    if version != ENVELOPE_VERSION:
        raise MalformedEnvelopeError("unknown format or version")
    if _NODE_ID_BYTES.fullmatch(node) is None:
        raise MalformedEnvelopeError("invalid node id")
    # isdigit() on bytes is ASCII-only; no leading zeros keeps one spelling per id.
    if not chat_id.isdigit() or chat_id[:1] == b"0" or len(chat_id) > 16:
        raise MalformedEnvelopeError("invalid connection id")
    number = int(chat_id)
    if number > MAX_CHAT_ID:
        raise MalformedEnvelopeError("connection id out of range")
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as e:
        # Relayed as a WebSocket text frame, it would make browsers close 1007.
        raise MalformedEnvelopeError("text is not valid UTF-8") from e
    return Envelope(node.decode("ascii"), number, text)


# -- where Redis is ------------------------------------------------------------------


@dataclass(frozen=True)
class RedisAddress:
    """A parsed ``--redis`` URL.  Its repr and ``display`` never show the password."""

    tls: bool
    #: TCP host (None for a unix socket) and port.
    host: str | None
    port: int
    #: The unix socket's path (None for TCP).
    path: str | None
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: rediss only: a PEM file of CA certificates to trust instead of the system's.
    ca_certs: str | None = None

    @property
    def display(self) -> str:
        """The URL without its password, for log lines."""
        user = f"{self.username}@" if self.username else ""
        if self.path is not None:
            query = f"?db={self.db}" if self.db else ""
            return f"unix://{user}{self.path}{query}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{user}{host}:{self.port}/{self.db}"

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        """A client endpoint that reaches this Redis without blocking the reactor."""
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        assert self.host is not None
        endpoint: IStreamClientEndpoint
        if isIPAddress(self.host):
            endpoint = TCP4ClientEndpoint(reactor, self.host, self.port, timeout)
        elif isIPv6Address(self.host):
            endpoint = TCP6ClientEndpoint(reactor, self.host, self.port, timeout)
        else:  # a name: resolved off the reactor thread, every address tried
            endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout)
        if self.tls:
            endpoint = wrapClientTLS(self._tls_options(), endpoint)
        return endpoint

    def _tls_options(self) -> Any:
        # Imported here: pyOpenSSL is only needed by those who use rediss://.
        from twisted.internet.ssl import (
            Certificate,
            optionsForClientTLS,
            trustRootFromCertificates,
        )

        trust = None
        if self.ca_certs is not None:
            pem = Path(self.ca_certs).read_bytes()
            end = b"-----END CERTIFICATE-----"
            blocks = [block + end for block in pem.split(end) if b"-----BEGIN" in block]
            if not blocks:
                raise ValueError(f"no PEM certificate in {self.ca_certs}")
            trust = trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])
        assert self.host is not None
        return optionsForClientTLS(self.host, trustRoot=trust)


_SCHEMES = ("redis", "rediss", "unix", "redis+unix")


def _without_password(url: str) -> str:
    """``url`` with whatever sits between ``user:`` and ``@`` starred out."""
    return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)


def parse_redis_url(url: str) -> RedisAddress:
    """
    Read ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS,
    optionally ``?ssl_ca_certs=/path/ca.pem``) or
    ``unix://[[user]:password@]/path/to/redis.sock[?db=N]`` (``redis+unix://``
    too; ``?password=`` also works there).  Raise ``ValueError`` with a message
    fit for the command line otherwise; it never repeats the password.
    """
    shown = _without_password(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"invalid Redis URL {shown}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"invalid Redis URL {shown}: use redis://host:port/db, "
            "rediss://host:port/db (TLS) or unix:///path/to/redis.sock"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    for key, values in query.items():
        if len(values) > 1:
            raise ValueError(f"invalid Redis URL {shown}: {key} given twice")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None

    if scheme in ("unix", "redis+unix"):
        _only(query, {"db", "password"}, shown)
        if parts.hostname or port is not None:
            raise ValueError(
                f"invalid Redis URL {shown}: a unix socket URL has no host; "
                "write unix:///absolute/path/to/redis.sock"
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(
                f"invalid Redis URL {shown}: the socket path must be absolute "
                "(unix:///path/to/redis.sock)"
            )
        if "password" in query:
            if password is not None:
                raise ValueError(f"invalid Redis URL {shown}: two passwords")
            password = query["password"][0]
        db = _db(query.get("db", ["0"])[0], shown)
        return RedisAddress(False, None, 6379, path, db, username, password)

    tls = scheme == "rediss"
    _only(query, {"ssl_ca_certs"} if tls else set(), shown)
    if not parts.hostname:
        raise ValueError(f"invalid Redis URL {shown}: no host")
    path = parts.path
    db = _db(path[1:], shown) if path not in ("", "/") else 0
    ca_certs = query.get("ssl_ca_certs", [None])[0]
    return RedisAddress(
        tls,
        parts.hostname,
        6379 if port is None else port,
        None,
        db,
        username,
        password,
        ca_certs,
    )


def _only(query: dict[str, list[str]], allowed: set[str], shown: str) -> None:
    unknown = sorted(set(query) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ValueError(
            f"invalid Redis URL {shown}: unknown parameter {unknown[0]!r} "
            f"(known here: {known})"
        )


def _db(text: str, shown: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(
            f"invalid Redis URL {shown}: the database must be a number "
            "(redis://host:6379/0)"
        )
    return int(text)


def check_channel(channel: str) -> str:
    """A channel name: 1-100 characters of ``A-Z a-z 0-9 . _ : -``."""
    if _CHANNEL.fullmatch(channel) is None:
        raise ValueError(
            f"invalid Redis channel {escape_for_log(channel)!r}: use 1-100 of "
            "A-Z a-z 0-9 . _ : -"
        )
    return channel


def check_node_id(node_id: str) -> str:
    """A node id: 1-64 characters of ``A-Z a-z 0-9 . _ : -``."""
    if _NODE_ID.fullmatch(node_id) is None:
        raise ValueError(
            f"invalid node id {escape_for_log(node_id)!r}: use 1-64 of "
            "A-Z a-z 0-9 . _ : -"
        )
    return node_id


def default_node_id(rng: random.Random | None = None) -> str:
    """
    ``host-pid-random``: unique, and says in Redis's ``CLIENT LIST`` and in
    the envelopes which process a connection or message belongs to.
    """
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "node"
    token = (rng or random.SystemRandom()).getrandbits(32)
    return f"{host}-{os.getpid()}-{token:08x}"


def retry_delay(
    attempt: int, initial: float, maximum: float, rng: random.Random
) -> float:
    """
    Seconds to wait before reconnect attempt ``attempt`` (1, 2, ...).

    The ceiling doubles from ``initial`` up to ``maximum``; the wait is drawn
    between half the ceiling and all of it, so nodes that lost Redis together
    do not all knock on it again in the same instant.
    """
    ceiling = min(maximum, initial * 2 ** min(attempt - 1, 32))
    return rng.uniform(ceiling / 2, ceiling)


# -- one connection to Redis, kept open ------------------------------------------------


class _PublisherProtocol(txredisapi.RedisProtocol):
    """Commands: PUBLISH, INCRBY, PING.  Tells its link when it goes."""

    link: _Link

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.link.connection_lost(self, why)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    """Subscribed to the channel; hands each message to the relay."""

    link: _Link

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.link.relay.message_received(message)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.link.connection_lost(self, why)


class _LinkFactory(Factory):
    noisy = False

    def __init__(self, link: _Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> txredisapi.BaseRedisProtocol:
        # No charset and no number conversion: payloads stay the bytes Redis
        # sent.  No password and db here either: txredisapi would stop
        # reconnecting for good on one failed AUTH; the link does both itself.
        protocol = self.link.protocol_class(charset=None, convertNumbers=False)
        protocol.factory = self
        protocol.link = self.link
        # txredisapi schedules on the global reactor; this one is ours.
        protocol.callLater = self.link.relay.reactor.callLater
        return protocol


_SURROGATE = re.compile("[\udc80-\udcff]")


def _byte_escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()) - 0xDC00:02x}"


def _reason(failure: Failure) -> str:
    return escape_for_log(failure.getErrorMessage() or repr(failure.value))


class _Link:
    """
    One connection to Redis that keeps itself open.

    Connects through an endpoint, then does its own handshake (AUTH, SELECT,
    CLIENT SETNAME, SUBSCRIBE) under a deadline; once that is done it is
    *up* and PINGs Redis every ``ping_interval`` seconds, dropping the
    connection when an answer takes longer than ``ping_timeout``.  Whatever
    ends a connection or an attempt, it tries again after a capped, jittered,
    exponential backoff, for as long as it runs.  It reports to its relay,
    which decides what is worth a log line.
    """

    def __init__(self, relay: RedisRelay, role: str, protocol_class: type) -> None:
        self.relay = relay
        self.role = role
        self.protocol_class = protocol_class
        self._reactor = relay.reactor
        #: The connection, once its handshake is done; None otherwise.
        self.protocol: Any = None
        #: A connection whose handshake is still going on.
        self._pending: Any = None
        self._attempt: Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._timer: IDelayedCall | None = None  # next PING, or a deadline
        self._drop_reason: str | None = None
        self._failures = 0
        self._up_since = 0.0
        self._running = False
        self._closed: list[Deferred[None]] = []

    def start(self) -> None:
        self._running = True
        self._connect()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection; fires once it is closed."""
        self._running = False
        self._cancel(self._retry)
        self._retry = None
        self._cancel(self._timer)
        self._timer = None
        if self._attempt is not None:
            self._attempt.cancel()
        protocol = self.protocol or self._pending
        if protocol is None or protocol.transport is None:
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._closed.append(closed)
        # A clean close sends what is buffered; a Redis that does not read
        # must not hold shutdown up, so the connection is aborted after a while.
        protocol.transport.loseConnection()
        self._timer = self._reactor.callLater(
            self.relay.ping_timeout, protocol.transport.abortConnection
        )
        return closed

    # -- connecting ---------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        attempt = self.relay.endpoint.connect(_LinkFactory(self))
        self._attempt = attempt
        attempt.addCallbacks(self._connected, self._attempt_failed)

    def _attempt_failed(self, failure: Failure) -> None:
        self._attempt = None
        if self._running:
            self._failed(_reason(failure))

    def _connected(self, protocol: Any) -> None:
        self._attempt = None
        if not self._running:
            protocol.transport.loseConnection()
            return
        self._pending = protocol
        self._timer = self._reactor.callLater(
            self.relay.connect_timeout, self._handshake_timed_out, protocol
        )
        d = self._handshake(protocol)
        d.addCallbacks(
            self._handshake_done,
            self._handshake_failed,
            callbackArgs=(protocol,),
            errbackArgs=(protocol,),
        )

    def _handshake(self, protocol: Any) -> Deferred[Any]:
        """AUTH, SELECT, CLIENT SETNAME, SUBSCRIBE: whichever apply, in order."""
        relay = self.relay
        address = relay.address
        steps: list[tuple[Any, ...]] = []
        if address.password is not None:
            user = (address.username,) if address.username else ()
            steps.append((b"AUTH", *user, address.password))
        if self.role == "publisher" and address.db:
            steps.append((b"SELECT", address.db))
        d: Deferred[Any] = succeed(None)
        for step in steps:
            d.addCallback(lambda _, step=step: protocol.execute_command(*step))
        # Names the connection in CLIENT LIST; an ACL may forbid it, which is fine.
        name = f"webchat-{relay.node_id}-{self.role}"
        d.addCallback(
            lambda _: protocol.execute_command(b"CLIENT", b"SETNAME", name).addErrback(
                lambda f: f.trap(txredisapi.ResponseError)
            )
        )
        if self.role == "subscriber":
            d.addCallback(lambda _: protocol.subscribe(relay.channel))
        return d

    def _handshake_done(self, _: Any, protocol: Any) -> None:
        if protocol is not self._pending:
            return  # lost meanwhile; connection_lost has dealt with it
        self._cancel(self._timer)
        self._pending = None
        self.protocol = protocol
        self._up_since = self._reactor.seconds()
        self._timer = self._reactor.callLater(self.relay.ping_interval, self._ping)
        self.relay.link_up(self)

    def _handshake_failed(self, failure: Failure, protocol: Any) -> None:
        if protocol is not self._pending or failure.check(txredisapi.ConnectionError):
            # Lost (or dropped by the deadline): connection_lost says why.
            return None
        self._drop(protocol, f"{_reason(failure)} (during the handshake)")
        return None

    def _handshake_timed_out(self, protocol: Any) -> None:
        self._timer = None
        timeout = self.relay.connect_timeout
        self._drop(protocol, f"no answer to the handshake within {timeout:g} s")

    def _drop(self, protocol: Any, reason: str) -> None:
        self._drop_reason = reason
        protocol.transport.abortConnection()

    # -- keeping it alive ---------------------------------------------------------

    def _ping(self) -> None:
        protocol = self.protocol
        self._timer = self._reactor.callLater(self.relay.ping_timeout, self._no_pong)
        # Any answer, even an error, proves Redis alive.
        protocol.execute_command(b"PING").addBoth(self._pong, protocol)

    def _pong(self, _: Any, protocol: Any) -> None:
        if protocol is self.protocol and self._running:
            self._cancel(self._timer)
            self._timer = self._reactor.callLater(self.relay.ping_interval, self._ping)

    def _no_pong(self) -> None:
        self._timer = None
        timeout = self.relay.ping_timeout
        self._drop(self.protocol, f"no answer to PING within {timeout:g} s")

    # -- losing it ----------------------------------------------------------------

    def connection_lost(self, protocol: Any, why: Failure) -> None:
        """Called by the protocol, after txredisapi has failed its waiting commands."""
        was_up = protocol is self.protocol
        if not was_up and protocol is not self._pending:
            return
        self._cancel(self._timer)
        self._timer = None
        self.protocol = self._pending = None
        reason = self._drop_reason or _reason(why)
        self._drop_reason = None
        if not self._running:
            closed, self._closed = self._closed, []
            for d in closed:
                d.callback(None)
            return
        if was_up:
            if self._reactor.seconds() - self._up_since >= STABLE_AFTER:
                self._failures = 0
            self.relay.link_lost(self, reason)
            self._schedule_retry()
        else:
            self._failed(reason)

    def _failed(self, reason: str) -> None:
        delay = self._schedule_retry()
        self.relay.link_failed(self, reason, delay)

    def _schedule_retry(self) -> float:
        self._failures += 1
        relay = self.relay
        delay = retry_delay(
            self._failures, relay.retry_initial, relay.retry_max, relay.rng
        )
        self._retry = self._reactor.callLater(delay, self._connect)
        return delay

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


# -- the relay ------------------------------------------------------------------------


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
        #: A node checks its own clients' messages, but anyone who can
        #: PUBLISH on the channel could otherwise hand every client here
        #: a message of any size.
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
        self._prefix = b"%b %b " % (ENVELOPE_VERSION, self.node_id.encode("ascii"))
        self._publisher = _Link(self, "publisher", _PublisherProtocol)
        self._subscriber = _Link(self, "subscriber", _SubscriberProtocol)
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
            reason = _reason(result)
            if result.check(txredisapi.ResponseError):
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
        if 0 < self.max_text_size < len(envelope.text):
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
        if isinstance(payload, bytes):
            # Bytes that are not UTF-8 appear as \xNN, like control characters.
            text = _SURROGATE.sub(
                _byte_escape,
                escape_for_log(payload.decode("utf-8", "surrogateescape")),
            )
        else:
            text = escape_for_log(repr(payload))
        self._log.warn(
            "Dropped a malformed message from Redis channel {channel}: "
            "{error}: {payload}{more}",
            channel=self.channel,
            error=error,
            payload=text,
            more=self._unlogged_drops(),
        )

    # -- what the links report ----------------------------------------------------

    def link_up(self, link: _Link) -> None:
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

    def link_lost(self, link: _Link, reason: str) -> None:
        if link is self._publisher:
            self.ids.disconnected()
        if self._up:
            self._up = False
            self._log.warn(
                "Redis link lost: {reason} ({role} connection)",
                reason=reason,
                role=link.role,
            )

    def link_failed(self, link: _Link, reason: str, delay: float) -> None:
        self._outage = True
        if not self._failure_logged:
            self._failure_logged = True
            self._log.warn(
                "Redis connection failed: {reason} (retrying in {delay:.1f} s)",
                reason=reason,
                delay=delay,
            )


# -- connection ids -------------------------------------------------------------------


class IdAllocator:
    """
    Connection ids that are unique across every node on one channel, handed
    out synchronously (the module docstring has the scheme).

    The relay tells it when its command connection comes and goes
    (``connected(execute)`` / ``disconnected()``); ``next_id()`` never waits.
    """

    def __init__(
        self,
        reactor: Any,
        channel: str = DEFAULT_CHANNEL,
        *,
        block_size: int = ID_BLOCK,
        rng: random.Random | None = None,
    ) -> None:
        if block_size < 2:
            raise ValueError("block_size must be at least 2")
        self._reactor = reactor
        self._log = Logger(namespace="webchat", source=self)
        self._block_size = block_size
        self._ids_key = f"webchat:{channel}:ids".encode()
        self._nodes_key = f"webchat:{channel}:nodes".encode()
        #: This node's number (1 .. 2**19 - 1), once Redis has given it one.
        self.node_number: int | None = None
        #: Ids reserved from Redis so far, and fallback ids handed out.
        self.reserved = 0
        self.fallbacks = 0
        self._next = self._end = 0  # the block in use: [next, end)
        self._spare: tuple[int, int] | None = None
        self._highest = 0  # the highest id Redis ever gave this node
        self._execute: Callable[..., Deferred[Any]] | None = None
        self._requesting = False
        self._asking_number = False
        self._refused_until = 0.0
        self._slot = (
            PROVISIONAL_BASE
            + (rng or random.SystemRandom()).randrange(NODE_SLOTS) * FALLBACK_PER_NODE
        )
        self._fallback_count = 0
        self._falling_back = False
        self._waiting: list[Deferred[None]] = []

    @property
    def ready(self) -> bool:
        """Whether ids reserved from Redis are at hand."""
        return self._next < self._end or self._spare is not None

    def when_ready(self) -> Deferred[None]:
        """Fires once ids reserved from Redis are at hand (at once if they are)."""
        if self.ready:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def next_id(self) -> int:
        """The next connection id: a reserved one while they last, else a fallback."""
        chat_id = self._next
        if chat_id < self._end:
            self._next = chat_id + 1
            if self._spare is None and self._end - self._next <= self._block_size // 2:
                self._reserve()
            return chat_id
        if self._spare is not None:
            (self._next, self._end), self._spare = self._spare, None
            return self.next_id()
        self._reserve()
        return self._fallback_id()

    def _fallback_id(self) -> int:
        if not self._falling_back:
            self._falling_back = True
            self._log.warn(
                "No connection ids reserved from Redis at hand: handing out "
                "fallback ids until Redis answers"
            )
        count = self._fallback_count % FALLBACK_PER_NODE
        self._fallback_count += 1
        self.fallbacks += 1
        if self.node_number is not None:
            return REDIS_ID_LIMIT + self.node_number * FALLBACK_PER_NODE + count
        return self._slot + count

    # -- talking to Redis ---------------------------------------------------------

    def connected(self, execute: Callable[..., Deferred[Any]]) -> None:
        """The command connection is up; ``execute(*args)`` runs a command on it."""
        self._execute = execute
        self._refused_until = 0.0
        if self.node_number is None and not self._asking_number:
            self._asking_number = True
            d = execute(b"INCR", self._nodes_key)
            d.addCallbacks(self._numbered, self._not_numbered)
        if self._spare is None and self._end - self._next <= self._block_size // 2:
            self._reserve()

    def disconnected(self) -> None:
        self._execute = None

    def _numbered(self, value: int) -> None:
        self._asking_number = False
        # Wraps after 524,287 starts: a clash then needs a node that old
        # still running, and both falling back in the same outage.
        self.node_number = (value - 1) % (NODE_SLOTS - 1) + 1

    def _not_numbered(self, failure: Failure) -> None:
        self._asking_number = False
        if failure.check(txredisapi.ResponseError):
            self._log.error(
                "Redis refused a node number: {error}", error=_reason(failure)
            )

    def _reserve(self) -> None:
        execute = self._execute
        if execute is None or self._requesting or self._spare is not None:
            return
        if self._reactor.seconds() < self._refused_until:
            return
        self._requesting = True
        d = execute(b"INCRBY", self._ids_key, self._block_size)
        d.addCallbacks(self._reserved, self._not_reserved)

    def _reserved(self, end: int) -> None:
        self._requesting = False
        start = end - self._block_size + 1
        if start <= self._highest:
            self._counter_lost(end)
            return
        self._install(start, end)

    def _not_reserved(self, failure: Failure) -> None:
        self._requesting = False
        if failure.check(txredisapi.ResponseError):
            # A persistent error (a key of the wrong type, an ACL) must not
            # turn every new connection into a command and a log line.
            self._refused_until = self._reactor.seconds() + RETRY_MAX
            self._log.error(
                "Redis refused to reserve connection ids: {error}",
                error=_reason(failure),
            )

    def _install(self, start: int, end: int) -> None:
        if end >= REDIS_ID_LIMIT:
            self._log.error(
                "Redis's connection id counter {key} is past 2**52; "
                "using fallback ids only",
                key=self._ids_key.decode(),
            )
            self._refused_until = float("inf")
            return
        self._highest = end
        self.reserved += end - start + 1
        if self._next >= self._end:
            self._next, self._end = start, end + 1
        else:
            self._spare = (start, end + 1)
        if self._falling_back:
            self._falling_back = False
            self._log.info(
                "Connection ids reserved from Redis again ({count} fallback id(s) "
                "handed out so far)",
                count=self.fallbacks,
            )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _counter_lost(self, end: int) -> None:
        """
        Redis answered a block at or below ids it gave this node before: it
        has lost the counter.  Other nodes may hold ids above this node's
        highest too, so the counter moves past a bound of every id ever
        reserved (unix time * 2**20) as well.
        """
        execute = self._execute
        floor = max(self._highest, int(self._reactor.seconds()) << 20)
        self._log.warn(
            "Redis has lost the connection id counter {key} (it answered {end}, "
            "this node has had ids up to {highest}); moving it past {floor} so "
            "that no id repeats.  Give Redis persistence to keep ids short.",
            key=self._ids_key.decode(),
            end=end,
            highest=self._highest,
            floor=floor,
        )
        if execute is None:
            return  # gone meanwhile; the next block is checked again
        self._requesting = True
        d = execute(b"EVAL", _RAISE_COUNTER, 1, self._ids_key, floor, self._block_size)
        d.addCallbacks(self._reserved, self._not_reserved)
        if self.node_number is not None:
            # The node counter went with it: claim this node's number again
            # so that nodes started from now on do not draw it.
            claim = execute(b"EVAL", _RAISE_COUNTER, 1, self._nodes_key,
                            self.node_number, 0)  # fmt: skip
            claim.addErrback(lambda _: None)
