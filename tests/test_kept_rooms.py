"""With --redis, the chat side of rooms kept in Redis (issue #14), in memory:
a room whose epoch and offset come later (Redis answers over the network)
greets its joiners only then, and kept messages that come meanwhile meet
the history without a gap or a duplicate; a client's ack waits for its
message to come back numbered."""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.test_json import PROTOCOL, T0
from webchat.codecs import Message
from webchat.limits import Limits
from webchat.redis import Envelope, RedisRelay
from webchat.testing import ChatPump, MemoryClient


class FakeStreams:
    """RoomStreams' answers, given by the test (Redis is far away)."""

    limit = 100

    def __init__(self) -> None:
        self.opening: Deferred[tuple[str, int]] = Deferred()
        self.kept: list[Message] = []

    def open_room(self, room: str) -> Deferred[tuple[str, int]]:
        return self.opening

    def read(self, room: str, after: int, upto: int) -> list[Message]:
        return [m for m in self.kept if after < m.offset <= upto]


def kept(offset: int, node: str = "other", chat_id: int = 500) -> Envelope:
    return Envelope(
        node, chat_id, b"m%d" % offset, "r", "bob", 1000 + offset, offset, "E1"
    )


class KeptRoomTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = clock = Clock()
        clock.advance(T0)
        self.pump = ChatPump(clock=clock, limits=Limits(rate_limit=0))
        factory = self.pump.factory
        self.relay = RedisRelay(
            clock, "redis://127.0.0.1", node_id="me", on_envelope=lambda e: None
        )
        self.relay.keep_history(100, 0)
        factory.attach_link(self.relay)
        self.streams = FakeStreams()
        factory.kept.streams = self.streams  # type: ignore[union-attr]
        self.factory = factory

    def events(self, client: MemoryClient) -> list[dict]:
        return [json.loads(text) for text in client.texts]

    def test_messages_kept_while_the_room_opens_meet_its_history_exactly(self):
        self.relay._up = True  # as if both links were up: the channel brings them
        self.streams.kept = [
            Message(500, b"m%d" % n, 0.0, 0, "r", "bob", 1000 + n, n)
            for n in range(1, 6)
        ]
        client = self.pump.connect("/ws/r", **PROTOCOL)
        self.assertEqual(client.texts, [])  # held: the room is not known yet
        # Redis kept 5 before it answered, 6 after; the channel brings both
        # before the answer.
        self.factory.deliver_kept(kept(5))
        self.factory.deliver_kept(kept(6))
        self.pump.pump()
        self.assertEqual(client.texts, [])
        self.streams.opening.callback(("E1", 5))
        self.pump.pump()
        got = self.events(client)
        self.assertEqual(got[0]["type"], "welcome")
        self.assertEqual((got[0]["offset"], got[0]["epoch"]), (5, "E1"))
        messages = [e for e in got if e["type"] == "message"]
        self.assertEqual([m["offset"] for m in messages], [1, 2, 3, 4, 5, 6])
        self.assertEqual(
            [m.get("history", False) for m in messages], [True] * 5 + [False]
        )
        # Live from now on, in offset order; an old one again is dropped.
        self.factory.deliver_kept(kept(6))
        self.factory.deliver_kept(kept(7))
        self.pump.pump()
        later = [e["offset"] for e in self.events(client)[len(got) :]]
        self.assertEqual(later, [7])

    def test_kept_messages_heard_before_the_link_is_up_wait_for_the_missed(self):
        # After an outage a node's subscriber may be back before its
        # publisher: the channel then brings the newest kept message before
        # this node has read the ones it missed.  Delivered at once, it would
        # move the room past them, and the catch-up (which reads after the
        # room's offset) would skip them for good.
        self.relay._up = True
        self.streams.kept = [
            Message(500, b"m%d" % n, 0.0, 0, "r", "bob", 1000 + n, n)
            for n in range(1, 9)
        ]
        self.streams.read = lambda room, after, upto: [  # type: ignore[method-assign]
            m for m in self.streams.kept if after < m.offset <= min(upto, 5)
        ]
        self.streams.opening.callback(("E1", 5))
        client = self.pump.connect("/ws/r", **PROTOCOL)
        self.pump.pump()
        seen = len(self.events(client))
        self.relay._up = False  # the link is lost; 6 and 7 are kept meanwhile
        self.factory.deliver_kept(kept(8))  # the subscriber is back first
        self.pump.pump()
        self.relay._up = True  # and now the publisher: the link is up
        self.streams.open_room = lambda room: succeed(("E1", 8))  # type: ignore[method-assign]
        self.streams.read = lambda room, after, upto: succeed(  # type: ignore[method-assign]
            [m for m in self.streams.kept if after < m.offset <= upto]
        )
        self.factory._link_back()
        self.pump.pump()
        later = [e for e in self.events(client)[seen:] if e["type"] == "message"]
        self.assertEqual([m["offset"] for m in later], [6, 7, 8])

    def open_room_at_5(self) -> MemoryClient:
        """A member in room r, open at offset 5 of E1; Redis keeps 1-8."""
        self.relay._up = True
        self.streams.kept = [
            Message(500, b"m%d" % n, 0.0, 0, "r", "bob", 1000 + n, n)
            for n in range(1, 9)
        ]
        self.streams.opening.callback(("E1", 5))
        client = self.pump.connect("/ws/r", **PROTOCOL)
        self.pump.pump()
        self.streams.open_room = lambda room: succeed(("E1", 8))  # type: ignore[method-assign]
        return client

    def live(self, client: MemoryClient, seen: int) -> list[tuple[int, bool]]:
        return [
            (e["offset"], e.get("delayed", False))
            for e in self.events(client)[seen:]
            if e["type"] == "message"
        ]

    def test_after_a_gap_only_the_missed_messages_are_marked_delayed(self):
        # The channel lost 6 and 7 (or the reply raced it): 8, heard live,
        # is read back with them, but it was not delayed by anything.
        client = self.open_room_at_5()
        seen = len(self.events(client))
        self.streams.read = lambda room, after, upto: succeed(  # type: ignore[method-assign]
            [m for m in self.streams.kept if after < m.offset <= upto]
        )
        self.factory.deliver_kept(kept(8))
        self.pump.pump()
        self.assertEqual(self.live(client, seen), [(6, True), (7, True), (8, False)])

    def test_missed_messages_read_back_keep_their_user(self):
        # Issue #15: the catch-up shows a signed sender's user as kept with
        # the message, though its node's presence no longer knows it.
        client = self.open_room_at_5()
        seen = len(self.events(client))
        self.streams.kept[5] = self.streams.kept[5]._replace(user="u-9")
        self.streams.read = lambda room, after, upto: succeed(  # type: ignore[method-assign]
            [m for m in self.streams.kept if after < m.offset <= upto]
        )
        self.factory.deliver_kept(kept(8))
        self.pump.pump()
        said = [e for e in self.events(client)[seen:] if e["type"] == "message"]
        self.assertEqual(
            [(m["offset"], m.get("user")) for m in said],
            [(6, "u-9"), (7, None), (8, None)],
        )

    def test_a_catch_up_read_that_fails_is_tried_again_before_newer_ones(self):
        # A restarted Redis answers LOADING for a moment: the newer message
        # waits for the missed ones instead of moving the room past them.
        client = self.open_room_at_5()
        seen = len(self.events(client))
        answers = [fail(RuntimeError("LOADING Redis is loading the dataset"))]
        self.streams.read = lambda room, after, upto: (  # type: ignore[method-assign]
            answers.pop()
            if answers
            else succeed([m for m in self.streams.kept if after < m.offset <= upto])
        )
        lines: list[str] = []
        observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.factory.deliver_kept(kept(8))
        self.pump.pump()
        self.assertEqual(self.live(client, seen), [])
        self.assertIn(
            "Could not read what room r missed while Redis was away: LOADING Redis"
            " is loading the dataset (trying again in 1 s)",
            lines,
        )
        self.clock.advance(1)
        self.pump.pump()
        self.assertEqual(self.live(client, seen), [(6, True), (7, True), (8, False)])

    def test_the_ack_comes_when_the_message_comes_back_numbered(self):
        self.streams.opening.callback(("E1", 0))
        sender = self.pump.connect("/ws/r", **PROTOCOL)
        other = self.pump.connect("/ws/r", **PROTOCOL)
        sender_id = self.events(sender)[0]["id"]
        self.relay._up = True  # as if both links were up
        appended = []
        self.relay.append_message = lambda *args, **kw: (  # type: ignore[method-assign]
            appended.append(args) or Deferred()
        )
        sender.send_text(json.dumps({"type": "message", "text": "hi", "ref": "a"}))
        self.pump.pump()
        self.assertEqual(len(appended), 1)
        self.assertNotIn("ack", [e["type"] for e in self.events(sender)])
        self.assertNotIn("message", [e["type"] for e in self.events(other)])
        echo = Envelope("me", sender_id, b"hi", "r", "guest", 1234, 1, "E1")
        self.factory.deliver_kept(echo)
        self.pump.pump()
        acks = [e for e in self.events(sender) if e["type"] == "ack"]
        self.assertEqual(acks, [{"type": "ack", "ref": "a", "offset": 1, "ts": 1234}])
        self.assertNotIn("message", [e["type"] for e in self.events(sender)])
        (message,) = [e for e in self.events(other) if e["type"] == "message"]
        self.assertEqual((message["text"], message["offset"]), ("hi", 1))

    def test_while_redis_is_away_members_here_get_it_at_once_without_offset(self):
        self.streams.opening.callback(("E1", 0))
        sender = self.pump.connect("/ws/r", **PROTOCOL)
        other = self.pump.connect("/ws/r", **PROTOCOL)
        sender.send_text(json.dumps({"type": "message", "text": "hi", "ref": "a"}))
        self.pump.pump()
        (ack,) = [e for e in self.events(sender) if e["type"] == "ack"]
        self.assertEqual((ack["ref"], ack["offset"]), ("a", None))
        (message,) = [e for e in self.events(other) if e["type"] == "message"]
        self.assertEqual((message["text"], message["offset"]), ("hi", None))
        self.assertEqual([m[4] for m in self.relay.later], [b"hi"])
