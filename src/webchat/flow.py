"""Per-connection flow control: slow readers, the send allowance, the fast path.

This is the only module that reaches into Twisted's transport internals
(``TRANSPORT_INTERNALS``: ``tests/test_flow.py`` fails loudly if a Twisted
upgrade renames them).  It lives apart from the WebSocket wire handling so
that what depends on Twisted's private parts is small and in one place.

Four jobs, all for ``deliver``, which a room calls once per member per turn:

* The direct-socket fast path: Twisted's ``transport.write`` buffers and
  sends on a later iteration, at a cost larger than the send itself, so
  while Twisted holds nothing unsent the bytes go straight to the socket.
  Over TLS (``--port ssl:...``) the same: the turn is encrypted in one
  ``SSL_write`` on the connection's own OpenSSL object (Twisted's memory-BIO
  TLS layer owns it; only its write side is borrowed), its ciphertext read
  into one buffer the server reuses member after member, and sent straight
  to the socket; what the kernel does not take goes to
  Twisted's buffer under the TLS layer, so order and back-pressure hold.
* Slow readers: the transport's producer signals (``pauseProducing``) start
  a count of what piles up; past ``--max-send-buffer`` the connection is
  closed 1008 "too slow".
* Big turns: a member that is reading (Twisted holds nothing unsent for it)
  takes a turn of any size.  What the kernel does not take at once is kept
  as *views* of the room's one turn buffer, never a copy, in a small
  per-connection queue, and fed into Twisted a bounded chunk of whole frames
  at a time as Twisted drains (``resumeProducing``).  So the copy held per
  member is about one Twisted buffer, however many senders the turn had.
  "Too slow" is judged over time: a member whose unsent bytes (views,
  Twisted's buffer, the kernel's) stay over ``--max-send-buffer`` for
  ``OVER_GRACE`` seconds is closed 1008; one that drains is never closed for
  the size of one turn.
* A member already behind (Twisted holds bytes for it: its kernel buffer is
  full) is not handed a turn that does not fit what it may still be owed:
  it is closed 1008 "too slow" before anything of the turn is copied.
  ``SO_SNDBUF`` is fixed at connection time so the kernel's share stays
  bounded too.

``write_now`` is the same direct-socket shortcut for plain HTTP answers
(``webchat.web.ChatChannel``).

``FlowControl`` is a mixin of ``WebChatProtocol`` rather than an object of
its own: an idle connection's memory is mostly its ``__dict__``, and the
hot path stays one method call per member.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from collections import deque
from typing import TYPE_CHECKING, Any

from autobahn.websocket.protocol import WebSocketProtocol
from OpenSSL import SSL
from OpenSSL.SSL import _ffi, _lib
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.tls import BufferingTLSTransport
from zope.interface import implementer

from webchat.limits import OVER_GRACE
from webchat.memory import release_free_heap

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
#: ... and of ``twisted.protocols.tls.BufferingTLSTransport`` (the TLS layer
#: of an ``ssl:`` port, ``transport.protocol``): its OpenSSL connection
#: (``_tlsConnection``), whether the handshake is over (``_handshakeDone``),
#: plaintext it holds back (``_appSendBuffer``, during a handshake) and its
#: small-write aggregator (``_aggregator``, whose ``_buffer`` it flushes on
#: the next iteration).
TLS_INTERNALS = (
    "_tlsConnection",
    "_handshakeDone",
    "_appSendBuffer",
    "_aggregator",
)

_OPEN = WebSocketProtocol.STATE_OPEN

#: A member taking a big turn is fed this much (bytes, whole frames, at
#: least one) into Twisted at a time: Twisted pauses us once it holds more
#: than its 64 KiB mark, and resumes us when it has sent it all.
FEED_CHUNK = 64 * 1024
#: Once a member has let go of views of more than this (bytes) the C heap's
#: free memory is handed back to the system (``webchat.memory``), at most
#: once a second per server: the turn outlived its flush (``Room.flush``
#: trims after big turns too), and glibc would keep tens of MB resident.
RELEASE_ABOVE = 4 * 1024 * 1024
#: Over TLS, turns up to this size (bytes) are encrypted and sent directly
#: (``_send_tls``); bigger ones go through Twisted's TLS layer, whose
#: buffer the slow-reader checks watch (their ciphertext would be a copy
#: per member, where the plain path keeps views of one turn buffer).
TLS_DIRECT_MAX = 64 * 1024
#: ... and of pyOpenSSL's ``SSL.Connection`` (``_tlsConnection``), whose
#: OpenSSL calls ``_send_tls`` makes itself through the bindings pyOpenSSL
#: uses (``OpenSSL.SSL._lib``, ``_ffi``): its ``SSL*`` (``_ssl``), the
#: memory BIO the ciphertext goes to (``_from_ssl``), and how it turns a
#: failed call into an exception (``_raise_ssl_error``).
PYOPENSSL_INTERNALS = ("_ssl", "_from_ssl", "_raise_ssl_error")
#: Ciphertext bytes per TLS record beyond its plaintext, at most: header 5,
#: AEAD tag 16, TLS 1.3's content type 1, TLS 1.2's explicit nonce 8.
_TLS_RECORD_OVERHEAD = 32
_TLS_RECORD = 16 * 1024


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
    #: Views of turn buffers not yet handed to Twisted, and their bytes.
    _queue: deque[memoryview] | None = None
    _queued = 0
    #: Bytes queued as views since the queue was last empty.
    _viewed = 0
    #: Taking a big turn: what comes next waits behind it (``deliver``).
    _draining = False
    #: Since when (the factory's clock) it has held more than its allowance.
    _over_since: float | None = None
    _over_check: Any = None
    #: Unsent bytes the kernel may hold for us (see ``start_flow_control``).
    _kernel_share = 0
    #: The raw socket, for plain TCP/Unix transports and TLS over TCP (see
    #: ``deliver``).
    _socket: socket.socket | None = None
    #: Twisted's TLS layer, for ``ssl:`` transports (see ``_send_tls``).
    _tls: BufferingTLSTransport | None = None
    #: The TCP connection under it all (the transport itself without TLS),
    #: whose buffer ``deliver`` looks at; None where there is no socket.
    _raw: Any = None
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
        transport = self.transport
        raw = None
        if isinstance(transport, BufferingTLSTransport):
            # An ssl: port: Twisted's TLS layer wraps the TCP connection.
            if isinstance(transport.transport, tcp.Connection):
                self._tls = transport
                raw = transport.transport
        elif isinstance(transport, tcp.Connection) and not transport.TLS:
            raw = transport
        if raw is not None:
            self._raw = raw
            self._socket = raw.socket
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
        closing (or is closed for being too slow).

        Twisted's ``transport.write`` does not write: it buffers, registers
        the socket with epoll and sends on a later iteration, inside its
        logging wrapper, and that bookkeeping costs more than the send.  So
        when Twisted holds nothing unsent for this connection the bytes go
        straight to the socket.  What the kernel does not take is finished to
        the end of its frame through ``transport.write``; the whole frames
        after that wait in the queue as views (``_feed``).  Once anything is
        buffered or queued everything goes behind it, so the order of bytes
        on the wire and Twisted's back-pressure signals stay intact.  Over
        TLS the turn is encrypted here and its ciphertext sent the same way
        (``_send_tls``) when the TLS layer holds nothing either.

        Autobahn raises for a send on a closing connection; checking the
        state first keeps that from ever surfacing in the *sender's* stack.
        """
        if self.state != _OPEN:
            return False
        if self._queue:
            # Taking a big turn: what comes next waits behind it, as views.
            return self._take_later(data)
        transport = self.transport
        raw = self._raw
        size = len(data)
        if self._paused:
            if self._draining:
                return self._take_later(data)
            self._backlog += size
            # The count assumes the kernel's share full; before calling the
            # connection too slow, ask what really is unsent.
            if self._backlog > self._backlog_limit() and size > self._room():
                self._too_slow()
                return False
        elif raw is not None and not raw._tempDataLen and not raw.dataBuffer:
            if self._tls is not None:
                if self._send_tls(data):
                    return True
                # A big turn, or the TLS layer holds something: through the
                # layer a chunk at a time as views, as a plain big turn is,
                # and judged the same way, over time.
                self._start_draining()
                return self._take_later(data)
            # Nothing unsent in Twisted: this member reads.  It takes the
            # turn whatever its size; only what it then leaves unread is
            # judged (``_judge``).
            try:
                sent = self._socket.send(data)
            except OSError:
                sent = 0  # EAGAIN, or a reset Twisted will notice and report
            if sent == size:
                return True
            # Whatever else this turn owes it (a sender's next run of other
            # people's frames) goes behind this, not through the check for
            # members that were behind before the turn.
            self._start_draining()
            boundary = _frame_boundary(data, sent)
            if boundary < size:
                # The rest of the turn stays where it is, in the room's
                # buffer, until Twisted asks for more.
                if boundary > sent:
                    transport.write(bytes(data[sent:boundary]))
                return self._take_later(memoryview(data)[boundary:])
            data = data[sent:]
        elif self._draining:
            return self._take_later(data)
        elif size > self._sure_fit - self._buffered() and size > self._room():
            # Behind already (its kernel buffer is full): a turn that does
            # not fit is refused before any of it is copied.
            self._too_slow()
            return False
        transport.write(data if type(data) is bytes else bytes(data))
        return True

    def _send_tls(self, data: bytes | memoryview) -> bool:
        """
        Encrypt ``data`` in one ``SSL_write`` and send the ciphertext straight
        to the socket; False (nothing done) when it must go through Twisted's
        TLS layer instead: a turn over ``TLS_DIRECT_MAX``, or a layer that
        holds plaintext or is not (or no longer) in its steady state.

        Twisted's layer would aggregate the write, encrypt it on the next
        iteration and hand the ciphertext to the transport's buffer, to be
        sent on the iteration after: several Python calls, two ``epoll_ctl``
        and a timer per member per turn.  Here the connection's own OpenSSL
        object encrypts (so sequence numbers and keys stay its own), and what
        the kernel does not take goes to the buffer under the layer
        (``transport.write`` of its raw transport), where the next turn finds
        it and queues behind it, and whose size ``pauseProducing`` and the
        too-slow checks count as before.
        """
        tls = self._tls
        size = len(data)
        if (
            size > TLS_DIRECT_MAX
            or tls._appSendBuffer  # type: ignore[union-attr]
            or tls.disconnecting  # type: ignore[union-attr]
            or not tls._handshakeDone  # type: ignore[union-attr]
        ):
            return False
        # Small writes the layer holds; None once its connection is lost (its
        # aggregator is then one that keeps nothing).
        held = getattr(tls._aggregator, "_buffer", None)  # type: ignore[union-attr]
        if held is None or held:
            return False
        connection = tls._tlsConnection  # type: ignore[union-attr]
        ssl = connection._ssl
        out = getattr(self.factory, "_tls_out", None) or self._new_tls_out()
        # pyOpenSSL's ``send`` and ``bio_read`` would each wrap the call in
        # Python (an allocation per read, its ciphertext copied into a new
        # bytes): the same calls made here on its own pointers cost a third
        # less per member (``benchmarks/tls_write_cost.py``).
        done = _lib.SSL_write(ssl, _ffi.from_buffer(data), size)
        while 0 < done < size:  # a context allowing partial writes: one a record
            more = _lib.SSL_write(ssl, _ffi.from_buffer(data[done:]), size - done)
            if more <= 0:
                _clear_ssl_error(connection, more)
                return True  # part of it encrypted: the connection is broken
            done += more
        if done <= 0:
            # A fatal alert came, or a handshake started: Twisted's layer
            # will meet the same and report it.  Nothing was encrypted, so
            # it has the turn.
            _clear_ssl_error(connection, done)
            return False
        got = _lib.BIO_read(connection._from_ssl, out.buffer, out.size)
        if got <= 0:
            return True  # cannot happen: a record was written; nothing to send
        cipher: bytes | memoryview = out.view[:got]
        if got == out.size:  # more than a turn of TLS_DIRECT_MAX makes
            pieces = [bytes(cipher)]
            while (
                got := _lib.BIO_read(connection._from_ssl, out.buffer, out.size)
            ) > 0:
                pieces.append(bytes(out.view[:got]))
            cipher = b"".join(pieces)
        try:
            sent = self._socket.send(cipher)  # type: ignore[union-attr]
        except OSError:
            sent = 0  # EAGAIN, or a reset Twisted will notice and report
        if sent < len(cipher):
            # A copy: the buffer is the next member's.
            tls.transport.write(bytes(cipher[sent:]))  # type: ignore[union-attr]
            # As on the plain path: the rest of this turn queues behind it.
            self._start_draining()
        return True

    def _new_tls_out(self) -> _CipherBuffer:
        """The server's one buffer for ciphertext, made at its first TLS turn."""
        out = _CipherBuffer()
        self.factory._tls_out = out  # type: ignore[attr-defined]
        return out

    def _start_draining(self) -> None:
        """This member took a turn it could not send at once: until the turn is
        over, what else it is owed queues behind, and is judged over time."""
        if not self._draining:
            self._draining = True
            self.factory.reactor.callLater(0, self._turn_over)  # type: ignore[attr-defined]

    def _take_later(self, data: bytes | memoryview) -> bool:
        """Queue ``data`` (whole frames) as a view, feed what Twisted may take."""
        view = data if type(data) is memoryview else memoryview(data)
        if self._queue is None:
            self._queue = deque()
        self._queue.append(view)
        self._queued += len(view)
        self._viewed += len(view)
        self._feed()
        return self._judge()

    def _feed(self) -> None:
        """
        Hand Twisted whole frames from the queue, ``FEED_CHUNK`` at a time,
        until it pauses us (it holds more than its mark) or the queue is empty.
        """
        queue = self._queue
        write = self.transport.write
        while queue and not self._paused:
            if self.state != _OPEN:
                self._drop_queue()
                return
            view = queue[0]
            if len(view) <= FEED_CHUNK:
                queue.popleft()
                piece = view
            else:
                end = _frame_boundary(view, FEED_CHUNK)
                piece = view[:end]
                if end >= len(view):
                    queue.popleft()
                else:
                    queue[0] = view[end:]
            self._queued -= len(piece)
            write(bytes(piece))
        if not queue:
            self._let_go()

    def _drop_queue(self) -> None:
        """Let go of the queued views (the connection is closing or gone)."""
        if self._queue:
            self._queue.clear()
        self._queued = 0
        self._let_go()
        self._draining = False
        self._over_since = None
        check, self._over_check = self._over_check, None
        if check is not None and check.active():
            check.cancel()

    def _let_go(self) -> None:
        """The queue is empty: after a big turn, have the free heap released."""
        viewed, self._viewed = self._viewed, 0
        if viewed <= RELEASE_ABOVE:
            return
        # One release a second for the whole server, however many members
        # finish a burst: the factory holds the pending call.
        factory = self.factory  # type: ignore[attr-defined]
        pending = getattr(factory, "_heap_release", None)
        if pending is None or not pending.active():
            factory._heap_release = factory.reactor.callLater(1.0, release_free_heap)

    def _judge(self) -> bool:
        """
        Whether this connection, taking a big turn, is still within its
        allowance over time; close it 1008 "too slow" if it has held more
        than ``--max-send-buffer`` unsent for ``OVER_GRACE`` seconds.
        """
        if self.state != _OPEN:
            self._drop_queue()
            return False
        limit = self._limits.max_send_buffer
        if limit <= 0:
            return True
        unsent = self._queued + self._buffered() + self._kernel_share
        if unsent > limit:
            unsent = self._queued + limit - self._room()  # ask the kernel
        if unsent <= limit:
            self._over_since = None
            return True
        clock = self.factory.reactor  # type: ignore[attr-defined]
        now = clock.seconds()
        if self._over_since is None:
            self._over_since = now
        elif now - self._over_since >= OVER_GRACE:
            self._too_slow()
            return False
        if self._over_check is None or not self._over_check.active():
            self._over_check = clock.callLater(
                self._over_since + OVER_GRACE - now, self._judge_later
            )
        return True

    def _turn_over(self) -> None:
        """The turn that found this member reading is over."""
        if not self._queue:
            self._draining = False

    def _judge_later(self) -> None:
        self._over_check = None
        if self._queue or self._draining:
            self._judge()

    def _buffered(self) -> int:
        """Bytes Twisted holds unsent for this connection (0 where it cannot say)."""
        transport = self._raw or self.transport
        held = (
            len(getattr(transport, "dataBuffer", b""))
            - getattr(transport, "offset", 0)
            + getattr(transport, "_tempDataLen", 0)
        )
        tls = self._tls
        if tls is not None:
            # Plaintext the TLS layer holds (aggregated, or held back in a
            # handshake) is unsent as well.
            aggregator = getattr(tls, "_aggregator", None)
            for piece in getattr(aggregator, "_buffer", ()):
                held += len(piece)
            for piece in tls._appSendBuffer:
                held += len(piece)
        return held

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
        # Views not yet fed are never sent: the close goes right after the
        # whole frames Twisted already holds.
        self._drop_queue()
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
        # Twisted has sent all it held: the next chunk of a big turn, if any.
        self._paused = False
        self._backlog = 0
        if self._queue:
            self._feed()
            self._judge()
        if not self._queue and self._draining:
            self._draining = False
            self._over_since = None

    def stopProducing(self) -> None:
        self._paused = False
        self._drop_queue()


