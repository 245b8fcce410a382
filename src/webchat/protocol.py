"""The WebSocket side of the chat: one protocol per browser, one factory per server.

Wire protocol (see docs/protocol.md for the long form)
-------------------------------------------------------

* A client opens a WebSocket on ``/`` or ``/ws``.  No subprotocol, no
  extensions.  On open it is given the next connection id ``N`` (1, 2, ...),
  which it is never told: other people see it.
* Client → server: a *text* message ``M`` (any UTF-8, empty included).
* Server → every *other* open client: the text message ``id N: M``, in the
  order the server received the originals.  The sender gets nothing back.
* Client → server: a *binary* message.  The server closes that connection
  with 1003 (unsupported data).
* Client → server: a text message that is not valid UTF-8.  Close 1007.
* Other protocol violations get the RFC 6455 close codes (1002 and friends).
* Server shutdown: every client gets close 1001 (going away).
"""

from __future__ import annotations

from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from webchat.hub import Hub
from webchat.logtext import escape_for_log

#: Close codes that mean "the server closed this connection because of
#: something the client did": these get the seed's ``An error has occurred``.
ERROR_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1011})

#: How long shutdown waits for clients to answer close 1001 before it drops them.
SHUTDOWN_GRACE = 5.0

_OPEN = WebSocketProtocol.STATE_OPEN

log = Logger(namespace="webchat")


class WebChatProtocol(WebSocketServerProtocol):
    """One chat participant.  Everything it learns it reports to the factory."""

    factory: WebChatFactory
    # Autobahn's own chatter: its per-frame debug lines are too costly and too
    # noisy for production, and its warning on a failed connection would say
    # again what our "An error has occurred" line already says.
    log = txaio.make_logger(level="error")

    #: 0 until the opening handshake completes; then the id others see.
    chat_id = 0

    def onConnect(self, request: Any) -> None:
        self.factory.admit(self, request)

    def onOpen(self) -> None:
        self.factory.register(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.close_with(
                WebSocketProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA,
                "binary messages are not supported",
            )
            return
        try:
            self.factory.relay(self, payload)
        except Exception:
            # A bug in relaying one message must not take the reactor's
            # read loop down with it: report it and end just this connection.
            log.failure("An error has occurred: relaying a message failed")
            self.close_with(
                WebSocketProtocol.CLOSE_STATUS_CODE_INTERNAL_ERROR, "internal error"
            )

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.unregister(self)

    def close_with(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with any RFC 6455 code.

        Autobahn's ``sendClose`` only lets applications use 1000 and
        3000-4999; the codes this server owes its clients (1001, 1003, 1008,
        1011, ...) go through the frame-level call instead.
        """
        if self.state == _OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123])

    def deliver(self, frame: Any) -> bool:
        """
        Queue a prepared frame; refuse it if this connection is closing.

        Autobahn raises for a send on a closing connection; checking first
        keeps that exception from ever surfacing in the *sender's* stack.
        """
        if self.state != _OPEN:
            return False
        self.sendPreparedMessage(frame)
        return True


class WebChatFactory(WebSocketServerFactory):
    """
    One chat room: tracks its protocols and fans each message out.

    ``reactor`` is kept on the factory (never imported here) so tests can run
    several servers in one process, or hand in a fake clock.
    """

    protocol = WebChatProtocol
    log = txaio.make_logger(level="error")

    def __init__(self, reactor: IReactorTime, *, quiet: bool = False) -> None:
        super().__init__(reactor=reactor)
        self.hub = Hub()
        self.quiet = quiet
        # Without failByDrop=False Autobahn answers a protocol violation by
        # dropping TCP, and the client never learns the close code.
        self.setProtocolOptions(failByDrop=False)

    # -- what the protocols report -------------------------------------------------

    def admit(self, protocol: WebChatProtocol, request: Any) -> None:
        """Decide whether a handshake may proceed (raise ``ConnectionDeny`` if not)."""

    def register(self, protocol: WebChatProtocol) -> None:
        protocol.chat_id = self.hub.allocate_id()
        self.hub.join(protocol)
        log.info("New connection! ({id})", id=protocol.chat_id)

    def unregister(self, protocol: WebChatProtocol) -> None:
        if not protocol.chat_id or not self.hub.leave(protocol):
            return  # never opened, or already gone
        code = protocol.localCloseCode
        if code in ERROR_CLOSE_CODES:
            reason = protocol.localCloseReason or b""
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            log.error(
                "An error has occurred: {error}",
                error=escape_for_log(f"{code} {reason}".strip()),
                id=protocol.chat_id,
            )
        log.info("Connection {id} has disconnected", id=protocol.chat_id)

    def relay(self, sender: WebChatProtocol, payload: bytes) -> int:
        """Send ``id N: payload`` to everyone but ``sender``; return how many got it."""
        frame = self.prepareMessage(b"id %d: %b" % (sender.chat_id, payload))
        count = self.hub.broadcast(sender, frame)
        if not self.quiet:
            log.info(
                "Connection {id} sending message {text} to {count} other connection(s)",
                id=sender.chat_id,
                text=escape_for_log(payload.decode("utf-8")),
                count=count,
            )
        return count

    # -- shutdown ------------------------------------------------------------------

    def close_all(
        self,
        code: int = WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY,
        reason: str = "server shutting down",
        grace: float = SHUTDOWN_GRACE,
    ) -> Deferred[int]:
        """
        Start the closing handshake with every client and wait for it.

        Fires with how many finished cleanly within ``grace`` seconds; the
        rest are dropped then, so a dead peer cannot hold shutdown hostage.
        """
        protocols = list(self.hub)
        waits = []
        for protocol in protocols:
            protocol.close_with(code, reason)
            waits.append(protocol.is_closed)
        if not waits:
            return succeed(0)

        done: Deferred[int] = Deferred()
        finished = DeferredList(waits, consumeErrors=True)

        def on_finished(_: object) -> None:
            if not done.called:
                timer.cancel()
                done.callback(sum(1 for p in protocols if p.wasClean))

        def on_timeout() -> None:
            for protocol in protocols:
                if protocol.state != WebSocketProtocol.STATE_CLOSED:
                    protocol.dropConnection(abort=True)
            done.callback(sum(1 for p in protocols if p.wasClean))

        timer = self.reactor.callLater(grace, on_timeout)
        finished.addCallback(on_finished)
        return done
