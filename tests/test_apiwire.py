"""The server API's lean HTTP/1.1 path (webchat.apiwire), on real sockets.

tests/test_api.py is the API's spec (every route, status and refusal) and
runs through this path too; here is what is the path's own: keep-alive and
pipelining, a head arriving in pieces, the deadlines on a kept-alive
connection, heads over the limit, the request cap, and the hand-over to
twisted.web of what it does not take, each with a bystander pair chatting.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import connect_raw, deferLater
from tests.test_api import KEY, BystanderApiMixin, Response
from tests.test_timeouts import PEER, FakeClockMixin, Transport
from webchat.api import ApiAnswer, ServerApi
from webchat.apiwire import ApiWire
from webchat.history.sqlite import SQLiteHistory
from webchat.limits import MAX_REQUESTS_PER_CONNECTION, Limits
from webchat.web import make_site


def keep_alive(method: str, path: str, body: bytes | None = None, **extra: str):
    """A request that leaves the connection open (unlike test_api's)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"Authorization: Bearer {KEY}"]
    lines += [f"{name}: {value}" for name, value in extra.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def publish_bytes(room: str, text: str, **extra: str) -> bytes:
    body = json.dumps({"text": text}).encode()
    return keep_alive("POST", f"/api/rooms/{room}/messages", body, **extra)


def responses(data: bytes) -> list[Response]:
    """Every response in ``data``, in order (each with a Content-Length)."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        found.append(Response(head + b"\r\n\r\n" + rest[:length]))
        data = rest[length:]
    return found


def complete(count: int):
    """A test on a peer's data: ``count`` whole responses have arrived."""
    return lambda data: _whole(data) and len(responses(data)) >= count


def _whole(data: bytes) -> bool:
    """Does ``data`` end where a response ends?"""
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return False
        data = rest[length:]
    return True


class LeanPathMixin(BystanderApiMixin):
    limits = Limits(rate_limit=0, handshake_timeout=0.5)

    @inlineCallbacks
    def peer(self):
        peer = yield connect_raw(self.api_port.getHost().port)
        self.addCleanup(lambda: peer.lost.called or peer.transport.abortConnection())
        return peer


class KeepAliveTests(LeanPathMixin, TestCase):
    @inlineCallbacks
    def test_two_publishes_pipelined_in_one_write_are_answered_in_order(self):
        member = yield self.json_client("/ws/p")
        yield member.received.get()  # welcome
        peer = yield self.peer()
        peer.transport.write(publish_bytes("p", "one") + publish_bytes("p", "two"))
        yield peer.wait_for(complete(2))
        first, second = responses(peer.data)
        self.assertEqual((first.status, first.json), (202, {"room": "p", "offset": 1}))
        self.assertEqual(
            (second.status, second.json), (202, {"room": "p", "offset": 2})
        )
        for answer in (first, second):
            self.assertEqual(answer.headers["server"], "webchat")
            self.assertEqual(answer.headers["x-content-type-options"], "nosniff")
            self.assertIn("date", answer.headers)
            self.assertNotIn("connection", answer.headers)
        texts = []
        for _ in range(2):
            texts.append(json.loads((yield member.received.get()))["text"])
        self.assertEqual(texts, ["one", "two"])
        # Still open: a third request on the same connection is answered.
        peer.transport.write(keep_alive("GET", "/api/rooms", Connection="close"))
        yield peer.lost
        third = responses(peer.data)[2]
        self.assertIn({"room": "p", "members": 1}, third.json["rooms"])
        self.assertEqual(third.headers["connection"], "close")
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_a_head_split_byte_by_byte(self):
        peer = yield self.peer()
        data = publish_bytes("s", "slowly", Connection="close")
        for i in range(len(data)):
            peer.transport.write(data[i : i + 1])
            yield deferLater(0.001)  # each byte its own segment
        yield peer.lost
        self.assertEqual(Response(peer.data).json, {"room": "s", "offset": 1})
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_the_last_request_a_connection_may_make_says_close(self):
        peer = yield self.peer()
        most = MAX_REQUESTS_PER_CONNECTION
        # One more than allowed, all in one write: the extra one is dropped.
        peer.transport.write(keep_alive("GET", "/api/rooms") * (most + 1))
        yield peer.lost
        got = responses(peer.data)
        self.assertEqual(len(got), most)
        self.assertEqual({r.status for r in got}, {200})
        self.assertNotIn("connection", got[-2].headers)
        self.assertEqual(got[-1].headers["connection"], "close")
        self.assertEqual(self.factory.dropped["request_limit"], 1)
        self.assertTrue(
            any(f"after its {most}th request" in line for line in self.logs.lines)
        )
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_http_1_0_is_answered_and_closed(self):
        peer = yield self.peer()
        peer.transport.write(
            keep_alive("GET", "/api/rooms").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
            + keep_alive("GET", "/api/rooms")
        )
        yield peer.lost
        self.assertTrue(peer.data.startswith(b"HTTP/1.0 200 OK\r\n"))
        self.assertEqual(len(responses(peer.data)), 1)  # the second: never

    @inlineCallbacks
    def test_a_page_asked_for_on_a_kept_alive_api_connection(self):
        # Handed to twisted.web with the rest of the connection.
        peer = yield self.peer()
        peer.transport.write(
            keep_alive("GET", "/api/rooms")
            + keep_alive("GET", "/healthz")
            + keep_alive("GET", "/api/rooms", Connection="close")
        )
        yield peer.lost
        got = responses(peer.data)
        self.assertEqual([r.status for r in got], [200, 200, 200])
        self.assertEqual(got[0].body, got[2].body)
        self.assertIn(b'"rooms"', got[0].body)
        yield self.assert_bystanders_chat()


class DeadlineTests(LeanPathMixin, TestCase):
    @inlineCallbacks
    def test_a_body_that_never_finishes_after_an_answer_is_cut_off(self):
        peer = yield self.peer()
        peer.transport.write(publish_bytes("d", "first"))
        yield peer.wait_for(complete(1))
        peer.transport.write(
            keep_alive("POST", "/api/rooms/d/messages")[:-2]
            + b"Content-Length: 100\r\n\r\n{"
        )
        yield peer.lost  # the handshake timeout: 0.5 s
        self.assertEqual(len(responses(peer.data)), 1)
        self.assertEqual(self.factory.dropped["handshake_timeout"], 1)
        self.assertTrue(
            any("no complete request within 0.5 s" in line for line in self.logs.lines)
        )
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_an_idle_kept_alive_connection_is_closed_quietly(self):
        peer = yield self.peer()
        peer.transport.write(publish_bytes("d", "first"))
        yield peer.lost
        self.assertEqual(len(responses(peer.data)), 1)
        self.assertEqual(self.factory.dropped["idle_preconnect"], 1)
        self.assertEqual(self.factory.dropped["handshake_timeout"], 0)
        yield self.assert_bystanders_chat()


class OversizedHeadTests(LeanPathMixin, TestCase):
    @inlineCallbacks
    def test_a_header_line_over_16_kb_is_431(self):
        peer = yield self.peer()
        peer.transport.write(publish_bytes("o", "x", Cookie="c" * 17000))
        yield peer.lost
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 431 "), peer.data[:100])
        self.assertEqual(self.factory.dropped["header_too_large"], 1)
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_a_head_over_16_kb_in_short_lines_is_400(self):
        peer = yield self.peer()
        many = {f"X-Filler-{n}": "y" * 100 for n in range(200)}
        peer.transport.write(publish_bytes("o", "x", **many))
        yield peer.lost
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 400 "), peer.data[:100])
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_after_an_answer_a_head_over_16_kb_is_still_refused(self):
        peer = yield self.peer()
        peer.transport.write(
            keep_alive("GET", "/api/rooms")
            + keep_alive("GET", "/api/rooms", Cookie="c" * 17000)
        )
        yield peer.lost
        self.assertEqual(responses(peer.data.split(b"HTTP/1.1 431")[0])[0].status, 200)
        self.assertIn(b"HTTP/1.1 431 ", peer.data)
        yield self.assert_bystanders_chat()


class OwnPortTests(KeepAliveTests):
    """The same on --api-port, where every connection starts on the lean path."""

    own_port = True

    @inlineCallbacks
    def test_a_page_asked_for_on_a_kept_alive_api_connection(self):
        peer = yield self.peer()
        peer.transport.write(
            keep_alive("GET", "/api/rooms") + keep_alive("GET", "/", Connection="close")
        )
        yield peer.lost
        self.assertEqual([r.status for r in responses(peer.data)], [200, 404])
        yield self.assert_bystanders_chat()


class LaterAnswerTests(LeanPathMixin, TestCase):
    """An answer that comes later (SQLite's thread) holds those behind it."""

    @inlineCallbacks
    def setUp(self):
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        history = SQLiteHistory(
            reactor, str(directory / "history.db"), limit=100, ttl=3600
        )
        history.startService()
        self.addCleanup(history.stopService)
        self.server_kwargs = {"history": history}
        yield super().setUp()

    @inlineCallbacks
    def test_pipelined_behind_a_later_answer_in_order(self):
        peer = yield self.peer()
        peer.transport.write(
            publish_bytes("l", "before")
            + keep_alive("GET", "/api/rooms/l/history")  # read in SQLite's thread
            + publish_bytes("l", "after", Connection="close")
        )
        yield peer.lost
        first, second, third = responses(peer.data)
        self.assertEqual(first.json, {"room": "l", "offset": 1})
        self.assertEqual(second.json["room"], "l")
        self.assertIn("messages", second.json)
        self.assertEqual(third.json, {"room": "l", "offset": 2})
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_a_full_pipeline_behind_a_later_answer(self):
        peer = yield self.peer()
        text = "x" * 3000
        count = MAX_REQUESTS_PER_CONNECTION - 1
        # 300 KB: read in many pieces, requests split across them.
        peer.transport.write(
            keep_alive("GET", "/api/rooms/b/history") + publish_bytes("b", text) * count
        )
        yield peer.lost  # the 100th request says close
        got = responses(peer.data)
        self.assertEqual(len(got), count + 1)
        self.assertEqual(got[0].json["messages"], [])
        self.assertEqual([r.json["offset"] for r in got[1:]], list(range(1, count + 1)))
        yield self.assert_bystanders_chat()


class ProtocolTests(LeanPathMixin, TestCase):
    """Which parser reads what: the lean one for API requests only."""

    @inlineCallbacks
    def test_api_requests_are_read_by_the_lean_path(self):
        site = self.api_port.factory
        built = []
        original = site.build_api_wire

        def spy(addr):
            built.append(original(addr))
            return built[-1]

        site.build_api_wire = spy
        peer = yield self.peer()
        peer.transport.write(publish_bytes("w", "x", Connection="close"))
        yield peer.lost
        self.assertEqual(Response(peer.data).status, 202)
        self.assertEqual(len(built), 1)
        self.assertIsInstance(built[0], ApiWire)
        page = yield self.call("GET", "/healthz")
        self.assertEqual(page.status, 200)
        self.assertEqual(len(built), 1)  # not the page
        self.assertNotIn(KEY, "\n".join(self.logs.lines))


class TlsTests(LeanPathMixin, TestCase):
    """The lean path behind TLS (an ``ssl:`` --port)."""

    tls = True

    @inlineCallbacks
    def peer(self):
        peer = yield connect_raw(self.api_port.getHost().port, self.client_tls)
        self.addCleanup(lambda: peer.lost.called or peer.transport.abortConnection())
        return peer

    @inlineCallbacks
    def test_pipelined_publishes_over_tls(self):
        peer = yield self.peer()
        peer.transport.write(
            publish_bytes("t", "one") + publish_bytes("t", "two", Connection="close")
        )
        yield peer.lost
        got = responses(peer.data)
        self.assertEqual([r.json["offset"] for r in got], [1, 2])
        yield self.assert_bystanders_chat()


class HeldAnswerApi:
    """An API whose every answer waits until the test gives it (as Redis)."""

    def __init__(self) -> None:
        self.calls: list = []

    def handle(self, call):
        answer = Deferred()
        self.calls.append((call, answer))
        return answer


class FakeClockTests(FakeClockMixin, SynchronousTestCase):
    """The path's timing on a fake clock, with answers the test releases."""

    def setUp(self):
        self.make_factory(handshake_timeout=10, response_timeout=30, ping_interval=0)
        self.api = HeldAnswerApi()
        self.site = make_site(self.factory, api=ServerApi(self.factory, b"k", 0))
        self.wire = ApiWire(self.site, self.api, PEER)
        self.transport = Transport(peerAddress=PEER)
        self.wire.makeConnection(self.transport)

    def release(self, index: int, status: int = 200) -> None:
        _, answer = self.api.calls[index]
        answer.callback(ApiAnswer(status, {}, b"{}\n"))

    def test_reading_stops_behind_a_held_answer_and_goes_on_after(self):
        self.wire.dataReceived(keep_alive("GET", "/api/rooms"))
        self.assertEqual(len(self.api.calls), 1)
        self.wire.dataReceived(publish_bytes("r", "x" * 50000))
        self.assertEqual(self.transport.producerState, "producing")
        self.wire.dataReceived(publish_bytes("r", "y" * 50000))
        # Over a head and a body's worth waiting: the socket is not read.
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(len(self.api.calls), 1)  # nothing parsed behind it
        self.assertEqual(self.transport.value(), b"")
        self.release(0)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(len(self.api.calls), 2)  # the next one, in order
        self.assertEqual(
            self.api.calls[1][0].body, b'{"text": "' + b"x" * 50000 + b'"}'
        )
        self.release(1, 202)
        self.release(2, 202)
        statuses = [r.status for r in responses(self.transport.value())]
        self.assertEqual(statuses, [200, 202, 202])

    def test_a_held_answer_past_the_response_deadline_is_cut_off(self):
        self.wire.dataReceived(keep_alive("GET", "/api/rooms"))
        self.clock.advance(29)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(1)
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.factory.dropped["response_timeout"], 1)
        self.wire.connectionLost(None)
        self.release(0)  # too late: nothing is written
        self.assertEqual(self.transport.value(), b"")

    def test_a_slow_second_request_meets_the_request_deadline(self):
        self.wire.dataReceived(keep_alive("GET", "/api/rooms"))
        self.release(0)
        self.transport.clear()
        request = keep_alive("GET", "/api/rooms")
        for byte in request[:9]:
            self.wire.dataReceived(bytes([byte]))
            self.clock.advance(1)  # a byte a second: never idle, never done
        self.assertFalse(self.transport.aborted)
        self.clock.advance(1)
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.factory.dropped["handshake_timeout"], 1)
        self.assertEqual(self.transport.value(), b"")
