"""The WebSocket side of the chat: one protocol per browser, one factory per server.

Wire protocol (docs/protocol.md has the long form)
--------------------------------------------------

* A client opens a WebSocket on ``/`` or ``/ws``.  No subprotocol, no
  extensions.  On open it is given the next connection id ``N`` (1, 2, ...),
  which it is never told: other people see it.
* Client → server: a *text* message ``M`` (any UTF-8, empty included).
* Server → every *other* open client: the text message ``id N: M``, in the
  order the server received the originals.  The sender gets nothing back.
* Client → server: a *binary* message.  Close 1003 (unsupported data).
* A text message that is not valid UTF-8: close 1007.
* A message or frame over ``--max-message-size``: close 1009.
* A message in more than ``--max-message-frames`` frames: close 1009.
* A message still unfinished ``--ping-interval`` seconds after its first
  frame: close 1008, reason "message unfinished after N s".
* More than ``--frame-rate-limit`` frames a second of any kind (beyond two
  seconds' worth), or more incoming bytes than the message limits allow
  (see ``Limits.byte_rate``): close 1008, and nothing more is read from it.
* More than ``--rate-limit`` messages a second (beyond ``--rate-burst``):
  close 1008, reason "rate limit exceeded".
* A client that lets more than ``--max-send-buffer`` bytes pile up unread:
  close 1008, reason "too slow".
* Other protocol violations: close 1002.
* No sign of life within ``--ping-timeout`` of a ping: the TCP connection is
  dropped (the peer is gone; there is nobody to send a close frame to).
* Server shutdown: close 1001 (going away) to everyone.

Refused opening handshakes get an HTTP status instead: 403 for a foreign
``Origin``, 503 when the server is full, 429 when one address holds too many.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.logger import Logger
from zope.interface import implementer

from webchat.access import AccessPolicy, canonical_address
from webchat.limits import Limits
from webchat.logtext import LogText, escape_for_log
from webchat.metrics import ChatStats
from webchat.ratelimit import TokenBucket
from webchat.room import Room
from webchat.rooms import LOBBY, Rooms

if TYPE_CHECKING:
    from webchat.relay import Envelope, RedisRelay

#: Close codes that mean "the server closed this connection because of
#: something the client did": these get the seed's ``An error has occurred``.
ERROR_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1011})

#: Error closes that are the server's own fault, logged at ``error``; the
#: rest (a client's mistake or misbehaviour) are logged at ``warn``.
SERVER_FAULT_CODES = frozenset({1011})

#: How each error close is counted (``WebChatFactory.dropped``).
_DROP_KIND = {
    1002: "protocol_error",
    1003: "unsupported_data",
    1007: "invalid_utf8",
    1009: "message_too_big",
    1011: "internal_error",
}

#: Seconds a cleanly closed connection may take to send what it still holds.
CLOSE_LINGER = 2.0

#: What Autobahn keeps after the opening handshake but never reads again.
_HANDSHAKE_ONLY = (
    "http_request_data",
    "http_response_data",
    "http_headers",
    "http_status_line",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_origin",
    "websocket_protocols",
    "websocket_extensions",
    "_wskey",
)
_NO_SEND_QUEUE: tuple[()] = ()

_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSED = WebSocketProtocol.STATE_CLOSED

log = Logger(namespace="webchat")


@implementer(IPushProducer)
class WebChatProtocol(WebSocketServerProtocol):
    """One chat participant.  Everything it learns it reports to the factory."""

    factory: WebChatFactory
    # Autobahn's own chatter: its per-frame debug lines are too costly and too
    # noisy for production, and its warning on a failed connection would say
    # again what our "An error has occurred" line already says.
    log = txaio.make_logger(level="error")

    #: 0 until the opening handshake completes; then the id others see.
    chat_id = 0
    #: The address this connection is accounted to (see AccessPolicy).
    client_address = "-"
    #: Why the server ended this connection itself, when it did: (kind, text).
    drop_reason: tuple[str, str] | None = None
    #: When the opening handshake completed (reactor time), for the log.
    opened_at = 0.0
    #: The room this connection is in, from the opening handshake to its end.
    room: Room | None = None

    _admitted = False
    _bucket: TokenBucket | None = None
    #: Budgets for every frame and every byte received (see ``onFrameBegin``).
    _frame_bucket: TokenBucket | None = None
    _byte_bucket: TokenBucket | None = None
    #: Set once the peer has flooded us: what it sends is no longer read.
    _deaf = False
    #: Frames of the message being received so far.
    _message_frames = 0
    #: Ends a fragmented message that takes too long (see ``onMessageBegin``).
    _message_deadline: IDelayedCall | None = None
    _paused = False
    _backlog = 0
    _last_heard = 0.0
    _pinged_at = 0.0
    _keepalive: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    #: Seconds the close we start next waits for the peer's answer (close_with).
    #: Seconds the peer has to answer the close we send; None = the limits'.
    _close_timeout: float | None = None
    #: Unsent bytes the kernel may hold for us (see ``connectionMade``).
    _kernel_share = 0
    #: The raw socket, for plain TCP/Unix transports (see ``deliver``).
    _socket: socket.socket | None = None
    #: The largest delivery that fits the allowance even with the kernel's
    #: share full and nothing in Twisted's buffer: ``deliver`` looks closer
    #: only at bigger ones (see ``connectionMade``).
    _sure_fit = 1 << 62

    # -- connection lifetime ------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.client_address = canonical_address(getattr(peer, "host", None) or "unix")
        self.factory.connections.add(self)
        # Take the transport's flow-control signals over from the HTTP channel
        # that handed us the connection: they are how we spot slow readers.
        try:
            self.transport.unregisterProducer()
        except RuntimeError:
            pass  # nobody was registered (test transports say so loudly)
        self.transport.registerProducer(self, True)
        if isinstance(self.transport, tcp.Connection) and not self.transport.TLS:
            self._socket = self.transport.socket
            limit = self.factory.limits.max_send_buffer
            if limit > 0:
                # Unsent data lives in two places: Twisted's buffer, which we
                # count, and the kernel's, which Linux grows by itself to
                # several MiB.  Fix the kernel's at half the allowance (Linux
                # doubles what it is given) so the two together stay bounded.
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limit // 4)
                self._kernel_share = self._socket.getsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF
                )
        limit = self.factory.limits.max_send_buffer
        if limit > 0:
            self._sure_fit = max(limit - self._kernel_share, 0)

    def onConnect(self, request: Any) -> None:
        self.factory.admit(self, request)
        self._admitted = True

    def onOpen(self) -> None:
        self._shed_handshake_state()
        limits = self.factory.limits
        reactor = self.factory.reactor
        if limits.rate_limit > 0:
            self._bucket = TokenBucket(limits.rate_limit, limits.rate_burst, reactor)
        if limits.frame_rate_limit > 0:
            self._frame_bucket = TokenBucket(
                limits.frame_rate_limit, limits.frame_burst, reactor
            )
        if limits.byte_rate > 0:
            self._byte_bucket = TokenBucket(
                limits.byte_rate, limits.byte_burst, reactor
            )
        self._start_keepalive()
        self.factory.register(self)

    def _shed_handshake_state(self) -> None:
        """
        Forget what only the opening handshake needed.

        An idle chat connection is mostly this object's ``__dict__``: Autobahn
        keeps the raw request and response, the parsed headers and a send
        queue we never use.  Those go, and the dict is rebuilt at its new size.
        (Autobahn's per-connection copies of the factory's options never
        happen here: see ``WebChatFactory``.)
        """
        state = self.__dict__
        for name in _HANDSHAKE_ONLY:
            state.pop(name, None)
        # Only sendData(sync=True) or chopped sends append here; we use neither.
        state["send_queue"] = _NO_SEND_QUEUE
        self.__dict__ = dict(state)

    def dataReceived(self, data: bytes) -> None:
        if self._deaf:
            return
        # Any bytes at all prove the peer alive: a busy client is never pinged.
        self._last_heard = self.factory.reactor.seconds()
        self.factory.stats.bytes_received += len(data)
        if self._byte_bucket is not None and not self._byte_bucket.take(len(data)):
            self._flooded("byte_rate_limited", "data rate limit exceeded")
            return
        super().dataReceived(data)

    # -- frames: what each costs, and how many a message may have -----------------

    def onFrameBegin(self) -> None:
        # Autobahn calls this for every frame header it has parsed, whatever
        # the opcode: the one place where a flood of tiny frames (empty
        # continuations, unsolicited pongs) can be seen and priced.
        if self._frame_bucket is not None and not self._frame_bucket.take():
            self._flooded("frame_rate_limited", "frame rate limit exceeded")
        super().onFrameBegin()

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._message_frames = 0
        interval = self.factory.limits.ping_interval
        if not self.current_frame.fin and interval > 0 and self.state == _OPEN:
            # Browsers never split a message, so this timer is rare: only a
            # fragmented message gets one, and it is gone when the message ends.
            self._message_deadline = self.factory.reactor.callLater(
                interval, self._message_unfinished
            )

    def onMessageFrameBegin(self, length: int) -> None:
        self._message_frames += 1
        limit = self.factory.limits.max_message_frames
        if 0 < limit < self._message_frames and self.state == _OPEN:
            self.close_with(
                1009, f"message in more than {limit} frames", kind="too_many_frames"
            )
        super().onMessageFrameBegin(length)

    def onMessageEnd(self) -> None:
        if self._message_deadline is not None:
            if self._message_deadline.active():
                self._message_deadline.cancel()
            self._message_deadline = None
        super().onMessageEnd()

    def _message_unfinished(self) -> None:
        self._message_deadline = None
        interval = self.factory.limits.ping_interval
        self.close_with(
            1008, f"message unfinished after {interval:g} s", kind="message_timeout"
        )

    def _flooded(self, kind: str, reason: str) -> None:
        """
        Close a connection that sends more than its budget, and stop reading it.

        Parsing what a flooder still sends while it ignores our close frame
        would cost the very CPU the budget protects: its unparsed input is
        thrown away and its socket no longer read.  The close timeout then
        drops it (1 s), or the shutdown grace if it was already going.
        """
        self.close_with(1008, reason, kind=kind)
        self._deaf = True
        self.data = b""  # Autobahn's unparsed input
        if self.transport is not None:
            self.transport.pauseProducing()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != _OPEN:
            # We are closing this connection (for cause, or shutting down): what
            # the client still sends before it reads our close is not relayed.
            return
        if self._bucket is not None and not self._bucket.take():
            self.close_with(1008, "rate limit exceeded", kind="rate_limited")
            return
        if isBinary:
            self.close_with(1003, "binary messages are not supported")
            return
        try:
            self.factory.relay(self, payload)
        except Exception:
            # A bug in relaying one message must not take the reactor's
            # read loop down with it: report it and end just this connection.
            log.failure("An error has occurred: relaying a message failed")
            self.close_with(1011, "internal error")

    def onPing(self, payload: bytes) -> None:
        # Every ping costs us a pong: pings draw on the same budget as messages.
        if self._bucket is not None and not self._bucket.take():
            self.close_with(1008, "rate limit exceeded", kind="rate_limited")
            return
        super().onPing(payload)  # the pong

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.unregister(self)

    def connectionLost(self, reason: Any = None) -> None:
        timers = (
            self._keepalive,
            self._linger,
            self._message_deadline,
            self.closeHandshakeTimeoutCall,
        )
        for timer in timers:
            if timer is not None and timer.active():
                timer.cancel()
        self._keepalive = self._linger = self._message_deadline = None
        self.closeHandshakeTimeoutCall = None
        super().connectionLost(reason)
        self.factory.forget(self)

    # -- closing ------------------------------------------------------------------

    def close_with(
        self,
        code: int,
        reason: str,
        kind: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """
        Start the closing handshake with any RFC 6455 code.

        Autobahn's ``sendClose`` only lets applications use 1000 and
        3000-4999; the codes this server owes its clients (1001, 1003, 1008,
        1011, ...) go through the frame-level call instead.  ``kind`` names
        the policy that closed it, for the log and the counters.  The peer
        has ``timeout`` seconds to answer before TCP is dropped (default: the
        limits' close timeout; 0 = the caller sees to that).
        """
        if self.state != _OPEN:
            return
        if kind is not None:
            self.drop_reason = (kind, f"{code} {reason}")
        self._close_timeout = timeout
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123])
        # Nothing it sends from now on is relayed (see onMessage), so Autobahn
        # need not assemble it: its "failed" flag stops that.
        self.failedByMe = True

    def sendCloseFrame(
        self,
        code: int | None = None,
        reasonUtf8: bytes | None = None,
        isReply: bool = False,
    ) -> None:
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)
        timeout = self._close_timeout
        if timeout is None:
            timeout = self.factory.limits.close_timeout
        if (
            self.closedByMe
            and self.state == WebSocketProtocol.STATE_CLOSING
            and self.closeHandshakeTimeoutCall is None
            and timeout > 0
        ):
            # Autobahn's own timer (closeHandshakeTimeout, off in the factory)
            # would run on the global reactor with one fixed timeout for every
            # close, cutting a shutdown's grace short.  Ours takes the timeout
            # this close was given, on the factory's clock; Autobahn still
            # cancels it when the peer answers.
            self.closeHandshakeTimeoutCall = self.factory.reactor.callLater(
                timeout, self.onCloseHandshakeTimeout
            )
        if not isReply and code in ERROR_CLOSE_CODES:
            # Closing for cause (ours or Autobahn's): the connection leaves the
            # chat now, not when the peer gets round to answering.
            self.factory.unregister(self)

    def _closeConnection(self, abort: bool = False) -> None:
        # Autobahn aborts the TCP connection the moment the client answers our
        # close frame.  An abort throws away whatever Twisted still holds
        # unsent, which can be our own close frame when the client's answer
        # arrived in the same read as the frame that earned it (a client doing
        # send(binary); close() would see 1006 instead of 1003).  After a
        # clean closing handshake, let the buffer drain, but not for long.
        if abort and self.wasClean and self.transport is not None:
            self.transport.loseConnection()
            self._linger = self.factory.reactor.callLater(
                CLOSE_LINGER, self.transport.abortConnection
            )
            return
        super()._closeConnection(abort)

    def drop(self, kind: str, reason: str) -> None:
        """End a connection whose peer cannot be talked to any more."""
        self.drop_reason = (kind, reason)
        self.factory.unregister(self)  # gone for everyone now, not at FIN
        if self.transport is not None:
            self.transport.abortConnection()

    # -- sending, and noticing who cannot keep up ---------------------------------

    def deliver(self, data: bytes | memoryview) -> bool:
        """
        Send whole frames built by the hub; refuse them if this connection is
        closing.

        Twisted's ``transport.write`` does not write: it buffers, registers
        the socket with epoll and sends on a later iteration, inside its
        logging wrapper, and that bookkeeping costs more than the send.  So
        when Twisted holds nothing unsent for this connection the bytes go
        straight to the socket, and only what the kernel does not take goes
        through ``transport.write``.  Once anything is buffered everything
        goes through Twisted, so the order of bytes on the wire and Twisted's
        back-pressure signals (which find slow readers) stay intact.  TLS
        transports always take ``transport.write``: their bytes must pass
        through the TLS layer.

        Autobahn raises for a send on a closing connection; checking the
        state first keeps that from ever surfacing in the *sender's* stack.
        """
        if self.state != _OPEN:
            return False
        transport = self.transport
        size = len(data)
        if self._paused:
            self._backlog += size
            # The count assumes the kernel's share full; before calling the
            # connection too slow, ask what really is unsent.
            if self._backlog > self._backlog_limit() and size > self._room():
                self._too_slow()
                return False
        elif (
            self._socket is not None
            and not transport._tempDataLen
            and not transport.dataBuffer
        ):
            # The allowance is consulted before anything is taken: once the
            # kernel has had its part, the rest would be copied into Twisted's
            # buffer whole, and one turn of big messages can owe each member
            # many times its allowance (150 senders of 60 KB: 9 MB each).
            if size > self._sure_fit and size > self._room():
                self._too_slow()
                return False
            try:
                sent = self._socket.send(data)
            except OSError:
                sent = 0  # EAGAIN, or a reset Twisted will notice and report
            if sent == size:
                return True
            data = data[sent:]
        elif size > self._sure_fit - self._buffered() and size > self._room():
            self._too_slow()
            return False
        transport.write(data if type(data) is bytes else bytes(data))
        return True

    def _buffered(self) -> int:
        """Bytes Twisted holds unsent for this connection (0 where it cannot say)."""
        transport = self.transport
        return (
            len(getattr(transport, "dataBuffer", b""))
            - getattr(transport, "offset", 0)
            + getattr(transport, "_tempDataLen", 0)
        )

    def _room(self) -> int:
        """
        How much more this connection may be handed now: the allowance less
        what is still unsent for it, in Twisted's buffer and the kernel's.

        Asking the kernel costs a system call, so ``deliver`` asks only
        when a delivery is too big to fit whatever the kernel holds.
        """
        limit = self.factory.limits.max_send_buffer
        if limit <= 0:
            return 1 << 62
        held = self._buffered()
        if self._socket is not None:
            try:
                raw = fcntl.ioctl(self._socket.fileno(), termios.TIOCOUTQ, b"\0" * 4)
                held += struct.unpack("i", raw)[0]
            except OSError:
                held += self._kernel_share  # cannot tell: assume it is full
        return limit - held

    def _backlog_limit(self) -> int:
        # We are paused once the kernel's buffer is full and Twisted holds
        # ``bufferSize`` more (``pauseProducing`` counts what it holds beyond
        # that); what we queue after that is the rest of the allowance.
        limit = self.factory.limits.max_send_buffer
        if limit <= 0:
            return 1 << 62
        held = self._kernel_share + getattr(self.transport, "bufferSize", 0)
        return max(limit - held, 0)

    def _too_slow(self) -> None:
        self.close_with(1008, "too slow", kind="too_slow")
        # The close frame sits behind everything unread; Autobahn's close
        # handshake timeout drops the connection (and its buffer) soon after.

    def pauseProducing(self) -> None:
        # Twisted calls this on every write while its buffer is over the mark;
        # only the first call starts the count, from what the write that
        # crossed the mark left in the buffer beyond it.
        if not self._paused:
            self._paused = True
            mark = getattr(self.transport, "bufferSize", 0)
            self._backlog = max(self._buffered() - mark, 0)

    def resumeProducing(self) -> None:
        self._paused = False
        self._backlog = 0

    def stopProducing(self) -> None:
        self._paused = False

    # -- dead peers ---------------------------------------------------------------

    def _start_keepalive(self) -> None:
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
        self.sendPing()
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


def _close_code(protocol: WebChatProtocol) -> int:
    """The code a connection ended with: the server's, else the client's, else 1006."""
    if protocol.drop_reason is not None and protocol.localCloseCode is None:
        return 1006  # dropped without a close frame (dead peer)
    return protocol.localCloseCode or protocol.remoteCloseCode or 1006


class WebChatFactory(WebSocketServerFactory):
    """
    One chat room: admits connections, tracks them, and fans messages out.

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
    ) -> None:
        # "webchat", not Autobahn's name and version, in the 101's Server:.
        super().__init__(reactor=reactor, server="webchat")
        self.stats = ChatStats()
        self.rooms = Rooms(reactor, self.stats, delivery_failed=self._delivery_failed)
        self._next_id = 1
        #: Where ids come from when several nodes share the chat (the Redis
        #: relay's allocator); ``None`` for this process's own counter.
        self.id_source: Callable[[], int] | None = None
        self.quiet = quiet
        self.limits = limits or Limits()
        self.access = access or AccessPolicy()
        #: Every connection from TCP accept to close, open or still handshaking.
        self.connections: set[WebChatProtocol] = set()
        self.per_address: Counter[str] = Counter()
        #: When the server started, for /healthz's uptime.
        self.started_at = reactor.seconds()
        #: Set at shutdown: new handshakes get 503 and /healthz says so.
        self.draining = False
        #: The Redis relay to other nodes, when there is one (``attach_link``).
        self.link: RedisRelay | None = None
        size = self.limits.max_message_size
        self.setProtocolOptions(
            # Without failByDrop=False Autobahn answers a protocol violation by
            # dropping TCP, and the client never learns the close code.
            failByDrop=False,
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
    def dropped(self) -> Counter[str]:
        """Connections the server ended for cause, by kind."""
        return self.stats.dropped

    # -- what the protocols report -------------------------------------------------

    def admit(self, protocol: WebChatProtocol, request: Any) -> None:
        """Let a handshake proceed, or raise ``ConnectionDeny`` with the HTTP status."""
        headers = request.headers
        peer = protocol.client_address
        address = self.access.client_address(peer, headers.get("x-forwarded-for"))
        protocol.client_address = address
        secure = ISSLTransport.providedBy(protocol.transport)
        if self.access.is_trusted_proxy(peer):
            proto = headers.get("x-forwarded-proto", "").strip().lower()
            secure = secure or proto in ("https", "wss")
        scheme = "https" if secure else "http"
        origin = headers.get("origin")
        limits = self.limits
        if self.draining:
            self._refuse(address, 503, "draining", "server is shutting down")
        if not self.access.origin_allowed(origin, headers.get("host"), scheme):
            shown = escape_for_log(origin or "")
            self._refuse(
                address,
                403,
                "origin",
                "origin not allowed",
                f"origin {shown} not allowed",
                # The one thing the operator needs to know next.
                hint=f"start webchat with --allowed-origin {shown} to allow it",
            )
        if limits.max_connections and len(self.connections) > limits.max_connections:
            self._refuse(address, 503, "max_connections", "server is full")
        per_ip = limits.max_connections_per_ip
        if per_ip and self.per_address[address] >= per_ip:
            self._refuse(
                address,
                429,
                "max_connections_per_ip",
                "too many connections",
                f"already {per_ip} connection(s) from this address",
            )
        self.per_address[address] += 1

    def _refuse(
        self,
        address: str,
        status: int,
        kind: str,
        reason: str,
        detail: str = "",
        hint: str = "",
    ) -> None:
        """Count and log a refused handshake, then refuse it with ``status``."""
        self.refused[kind] += 1
        log.warn(
            "Refused connection from {peer}: {reason} (HTTP {status}{hint})",
            peer=escape_for_log(address),
            reason=detail or reason,
            status=status,
            hint=f"; {hint}" if hint else "",
        )
        raise ConnectionDeny(status, reason)

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
        protocol.chat_id = self.allocate_id()
        protocol.room = self.rooms.join(LOBBY, protocol)
        self.stats.opened += 1
        protocol.opened_at = self.reactor.seconds()
        log.info(
            "New connection! ({id}) from {peer}",
            id=protocol.chat_id,
            peer=escape_for_log(protocol.client_address),
        )

    def unregister(self, protocol: WebChatProtocol) -> None:
        room = protocol.room
        if not protocol.chat_id or room is None or not self.rooms.leave(room, protocol):
            return  # never opened, or already gone
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
        if protocol._admitted:
            address = protocol.client_address
            self.per_address[address] -= 1
            if self.per_address[address] <= 0:
                del self.per_address[address]

    def _delivery_failed(self, protocol: WebChatProtocol) -> bool:
        """A delivery to ``protocol`` raised (a bug): end just that connection."""
        protocol.close_with(1011, "internal error")
        return True

    def relay(self, sender: WebChatProtocol, payload: bytes) -> int:
        """Send ``id N: payload`` to everyone but ``sender``; return how many get it."""
        room = sender.room
        count = room.publish(sender, payload) if room is not None else 0
        self.stats.messages_received += 1
        if self.link is not None:
            self.link.publish(sender.chat_id, payload)
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
                "Connection {id} sending message {text} to {count} other connection(s)",
                id=sender.chat_id,
                text=LogText(payload),
                count=count,
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

    def deliver_remote(self, envelope: Envelope) -> None:
        """A message from a client of another node: everyone here gets it."""
        room = self.rooms.get(LOBBY)
        count = 0
        if room is not None:
            count = room.publish(None, envelope.text, sender_id=envelope.chat_id)
        self.stats.messages_relayed_in += 1
        if not self.quiet:
            log.info(
                "Connection {id} on node {node} sending message {text} to {count} "
                "connection(s) here",
                id=envelope.chat_id,
                node=envelope.node,
                text=LogText(envelope.text),
                count=count,
            )

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