class _CipherBuffer:
    """
    Where ``_send_tls`` reads each member's ciphertext out of OpenSSL: one
    buffer for the whole server, reused member after member, since each
    member's ciphertext is sent (or copied into Twisted's buffer) before the
    next member's turn.  Big enough for a turn of ``TLS_DIRECT_MAX``.
    """

    __slots__ = ("buffer", "size", "view")

    def __init__(self) -> None:
        self.size = TLS_DIRECT_MAX + _TLS_RECORD_OVERHEAD * (
            TLS_DIRECT_MAX // _TLS_RECORD + 1
        )
        self.buffer = _ffi.new("char[]", self.size)
        self.view = memoryview(_ffi.buffer(self.buffer))


def _clear_ssl_error(connection: SSL.Connection, result: int) -> None:
    """
    Let pyOpenSSL take a failed ``SSL_write``'s error off OpenSSL's queue,
    as its own ``send`` would: a stale error there would be read as the
    answer to Twisted's next call on the connection.
    """
    try:
        connection._raise_ssl_error(connection._ssl, result)
    except SSL.Error:
        pass


def write_now(transport: Any, data: bytes) -> None:
    """
    Write ``data`` to ``transport``: straight to the socket while Twisted
    holds nothing unsent for it (plain TCP or Unix, still open), else through
    ``transport.write``, as ``FlowControl.deliver`` does for chat frames.

    Twisted's ``write`` only buffers and registers the socket for writing;
    the send comes on a later reactor iteration (and the socket is taken off
    epoll again after it), which for a small HTTP answer costs more than the
    send.  What the kernel does not take goes through ``transport.write``,
    so the order of bytes and Twisted's back-pressure stay as they were.
    """
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataLen
        and not transport.dataBuffer
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or a reset Twisted will notice and report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _frame_boundary(data: bytes | memoryview, offset: int) -> int:
    """
    Where the frame holding byte ``offset`` of ``data`` (whole server frames,
    unmasked) ends: ``offset`` itself if a frame starts there.
    """
    at = 0
    while at < offset:
        length = data[at + 1] & 0x7F
        if length < 126:
            at += 2 + length
        elif length == 126:
            at += 4 + int.from_bytes(data[at + 2 : at + 4], "big")
        else:
            at += 10 + int.from_bytes(data[at + 2 : at + 10], "big")
    return at
