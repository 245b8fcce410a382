"""One port, two jobs: plain GETs get files, upgrades on / and /ws get the chat."""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.support import HANDSHAKE, ServerMixin, connect_raw, parse_server_frames
from webchat.web import default_web_root


class RoutingTests(ServerMixin, TestCase):
    timeout = 20

    def setUp(self):
        return self.start_server()

    @inlineCallbacks
    def request(self, raw: bytes) -> bytes:
        peer = yield connect_raw(self.port.getHost().port)
        peer.transport.write(raw)
        yield peer.lost
        return peer.data

    @inlineCallbacks
    def test_plain_get_on_root_serves_the_page(self):
        reply = yield self.request(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.0 200 "), reply[:80])
        self.assertIn(b"text/html", reply.split(b"\r\n\r\n")[0])
        body = reply.split(b"\r\n\r\n", 1)[1]
        self.assertEqual(body, (default_web_root() / "index.html").read_bytes())

    @inlineCallbacks
    def test_pages_carry_security_headers(self):
        reply = yield self.request(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        head = reply.split(b"\r\n\r\n")[0].lower()
        self.assertIn(b"x-content-type-options: nosniff", head)
        self.assertIn(b"frame-ancestors 'none'", head)
        self.assertIn(b"content-security-policy: default-src 'self';", head)

    @inlineCallbacks
    def test_script_and_style_are_served(self):
        for name, kind in (
            (b"webchat.js", b"javascript"),
            (b"webchat.css", b"text/css"),
        ):
            reply = yield self.request(b"GET /" + name + b" HTTP/1.0\r\n\r\n")
            self.assertTrue(reply.startswith(b"HTTP/1.0 200 "), reply[:80])
            self.assertIn(kind, reply.split(b"\r\n\r\n")[0])

    @inlineCallbacks
    def test_plain_get_on_ws_says_upgrade_required(self):
        reply = yield self.request(b"GET /ws HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertTrue(
            reply.startswith(b"HTTP/1.0 426 Upgrade Required\r\n"), reply[:80]
        )
        self.assertIn(b"\r\nUpgrade: websocket\r\n", reply)

    @inlineCallbacks
    def test_unknown_path_is_404_and_upgrade_elsewhere_is_not_accepted(self):
        reply = yield self.request(b"GET /nope HTTP/1.0\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.0 404 "), reply[:80])
        peer = yield connect_raw(self.port.getHost().port)
        peer.transport.write(HANDSHAKE.replace(b"GET / ", b"GET /elsewhere "))
        reply = yield peer.wait_for(lambda data: b"\r\n\r\n" in data)
        peer.transport.abortConnection()
        self.assertTrue(reply.startswith(b"HTTP/1.1 404 "), reply[:80])

    @inlineCallbacks
    def test_only_rfc_6455_websocket_version_13_is_accepted(self):
        # Version 8 is the 2011 draft (hybi-10) Autobahn also speaks; no
        # browser has sent it for a decade, and the chat is tested against 13
        # only.  RFC 6455 4.4: refuse and say which version we speak.
        for version in (b"8", b"12", b"14"):
            peer = yield connect_raw(self.port.getHost().port)
            peer.transport.write(
                HANDSHAKE.replace(b"Version: 13", b"Version: " + version)
            )
            reply = yield peer.wait_for(lambda data: b"\r\n\r\n" in data)
            peer.transport.abortConnection()
            self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), (version, reply[:80]))
            self.assertIn(b"\r\nSec-WebSocket-Version: 13\r\n", reply)

    @inlineCallbacks
    def test_upgrade_is_accepted_on_root_and_on_ws(self):
        for path in ("/", "/ws"):
            client = yield self.connect(path)
            self.assertIsNone(client.closed_code)

    @inlineCallbacks
    def test_an_upgrade_after_healthz_on_one_connection_joins_the_chat(self):
        alice = yield self.connect()
        peer = yield connect_raw(self.port.getHost().port)
        self.addCleanup(peer.transport.abortConnection)
        peer.transport.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = yield peer.wait_for(lambda data: data.endswith(b"}\n"))
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:80])
        peer.data = b""
        peer.transport.write(HANDSHAKE)  # the same connection, kept alive
        reply = yield peer.wait_for(lambda data: b"\r\n\r\n" in data)
        self.assertTrue(reply.startswith(b"HTTP/1.1 101 "), reply[:80])
        alice.send_text("hello, second request")
        yield peer.wait_for(lambda _: parse_server_frames(peer.body()))
        self.assertEqual(
            parse_server_frames(peer.body()), [(0x1, b"id 1: hello, second request")]
        )

    @inlineCallbacks
    def test_garbage_gets_400(self):
        reply = yield self.request(b"\x16\x03\x01 not http at all\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), reply[:80])
