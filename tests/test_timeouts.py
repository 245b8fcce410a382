"""Time-dependent rules on a fake clock: pings, handshake deadline, shutdown
grace, closing handshakes.

No sockets and no sleeping: the server's reactor is a ``Clock`` and its
connections are ``StringTransport``s, so each test says exactly when time
passes and looks at exactly the bytes the server wrote.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.support import HANDSHAKE, LogCapture, client_frame, parse_server_frames
from webchat.chat import WebChatFactory
from webchat.limits import Limits
from webchat.service import ChatService
from webchat.tap import Options
from webchat.web import make_site

PEER = IPv4Address("TCP", "192.0.2.7", 50000)


class Transport(StringTransport):
    """A StringTransport that, like TCP's, says whether it was aborted."""

    aborted = False
    protocol = None  # WebSocketResource swaps this on takeover

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class FakeClockMixin:
    def make_factory(self, **limits) -> WebChatFactory:
        self.clock = Clock()
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)
        self.factory = WebChatFactory(self.clock, limits=Limits(**limits))
        return self.factory

    def open_connection(self):
        protocol = self.factory.buildProtocol(PEER)
        transport = Transport(peerAddress=PEER)
        protocol.makeConnection(transport)
        protocol.dataReceived(HANDSHAKE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        transport.clear()
        return protocol, transport


class KeepaliveTests(FakeClockMixin, SynchronousTestCase):
    def setUp(self):
        self.make_factory(ping_interval=30, ping_timeout=10)

    def test_silent_peer_is_pinged_then_dropped(self):
        _protocol, transport = self.open_connection()
        self.clock.advance(29.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        self.assertEqual(parse_server_frames(transport.value()), [(0x9, b"")])
        self.clock.advance(9.9)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(transport.aborted)
        # Gone for everyone at once, not when (if ever) TCP notices.
        self.assertEqual(len(self.factory.rooms), 0)
        self.assertEqual(self.factory.dropped["ping_timeout"], 1)
        self.assertIn(
            "An error has occurred: connection 1 from 192.0.2.7: "
            "no answer to ping within 10 s",
            self.logs.lines,
        )

    def test_a_pong_keeps_the_connection_and_restarts_the_interval(self):
        protocol, transport = self.open_connection()
        self.clock.advance(30)
        transport.clear()
        self.clock.advance(5)
        protocol.dataReceived(client_frame(0xA, b""))
        self.clock.advance(10)
        self.assertFalse(transport.aborted)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(20)  # 30 s after the pong: the next ping
        self.assertEqual(parse_server_frames(transport.value()), [(0x9, b"")])

    def test_a_chatty_peer_is_never_pinged(self):
        protocol, transport = self.open_connection()
        for _ in range(20):
            self.clock.advance(20)
            protocol.dataReceived(client_frame(0x1, b"still here"))
        frames = parse_server_frames(transport.value())
        self.assertNotIn(0x9, [opcode for opcode, _ in frames])
        self.assertFalse(transport.aborted)


class HandshakeDeadlineTests(FakeClockMixin, SynchronousTestCase):
    def setUp(self):
        self.make_factory(handshake_timeout=10)
        self.site = make_site(self.factory)

    def connect(self):
        channel = self.site.buildProtocol(PEER)
        transport = Transport(peerAddress=PEER)
        channel.makeConnection(transport)
        return channel, transport

    def test_slowloris_is_cut_off_at_the_deadline(self):
        channel, transport = self.connect()
        request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 20
        for byte in request[:9]:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(1)  # a byte a second: never idle, never done
        self.assertFalse(transport.aborted)
        self.clock.advance(1)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.factory.dropped["handshake_timeout"], 1)
        self.assertIn(
            "Closed connection from 192.0.2.7: no complete request within 10 s",
            self.logs.lines,
        )

    def test_a_connection_that_sent_nothing_is_closed_quietly(self):
        # What browsers do on every visit: open a spare connection, never use it.
        _, transport = self.connect()
        self.clock.advance(10)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.factory.dropped["idle_preconnect"], 1)
        self.assertEqual(self.factory.dropped["handshake_timeout"], 0)
        (event,) = self.logs.events
        self.assertEqual(event["log_level"], LogLevel.debug)
        self.assertEqual(
            formatEvent(event),
            "Closed idle connection from 192.0.2.7: no request within 10 s",
        )

    def test_an_idle_keep_alive_connection_is_closed_quietly(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b" 200 ", transport.value())
        self.clock.advance(10)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.factory.dropped["idle_preconnect"], 1)
        self.assertEqual(self.factory.dropped["handshake_timeout"], 0)
        self.assertEqual(
            [e["log_level"] for e in self.logs.events if "Closed" in formatEvent(e)],
            [LogLevel.debug],
        )

    def test_a_half_sent_second_request_is_still_a_warning(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        # The doorway has handed the connection to the HTTP channel by now.
        transport.protocol.dataReceived(b"GET / HTTP/1.1\r\nHo")
        self.clock.advance(10)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.factory.dropped["handshake_timeout"], 1)
        self.assertEqual(self.factory.dropped["idle_preconnect"], 0)
        (event,) = [e for e in self.logs.events if "Closed" in formatEvent(e)]
        self.assertEqual(event["log_level"], LogLevel.warn)

    def test_a_complete_upgrade_is_not_cut_off(self):
        channel, transport = self.connect()
        self.clock.advance(9)
        channel.dataReceived(HANDSHAKE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        self.clock.advance(60)
        self.assertFalse(transport.aborted)
        self.assertEqual(len(self.factory.rooms), 1)


class ShutdownGraceTests(FakeClockMixin, SynchronousTestCase):
    def setUp(self):
        self.make_factory(shutdown_grace=5)

    def test_clients_that_answer_close_cleanly(self):
        protocol, transport = self.open_connection()
        done = self.factory.close_all()
        frames = parse_server_frames(transport.value())
        self.assertEqual(frames, [(0x8, b"\x03\xe9server shutting down")])
        self.assertNoResult(done)
        protocol.dataReceived(client_frame(0x8, b"\x03\xe9"))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(done), 1)

    def test_clients_that_do_not_answer_are_dropped_after_the_grace(self):
        _, silent = self.open_connection()
        done = self.factory.close_all()
        self.clock.advance(4.9)
        self.assertNoResult(done)
        self.assertFalse(silent.aborted)
        self.clock.advance(0.1)
        self.assertTrue(silent.aborted)
        self.assertEqual(self.successResultOf(done), 0)

    def test_a_client_may_take_most_of_the_grace_to_answer(self):
        protocol, transport = self.open_connection()
        done = self.factory.close_all()
        self.clock.advance(4.5)  # far past Autobahn's own 1 s close timeout
        self.assertFalse(transport.aborted)
        protocol.dataReceived(client_frame(0x8, b"\x03\xe9"))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(done), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CloseTimeoutTests(FakeClockMixin, SynchronousTestCase):
    def setUp(self):
        self.make_factory()

    def test_a_client_closed_for_cause_has_one_second_to_answer(self):
        protocol, transport = self.open_connection()
        protocol.dataReceived(client_frame(0x2, b"binary"))
        (frame,) = parse_server_frames(transport.value())
        self.assertEqual(frame[0], 0x8)
        self.assertEqual(frame[1][:2], (1003).to_bytes(2, "big"))
        self.clock.advance(0.9)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(transport.aborted)

    def test_an_answer_in_time_cancels_the_timer(self):
        protocol, _transport = self.open_connection()
        protocol.dataReceived(client_frame(0x2, b"binary"))
        protocol.dataReceived(client_frame(0x8, b"\x03\xeb"))
        self.assertTrue(protocol.wasClean)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class UnfinishedMessageTests(FakeClockMixin, SynchronousTestCase):
    def setUp(self):
        self.make_factory(ping_interval=30, ping_timeout=10)

    def test_a_message_unfinished_after_the_ping_interval_gets_1008(self):
        protocol, transport = self.open_connection()
        protocol.dataReceived(client_frame(0x1, b"a", fin=False))
        for _ in range(29):  # a frame a second: never silent, never pinged
            self.clock.advance(1)
            protocol.dataReceived(client_frame(0x0, b"b", fin=False))
        self.clock.advance(0.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        self.assertEqual(
            parse_server_frames(transport.value()),
            [(0x8, b"\x03\xf0message unfinished after 30 s")],
        )
        self.assertEqual(self.factory.dropped["message_timeout"], 1)
        self.assertIn(
            "An error has occurred: connection 1 from 192.0.2.7: "
            "1008 message unfinished after 30 s",
            self.logs.lines,
        )

    def test_one_frame_trickled_a_byte_a_second_gets_1008_too(self):
        protocol, transport = self.open_connection()
        frame = client_frame(0x1, b"x" * 100)  # FIN=1, but slow to arrive
        protocol.dataReceived(frame[:7])  # header, mask and one byte
        for byte in frame[7:36]:  # a byte a second: never silent
            self.clock.advance(1)
            protocol.dataReceived(bytes([byte]))
        self.clock.advance(0.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        self.assertEqual(
            parse_server_frames(transport.value()),
            [(0x8, b"\x03\xf0message unfinished after 30 s")],
        )
        self.assertEqual(self.factory.dropped["message_timeout"], 1)

    def test_a_frame_that_arrives_whole_gets_no_timer(self):
        protocol, _transport = self.open_connection()
        frame = client_frame(0x1, b"x" * 100)
        protocol.dataReceived(frame)
        self.assertIsNone(protocol._message_deadline)  # the common case: free
        protocol.dataReceived(frame[:-1])
        self.assertIsNotNone(protocol._message_deadline)
        protocol.dataReceived(frame[-1:])
        self.assertIsNone(protocol._message_deadline)

    def test_a_message_finished_in_time_is_relayed_and_forgotten(self):
        protocol, transport = self.open_connection()
        _other, received = self.open_connection()
        protocol.dataReceived(client_frame(0x1, b"a", fin=False))
        self.clock.advance(29)
        protocol.dataReceived(client_frame(0x0, b"z", fin=True))
        self.clock.advance(0)  # the end-of-turn flush
        self.assertEqual(parse_server_frames(received.value()), [(0x1, b"id 1: az")])
        self.clock.advance(5)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(sum(self.factory.dropped.values()), 0)


class FrameBudgetTests(FakeClockMixin, SynchronousTestCase):
    """What a browser does at the message rate limit never trips the budgets."""

    def setUp(self):
        self.make_factory()  # every default

    def test_a_browser_at_the_message_rate_limit_stays(self):
        limits = self.factory.limits
        protocol, transport = self.open_connection()
        largest = b"x" * limits.max_message_size
        protocol.dataReceived(client_frame(0x1, largest) * limits.rate_burst)
        # Ten seconds at the limit after a full burst: long past every
        # bucket's burst, so this is the steady state (each bucket's rate is
        # at least the message rate's, and the largest messages are sent).
        for second in range(10):
            for _ in range(int(limits.rate_limit)):
                self.clock.advance(1 / limits.rate_limit)
                protocol.dataReceived(client_frame(0x1, largest))
            if second % 5 == 0:
                protocol.dataReceived(client_frame(0xA, b""))  # pongs too
        self.assertNotIn(0x8, [op for op, _ in parse_server_frames(transport.value())])
        self.assertEqual(sum(self.factory.dropped.values()), 0)


class KeepAliveDeadlineTests(FakeClockMixin, SynchronousTestCase):
    """
    The handshake deadline on the *second* request of a keep-alive connection:
    it runs again from the first response, and stops once a request is in.
    """

    def setUp(self):
        self.make_factory(handshake_timeout=10, ping_interval=0)
        self.site = make_site(self.factory)
        self.channel = self.site.buildProtocol(PEER)
        self.transport = Transport(peerAddress=PEER)
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 "))
        self.transport.clear()

    def test_an_upgrade_as_the_second_request_completes_and_stays(self):
        self.clock.advance(9)
        self.transport.protocol.dataReceived(HANDSHAKE)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 101 "))
        self.assertEqual(len(self.factory.rooms), 1)
        self.clock.advance(60)
        self.assertFalse(self.transport.aborted)
        self.assertEqual(len(self.factory.rooms), 1)
        self.assertEqual(self.factory.dropped["handshake_timeout"], 0)

    def test_slowloris_on_the_second_request_is_cut_off_at_the_deadline(self):
        request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 20
        for byte in request[:9]:
            self.transport.protocol.dataReceived(bytes([byte]))
            self.clock.advance(1)  # a byte a second: never idle, never done
        self.assertFalse(self.transport.aborted)
        self.clock.advance(1)
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.factory.dropped["handshake_timeout"], 1)
        self.assertIn(
            "Closed connection from 192.0.2.7: no complete request within 10 s",
            self.logs.lines,
        )


class ShutdownGraceOptionTests(FakeClockMixin, SynchronousTestCase):
    """``--shutdown-grace`` as an operator passes it, through to the drain."""

    def make_service(self, *argv: str) -> ChatService:
        options = Options()
        options.parseOptions(list(argv))
        self.clock = Clock()
        self.factory = WebChatFactory(self.clock, limits=options.limits())
        return ChatService(self.factory)

    def test_a_grace_of_2_seconds_drops_a_silent_client_after_2_seconds(self):
        service = self.make_service("--shutdown-grace", "2")
        service.startService()
        _, silent = self.open_connection()
        done = service.stopService()
        self.assertEqual(
            parse_server_frames(silent.value()),
            [(0x8, b"\x03\xe9server shutting down")],
        )
        self.clock.advance(1.9)
        self.assertNoResult(done)
        self.assertFalse(silent.aborted)
        self.clock.advance(0.1)
        self.assertTrue(silent.aborted)
        self.successResultOf(done)
