"""Flow control: the Twisted internals it relies on, and failures kept to one member."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from webchat.flow import (
    _OPEN,
    OVER_GRACE,
    PYOPENSSL_INTERNALS,
    TLS_INTERNALS,
    TRANSPORT_INTERNALS,
    FlowControl,
)
from webchat.frames import text_frame
from webchat.limits import Limits
from webchat.testing import ChatPump


class TwistedInternalsTests(SynchronousTestCase):
    """
    ``webchat.flow`` reads private attributes of Twisted's TCP transport.
    If a Twisted upgrade renames or drops one, this fails, naming it, long
    before a slow reader goes unnoticed in production.
    """

    def setUp(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        self.addCleanup(ours.close)
        # A memory reactor: the transport registers for writing, never writes.
        self.transport = tcp.Connection(ours, Protocol(), reactor=MemoryReactor())
        self.transport.connected = True

    def test_every_internal_flow_reads_exists(self):
        missing = [n for n in TRANSPORT_INTERNALS if not hasattr(self.transport, n)]
        self.assertEqual(
            missing, [], f"Twisted's tcp.Connection no longer has {missing}"
        )
        self.assertIsInstance(self.transport.socket, socket.socket)
        self.assertFalse(self.transport.TLS)
        self.assertIsInstance(self.transport.bufferSize, int)

    def test_every_internal_of_the_tls_layer_flow_reads_exists(self):
        # What an ssl: port wraps each connection in (listenSSL's factory).
        from twisted.internet.ssl import CertificateOptions
        from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(
            CertificateOptions(), False, Factory.forProtocol(Protocol), Clock()
        )
        self.assertIs(factory.protocol, BufferingTLSTransport)
        tls = factory.buildProtocol(None)
        tls.makeConnection(self.transport)
        missing = [n for n in TLS_INTERNALS if not hasattr(tls, n)]
        self.assertEqual(missing, [], f"Twisted's TLS layer no longer has {missing}")
        self.assertFalse(tls._handshakeDone)
        self.assertEqual(tls._appSendBuffer, [])
        self.assertEqual(tls._aggregator._buffer, [])
        tls.write(b"held back: no handshake yet")
        held = tls._aggregator._buffer + tls._appSendBuffer
        self.assertEqual(b"".join(held), b"held back: no handshake yet")
        # ... and the pyOpenSSL connection under it, whose OpenSSL calls
        # flow makes itself through the bindings pyOpenSSL uses.
        from OpenSSL.SSL import _ffi, _lib

        connection = tls._tlsConnection
        missing = [n for n in PYOPENSSL_INTERNALS if not hasattr(connection, n)]
        self.assertEqual(missing, [], f"pyOpenSSL's Connection no longer has {missing}")
        for name in ("SSL_write", "BIO_read"):
            self.assertTrue(hasattr(_lib, name), f"pyOpenSSL's bindings lack {name}")
        self.assertEqual(_ffi.typeof(connection._ssl).cname, "SSL *")
        self.assertEqual(_ffi.typeof(connection._from_ssl).cname, "BIO *")

    def test_what_flow_counts_as_unsent_grows_with_a_write(self):
        def unsent():
            t = self.transport
            return len(t.dataBuffer) - t.offset + t._tempDataLen

        self.assertEqual(unsent(), 0)
        self.transport.write(b"x" * 1000)  # buffered: no reactor to send it
        self.assertEqual(unsent(), 1000)


class DeliveryFailureTests(SynchronousTestCase):
    def test_a_connection_whose_delivery_raises_does_not_cost_the_others(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        pump = ChatPump(quiet=True)
        alice, bob, carol = pump.connect(), pump.connect(), pump.connect()
        (on_server,) = [p for p in pump.factory.rooms if p.chat_id == 2]

        def broken(data):
            raise RuntimeError("a bug in delivering")

        on_server.deliver = broken
        alice.send_text("one")
        pump.pump()
        alice.send_text("two")
        pump.pump()
        self.assertEqual(carol.texts, ["id 1: one", "id 1: two"])  # after bob
        self.assertEqual(bob.close_code, 1011)
        self.assertEqual(bob.texts, [])
        failures = [
            formatEvent(e)
            for e in events
            if formatEvent(e).startswith("An error has occurred: delivering")
        ]
        self.assertEqual(
            failures, ["An error has occurred: delivering to connection 2 failed"]
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(pump.factory.dropped["internal_error"], 1)


class _Member(FlowControl):
    """The parts of a connection ``FlowControl`` needs, on a real socket pair."""

    def __init__(self, limits: Limits, clock: Clock, ours: socket.socket) -> None:
        self.state = _OPEN
        self.factory = SimpleNamespace(limits=limits, reactor=clock)
        self.closed: list[tuple[int, str]] = []
        # A memory reactor: the transport sends only when the test calls
        # ``doWrite``, as the reactor would once the peer has read.
        self.transport = tcp.Connection(ours, Protocol(), reactor=MemoryReactor())
        self.transport.connected = True
        self.start_flow_control()

    def close_with(self, code: int, reason: str, kind: str | None = None) -> None:
        self.closed.append((code, reason))
        self.state = WebSocketProtocol.STATE_CLOSING


class BigTurnFlowTests(SynchronousTestCase):
    """
    A turn bigger than the allowance, handed to a member that was reading:
    kept as views and fed a chunk at a time; too slow only if it stays over
    the allowance for ``OVER_GRACE`` seconds (review of issue #9).
    """

    allowance = 256 * 1024

    def setUp(self):
        ours, self.peer = socket.socketpair()
        self.addCleanup(self.peer.close)
        self.addCleanup(ours.close)
        self.peer.setblocking(False)
        self.clock = Clock()
        self.member = _Member(Limits(max_send_buffer=self.allowance), self.clock, ours)
        self.frames = [text_frame(b"%d " % n, b"x" * 60_000) for n in range(40)]
        self.turn = b"".join(self.frames)  # 2.4 MB: ten times the allowance

    def read_peer(self) -> bytes:
        data = b""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return data
            data += chunk

    def test_a_reader_gets_the_whole_turn_in_order_and_stays(self):
        self.assertTrue(self.member.deliver(self.turn))
        self.assertGreater(self.member._queued, 0)  # views, not a copy
        got = b""
        for _ in range(1000):
            got += self.read_peer()
            if len(got) == len(self.turn):
                break
            self.member.transport.doWrite()
            self.clock.advance(0.001)
        self.assertEqual(got, self.turn)
        self.clock.advance(OVER_GRACE * 2)
        self.assertEqual(self.member.closed, [])

    def test_a_member_that_stops_reading_is_closed_after_the_grace(self):
        self.assertTrue(self.member.deliver(self.turn))
        self.clock.advance(OVER_GRACE - 0.5)
        self.assertEqual(self.member.closed, [])
        self.clock.advance(1)
        self.assertEqual(self.member.closed, [(1008, "too slow")])
        self.assertEqual(self.member._queued, 0)  # the views are let go
        # What it was sent ends with a whole frame: the close can follow.
        transport = self.member.transport
        sent = (
            self.read_peer()
            + bytes(transport.dataBuffer[transport.offset :])
            + b"".join(transport._tempDataBuffer)
        )
        self.assertTrue(self.turn.startswith(sent))
        ends = {sum(len(f) for f in self.frames[:n]) for n in range(41)}
        self.assertIn(len(sent), ends)
