"""Rooms, names and JSON events (issue #13), through the in-memory pump.

Everything here is what a client sees on the wire: the handshake's status
and subprotocol, the JSON events byte for byte, the seed's ``id N: text``
frames and the close codes, with the production site and factory on a
``Clock`` (``webchat.testing``).  Real sockets: tests/test_rooms.py.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.support import LogCapture
from tests.test_room import Recorder
from webchat.codecs import JSON, SEED, Message
from webchat.events import BadEvent, check_name, parse_event
from webchat.limits import Limits
from webchat.metrics import ChatStats
from webchat.rooms import Rooms, room_of_path
from webchat.testing import ChatPump, MemoryClient

PROTOCOL = {"Sec_WebSocket_Protocol": "webchat.v1.json"}
#: 2025-12-02 00:00:00 UTC, in seconds: the pump's clock starts here.
T0 = 1764633600.0


def events(client: MemoryClient) -> list[dict]:
    return [json.loads(text) for text in client.texts]


class ChatTestCase(SynchronousTestCase):
    limits = Limits(rate_limit=0)

    def setUp(self):
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)
        clock = Clock()
        clock.advance(T0)
        self.pump = ChatPump(clock=clock, limits=self.limits)

    def json_client(self, path: str = "/") -> MemoryClient:
        client = self.pump.connect(path, **PROTOCOL)
        self.assertEqual(client.status, 101)
        return client

    def send(self, client: MemoryClient, **event: object) -> None:
        client.send_text(json.dumps(event))
        self.pump.pump()


class CodecChoiceTests(ChatTestCase):
    def test_json_is_chosen_by_subprotocol_and_answered(self):
        client = self.json_client()
        self.assertIn(
            b"\r\nSec-WebSocket-Protocol: webchat.v1.json\r\n", client.response
        )

    def test_no_subprotocol_is_the_seed_with_no_events_at_all(self):
        seed = self.pump.connect("/")
        self.assertNotIn(b"Sec-WebSocket-Protocol", seed.response)
        other = self.json_client()
        self.send(other, type="name", name="ann")
        self.send(other, type="typing")
        self.send(other, type="message", text="hi")
        other.transport.loseConnection()
        self.pump.pump()
        self.assertEqual(seed.texts, ["id 2: hi"])

    def test_an_unknown_subprotocol_alone_gets_the_seed(self):
        client = self.pump.connect("/", Sec_WebSocket_Protocol="chat.v9")
        self.assertEqual(client.status, 101)
        self.assertNotIn(b"Sec-WebSocket-Protocol", client.response)


class WelcomeAndMessageTests(ChatTestCase):
    def test_welcome_byte_for_byte(self):
        self.pump.connect("/ws/lobby")  # a seed member: guest-1
        ann = self.json_client("/?name=ann")
        epoch = self.pump.factory.rooms.get("lobby").epoch
        self.assertEqual(
            ann.texts,
            [
                '{"type":"welcome","id":2,"name":"ann","room":"lobby","members":'
                '[{"id":1,"name":"guest-1"},{"id":2,"name":"ann"}],"limits":'
                '{"max_text_bytes":65280,"max_message_size":65536,"rate_limit":0,'
                f'"rate_burst":60}},"offset":0,"epoch":"{epoch}"}}'
            ],
        )

    def test_message_ack_and_the_seed_format_in_one_room(self):
        ann = self.json_client("/ws/?name=ann")
        bob = self.json_client("/ws?name=bob")
        seed = self.pump.connect("/")
        self.send(ann, type="message", text="hi \u00e9", ref="c1")
        self.assertEqual(
            ann.texts[-1], '{"type":"ack","ref":"c1","offset":1,"ts":1764633600000}'
        )
        self.assertEqual(
            bob.texts[-1],
            '{"type":"message","room":"lobby","id":1,"name":"ann",'
            '"text":"hi \u00e9","ts":1764633600000,"offset":1}',
        )
        self.assertEqual(seed.texts, ["id 1: hi \u00e9"])
        # The JSON sender never gets its own message back.
        self.assertNotIn("message", [e["type"] for e in events(ann)])
        self.pump.clock.advance(1.5)
        seed.send_text("plain")
        self.pump.pump()
        self.send(bob, type="message", text="x", ref=7)
        self.assertEqual(
            events(ann)[-2:],
            [
                {"type": "message", "room": "lobby", "id": 3, "name": "guest-3",
                 "text": "plain", "ts": 1764633601500, "offset": 2},
                {"type": "message", "room": "lobby", "id": 2, "name": "bob",
                 "text": "x", "ts": 1764633601500, "offset": 3},
            ],
        )  # fmt: skip
        self.assertEqual(events(bob)[-1], {"type": "ack", "ref": 7, "offset": 3,
                                           "ts": 1764633601500})  # fmt: skip
        self.assertEqual(seed.texts[-1], "id 2: x")
        self.send(ann, type="message", text="no ref")
        self.assertIsNone(events(ann)[-1]["ref"])

    def test_rooms_never_see_each_other(self):
        ann = self.json_client("/ws/a?name=ann")
        bob = self.json_client("/ws/b?name=bob")
        seed_a = self.pump.connect("/ws/a")
        seed_b = self.pump.connect("/ws/b")
        self.send(ann, type="message", text="in a")
        seed_b.send_text("in b")
        self.pump.pump()
        self.assertEqual(seed_a.texts, ["id 1: in a"])
        self.assertEqual(seed_b.texts, [])
        self.assertEqual(
            [e["type"] for e in events(bob)], ["welcome", "join", "message"]
        )
        self.assertEqual(events(bob)[-1]["text"], "in b")
        self.assertEqual(events(bob)[-1]["room"], "b")
        self.assertEqual([e.get("text") for e in events(ann)][-1], None)  # the ack


class PresenceTests(ChatTestCase):
    def test_join_rename_leave_in_order_with_messages(self):
        ann = self.json_client("/ws/r?name=ann")
        seed = self.pump.connect("/ws/r")
        bob = self.json_client("/ws/r?name=bob")
        self.send(bob, type="name", name="  Robert ")
        self.send(bob, type="message", text="hello")
        bob.transport.loseConnection()
        self.pump.pump()
        seed.transport.loseConnection()
        self.pump.pump()
        self.assertEqual(
            events(ann)[1:],
            [
                {"type": "join", "room": "r", "member": {"id": 2, "name": "guest-2"}},
                {"type": "join", "room": "r", "member": {"id": 3, "name": "bob"}},
                {"type": "name", "room": "r", "id": 3, "old": "bob", "name": "Robert"},
                {"type": "message", "room": "r", "id": 3, "name": "Robert",
                 "text": "hello", "ts": 1764633600000, "offset": 1},
                {"type": "leave", "room": "r", "member": {"id": 3, "name": "Robert"}},
                {"type": "leave", "room": "r", "member": {"id": 2, "name": "guest-2"}},
            ],
        )  # fmt: skip
        # The renamer hears its own rename; nobody hears their own join.
        self.assertEqual([e["type"] for e in events(bob)], ["welcome", "name", "ack"])
        carl = self.json_client("/ws/r")
        self.assertEqual(
            events(carl)[0]["members"],
            [{"id": 1, "name": "ann"}, {"id": 4, "name": "guest-4"}],
        )

    def test_typing_at_most_one_per_interval(self):
        ann = self.json_client("/ws/t?name=ann")
        bob = self.json_client("/ws/t?name=bob")
        for _ in range(3):
            self.send(bob, type="typing")
        self.pump.clock.advance(1.9)
        self.send(bob, type="typing")
        self.pump.clock.advance(0.2)
        self.send(bob, type="typing")
        typing = [e for e in events(ann) if e["type"] == "typing"]
        self.assertEqual(
            typing, [{"type": "typing", "room": "t", "id": 2, "name": "bob"}] * 2
        )
        self.assertEqual(len(bob.texts), 1)  # the welcome: no echo, no error


class NameTests(ChatTestCase):
    def test_check_name(self):
        self.assertEqual(check_name("  ann  "), "ann")
        self.assertEqual(check_name("x" * 32), "x" * 32)
        for bad in ("", "   ", "x" * 33, "a\u202eb", "a\nb", "a\u2028b", "a\u200bb"):
            with self.assertRaises(BadEvent) as caught:
                check_name(bad)
            self.assertEqual(caught.exception.code, "bad_name")

    def test_query_name_clash_gets_a_suffix_case_insensitively(self):
        self.json_client("/ws/n?name=Bob")
        self.json_client("/ws/n?name=bob")
        third = self.json_client("/ws/n?name=BOB")
        self.assertEqual(
            [m["name"] for m in events(third)[0]["members"]], ["Bob", "bob-2", "BOB-3"]
        )
        # Another room: no clash.
        self.assertEqual(events(self.json_client("/ws/m?name=bob"))[0]["name"], "bob")

    def test_bad_query_name_connects_as_guest_then_errors(self):
        client = self.json_client("/ws/n?name=%E2%80%AEevil")
        welcome, error = events(client)
        self.assertEqual(welcome["name"], "guest-1")
        self.assertEqual(error["type"], "error")
        self.assertEqual(error["code"], "bad_name")
        self.assertNotIn("ref", error)

    def test_name_event_clash_and_bad_name_leave_the_name(self):
        self.json_client("/ws/n?name=ann")
        bob = self.json_client("/ws/n?name=bob")
        self.send(bob, type="name", name="ANN")
        self.send(bob, type="name", name="")
        self.assertEqual(
            [(e["type"], e["code"]) for e in events(bob)[1:]],
            [("error", "name_taken"), ("error", "bad_name")],
        )
        self.send(bob, type="name", name="Bob")  # a case change of its own
        self.assertEqual(events(bob)[-1]["name"], "Bob")
        self.assertEqual(self.pump.factory.stats.bad_events["name_taken"], 1)

    def test_seed_clients_see_ids_whatever_the_names(self):
        ann = self.json_client("/ws/n?name=ann")
        seed = self.pump.connect("/ws/n")
        self.send(ann, type="message", text="hi")
        self.assertEqual(seed.texts, ["id 1: hi"])


class BadEventTests(ChatTestCase):
    def test_parse_event_codes(self):
        cases = {
            b"nope": "bad_json",
            b"[1]": "bad_json",
            b'{"type":"dance"}': "unknown_type",
            b'{"text":"x"}': "bad_event",
            b'{"type":"message"}': "bad_event",
            b'{"type":"message","text":5}': "bad_event",
            b'{"type":"message","text":"x","ref":true}': "bad_event",
            b'{"type":"message","text":"x","ref":"' + b"r" * 65 + b'"}': "bad_event",
            b'{"type":"name","name":null}': "bad_event",
        }
        for payload, code in cases.items():
            with self.assertRaises(BadEvent) as caught:
                parse_event(payload)
            self.assertEqual(caught.exception.code, code, payload)
        self.assertEqual(
            parse_event(b'{"type":"message","text":"x","ref":"r1"}').ref, "r1"
        )

    def test_each_bad_event_gets_an_error_and_the_connection_stays(self):
        ann = self.json_client("/?name=ann")
        bob = self.json_client("/?name=bob")
        ann.send_text("{not json")
        self.send(ann, type="dance")
        self.send(ann, type="message", text="x" * 65281, ref="big")
        self.send(ann, type="message", text=["x"], ref="c9")
        self.assertEqual(
            events(ann)[2:],
            [
                {"type": "error", "code": "bad_json", "reason": "not a JSON event"},
                {"type": "error", "code": "unknown_type",
                 "reason": "unknown event type"},
                {"type": "error", "code": "message_too_big",
                 "reason": "text is over 65280 bytes (UTF-8)", "ref": "big"},
                {"type": "error", "code": "bad_event",
                 "reason": "a message needs a text string", "ref": "c9"},
            ],
        )  # fmt: skip
        self.send(ann, type="message", text="x" * 65280, ref="fits")
        self.assertEqual(events(ann)[-1]["type"], "ack")
        self.assertEqual(events(bob)[-1]["text"], "x" * 65280)
        self.assertIsNone(ann.close_code)
        self.assertIn(
            "Connection 1 from 127.0.0.1: bad_json (not a JSON event)", self.logs.lines
        )

    def test_a_deeply_nested_event_is_bad_json_not_a_server_error(self):
        ann = self.json_client("/?name=ann")
        bob = self.json_client("/?name=bob")
        ann.send_text("[" * 60000)  # fits a message; json.loads recurses per level
        ann.send_text('{"type": "message", "text": ' + "[" * 60000 + "}")
        self.pump.pump()
        self.assertEqual(
            events(ann)[2:],
            [{"type": "error", "code": "bad_json", "reason": "not a JSON event"}] * 2,
        )
        self.send(ann, type="message", text="still here")
        self.assertEqual(events(bob)[-1]["text"], "still here")
        self.assertIsNone(ann.close_code)
        self.assertEqual(self.pump.factory.stats.bad_events["bad_json"], 2)
        self.assertFalse(any("error has occurred" in line for line in self.logs.lines))

    def test_ten_bad_events_in_ten_seconds_close_1008_after_an_error(self):
        ann = self.json_client("/?name=ann")
        bob = self.json_client("/?name=bob")
        for _ in range(9):
            ann.send_text("junk")
        self.pump.pump()
        self.pump.clock.advance(10.5)  # the first ones are now out of the window
        ann.send_text("junk")
        self.pump.pump()
        for _ in range(8):
            ann.send_text("junk")
        self.pump.pump()
        self.assertIsNone(ann.close_code)  # 9 within the last 10 s
        ann.send_text("junk")
        self.pump.pump()
        self.assertEqual(ann.close_code, 1008)
        self.assertEqual(
            events(ann)[-1],
            {"type": "error", "code": "bad_event", "reason": "too many bad events"},
        )
        self.assertEqual(self.pump.factory.dropped["bad_events"], 1)
        self.send(bob, type="message", text="still here")
        self.assertEqual(events(bob)[-1]["type"], "ack")


class RateLimitedTests(ChatTestCase):
    limits = Limits(rate_limit=1, rate_burst=2)

    def test_an_error_comes_before_the_rate_limit_close(self):
        ann = self.json_client("/?name=ann")
        for i in range(3):
            self.send(ann, type="message", text=str(i), ref=i)
        self.assertEqual(
            [e["type"] for e in events(ann)], ["welcome", "ack", "ack", "error"]
        )
        self.assertEqual(
            events(ann)[-1],
            {"type": "error", "code": "rate_limited", "reason": "rate limit exceeded"},
        )
        self.assertEqual(ann.close_code, 1008)


class TooBigTests(ChatTestCase):
    limits = Limits(rate_limit=0, max_message_size=1000)

    def test_an_error_comes_before_the_1009(self):
        ann = self.json_client("/?name=ann")
        ann.send_text(json.dumps({"type": "message", "text": "x" * 2000}))
        self.pump.pump()
        self.assertEqual(ann.close_code, 1009)
        self.assertEqual(events(ann)[-1]["code"], "message_too_big")
        self.assertEqual(events(ann)[0]["limits"]["max_text_bytes"], 744)


class RoomPathTests(ChatTestCase):
    def test_room_of_path(self):
        for path in ("", "/", "/ws", "/ws/"):
            self.assertEqual(room_of_path(path), "lobby")
        self.assertEqual(room_of_path("/ws/a.B_c-9"), "a.B_c-9")
        self.assertEqual(room_of_path("/ws/" + "x" * 64), "x" * 64)
        for path in ("/ws/" + "x" * 65, "/ws/a%20b", "/ws/a/b", "/ws/\u00e9", "/x"):
            self.assertIsNone(room_of_path(path), path)

    def test_bad_room_is_400_logged_counted(self):
        for path in ("/ws/a%20b", "/ws/a/b", "/ws/" + "x" * 65):
            client = self.pump.connect(path)
            self.assertEqual(client.status, 400, path)
            self.assertIn(b"bad room name", client.response)
        self.assertEqual(self.pump.factory.refused["bad_room"], 3)

    def test_rooms_are_freed_and_counted(self):
        a = self.pump.connect("/ws/a")
        b = self.json_client("/ws/b")
        factory = self.pump.factory
        self.assertEqual(factory.rooms.open, 2)
        self.assertEqual((factory.rooms.members(SEED), factory.rooms.members(JSON)),
                         (1, 1))  # fmt: skip
        a.transport.loseConnection()
        self.pump.pump()
        self.assertEqual(factory.rooms.names, ["b"])
        b.transport.loseConnection()
        self.pump.pump()
        self.assertEqual(factory.rooms.open, 0)


class MaxRoomsTests(ChatTestCase):
    limits = Limits(rate_limit=0, max_rooms=2)

    def test_a_new_room_past_the_cap_is_503_an_open_one_is_not(self):
        self.pump.connect("/ws/a")
        self.pump.connect("/ws/b")
        refused = self.pump.connect("/ws/c")
        self.assertEqual(refused.status, 503)
        self.assertIn(b"too many rooms", refused.response)
        self.assertEqual(self.pump.connect("/ws/a").status, 101)
        self.assertEqual(self.pump.factory.refused["max_rooms"], 1)


class EncodedOnceTests(SynchronousTestCase):
    def test_json_members_share_one_encoding_the_seed_skips_presence(self):
        clock = Clock()
        rooms = Rooms(clock, ChatStats())
        seed, one, two, sender = Recorder(1), Recorder(2), Recorder(3), Recorder(4)
        for member, codec in ((seed, SEED), (one, JSON), (two, JSON), (sender, JSON)):
            room = rooms.join("r", member, codec)
        room.publish_event(b"\x81\x02{}", member_id=2)
        room.publish(sender, b"hi")
        clock.advance(0)
        self.assertEqual(seed.writes, [SEED.encode(Message(4, b"hi", 0.0, 4))])
        self.assertEqual(one.writes, [JSON.encode(room_message(room, 4, b"hi"))])
        self.assertEqual(two.writes, [b"\x81\x02{}" + one.writes[0]])
        self.assertEqual(sender.writes, [b"\x81\x02{}"])
        # The two JSON members that are not senders got the same bytes object.
        three, four = Recorder(5), Recorder(6)
        rooms.join("r", three, JSON)
        rooms.join("r", four, JSON)
        room.publish(seed, b"again")
        clock.advance(0)
        self.assertIs(three.writes[-1], four.writes[-1])
        self.assertIs(one.writes[-1], three.writes[-1])

    def test_a_seed_only_room_queues_no_presence(self):
        clock = Clock()
        rooms = Rooms(clock, ChatStats())
        room = rooms.join("r", Recorder(1), SEED)
        room.publish_event(b"\x81\x02{}")
        self.assertEqual(clock.getDelayedCalls(), [])


def room_message(room, sender_id: int, text: bytes) -> Message:
    return Message(sender_id, text, 0.0, sender_id, room.name, f"guest-{sender_id}",
                   room.ts, room.offset)  # fmt: skip
