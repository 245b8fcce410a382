"""Rooms and JSON events over real sockets (issue #13).

Seed-format and JSON clients in one room hear each other, different rooms
never do, presence is right after joins, renames and leaves, and every
refusal or policy close is what a client sees on the wire, while a pair of
bystanders in the lobby keeps chatting without noticing a thing.
"""

from __future__ import annotations

import json
from urllib.error import HTTPError
from urllib.request import urlopen

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import ChatClient, ServerMixin, connect_raw, take
from tests.test_limits import limits_from_options
from webchat.limits import MAX_ROOMS, Limits

SUBPROTOCOL = "webchat.v1.json"


def connect_json(port: int, path: str = "/"):
    """A client that offers ``webchat.v1.json``; fires once it is open."""
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}{path}", protocols=[SUBPROTOCOL]
    )
    factory.protocol = ChatClient
    factory.setProtocolOptions(failByDrop=False, openHandshakeTimeout=5)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    return endpoint.connect(factory).addCallback(lambda client: client.opened)


class RoomsMixin(ServerMixin):
    timeout = 30
    limits = Limits(rate_limit=0)

    @inlineCallbacks
    def setUp(self):
        yield self.start_server(limits=self.limits)
        # The bystanders: two seed-format clients in the lobby.
        self.alice, self.bob = yield self.connect_many(2)
        self._said = 0

    @inlineCallbacks
    def json_client(self, path: str = "/"):
        client = yield connect_json(self.port.getHost().port, path)
        self.clients.append(client)
        self.assertEqual(client.websocket_protocol_in_use, SUBPROTOCOL)
        return client

    @inlineCallbacks
    def next_event(self, client: ChatClient):
        return json.loads((yield client.received.get()))

    @inlineCallbacks
    def events(self, client: ChatClient, count: int):
        return [json.loads(text) for text in (yield take(client, count))]

    @inlineCallbacks
    def assert_bystanders_chat(self):
        """Alice and Bob, in the lobby throughout, still hear each other only."""
        self._said += 1
        text = f"still chatting {self._said}"
        self.alice.send_text(text)
        self.assertEqual((yield self.bob.received.get()), f"id 1: {text}")
        self.assertIsNone(self.alice.closed_code)
        self.assertIsNone(self.bob.closed_code)
        self.assertEqual(self.alice.pending(), [])

    @inlineCallbacks
    def handshake_status(self, path: bytes, extra: bytes = b"") -> bytes:
        """The status line of a raw WebSocket handshake on ``path``."""
        peer = yield connect_raw(self.port.getHost().port)
        self.addCleanup(lambda: peer.transport.abortConnection())
        peer.transport.write(
            b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
        )
        data = yield peer.wait_for(lambda data: b"\r\n\r\n" in data)
        return data.split(b"\r\n", 1)[0]


class MixedRoomTests(RoomsMixin, TestCase):
    @inlineCallbacks
    def test_seed_and_json_share_a_room_and_rooms_are_apart(self):
        ann = yield self.json_client("/ws/dev?name=ann")
        welcome = yield self.next_event(ann)
        self.assertEqual(welcome["members"], [{"id": 3, "name": "ann"}])
        seed = yield self.connect("/ws/dev")
        self.assertEqual(
            (yield self.next_event(ann)),
            {"type": "join", "room": "dev", "member": {"id": 4, "name": "guest-4"}},
        )
        seed.send_text("from the seed")
        message = yield self.next_event(ann)
        self.assertEqual(
            (message["id"], message["name"], message["text"], message["offset"]),
            (4, "guest-4", "from the seed", 1),
        )
        ann.send_text(json.dumps({"type": "message", "text": "from ann", "ref": "a"}))
        self.assertEqual((yield seed.received.get()), "id 3: from ann")
        ack = yield self.next_event(ann)
        self.assertEqual((ack["type"], ack["ref"], ack["offset"]), ("ack", "a", 2))
        # The lobby heard none of it, and its chat never reached the room.
        yield self.assert_bystanders_chat()
        self.assertEqual(self.alice.pending() + self.bob.pending(), [])
        self.assertEqual(seed.pending() + ann.pending(), [])
        self.assertTrue(
            any("New connection! (3) from 127.0.0.1 in room dev" in line
                for line in self.logs.lines)
        )  # fmt: skip

    @inlineCallbacks
    def test_presence_right_after_joins_renames_leaves(self):
        ann = yield self.json_client("/ws/p?name=ann")
        yield self.next_event(ann)
        bob = yield self.json_client("/ws/p?name=ann")  # taken: ann-2
        welcome = yield self.next_event(bob)
        self.assertEqual(
            welcome["members"], [{"id": 3, "name": "ann"}, {"id": 4, "name": "ann-2"}]
        )
        bob.send_text(json.dumps({"type": "name", "name": "bob"}))
        rename = {"type": "name", "room": "p", "id": 4, "old": "ann-2", "name": "bob"}
        self.assertEqual((yield self.events(ann, 2))[1], rename)
        self.assertEqual((yield self.next_event(bob)), rename)
        carl = yield self.json_client("/ws/p")
        welcome = yield self.next_event(carl)
        self.assertEqual(
            [m["name"] for m in welcome["members"]], ["ann", "bob", "guest-5"]
        )
        bob.sendClose(1000)
        yield bob.closed
        leave = {"type": "leave", "room": "p", "member": {"id": 4, "name": "bob"}}
        self.assertEqual((yield self.events(ann, 2)), [
            {"type": "join", "room": "p", "member": {"id": 5, "name": "guest-5"}},
            leave,
        ])  # fmt: skip
        self.assertEqual((yield self.next_event(carl)), leave)
        dave = yield self.json_client("/ws/p")
        welcome = yield self.next_event(dave)
        self.assertEqual([m["id"] for m in welcome["members"]], [3, 5, 6])
        yield self.assert_bystanders_chat()

    @inlineCallbacks
    def test_the_page_is_served_at_r_room(self):
        base = f"http://127.0.0.1:{self.port.getHost().port}"

        def get(path):
            try:
                with urlopen(base + path, timeout=5) as reply:
                    return reply.status, reply.read()
            except HTTPError as e:
                return e.code, e.read()

        status, page = yield deferToThread(get, "/r/dev")
        self.assertEqual(status, 200)
        self.assertEqual(page, (yield deferToThread(get, "/"))[1])
        self.assertEqual((yield deferToThread(get, "/r/a%20b"))[0], 400)
        yield self.assert_bystanders_chat()


