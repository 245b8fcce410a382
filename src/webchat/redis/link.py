"""One connection to Redis, kept open.

Twisted's ``ClientService`` does the connecting, the waiting between
attempts and the closing at shutdown; a ``Link`` adds what Redis needs on
top: its handshake (AUTH, SELECT, CLIENT SETNAME, SUBSCRIBE) under a
deadline, a PING watchdog that notices a Redis that keeps the socket open
but no longer answers, and a report to the relay of every link that comes
up, is lost or fails, from which the relay makes its once-per-outage log
lines.

txredisapi is imported only once a connection is made (``protocols.py``):
its import installs the global reactor, which must wait until twistd has
chosen one (``--reactor``).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from webchat.logtext import escape_for_log

if TYPE_CHECKING:
    from webchat.redis.pubsub import RedisRelay

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


def failure_reason(failure: Failure) -> str:
    """Why something failed, fit for a log line."""
    return escape_for_log(failure.getErrorMessage() or repr(failure.value))


def is_refusal(failure: Failure) -> bool:
    """Whether Redis answered with an error (rather than the connection going)."""
    # Only ever asked about a command's answer: txredisapi is imported by then.
    from txredisapi import ResponseError

    return failure.check(ResponseError) is not None


class _QuietClientService(ClientService):
    """
    A ``ClientService`` without its log line per scheduled retry: a Redis
    down for an hour would write 720 of them.  The relay says once per
    outage what failed (tests/test_relay.py checks that nothing else does).
    """

    _log = Logger(observer=lambda event: None)


@implementer(IStreamClientEndpoint)
class _NotingFailures:
    """
    The relay's endpoint, noting why an attempt failed: ``ClientService``
    tells its retry policy only how many attempts failed, not why.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, link: Link) -> None:
        self._endpoint = endpoint
        self._link = link

    def connect(self, factory: Any) -> Deferred[Any]:
        attempt = self._endpoint.connect(factory)
        attempt.addErrback(self._link.attempt_failed)
        return attempt


