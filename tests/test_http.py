"""The plain-HTTP side under hostile or odd requests, over real sockets.

Each test keeps Alice and Bob chatting (see ``LimitsMixin``) and checks what a
client sees on the wire: the status, the headers, the connection closing, and
the server's own log line and counter.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

from twisted.internet import reactor, tcp
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import HANDSHAKE, Twistd, client_frame, connect_raw, deferLater, slow
from tests.test_limits import LimitsMixin
from tests.test_timeouts import PEER, FakeClockMixin, Transport
from webchat.access import AccessPolicy
from webchat.limits import MAX_REQUESTS_PER_CONNECTION, Limits
from webchat.metrics import MetricsPage, make_registry
from webchat.web import default_web_root, make_site

PAGE = (default_web_root() / "index.html").read_bytes()


def open_fds() -> int:
    """File descriptors this process (the server's, in these tests) holds."""
    return len(os.listdir("/proc/self/fd"))


class AllLogs:
    """Every log event, Twisted's own included (tracebacks, warnings)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    def text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def failures(self) -> list[dict]:
        return [e for e in self.events if "log_failure" in e]


class HTTPMixin(LimitsMixin):
    timeout = 30

    @inlineCallbacks
    def setUp(self):
        self.all_logs = AllLogs()
        globalLogPublisher.addObserver(self.all_logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.all_logs)
        yield super().setUp()

    @inlineCallbacks
    def exchange(self, raw: bytes, port: int | None = None, within: float = 5.0):
        """Send ``raw``; return everything received until the server closes."""
        peer = yield connect_raw(port or self.port.getHost().port)
        self.addCleanup(peer.transport.abortConnection)
        peer.transport.write(raw)
        yield peer.lost.addTimeout(within, reactor)
        return peer.data

    def webchat_lines(self, start: str) -> list[str]:
        return [line for line in self.logs.lines if line.startswith(start)]


class RangeTests(HTTPMixin, TestCase):
    @inlineCallbacks
    def test_a_multi_range_request_gets_the_whole_page(self):
        # 300 open-ended ranges: Twisted's multi-range producer failed on these
        # mid-response (a negative read length), leaving the file open.
        ranges = ",".join(f"{i}-" for i in range(0, 1800, 6))
        before = open_fds()
        reply = yield self.exchange(
            f"GET /index.html HTTP/1.1\r\nHost: x\r\nRange: bytes={ranges}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head[:80])
        self.assertEqual(body, PAGE)
        self.assertIn(b"\r\nAccept-Ranges: none", head)
        yield deferLater(0.05)
        self.assertEqual(open_fds(), before)  # no file left open
        self.assertEqual(self.all_logs.failures(), [])
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_a_single_range_is_ignored_too(self):
        reply = yield self.exchange(
            b"GET /index.html HTTP/1.0\r\nRange: bytes=0-9\r\n\r\n"
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200 "), head[:80])
        self.assertEqual(body, PAGE)
        yield self.assert_bystanders_chat()


class ResponseDeadlineTests(HTTPMixin, TestCase):
    limits = Limits(rate_limit=0, response_timeout=1.0)

    @inlineCallbacks
    def test_a_client_that_stops_reading_is_cut_and_its_file_closed(self):
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        with open(root / "big.bin", "wb") as big:
            big.truncate(64 * 1024 * 1024)  # far more than any socket buffers
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        files = yield endpoint.listen(make_site(self.factory, web_root=root))
        self.addCleanup(files.stopListening)

        before = open_fds()
        reader = socket.socket()
        self.addCleanup(reader.close)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", files.getHost().port))
        reader.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        # Being served: our socket, the server's, and the file it reads.
        for _ in range(50):
            yield deferLater(0.02)
            if open_fds() >= before + 3:
                break
        self.assertGreaterEqual(open_fds(), before + 3)
        yield self.assert_bystanders_chat()

        for _ in range(100):  # the deadline is 1 s; give it up to 5
            yield deferLater(0.05)
            if open_fds() == before + 1:
                break
        self.assertEqual(open_fds(), before + 1)  # only our own socket left
        self.assertEqual(self.factory.dropped["response_timeout"], 1)
        self.assertEqual(
            self.webchat_lines("Aborted response"),
            ["Aborted response to 127.0.0.1: not sent within 1 s"],
        )
        reader.setblocking(False)
        received = 0
        with self.assertRaises((ConnectionResetError, BlockingIOError)):
            while True:  # drain what had reached us, then see the reset
                chunk = reader.recv(1 << 20)
                if not chunk:
                    raise ConnectionResetError("closed")
                received += len(chunk)
        self.assertLess(received, 64 * 1024 * 1024)
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_a_prompt_response_keeps_the_connection(self):
        peer = yield connect_raw(self.port.getHost().port)
        self.addCleanup(peer.transport.abortConnection)
        for _ in range(2):
            peer.data = b""
            peer.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            yield peer.wait_for(lambda d: d.endswith(b"}\n"))
            self.assertTrue(peer.data.startswith(b"HTTP/1.1 200 "))
        yield deferLater(1.3)  # past the response deadline: nothing pending
        self.assertFalse(peer.lost.called)
        self.assertEqual(self.factory.dropped["response_timeout"], 0)


class BodyTests(HTTPMixin, TestCase):
    @inlineCallbacks
    def assert_refused_unread(self, raw: bytes, status: bytes):
        before = open_fds()
        reply = yield self.exchange(raw, within=3.0)
        self.assertTrue(reply.startswith(b"HTTP/1.1 " + status), reply[:80])
        self.assertIn(b"\r\nConnection: close\r\n", reply)
        yield deferLater(0.05)
        # Nothing spooled: no temporary file is held open.
        self.assertEqual(open_fds(), before)
        self.assertEqual(self.factory.dropped["request_body"], 1)
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_a_post_announcing_3_gb_is_refused_at_once(self):
        yield self.assert_refused_unread(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000000\r\n\r\n"
            + b"x" * 1000,
            b"405 ",
        )
        self.assertEqual(
            self.webchat_lines("Refused request"),
            ["Refused request from 127.0.0.1: POST with a body (HTTP 405)"],
        )

    @inlineCallbacks
    def test_a_chunked_get_is_refused_at_once(self):
        yield self.assert_refused_unread(
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n",
            b"413 ",
        )

    @inlineCallbacks
    def test_a_post_without_a_body_still_gets_405(self):
        reply = yield self.exchange(b"POST / HTTP/1.0\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.0 405 "), reply[:80])
        self.assertEqual(self.factory.dropped["request_body"], 0)


class OddRequestTests(HTTPMixin, TestCase):
    @inlineCallbacks
    def test_a_nul_in_the_path_is_404_without_a_traceback(self):
        reply = yield self.exchange(b"GET /index.html%00.txt HTTP/1.0\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.0 404 "), reply[:80])
        self.assertEqual(self.all_logs.failures(), [])
        self.assertNotIn("Traceback", self.all_logs.text())
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_a_header_line_over_16_kb_gets_431_and_one_log_line(self):
        reply = yield self.exchange(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        )
        self.assertTrue(reply.startswith(b"HTTP/1.1 431 "), reply[:80])
        self.assertEqual(
            self.webchat_lines("Refused request"),
            [
                "Refused request from 127.0.0.1: a header line over 16384 bytes "
                "(HTTP 431)"
            ],
        )
        self.assertEqual(self.factory.dropped["header_too_large"], 1)
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_an_upgrade_with_a_20_kb_header_in_one_read_gets_431_too(self):
        reply = yield self.exchange(
            HANDSHAKE.replace(b"\r\n\r\n", b"\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        )
        self.assertTrue(reply.startswith(b"HTTP/1.1 431 "), reply[:80])
        self.assertEqual(
            self.webchat_lines("Refused request"),
            [
                "Refused request from 127.0.0.1: a header line over 16384 bytes "
                "(HTTP 431)"
            ],
        )
        self.assertEqual(self.factory.dropped["header_too_large"], 1)
        self.assertEqual(len(self.factory.rooms), 2)  # Alice and Bob only
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_head_healthz_is_quiet_and_says_the_length(self):
        get = yield self.exchange(b"GET /healthz HTTP/1.0\r\n\r\n")
        head = yield self.exchange(b"HEAD /healthz HTTP/1.0\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200 "), head[:80])
        self.assertTrue(head.endswith(b"\r\n\r\n"), head)  # no body
        # The uptime in the body may gain a digit between the two requests.
        got = len(get.split(b"\r\n\r\n", 1)[1])
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
        self.assertIsNotNone(length, head)
        self.assertLessEqual(abs(int(length.group(1)) - got), 1)
        self.assertNotIn("message body", self.all_logs.text())

    @inlineCallbacks
    def test_no_server_header_names_a_library(self):
        page = yield self.exchange(b"GET / HTTP/1.0\r\n\r\n")
        self.assertIn(b"\r\nServer: webchat\r\n", page.split(b"\r\n\r\n")[0])
        head, _ = yield self.handshake()
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(b"\r\nServer: webchat\r\n", head + b"\r\n")
        refused, _ = yield self.handshake(b"Origin: http://evil.example\r\n")
        for reply in (page, head, refused):
            self.assertNotIn(b"Twisted", reply)
            self.assertNotIn(b"Autobahn", reply)


class UpgradeThroughTheWebTests(HTTPMixin, TestCase):
    """Upgrades the doorway leaves to twisted.web, with frames right behind."""

    @inlineCallbacks
    def assert_frames_arrive(self, prefix: bytes, request_line: bytes):
        peer = yield connect_raw(self.port.getHost().port)
        self.addCleanup(peer.transport.abortConnection)
        handshake = HANDSHAKE.replace(b"GET / HTTP/1.1", request_line)
        hello = client_frame(0x1, b"hello in the same packet")
        peer.transport.write(prefix + handshake + hello)
        got = yield self.bob.received.get().addTimeout(5, reactor)
        self.assertEqual(got, "id 3: hello in the same packet")
        yield peer.wait_for(lambda d: b"HTTP/1.1 101 " in d).addTimeout(5, reactor)
        yield self.assert_bystanders_chat()

    def test_an_encoded_path(self):
        return self.assert_frames_arrive(b"", b"GET /%77s HTTP/1.1")

    def test_an_absolute_uri(self):
        return self.assert_frames_arrive(b"", b"GET http://127.0.0.1/ws HTTP/1.1")

    def test_after_a_keep_alive_request(self):
        return self.assert_frames_arrive(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"GET / HTTP/1.1"
        )

    def test_after_the_page_on_a_keep_alive_connection(self):
        return self.assert_frames_arrive(
            b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /ws HTTP/1.1"
        )

    @inlineCallbacks
    def test_an_http_1_0_upgrade_is_refused(self):
        reply = yield self.exchange(HANDSHAKE.replace(b"HTTP/1.1", b"HTTP/1.0"))
        self.assertTrue(
            reply.startswith(b"HTTP/1.0 426 Upgrade Required\r\n"), reply[:80]
        )
        self.assertEqual(len(self.factory.rooms), 2)  # Alice and Bob only
        self.assertEqual(self.factory.refused["http_version"], 1)
        self.assertEqual(
            self.webchat_lines("Refused connection"),
            ["Refused connection from 127.0.0.1: WebSocket over HTTP/1.0 (HTTP 426)"],
        )
        yield self.assert_bystanders_chat()


class PipelineTests(HTTPMixin, TestCase):
    @inlineCallbacks
    def test_a_long_pipeline_is_cut_at_the_request_limit(self):
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        reply = yield self.exchange(request * (MAX_REQUESTS_PER_CONNECTION + 50))
        heads = re.findall(rb"HTTP/1\.1 [^\r]*\r\n(?:[^\r]+\r\n)*", reply)
        self.assertEqual(len(heads), MAX_REQUESTS_PER_CONNECTION)
        self.assertTrue(all(head.startswith(b"HTTP/1.1 200 ") for head in heads))
        self.assertIn(b"\r\nConnection: close", heads[-1])
        self.assertNotIn(b"Connection: close", heads[-2])
        self.assertEqual(
            self.webchat_lines("Closing connection"),
            ["Closing connection from 127.0.0.1 after its 100th request"],
        )
        self.assertEqual(self.factory.dropped["request_limit"], 1)
        yield self.assert_bystanders_chat()


class NullOriginTests(HTTPMixin, TestCase):
    @inlineCallbacks
    def test_null_origin_is_refused_by_our_policy(self):
        head, _ = yield self.handshake(b"Origin: null\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403 "), head)
        self.assertEqual(self.factory.refused["origin"], 1)
        self.assertEqual(
            self.webchat_lines("Refused connection"),
            [
                "Refused connection from 127.0.0.1: origin null not allowed "
                "(HTTP 403; start webchat with --allowed-origin null to allow it)"
            ],
        )
        yield self.assert_bystanders_chat()


class NullOriginAllowedTests(HTTPMixin, TestCase):
    @property
    def access(self) -> AccessPolicy:  # built late: main refused "null" here
        return AccessPolicy.from_options(["null"])

    @inlineCallbacks
    def test_null_origin_can_be_allowed_by_name(self):
        head, _ = yield self.handshake(b"Origin: null\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        head, _ = yield self.handshake(b"Origin: http://evil.example\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403 "), head)
        yield self.assert_bystanders_chat()


class NullOriginStarTests(HTTPMixin, TestCase):
    access = AccessPolicy.from_options(["*"])

    @inlineCallbacks
    def test_star_allows_null_origin(self):
        head, _ = yield self.handshake(b"Origin: null\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        yield self.assert_bystanders_chat()


class MetricsAccessTests(HTTPMixin, TestCase):
    access = AccessPolicy.from_options([], ["127.0.0.1"])

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        metrics = MetricsPage(make_registry(self.factory))
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        site = make_site(self.factory, metrics=metrics)
        self.chat_port = yield endpoint.listen(site)
        self.addCleanup(self.chat_port.stopListening)

    @inlineCallbacks
    def test_metrics_on_the_chat_port_only_for_local_and_proxy_addresses(self):
        port = self.chat_port.getHost().port
        local = yield self.exchange(b"GET /metrics HTTP/1.0\r\n\r\n", port)
        self.assertTrue(local.startswith(b"HTTP/1.0 200 "), local[:80])
        self.assertIn(b"webchat_connections 2.0", local)
        # A visitor from the internet, relayed by the (trusted) proxy.
        relayed = yield self.exchange(
            b"GET /metrics HTTP/1.0\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n", port
        )
        self.assertTrue(relayed.startswith(b"HTTP/1.0 404 "), relayed[:80])
        self.assertNotIn(b"webchat_", relayed)
        # The proxy host itself (e.g. Prometheus there) still may.
        proxied_local = yield self.exchange(
            b"GET /metrics HTTP/1.0\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n", port
        )
        self.assertTrue(proxied_local.startswith(b"HTTP/1.0 200 "))
        yield self.assert_bystanders_chat()


class ResponseDeadlineClockTests(FakeClockMixin, SynchronousTestCase):
    """The same deadline on a fake clock: exactly when it fires, and when not."""

    handshake_timeout = 10
    response_timeout = 30

    def setUp(self):
        self.make_factory(
            handshake_timeout=self.handshake_timeout,
            response_timeout=self.response_timeout,
        )
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        (root / "big.bin").write_bytes(b"x" * (1 << 20))
        self.site = make_site(self.factory, web_root=root)
        self.channel = self.site.buildProtocol(PEER)
        self.transport = Transport(peerAddress=PEER)
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.disconnect)

    def disconnect(self) -> None:
        """What a real transport does once aborted: stop its producer, report."""
        if self.transport.producer is not None:
            self.transport.producer.stopProducing()
        self.channel.connectionLost(Failure(ConnectionDone()))

    def test_a_response_not_sent_in_time_is_aborted(self):
        self.channel.dataReceived(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        # The transport never asks the file's producer for more: like a client
        # that stopped reading.
        self.assertLess(len(self.transport.value()), 1 << 20)
        self.clock.advance(29.9)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.factory.dropped["response_timeout"], 1)
        self.assertIn(
            "Aborted response to 192.0.2.7: not sent within 30 s", self.logs.lines
        )

    def test_after_a_prompt_response_the_request_deadline_runs_again(self):
        self.clock.advance(9)
        self.channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.transport.value().endswith(b"}\n"))
        self.clock.advance(9.9)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(0.1)  # 10 s idle after the response: the next request
        self.assertTrue(self.transport.aborted)
        # Idle, not half-sent: closed quietly, as a browser's kept-alive socket.
        self.assertEqual(self.factory.dropped["idle_preconnect"], 1)
        self.assertEqual(self.factory.dropped["response_timeout"], 0)

    def test_requests_on_a_kept_alive_connection_set_no_timer_each(self):
        made = []
        call_later = self.clock.callLater
        self.clock.callLater = lambda *a, **kw: made.append(a) or call_later(*a, **kw)
        for _ in range(50):
            self.clock.advance(1)
            # The doorway hands the connection to the HTTP channel at once.
            receiver = self.transport.protocol or self.channel
            receiver.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(self.transport.value().endswith(b"}\n"))
            self.transport.clear()
        # One timer, set again each time the shorter timeout passes (every
        # 10 s here), not one or more per request.
        limits = self.factory.limits
        shortest = min(limits.handshake_timeout, limits.response_timeout)
        self.assertLessEqual(len(made), 50 // shortest + 1)
        self.clock.advance(9.9)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(0.1)  # 10 s after the last response, as ever
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.factory.dropped["idle_preconnect"], 1)


class ShortResponseDeadlineClockTests(ResponseDeadlineClockTests):
    """A response deadline sooner than the request deadline still holds."""

    response_timeout = 2

    def test_a_response_not_sent_in_time_is_aborted(self):
        self.clock.advance(5)
        self.channel.dataReceived(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(1.9)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(0.1)  # 2 s after the request, before the 10 s one
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.factory.dropped["response_timeout"], 1)
        self.assertIn(
            "Aborted response to 192.0.2.7: not sent within 2 s", self.logs.lines
        )


class _SocketTransport(tcp.Connection):
    """Twisted's TCP transport on a socket of our own, with a peer address."""

    def getPeer(self):
        return PEER

    def getHost(self):
        return PEER


class DirectAnswerTests(FakeClockMixin, SynchronousTestCase):
    """
    A plain HTTP answer is on the wire when the request's turn ends, in one
    write: not left in Twisted's buffer for a later reactor iteration (the
    reactor here is a MemoryReactor, which never gets to write).
    """

    def setUp(self):
        self.make_factory()
        # A real TCP connection on loopback (twisted.web sets TCP_NODELAY).
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        self.theirs = socket.create_connection(listener.getsockname())
        self.addCleanup(self.theirs.close)
        ours, _ = listener.accept()
        ours.setblocking(False)
        self.addCleanup(ours.close)
        site = make_site(self.factory)
        doorway = site.buildProtocol(PEER)
        self.transport = _SocketTransport(ours, doorway, reactor=MemoryReactor())
        self.transport.connected = True
        doorway.makeConnection(self.transport)
        self.theirs.settimeout(0.5)

    def answers(self, request: bytes) -> bytes:
        self.transport.protocol.dataReceived(request)
        return self.theirs.recv(1 << 20)

    def test_the_answer_is_sent_in_the_turn_that_read_the_request(self):
        reply = self.answers(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply[:80])
        self.assertTrue(reply.endswith(b"}\n"), reply[-80:])
        self.assertIn(b"\r\nServer: webchat\r\n", reply)

    def test_an_answer_without_a_body_is_sent_too(self):
        reply = self.answers(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply[:80])
        self.assertTrue(reply.endswith(b"\r\n\r\n"), reply[-80:])

    def test_pipelined_requests_are_answered_in_order(self):
        reply = self.answers(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        for _ in range(10):
            if reply.count(b"HTTP/1.1 ") >= 2:
                break
            reply += self.theirs.recv(1 << 20)
        first, second = reply.split(b"HTTP/1.1 ")[1:]
        self.assertTrue(first.startswith(b"200 "), first[:40])
        self.assertTrue(second.startswith(b"404 "), second[:40])


@slow
class TwistdHTTPTests(SynchronousTestCase):
    """The same defences in the real twistd, its descriptors read from /proc."""

    def test_stalled_download_and_huge_post_leave_no_descriptor_behind(self):
        workdir = Path(self.mktemp()).resolve()
        root = workdir / "web"
        root.mkdir(parents=True)
        (root / "index.html").write_bytes(PAGE)
        with open(root / "big.bin", "wb") as big:
            big.truncate(64 * 1024 * 1024)
        server = Twistd(
            workdir,
            "--port", "tcp:0:interface=127.0.0.1",
            "--web-root", str(root),
            "--response-timeout", "1",
        )  # fmt: skip
        self.addCleanup(server.stop, signal.SIGKILL)
        log = server.wait_for_log("Site starting on")
        port = int(re.search(r"Site starting on (\d+)", log).group(1))
        fd_dir = Path(f"/proc/{server.process.pid}/fd")

        def fds() -> int:
            return len(list(fd_dir.iterdir()))

        def fds_settled() -> int:
            """The count once the server has processed its side of a close."""
            deadline = time.monotonic() + 5
            while fds() != before and time.monotonic() < deadline:
                time.sleep(0.05)
            return fds()

        def get_page() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as page:
                page.sendall(b"GET / HTTP/1.0\r\n\r\n")
                reply = b""
                while chunk := page.recv(65536):
                    reply += chunk
            return reply

        # Counted after a first request has been served, so whatever the
        # server opens once, lazily, is in the baseline.
        self.assertTrue(get_page().endswith(PAGE))
        time.sleep(0.2)
        before = fds()
        with socket.socket() as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", port))
            reader.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            server.wait_for_log("Aborted response to 127.0.0.1: not sent within 1 s")
            self.assertEqual(fds_settled(), before)  # socket and file both closed

        with socket.create_connection(("127.0.0.1", port), timeout=5) as poster:
            poster.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000000\r\n\r\n"
                + b"x" * 1000
            )
            reply = b""
            while chunk := poster.recv(4096):  # until the server closes
                reply += chunk
        self.assertTrue(reply.startswith(b"HTTP/1.1 405 "), reply[:80])
        server.wait_for_log("Refused request from 127.0.0.1: POST with a body")
        self.assertEqual(fds_settled(), before)
        self.assertTrue(get_page().endswith(PAGE))
        self.assertNotIn("Traceback", server.log())