class RefusalTests(RoomsMixin, TestCase):
    limits = Limits(rate_limit=0, max_rooms=2)

    @inlineCallbacks
    def test_bad_room_400_and_max_rooms_503(self):
        for path in (b"/ws/a%20b", b"/ws/a/b", b"/%77s/x%2Fy", b"/ws/" + b"x" * 65):
            status = yield self.handshake_status(path)
            self.assertEqual(status, b"HTTP/1.1 400 bad room name: 1-64 of A-Z a-z "
                                     b"0-9 . _ -", path)  # fmt: skip
        self.assertEqual(self.factory.refused["bad_room"], 4)
        self.assertIn(
            "Refused connection from 127.0.0.1: bad room name /ws/a%20b (HTTP 400)",
            self.logs.lines,
        )
        # The lobby is one room; one more may open, not two.
        ann = yield self.json_client("/ws/second")
        self.assertEqual(
            (yield self.handshake_status(b"/ws/third")),
            b"HTTP/1.1 503 too many rooms",
        )
        self.assertEqual(self.factory.refused["max_rooms"], 1)
        seed = yield self.connect("/ws/second")  # an open room: let in
        yield self.assert_bystanders_chat()
        for client in (ann, seed):
            client.sendClose(1000)
            yield client.closed
        yield self.connect("/ws/third")  # "second" was freed
        yield self.assert_bystanders_chat()


class RateCloseTests(RoomsMixin, TestCase):
    limits = Limits(rate_limit=1, rate_burst=3)

    @inlineCallbacks
    def test_an_error_event_before_the_1008(self):
        ann = yield self.json_client("/ws/r?name=ann")
        for i in range(4):
            ann.send_text(json.dumps({"type": "message", "text": str(i), "ref": i}))
        yield ann.closed
        got = [json.loads(text) for text in ann.pending()]
        self.assertEqual([e["type"] for e in got], ["welcome", "ack", "ack", "ack",
                                                    "error"])  # fmt: skip
        self.assertEqual(
            got[-1],
            {"type": "error", "code": "rate_limited", "reason": "rate limit exceeded"},
        )
        self.assertEqual(ann.closed_code, 1008)
        self.assertEqual(ann.closed_reason, "rate limit exceeded")
        yield self.assert_bystanders_chat()


class BadEventsCloseTests(RoomsMixin, TestCase):
    @inlineCallbacks
    def test_malformed_json_gets_errors_then_1008(self):
        ann = yield self.json_client("/ws/r?name=ann")
        yield self.next_event(ann)
        ann.send_text("{oops")
        self.assertEqual(
            (yield self.next_event(ann)),
            {"type": "error", "code": "bad_json", "reason": "not a JSON event"},
        )
        yield self.assert_bystanders_chat()
        for _ in range(9):
            ann.send_text("{oops")
        yield ann.closed
        got = [json.loads(text) for text in ann.pending()]
        self.assertEqual([e["code"] for e in got], ["bad_json"] * 9 + ["bad_event"])
        self.assertEqual(got[-1]["reason"], "too many bad events")
        self.assertEqual((ann.closed_code, ann.closed_reason),
                         (1008, "too many bad events"))  # fmt: skip
        self.assertEqual(self.factory.dropped["bad_events"], 1)
        yield self.assert_bystanders_chat()


class OptionTests(TestCase):
    def test_max_rooms_option(self):
        self.assertEqual(limits_from_options().max_rooms, MAX_ROOMS)
        self.assertEqual(limits_from_options("--max-rooms", "0").max_rooms, 0)
        self.assertEqual(limits_from_options("--max-rooms", "5").max_rooms, 5)
