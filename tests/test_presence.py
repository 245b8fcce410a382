"""Rooms and presence across nodes, without Redis: the ``wc2`` envelope, and
the bookkeeping of other nodes' members (expiry driven by a ``Clock``).
The same against real redis-server and twistd nodes: tests/test_cluster.py."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from webchat.chat import WebChatFactory
from webchat.codecs import SEED
from webchat.redis import RedisRelay
from webchat.redis.envelope import (
    Envelope,
    MalformedEnvelopeError,
    PresenceEvent,
    decode_envelope,
    encode_envelope,
    encode_presence,
    stream_envelope_parts,
)
from webchat.redis.presence import RemotePresence, parse_snapshot


class Wc2EnvelopeTests(SynchronousTestCase):
    def test_a_message_carries_room_name_and_time_and_the_text_as_bytes(self):
        text = "line one\nline two with spaces  é 😀".encode()
        payload = encode_envelope("n1", 42, text, "room.A_b-1", "Ann Lee", 1234567)
        self.assertEqual(
            payload,
            b"wc2 n1 m room.A_b-1 42 1234567 Ann Lee\n" + text,
        )
        self.assertEqual(
            decode_envelope(payload),
            Envelope("n1", 42, text, "room.A_b-1", "Ann Lee", 1234567),
        )

    def test_presence_round_trips(self):
        for event, wire in [
            (PresenceEvent("n1", "join", 5, "r", 7, "A b"), b"wc2 n1 j 5 r 7 A b"),
            (PresenceEvent("n1", "name", 6, "r", 7, "Zed"), b"wc2 n1 n 6 r 7 Zed"),
            (PresenceEvent("n1", "leave", 7, "r", 7, ""), b"wc2 n1 l 7 r 7"),
            (PresenceEvent("n1", "typing", 0, "r", 7, "Zed"), b"wc2 n1 t r 7 Zed"),
            (PresenceEvent("n1", "beat", 9), b"wc2 n1 h 9"),
            (PresenceEvent("n1", "gone", 10), b"wc2 n1 x 10"),
        ]:
            self.assertEqual(encode_presence(event), wire)
            self.assertEqual(decode_envelope(wire), event)

    def test_malformed_is_refused_with_a_reason(self):
        bad = {
            b"wc2 n1 m r 1 0 Ann": "needs room, id, ts, name, LF",
            b"wc2 n1 m r 1 0\nhi": "needs room, id, ts, name, LF",
            b"wc2 n1 m r/x 1 0 Ann\nhi": "invalid room",
            b"wc2 n1 m r 1 -5 Ann\nhi": "invalid ts",
            b"wc2 n1 m r 1 01 Ann\nhi": "invalid ts",
            b"wc2 n1 m r 0 0 Ann\nhi": "invalid connection id",
            b"wc2 n1 m r 1 0 \x1b[2J\nhi": "invalid name",
            b"wc2 n1 m r 1 0 \xe2\x80\xaeevil\nhi": "invalid name",  # RLO
            b"wc2 n1 m r 1 0 " + b"x" * 33 + b"\nhi": "invalid name",
            b"wc2 n1 m r 1 0  Ann\nhi": "invalid name",  # not trimmed
            b"wc2 n1 m r 1 0 Ann\n\xff": "not valid UTF-8",
            b"wc2 n1 q 1": "unknown kind",
            b"wc2 n1 j 0 r 1 Ann": "invalid version",
            b"wc2 n1 j 1 r 1": "needs version, room, id, name",
            b"wc2 n1 l 1 r": "needs version, room, id",
            b"wc2 n1 h x": "invalid version",
            b"wc2 n/1 h 1": "invalid node id",
        }
        for payload, error in bad.items():
            with self.assertRaises(MalformedEnvelopeError, msg=payload) as caught:
                decode_envelope(payload)
            self.assertIn(error, str(caught.exception), payload)

    def test_a_kept_message_carries_its_offset_and_epoch(self):
        before, between, after = stream_envelope_parts(
            "n1", "r", 7, 100, "Ann Lee", b"hi\nthere", delayed=False
        )
        payload = before + b"12" + between + b"Ep_-1" + after
        self.assertEqual(payload, b"wc2 n1 s r 12 Ep_-1 7 100 Ann Lee\nhi\nthere")
        self.assertEqual(
            decode_envelope(payload),
            Envelope("n1", 7, b"hi\nthere", "r", "Ann Lee", 100, 12, "Ep_-1", False),
        )
        self.assertTrue(decode_envelope(b"wc2 n1 d r 3 e 7 1 A\nx").delayed)
        for bad, error in [
            (b"wc2 n1 s r 0 e 7 1 A\nx", "invalid offset"),
            (b"wc2 n1 s r 1 e/x 7 1 A\nx", "invalid epoch"),
            (b"wc2 n1 s r 1 e 7 1\nx", "needs room, offset, epoch"),
        ]:
            with self.assertRaises(MalformedEnvelopeError, msg=bad) as caught:
                decode_envelope(bad)
            self.assertIn(error, str(caught.exception))

    def test_names_beyond_the_fast_path_still_pass_when_good(self):
        # A no-break space is not "printable" to Python, but a fine name.
        payload = encode_envelope("n1", 1, b"hi", "r", "Ann\u00a0Lee")
        self.assertEqual(decode_envelope(payload).name, "Ann\u00a0Lee")


class Listener:
    """Records what the chat would be told."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    # ``user`` (--auth) is recorded only when there is one.

    def remote_joined(self, room: str, chat_id: int, name: str, user="") -> None:
        self.calls.append(("join", room, chat_id, name, *([user] if user else [])))

    def remote_left(self, room: str, chat_id: int, name: str, user="") -> None:
        self.calls.append(("leave", room, chat_id, name, *([user] if user else [])))

    def remote_renamed(
        self, room: str, chat_id: int, old: str, name: str, user=""
    ) -> None:
        self.calls.append(("name", room, chat_id, old, name))

    def remote_typing(self, room: str, chat_id: int, name: str, user="") -> None:
        self.calls.append(("typing", room, chat_id, name, *([user] if user else [])))


