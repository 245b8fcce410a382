"""The per-connection keepalive: ping the silent, drop the dead.

A client that has sent nothing for ``--ping-interval`` seconds is pinged;
if not a byte arrives within ``--ping-timeout`` after that, the peer is
gone (there is nobody to send a close frame to) and the TCP connection is
dropped.  A busy client is never pinged: any bytes at all prove it alive.

One timer per connection, on the factory's clock (never the global
reactor), so a test drives it with ``twisted.internet.task.Clock``.  A
mixin of ``WebChatProtocol``, like ``webchat.flow``: no object of its own
per connection.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IDelayedCall

_OPEN = WebSocketProtocol.STATE_OPEN

#: An empty ping frame, as Autobahn's ``sendPing()`` builds it.  It goes out
#: through ``deliver`` like a chat message: straight to the socket when
#: nothing is waiting for it, where Autobahn's went through Twisted's buffer,
#: a write on a later iteration and two epoll changes (see ``webchat.flow``),
#: for every silent member every ping interval.
PING_FRAME = b"\x89\x00"


class Keepalive:
    """
    The ping timer of one connection.

    The host class provides ``factory.reactor``, ``factory.limits``,
    ``state``, ``deliver`` and ``drop``, and calls ``heard`` for every
    read, ``start_keepalive`` when the connection opens and
    ``stop_keepalive`` when it is lost.
    """

    factory: Any
    state: int
    deliver: Any

    _last_heard = 0.0
    _pinged_at = 0.0
    _keepalive: IDelayedCall | None = None

    def heard(self) -> None:
        """The peer sent something: it is alive now."""
        self._last_heard = self.factory.reactor.seconds()

    def stop_keepalive(self) -> None:
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None

    def start_keepalive(self) -> None:
        interval = self.factory.limits.ping_interval
        if interval > 0:
            self._last_heard = self.factory.reactor.seconds()
            self._keepalive = self.factory.reactor.callLater(
                interval, self._keepalive_tick
            )

    def _keepalive_tick(self) -> None:
        """Ping a client that has been silent for a whole ping interval."""
        self._keepalive = None
        if self.state != _OPEN:
            return
        reactor = self.factory.reactor
        limits = self.factory.limits
        silent_until = self._last_heard + limits.ping_interval
        now = reactor.seconds()
        if now < silent_until:
            self._keepalive = reactor.callLater(
                silent_until - now, self._keepalive_tick
            )
            return
        self.deliver(PING_FRAME)
        self._pinged_at = now
        self._keepalive = reactor.callLater(limits.ping_timeout, self._keepalive_check)

    def _keepalive_check(self) -> None:
        self._keepalive = None
        if self.state != _OPEN:
            return
        if self._last_heard < self._pinged_at:  # not a byte since the ping
            timeout = self.factory.limits.ping_timeout
            self.drop("ping_timeout", f"no answer to ping within {timeout:g} s")
        else:
            self._keepalive_tick()
