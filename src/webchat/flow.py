"""Per-connection flow control: slow readers, the send allowance, the fast path.

This is the only module that reaches into Twisted's transport internals
(``TRANSPORT_INTERNALS``: ``tests/test_flow.py`` fails loudly if a Twisted
upgrade renames them).  It lives apart from the WebSocket wire handling so
that what depends on Twisted's private parts is small and in one place.

Three jobs, all for ``deliver``, which a room calls once per member per turn:

* The direct-socket fast path: Twisted's ``transport.write`` buffers and
  sends on a later iteration, at a cost larger than the send itself, so
  while Twisted holds nothing unsent the bytes go straight to the socket.
* Slow readers: the transport's producer signals (``pauseProducing``) start
  a count of what piles up; past ``--max-send-buffer`` the connection is
  closed 1008 "too slow".
* The turn allowance: a delivery that does not fit what the connection may
  still be owed is refused before anything is copied, so one turn of big
  messages cannot hold many times the allowance per member.  ``SO_SNDBUF``
  is fixed at connection time so the kernel's share stays bounded too.

``FlowControl`` is a mixin of ``WebChatProtocol`` rather than an object of
its own: an idle connection's memory is mostly its ``__dict__``, and the
hot path stays one method call per member.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import TYPE_CHECKING, Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

if TYPE_CHECKING:
    from webchat.limits import Limits

#: The private attributes of ``twisted.internet.tcp.Connection`` this module
#: reads: what Twisted holds unsent (``dataBuffer`` from ``offset``, plus
#: ``_tempDataLen`` not yet joined into it), its pause mark
#: (``bufferSize``), the raw ``socket``, and whether it is ``TLS``.
TRANSPORT_INTERNALS = (
    "dataBuffer",
    "offset",
    "_tempDataLen",
    "bufferSize",
    "socket",
    "TLS",
)

_OPEN = WebSocketProtocol.STATE_OPEN


@implementer(IPushProducer)
class FlowControl:
    """
    Sending to one connection, and noticing when it cannot keep up.

    The host class provides ``transport``, ``state``, ``factory.limits``
    and ``close_with``.
    """

    transport: Any
    state: int

    _paused = False
    _backlog = 0
    #: Unsent bytes the kernel may hold for us (see ``start_flow_control``).
    _kernel_share = 0
    #: The raw socket, for plain TCP/Unix transports (see ``deliver``).
    _socket: socket.socket | None = None
    #: The largest delivery that fits the allowance even with the kernel's
    #: share full and nothing in Twisted's buffer: ``deliver`` looks closer
    #: only at bigger ones (see ``start_flow_control``).
    _sure_fit = 1 << 62

    @property
    def _limits(self) -> Limits:
        return self.factory.limits  # type: ignore[attr-defined]

    def start_flow_control(self) -> None:
        """At ``connectionMade``: take the transport's signals, fix SO_SNDBUF."""
        # Take the transport's flow-control signals over from the HTTP channel
        # that handed us the connection: they are how we spot slow readers.
        try:
            self.transport.unregisterProducer()
        except RuntimeError:
            pass  # nobody was registered (test transports say so loudly)
        self.transport.registerProducer(self, True)
        limit = self._limits.max_send_buffer
        if isinstance(self.transport, tcp.Connection) and not self.transport.TLS:
            self._socket = self.transport.socket
            if limit > 0:
                # Unsent data lives in two places: Twisted's buffer, which we
                # count, and the kernel's, which Linux grows by itself to
                # several MiB.  Fix the kernel's at half the allowance (Linux
                # doubles what it is given) so the two together stay bounded.
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limit // 4)
                self._kernel_share = self._socket.getsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF
                )
        if limit > 0:
            self._sure_fit = max(limit - self._kernel_share, 0)

    def deliver(self, data: bytes | memoryview) -> bool:
        """
        Send whole frames built by a room's codec; refuse them if this connection is
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
        limit = self._limits.max_send_buffer
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
        limit = self._limits.max_send_buffer
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