def hash_reply(version: int, **members: tuple[str, str]) -> list[bytes]:
    """A presence hash as HGETALL returns it (member ids as m<N> keywords)."""
    reply = [b"_v", b"%d" % version]
    for key, (room, name) in members.items():
        reply += [key[1:].encode(), f"{room} {name}".encode()]
    return reply


class RemotePresenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs.append)
        self.clock = Clock()
        self.asked: list[str] = []
        self.presence = RemotePresence(self.clock, self.asked.append, timeout=3.0)
        self.listener = Listener()
        self.presence.listener = self.listener

    def know(self, node: str = "a", version: int = 10, **members: Any) -> None:
        self.presence.ask(node)
        self.presence.snapshot(node, hash_reply(version, **members), 3000)
        self.listener.calls.clear()
        self.asked.clear()

    def test_an_unknown_node_is_read_from_its_hash(self):
        self.presence.event(PresenceEvent("a", "join", 11, "r", 7, "Ann"))
        self.assertEqual(self.asked, ["a"])
        self.assertEqual(self.listener.calls, [])  # the hash will say it
        self.presence.snapshot("a", hash_reply(11, m7=("r", "Ann")), 3000)
        self.assertEqual(self.listener.calls, [("join", "r", 7, "Ann")])
        self.assertEqual(self.presence.roster("r"), [{"id": 7, "name": "Ann"}])
        self.assertEqual(self.presence.members, 1)

    def test_events_in_order_apply_and_stale_ones_do_not(self):
        self.know(m7=("r", "Ann"))
        p = self.presence
        p.event(PresenceEvent("a", "join", 11, "r", 8, "Bob"))
        p.event(PresenceEvent("a", "name", 12, "r", 8, "Rob"))
        p.event(PresenceEvent("a", "leave", 13, "r", 7, ""))
        p.event(PresenceEvent("a", "join", 12, "r", 9, "Late"))  # stale
        p.event(PresenceEvent("a", "typing", 0, "r", 8, "Rob"))
        p.event(PresenceEvent("a", "typing", 0, "r", 99, "Nobody"))  # unknown
        self.assertEqual(
            self.listener.calls,
            [
                ("join", "r", 8, "Bob"),
                ("name", "r", 8, "Bob", "Rob"),
                ("leave", "r", 7, "Ann"),
                ("typing", "r", 8, "Rob"),
            ],
        )
        self.assertEqual(self.asked, [])
        self.assertTrue(p.name_taken("r", "rob"))
        self.assertFalse(p.name_taken("r", "bob"))
        self.assertFalse(p.name_taken("other", "rob"))

    def test_a_skipped_version_reads_the_hash_which_then_rules(self):
        self.know(m7=("r", "Ann"), m8=("r", "Bob"))
        self.presence.event(PresenceEvent("a", "join", 13, "s", 9, "Cy"))
        self.assertEqual(self.asked, ["a"])
        # Meanwhile (11, 12) Bob left and Ann went to room t.
        self.presence.snapshot(
            "a", hash_reply(13, m7=("t", "Ann"), m9=("s", "Cy")), 3000
        )
        self.assertEqual(
            sorted(self.listener.calls),
            sorted(
                [
                    ("join", "s", 9, "Cy"),
                    ("leave", "r", 8, "Bob"),
                    ("leave", "r", 7, "Ann"),
                    ("join", "t", 7, "Ann"),
                ]
            ),
        )
        self.assertEqual(self.presence.members, 2)

    def test_a_beat_with_a_newer_version_reads_the_hash(self):
        self.know(version=10)
        self.presence.event(PresenceEvent("a", "beat", 10))
        self.assertEqual(self.asked, [])
        self.presence.event(PresenceEvent("a", "beat", 12))
        self.assertEqual(self.asked, ["a"])
        # Asked once at a time; asked again when the answer is older.
        self.presence.event(PresenceEvent("a", "join", 13, "r", 1, "Z"))
        self.assertEqual(self.asked, ["a"])
        self.presence.snapshot("a", hash_reply(12), 3000)
        self.assertEqual(self.asked, ["a", "a"])
        self.assertEqual(self.presence.roster("r"), [{"id": 1, "name": "Z"}])

    def test_a_node_not_heard_from_within_the_timeout_leaves(self):
        self.know("a", m7=("r", "Ann"))
        self.know("b", m8=("r", "Bob"))
        for _ in range(3):
            self.clock.advance(1.0)
            self.presence.heard("b")  # b beats, a is dead
        self.assertEqual(self.presence.expire(), [])  # 3 s after a: not yet
        self.clock.advance(0.5)
        self.assertEqual(self.presence.expire(), ["a"])
        self.assertEqual(self.listener.calls, [("leave", "r", 7, "Ann")])
        self.assertEqual(self.presence.nodes, ["b"])
        self.assertEqual(self.presence.roster("r"), [{"id": 8, "name": "Bob"}])

    def test_the_hash_ttl_says_when_the_node_last_beat(self):
        self.presence.ask("a")
        # Read 2.5 s after its last beat (0.5 s of its 3 s TTL left).
        self.presence.snapshot("a", hash_reply(1, m7=("r", "Ann")), 500)
        self.clock.advance(0.6)
        self.assertEqual(self.presence.expire(), ["a"])

    def test_a_node_that_stops_cleanly_leaves_at_once(self):
        self.know("a", m7=("r", "Ann"), m8=("s", "Bob"))
        self.presence.event(PresenceEvent("a", "gone", 11))
        self.assertEqual(
            sorted(self.listener.calls),
            [("leave", "r", 7, "Ann"), ("leave", "s", 8, "Bob")],
        )
        self.assertEqual((self.presence.members, self.presence.nodes), (0, []))

    def test_no_hash_no_node(self):
        self.know("a", m7=("r", "Ann"))
        self.presence.ask("a")
        self.presence.snapshot("a", [], -2)
        self.assertEqual(self.listener.calls, [("leave", "r", 7, "Ann")])
        self.presence.ask("ghost")
        self.presence.snapshot("ghost", [], -2)
        self.assertEqual(self.presence.nodes, [])

    def test_bounded_whatever_is_published(self):
        presence = RemotePresence(
            self.clock, self.asked.append, timeout=3.0, max_members=5, max_nodes=2
        )
        for node in ("a", "b", "c"):
            presence.ask(node)
            members = {f"m{n}": ("r", f"{node}{n}") for n in range(1, 5)}
            members = {
                f"m{ord(node) * 100 + int(k[1:])}": v for k, v in members.items()
            }
            presence.snapshot(node, hash_reply(1, **members), 3000)
        self.assertEqual(presence.members, 5)
        self.assertEqual(len(presence.nodes), 2)
        self.assertEqual(presence.dropped["over_cap"], 4)  # 3 of b, c itself
        lines = [formatEvent(e) for e in self.logs if e.get("log_source") is presence]
        self.assertEqual(len(lines), 1, lines)  # one line a minute at most
        self.assertIn("more than 5 members of other nodes", lines[0])
        # A node may not claim another's member.
        presence.snapshot("b", hash_reply(5, m9701=("r", "thief")), 3000)
        self.assertEqual(presence.dropped["conflict"], 1)

    def test_snapshot_requests_at_once_are_capped(self):
        for n in range(100):
            self.presence.event(PresenceEvent(f"bogus{n}", "beat", 1))
        self.assertEqual(len(self.asked), 32)
        self.assertEqual(self.presence.dropped["busy"], 68)
        for node in self.asked:
            self.presence.snapshot(node, [], -2)
        self.assertEqual(self.presence.nodes, [])

    def test_a_bad_hash_field_is_skipped_and_counted(self):
        version, members, bad = parse_snapshot(
            [
                b"_v",
                b"4",
                b"7",
                b"r Ann",
                b"x",
                b"r Bob",
                b"8",
                b"r \x1bevil",
                b"9",
                b"r",
            ]
        )
        self.assertEqual((version, members, bad), (4, {7: ("r", "Ann", "")}, 3))