class _LinkFactory(Factory):
    noisy = False

    def __init__(self, link: Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> Protocol:
        from webchat.redis.protocols import PublisherProtocol, SubscriberProtocol

        kind = (
            PublisherProtocol if self.link.role == "publisher" else SubscriberProtocol
        )
        # No charset and no number conversion: payloads stay the bytes Redis
        # sent.  No password and db here either: txredisapi's own AUTH and
        # SELECT expect its reconnecting factory, which gives up for good on
        # one failed AUTH; the link does both itself, under its deadline.
        protocol = kind(charset=None, convertNumbers=False)
        protocol.factory = self
        protocol.link = self.link
        # txredisapi schedules on the global reactor; this one is ours.
        protocol.callLater = self.link.reactor.callLater
        return protocol


class Link:
    """
    One connection to Redis that keeps itself open.

    Once connected it does its own handshake (AUTH, SELECT, CLIENT SETNAME,
    SUBSCRIBE) under a deadline; once that is done it is *up* and PINGs
    Redis every ``ping_interval`` seconds, dropping the connection when an
    answer takes longer than ``ping_timeout``.  Whatever ends a connection or
    an attempt, ``ClientService`` tries again after the wait ``_next_wait``
    chooses, for as long as it runs.  It reports to its relay, which decides
    what is worth a log line.
    """

    def __init__(self, relay: RedisRelay, role: str) -> None:
        self.relay = relay
        #: "publisher" (commands) or "subscriber" (the channel).
        self.role = role
        self.reactor = relay.reactor
        #: The connection, once its handshake is done; None otherwise.
        self.protocol: Any = None
        #: A connection whose handshake is still going on.
        self._pending: Any = None
        self._timer: IDelayedCall | None = None  # next PING, or a deadline
        self._drop_reason: str | None = None
        #: Why the last attempt failed, for the retry that follows it.
        self._failure: str | None = None
        self._failures = 0
        self._up_since = 0.0
        self._service = _QuietClientService(
            _NotingFailures(relay.endpoint, self),
            _LinkFactory(self),
            retryPolicy=self._next_wait,
            clock=self.reactor,
        )

    def start(self) -> None:
        self._failure = None
        self._service.startService()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection; fires once it is closed."""
        self._cancel(self._timer)
        self._timer = None
        protocol = self.protocol or self._pending
        closed: Deferred[None] = self._service.stopService()
        if protocol is None or protocol.transport is None or closed.called:
            return closed
        # A clean close sends what is buffered; a Redis that does not read
        # must not hold shutdown up, so the connection is aborted after a while.
        abort = self.reactor.callLater(
            self.relay.ping_timeout, protocol.transport.abortConnection
        )

        def closed_in_time(result: Any) -> Any:
            self._cancel(abort)
            return result

        return closed.addBoth(closed_in_time)

    # -- connecting ---------------------------------------------------------------

    def attempt_failed(self, failure: Failure) -> Failure:
        """An attempt to connect failed (the endpoint's errback)."""
        self._failure = failure_reason(failure)
        return failure

    def _next_wait(self, failed_in_a_row: int) -> float:
        """
        ``ClientService``'s retry policy: the wait before the next attempt,
        and the moment to report the attempt that failed.

        ``ClientService`` counts the attempts that failed since the last TCP
        connection; the link keeps its own count, because here an attempt
        also fails when Redis takes the connection and then refuses the
        handshake, and a link lost within ``STABLE_AFTER`` of coming up does
        not start over: a Redis that accepts and drops every connection is
        not knocked on ten times a second.
        """
        self._failures += 1
        relay = self.relay
        delay = retry_delay(
            self._failures, relay.retry_initial, relay.retry_max, relay.rng
        )
        reason, self._failure = self._failure, None
        if reason is not None:
            relay.link_failed(self, reason, delay)
        return delay

    def connection_made(self, protocol: Any) -> None:
        """Called by the protocol once it is connected: start the handshake."""
        self._pending = protocol
        self._timer = self.reactor.callLater(
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
                lambda f: None if is_refusal(f) else f
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
        self._up_since = self.reactor.seconds()
        self._timer = self.reactor.callLater(self.relay.ping_interval, self._ping)
        self.relay.link_up(self)

    def _handshake_failed(self, failure: Failure, protocol: Any) -> None:
        from txredisapi import ConnectionError as ConnectionLost

        if protocol is not self._pending or failure.check(ConnectionLost):
            # Lost (or dropped by the deadline): connection_lost says why.
            return None
        self._drop(protocol, f"{failure_reason(failure)} (during the handshake)")
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
        self._timer = self.reactor.callLater(self.relay.ping_timeout, self._no_pong)
        # Any answer, even an error, proves Redis alive.
        protocol.execute_command(b"PING").addBoth(self._pong, protocol)

    def _pong(self, _: Any, protocol: Any) -> None:
        if protocol is self.protocol and self._service.running:
            self._cancel(self._timer)
            self._timer = self.reactor.callLater(self.relay.ping_interval, self._ping)

    def _no_pong(self) -> None:
        self._timer = None
        timeout = self.relay.ping_timeout
        self._drop(self.protocol, f"no answer to PING within {timeout:g} s")

    # -- losing it ----------------------------------------------------------------

    def connection_lost(self, protocol: Any, why: Failure) -> None:
        """
        Called by the protocol, after txredisapi has failed its waiting
        commands and before ``ClientService`` schedules the next attempt.
        """
        was_up = protocol is self.protocol
        if not was_up and protocol is not self._pending:
            return
        self._cancel(self._timer)
        self._timer = None
        self.protocol = self._pending = None
        reason = self._drop_reason or failure_reason(why)
        self._drop_reason = None
        if not self._service.running:
            return  # stopped: ClientService fires stop()'s Deferred
        if was_up:
            if self.reactor.seconds() - self._up_since >= STABLE_AFTER:
                self._failures = 0
            self.relay.link_lost(self, reason)
        else:
            self._failure = reason  # reported with the wait before the retry

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()
