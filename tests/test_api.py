"""The server API (issue #15, docs/api.md), on real sockets in this process.

Every route and every refusal, as the app sees them (status, JSON body,
headers), and what the chat's members see of it (``server: text`` for the
seed's clients, ``"server": true`` in JSON, history on join), with a
bystander pair chatting through the hostile requests.  Two nodes and Redis:
tests/test_api_cluster.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.support import ServerMixin, connect_raw, deferLater
from tests.test_auth import SECRET, AllLogs, hs256
from tests.test_rooms import connect_json
from webchat.api import MemoryIdempotency, ServerApi
from webchat.auth import TokenVerifier
from webchat.history.sqlite import SQLiteHistory
from webchat.limits import API_BODY_OVERHEAD, Limits
from webchat.metrics import MetricsPage, make_registry
from webchat.redis.envelope import (
    Disconnect,
    MalformedEnvelopeError,
    decode_envelope,
    encode_disconnect,
)
from webchat.web import make_api_site, make_site

KEY = "s3cret-api-key-never-logged"
AUTH = {"Authorization": f"Bearer {KEY}"}


def request_bytes(
    method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Response:
    def __init__(self, data: bytes) -> None:
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0] else 0
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    @property
    def json(self):
        return json.loads(self.body)


class ApiMixin(ServerMixin):
    limits = Limits(rate_limit=0)
    rate_limit = 1000.0

    #: Server options for the factory (auth for DisconnectTests).
    server_kwargs: dict = {}

    @inlineCallbacks
    def start_api(self, own_port: bool = False):
        yield self.start_server(limits=self.limits, **self.server_kwargs)
        self.clock = Clock()
        self.api = ServerApi(
            self.factory, KEY.encode(), self.rate_limit, clock=self.clock
        )
        if own_port:
            endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
            self.api_port = yield endpoint.listen(make_api_site(self.factory, self.api))
            self.addCleanup(self.api_port.stopListening)
            return
        # The chat's site again, now with /api (the mixin's has none).
        yield self.port.stopListening()
        if self.tls:
            endpoint = self._tls_endpoint()
        else:
            endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = yield endpoint.listen(make_site(self.factory, api=self.api))
        self.api_port = self.port
        scheme = "wss" if self.tls else "ws"
        self.url = f"{scheme}://127.0.0.1:{self.port.getHost().port}/"

    @inlineCallbacks
    def call(self, method, path, body=None, headers=AUTH, raw=None):
        peer = yield connect_raw(self.api_port.getHost().port)
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        peer.transport.write(raw or request_bytes(method, path, body, headers))
        yield peer.lost
        return Response(peer.data)

    @inlineCallbacks
    def json_client(self, path):
        client = yield connect_json(self.port.getHost().port, path)
        self.clients.append(client)
        return client

    def publish(self, room, **body):
        return self.call("POST", f"/api/rooms/{room}/messages", body)


class BystanderApiMixin(ApiMixin):
    """An API (on the chat's port, or its own with ``own_port``) and a pair
    of chat clients, Alice and Bob, whose chat a hostile caller must not
    disturb."""

    own_port = False

    @inlineCallbacks
    def setUp(self):
        yield self.start_api(own_port=self.own_port)
        self.alice, self.bob = yield self.connect_many(2)
        self._said = 0

    @inlineCallbacks
    def assert_bystanders_chat(self):
        self._said += 1
        self.alice.send_text(f"still {self._said}")
        self.assertEqual((yield self.bob.received.get()), f"id 1: still {self._said}")
        self.assertIsNone(self.alice.closed_code)


class PublishTests(ApiMixin, TestCase):
    @inlineCallbacks
    def setUp(self):
        yield self.start_api()

    @inlineCallbacks
    def test_a_message_reaches_both_codecs_and_the_history(self):
        yield self.connect("/ws/news")
        js = yield self.json_client("/ws/news")
        welcome = json.loads((yield js.received.get()))
        response = yield self.publish("news", text="héllo", **{"from": "Bot"})
        self.assertEqual(response.status, 202)
        self.assertEqual(response.json, {"room": "news", "offset": 1})
        self.assertEqual(response.headers["content-type"], "application/json")
        event = json.loads((yield js.received.get()))
        self.assertEqual(
            list(event),
            ["type", "room", "id", "name", "server", "text", "ts", "offset"],
        )
        self.assertEqual(
            (event["id"], event["name"], event["server"], event["text"]),
            (0, "Bot", True, "héllo"),
        )
        self.assertEqual(event["offset"], 1)
        # A joiner replays it from history.
        late = yield self.json_client("/ws/news")
        yield late.received.get()  # welcome
        replayed = json.loads((yield late.received.get()))
        self.assertEqual(
            (replayed["server"], replayed["text"], replayed["history"]),
            (True, "héllo", True),
        )
        # GET history has it, as a message event.
        history = yield self.call("GET", "/api/rooms/news/history")
        self.assertEqual(history.status, 200)
        self.assertEqual(history.json["epoch"], welcome["epoch"])
        [kept] = history.json["messages"]
        self.assertEqual(
            (kept["name"], kept["server"], kept["offset"]), ("Bot", True, 1)
        )

    @inlineCallbacks
    def test_seed_clients_get_server_colon_text(self):
        seed = yield self.connect("/ws/news")
        response = yield self.publish("news", text="hello all")
        self.assertEqual(response.status, 202)
        got = yield seed.received.get()
        self.assertEqual(got, "server: hello all")
        line = [x for x in self.logs.lines if "Server API sending" in x]
        self.assertEqual(
            line,
            ["Server API sending message hello all to 1 connection(s) in room news"],
        )

    @inlineCallbacks
    def test_a_room_nobody_is_in_keeps_it_for_the_first_joiner(self):
        response = yield self.publish("empty", text="you missed this")
        self.assertEqual(response.json, {"room": "empty", "offset": 1})
        yield deferLater(0)
        self.assertNotIn("empty", self.factory.rooms)  # closed again
        js = yield self.json_client("/ws/empty")
        welcome = json.loads((yield js.received.get()))
        self.assertEqual(welcome["offset"], 1)
        replayed = json.loads((yield js.received.get()))
        self.assertEqual(replayed["text"], "you missed this")

    @inlineCallbacks
    def test_a_repeated_idempotency_key_gets_the_first_answer_and_delivers_nothing(
        self,
    ):
        seed = yield self.connect("/ws/news")
        first = yield self.publish("news", text="once", idempotency_key="k-1")
        again = yield self.publish("news", text="once", idempotency_key="k-1")
        other = yield self.publish("news", text="twice", idempotency_key="k-2")
        self.assertEqual((first.status, again.status, other.status), (202, 202, 202))
        self.assertEqual(first.json, again.json)
        self.assertEqual(other.json["offset"], 2)
        self.assertEqual((yield seed.received.get()), "server: once")
        self.assertEqual((yield seed.received.get()), "server: twice")
        yield deferLater(0.05)
        self.assertEqual(seed.pending(), [])

    @inlineCallbacks
    def test_bad_bodies(self):
        cases = [
            (b"{not json", 400, "bad_json"),
            (b"\xff\xfe{}", 400, "bad_json"),
            (b"[1]", 400, "bad_json"),
            (b'{"text": 5}', 400, "bad_text"),
            (b'{"text": "\\ud800"}', 400, "bad_text"),
            (b'{"text": "x", "from": "\\u0000"}', 400, "bad_name"),
            (b'{"text": "x", "idempotency_key": ""}', 400, "bad_idempotency_key"),
        ]
        for body, status, code in cases:
            response = yield self.call("POST", "/api/rooms/news/messages", body)
            self.assertEqual((response.status, response.json["error"]), (status, code))
            self.assertIsInstance(response.json["detail"], str)
        bad_room = yield self.publish("bad%20room", text="x")
        self.assertEqual((bad_room.status, bad_room.json["error"]), (400, "bad_room"))
        too_big = "x" * (self.factory.limits.max_text_bytes + 1)
        response = yield self.publish("news", text=too_big)
        self.assertEqual((response.status, response.json["error"]), (413, "too_large"))


class RouteTests(ApiMixin, TestCase):
    @inlineCallbacks
    def setUp(self):
        yield self.start_api()

    @inlineCallbacks
    def test_rooms_and_members(self):
        yield self.connect("/ws/a")
        yield self.json_client("/ws/a")
        yield self.connect("/ws/b?name=x")
        rooms = yield self.call("GET", "/api/rooms")
        self.assertEqual(
            rooms.json,
            {"rooms": [{"room": "a", "members": 2}, {"room": "b", "members": 1}]},
        )
        members = yield self.call("GET", "/api/rooms/a/members")
        self.assertEqual(
            members.json,
            {
                "room": "a",
                "members": [{"id": 1, "name": "guest-1"}, {"id": 2, "name": "guest-2"}],
            },
        )
        nobody = yield self.call("GET", "/api/rooms/zzz/members")
        self.assertEqual(nobody.json, {"room": "zzz", "members": []})

    @inlineCallbacks
    def test_history_since_and_limit(self):
        for n in range(1, 6):
            yield self.publish("h", text=f"m{n}")
        every = yield self.call("GET", "/api/rooms/h/history")
        self.assertEqual([m["text"] for m in every.json["messages"]], [
            "m1", "m2", "m3", "m4", "m5"
        ])  # fmt: skip
        last = yield self.call("GET", "/api/rooms/h/history?limit=2")
        self.assertEqual([m["offset"] for m in last.json["messages"]], [4, 5])
        after = yield self.call("GET", "/api/rooms/h/history?since=1&limit=2")
        self.assertEqual([m["offset"] for m in after.json["messages"]], [2, 3])
        self.assertEqual(after.json["epoch"], every.json["epoch"])
        bad = yield self.call("GET", "/api/rooms/h/history?since=-1")
        self.assertEqual((bad.status, bad.json["error"]), (400, "bad_query"))

    @inlineCallbacks
    def test_not_found_and_method_not_allowed(self):
        response = yield self.call("GET", "/api/nothing")
        self.assertEqual((response.status, response.json["error"]), (404, "not_found"))
        response = yield self.call("GET", "/api/rooms/a/messages")
        self.assertEqual(
            (response.status, response.json["error"], response.headers["allow"]),
            (405, "method_not_allowed", "POST"),
        )
        response = yield self.call("POST", "/api/rooms", b"{}")
        self.assertEqual((response.status, response.headers["allow"]), (405, "GET"))

    @inlineCallbacks
    def test_no_key_or_a_wrong_key_is_401_and_the_key_is_never_logged(self):
        missing = yield self.call("GET", "/api/rooms", headers={})
        wrong = yield self.call(
            "GET", "/api/rooms", headers={"Authorization": f"Bearer {KEY}x"}
        )
        for response, detail in (
            (missing, "missing API key"),
            (wrong, "wrong API key"),
        ):
            self.assertEqual(response.status, 401)
            self.assertEqual(response.json, {"error": "unauthorized", "detail": detail})
            self.assertIn("Bearer", response.headers["www-authenticate"])
        lower = yield self.call(
            "GET", "/api/rooms", headers={"Authorization": f"bearer  {KEY}"}
        )
        self.assertEqual(lower.status, 200)  # the scheme is case-insensitive
        other = yield self.call(
            "GET", "/api/rooms", headers={"Authorization": f"Basic {KEY}"}
        )
        self.assertEqual(other.status, 401)
        yield self.publish("a", text="hi")
        self.assertTrue(any("HTTP 401" in line for line in self.logs.lines))
        self.assertFalse([line for line in self.logs.lines if KEY in line])

    @inlineCallbacks
    def test_a_token_in_a_refused_path_is_redacted_in_the_log(self):
        response = yield self.call("GET", "/api/rooms;token=s3cret-t0ken/x")
        self.assertEqual(response.status, 404)
        refused = [line for line in self.logs.lines if "API refused" in line]
        self.assertEqual(len(refused), 1, refused)
        self.assertIn("GET /api/rooms;token=[redacted] from", refused[0])
        self.assertNotIn("s3cret-t0ken", "\n".join(self.logs.lines))

    @inlineCallbacks
    def test_bodies_stay_refused_outside_the_api(self):
        response = yield self.call("POST", "/", b"x")
        self.assertEqual(response.status, 405)
        response = yield self.call("POST", "/apix/rooms", b"x")
        self.assertEqual(response.status, 405)

    @inlineCallbacks
    def test_a_chunked_body_is_411(self):
        raw = (
            b"POST /api/rooms/a/messages HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        response = yield self.call("POST", "", raw=raw)
        self.assertEqual(
            (response.status, response.json["error"]), (411, "length_required")
        )


class DisconnectTests(ApiMixin, TestCase):
    @inlineCallbacks
    def setUp(self):
        self.server_kwargs = {
            "auth": "optional",
            "verifier": TokenVerifier(secret=SECRET, clock=reactor.seconds),
        }
        yield self.start_api()

    @inlineCallbacks
    def test_every_connection_of_the_user_is_closed_4002(self):
        token = hs256(sub="u1")
        js = yield self.json_client(f"/ws/a?token={token}")
        seed = yield self.connect(f"/ws/a?token={token}")
        other = yield self.connect("/ws/a?token=" + hs256(sub="u2"))
        anonymous = yield self.connect("/ws/a")
        yield js.received.get()  # welcome
        members = yield self.call("GET", "/api/rooms/a/members")
        self.assertEqual(
            [m.get("user") for m in members.json["members"]], ["u1", "u1", "u2", None]
        )
        response = yield self.call(
            "POST", "/api/users/u1/disconnect", {"reason": "banned ✋"}
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json, {"user": "u1", "disconnected": 2})
        while True:
            event = json.loads((yield js.received.get()))
            if event["type"] == "error":
                break
        self.assertEqual(
            event, {"type": "error", "code": "disconnected", "reason": "banned ✋"}
        )
        for client in (js, seed):
            code, reason = yield client.closed
            self.assertEqual(
                (code, reason), (4002, "disconnected by the app: banned ✋")
            )
        self.assertIsNone(other.closed_code)
        self.assertIsNone(anonymous.closed_code)
        nobody = yield self.call("POST", "/api/users/u9/disconnect", b"")
        self.assertEqual(nobody.json, {"user": "u9", "disconnected": 0})

    @inlineCallbacks
    def test_the_path_names_any_user_auth_accepts_percent_decoded(self):
        spaced = yield self.connect("/ws/a?token=" + hs256(sub="a b"))
        accented = yield self.connect("/ws/a?token=" + hs256(sub="é/1"))
        response = yield self.call("POST", "/api/users/a%20b/disconnect", b"")
        self.assertEqual(
            (response.status, response.json),
            (200, {"user": "a b", "disconnected": 1}),
        )
        self.assertEqual((yield spaced.closed)[0], 4002)
        response = yield self.call("POST", "/api/users/%C3%A9%2F1/disconnect", b"")
        self.assertEqual(response.json, {"user": "é/1", "disconnected": 1})
        self.assertEqual((yield accented.closed)[0], 4002)
        for bad in ("%20%20", "a%0Ab", "%FF", "a%E2%80%8Bb", "u" * 257):
            response = yield self.call("POST", f"/api/users/{bad}/disconnect", b"")
            self.assertEqual(
                (response.status, response.json["error"]), (400, "bad_user"), bad
            )
        self.assertEqual(self.factory.stats.api[(400, "bad_user")], 5)

    def test_a_long_reason_is_cut_on_a_character(self):
        from webchat.chat import _fit_close_reason

        cut = _fit_close_reason("disconnected by the app: " + "é" * 100)
        self.assertLessEqual(len(cut.encode()), 123)
        self.assertTrue(cut.endswith("é"))


class HostileTests(BystanderApiMixin, TestCase):
    limits = Limits(rate_limit=0, handshake_timeout=0.5)

    @inlineCallbacks
    def test_a_10_mb_body_is_refused_from_its_headers(self):
        peer = yield connect_raw(self.api_port.getHost().port)
        peer.transport.write(
            request_bytes("POST", "/api/rooms/a/messages", None, AUTH)[:-2]
            + b"Content-Length: 10485760\r\n\r\n"
            + b"x" * 65536
        )
        yield peer.lost
        response = Response(peer.data)
        self.assertEqual((response.status, response.json["error"]), (413, "too_large"))
        cap = self.factory.limits.max_message_size + API_BODY_OVERHEAD
        self.assertEqual(response.json["detail"], f"the body is over {cap} bytes")
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_a_body_that_never_finishes_is_cut_off(self):
        peer = yield connect_raw(self.api_port.getHost().port)
        peer.transport.write(
            request_bytes("POST", "/api/rooms/a/messages", None, AUTH)[:-2]
            + b"Content-Length: 100\r\n\r\n{"
        )
        yield peer.lost  # the handshake timeout: 0.5 s
        self.assertEqual(peer.data, b"")
        self.assertTrue(
            any("no complete request within 0.5 s" in line for line in self.logs.lines)
        )
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_a_deeply_nested_body_is_400_bad_json(self):
        deep = b"[" * 60000
        for path in ("/api/rooms/a/messages", "/api/users/u1/disconnect"):
            response = yield self.call("POST", path, deep)
            self.assertEqual(
                (response.status, response.json),
                (400, {"error": "bad_json", "detail": "the body is nested too deep"}),
            )
            yield self.assert_bystanders_chat()
        self.assertEqual(self.factory.stats.api[(400, "bad_json")], 2)
        refused = [line for line in self.logs.lines if "Server API refused" in line]
        self.assertEqual(len(refused), 2, refused)
        self.assertFalse(any("error has occurred" in line for line in self.logs.lines))


class RateLimitTests(ApiMixin, TestCase):
    rate_limit = 1.0  # a burst of 2

    @inlineCallbacks
    def setUp(self):
        yield self.start_api()

    @inlineCallbacks
    def test_over_the_rate_is_429_with_retry_after(self):
        answers = []
        for _ in range(3):
            answers.append((yield self.call("GET", "/api/rooms")))
        self.assertEqual([a.status for a in answers], [200, 200, 429])
        self.assertEqual(answers[2].json["error"], "rate_limited")
        self.assertEqual(answers[2].headers["retry-after"], "1")
        self.clock.advance(1)
        self.assertEqual((yield self.call("GET", "/api/rooms")).status, 200)
        metrics = MetricsPage(make_registry(self.factory)).render_GET(
            DummyRequest([b"metrics"])
        )
        self.assertIn(
            b'webchat_api_requests_total{error="rate_limited",status="429"} 1.0',
            metrics,
        )
        self.assertIn(
            b'webchat_api_requests_total{error="ok",status="200"} 3.0', metrics
        )


class IdempotencyMemoryTests(SynchronousTestCase):
    def test_keys_are_kept_for_the_window_and_at_most_so_many(self):
        clock = Clock()
        keys = MemoryIdempotency(clock, window=600, most=2)

        def reserve(key):
            return self.successResultOf(keys.reserve(key))

        self.assertIsNone(reserve("a"))
        self.assertEqual(reserve("a"), b"pending")
        keys.settle("a", b'{"offset":1}')
        self.assertEqual(reserve("a"), b'{"offset":1}')
        clock.advance(599)
        self.assertEqual(reserve("a"), b'{"offset":1}')
        clock.advance(1)
        self.assertIsNone(reserve("a"))  # the window is over: a new request
        self.assertIsNone(reserve("b"))
        self.assertIsNone(reserve("c"))  # the oldest ("a") goes
        self.assertIsNone(reserve("a"))
        keys.release("a")  # a failed publish frees its key
        self.assertIsNone(reserve("a"))


class OwnPortTests(ApiMixin, TestCase):
    @inlineCallbacks
    def setUp(self):
        yield self.start_api(own_port=True)

    @inlineCallbacks
    def test_the_api_port_serves_the_api_and_nothing_else(self):
        response = yield self.call("GET", "/api/rooms")
        self.assertEqual(response.json, {"rooms": []})
        page = yield self.call("GET", "/")
        self.assertEqual(page.status, 404)
        # ...and the chat's port has no /api then.
        peer = yield connect_raw(self.port.getHost().port)
        peer.transport.write(request_bytes("GET", "/api/rooms", None, AUTH))
        yield peer.lost
        self.assertEqual(Response(peer.data).status, 404)


class EnvelopeTests(SynchronousTestCase):
    """What the server API adds to wc2 (docs/protocol.md, "From the app")."""

    def test_a_disconnect_round_trips(self):
        payload = encode_disconnect("web-1", "u-42", "spam, again\nand again ✋")
        self.assertEqual(
            payload, "wc2 web-1 k u-42\nspam, again\nand again ✋".encode()
        )
        self.assertEqual(
            decode_envelope(payload),
            Disconnect("web-1", "u-42", "spam, again\nand again ✋"),
        )
        self.assertEqual(
            decode_envelope(b"wc2 web-1 k u-42\n"), Disconnect("web-1", "u-42", "")
        )
        # A sub with an inner space is a user (auth.is_user_id): so it travels.
        self.assertEqual(
            decode_envelope(encode_disconnect("web-1", "a b", "")),
            Disconnect("web-1", "a b", ""),
        )

    def test_a_bad_disconnect_is_malformed(self):
        for payload in (
            b"wc2 web-1 k u\t42\nr",  # a tab in the user
            b"wc2 web-1 k   \nr",  # all spaces
            b"wc2 web-1 k u-42",  # no LF
            b"wc2 web-1 k \xff\nr",
            b"wc2 web-1 k u-42\n\xff",
            b"wc2 web-1 k " + b"u" * 257 + b"\n",
        ):
            with self.assertRaises(MalformedEnvelopeError):
                decode_envelope(payload)

    def test_id_0_is_read_in_kept_messages_only(self):
        kept = decode_envelope(b"wc2 web-1 s news 7 ep0ch 0 1764633600000 ops\nhi")
        self.assertEqual((kept.chat_id, kept.name, kept.offset), (0, "ops", 7))
        with self.assertRaises(MalformedEnvelopeError):
            decode_envelope(b"wc2 web-1 m news 0 1764633600000 ops\nhi")


class AccessLogTests(ApiMixin, TestCase):
    """The app's requests are in the access log, but for --quiet."""

    @inlineCallbacks
    def setUp(self):
        self.all_logs = AllLogs()
        globalLogPublisher.addObserver(self.all_logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.all_logs)
        yield self.start_api()

    @inlineCallbacks
    def test_a_publish_is_in_the_access_log(self):
        yield self.publish("a", text="hi")
        lines = [x for x in self.all_logs.lines if '"POST /api/rooms/a/messages' in x]
        self.assertEqual(len(lines), 1, self.all_logs.lines)
        self.assertNotIn(KEY, self.all_logs.text)

    @inlineCallbacks
    def test_not_with_quiet(self):
        self.factory.quiet = True
        yield self.publish("a", text="hi")
        self.assertFalse([x for x in self.all_logs.lines if "/api/" in x])
        page = yield self.call("GET", "/index.html")
        self.assertEqual(page.status, 200)
        self.assertTrue([x for x in self.all_logs.lines if "/index.html" in x])


class SQLiteHistoryTests(ApiMixin, TestCase):
    """With --history-db: a read answered from SQLite's thread, later."""

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
        yield self.start_api()

    @inlineCallbacks
    def test_published_messages_are_kept_in_the_database(self):
        for n in (1, 2, 3):
            response = yield self.publish("db", text=f"m{n}")
            self.assertEqual(response.json, {"room": "db", "offset": n})
        got = yield self.call("GET", "/api/rooms/db/history?since=1")
        self.assertEqual(got.status, 200)
        self.assertEqual([m["text"] for m in got.json["messages"]], ["m2", "m3"])
        js = yield self.json_client("/ws/db")
        self.assertEqual(json.loads((yield js.received.get()))["offset"], 3)