class ChatWithPresenceTests(SynchronousTestCase):
    """The chat's side: remote members in welcome, names and events."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = WebChatFactory(self.clock)
        self.relay = RedisRelay(
            self.clock, "redis://127.0.0.1", node_id="me", on_envelope=lambda e: None
        )
        self.factory.attach_link(self.relay)
        self.relay.presence.ask("a")
        self.relay.presence.snapshot(
            "a", hash_reply(3, m500=("r", "Ann"), m501=("other", "Bob")), 30000
        )

    def test_free_names_avoid_remote_members_of_the_room(self):
        room = self.factory.rooms.join("r", _Member(1), member_name="ann")
        self.assertEqual(room.roster(), [{"id": 1, "name": "ann-2"}])
        other = self.factory.rooms.join("other", _Member(2), member_name="Ann")
        self.assertEqual(other.roster(), [{"id": 2, "name": "Ann"}])
        member = _Member(3)
        room.join(member, SEED)
        self.assertFalse(room.rename(member, "ANN"))
        self.assertEqual(
            self.factory._roster(room),
            [
                {"id": 1, "name": "ann-2"},
                {"id": 3, "name": "guest-3"},
                {"id": 500, "name": "Ann"},
            ],
        )


class _Member:
    def __init__(self, chat_id: int) -> None:
        self.chat_id = chat_id
        self.chat_name = ""

    def deliver(self, data: bytes | memoryview) -> bool:
        return True
