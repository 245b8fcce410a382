"""Rooms without sockets: who gets what, in which order, in one write."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from webchat.chat import WebChatFactory
from webchat.codecs import Message
from webchat.frames import text_frame
from webchat.metrics import ChatStats
from webchat.room import RELEASE_ABOVE
from webchat.rooms import Rooms


class Plain:
    """A codec that sends the text as it came: frames are what the tests say."""

    name = "plain"

    def encode(self, message: Message) -> bytes:
        return message.text


PLAIN = Plain()


class Recorder:
    def __init__(self, chat_id: int, closing: bool = False) -> None:
        self.chat_id = chat_id
        self.closing = closing
        self.writes: list[bytes] = []

    def deliver(self, data: bytes) -> bool:
        if self.closing:
            return False
        self.writes.append(data)
        return True


class RoomTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.stats = ChatStats()
        self.rooms = Rooms(self.clock, self.stats)
        self.members = [Recorder(chat_id) for chat_id in range(1, 5)]
        for member in self.members:
            self.room = self.rooms.join("lobby", member, PLAIN)

    def test_nothing_is_sent_before_the_end_of_the_turn_and_nothing_waits_longer(self):
        a = self.members[0]
        self.assertEqual(self.room.publish(a, b"F1"), 3)
        self.assertEqual([m.writes for m in self.members], [[], [], [], []])
        self.clock.advance(0)  # the end of this reactor iteration, not a timer
        self.assertEqual(
            [m.writes for m in self.members], [[], [b"F1"], [b"F1"], [b"F1"]]
        )

    def test_one_write_per_member_per_turn_without_its_own_frames(self):
        a, b, c, d = self.members
        self.room.publish(a, b"A1")
        self.room.publish(b, b"B1")
        self.room.publish(a, b"A2")
        self.room.publish(None, b"R1")  # from another node: goes to everyone
        self.clock.advance(0)
        self.assertEqual(a.writes, [b"B1R1"])
        self.assertEqual(b.writes, [b"A1A2R1"])
        self.assertEqual(c.writes, [b"A1B1A2R1"])
        self.assertEqual(d.writes, [b"A1B1A2R1"])
        # 4 messages to 4 members, less the 3 that were the member's own.
        self.assertEqual(self.stats.deliveries, 13)
        self.assertEqual(self.stats.bytes_sent, 4 + 6 + 8 + 8)
        (histogram,) = self.stats.fanout_seconds.collect()
        counts = [s.value for s in histogram.samples if s.name.endswith("_count")]
        self.assertEqual(counts, [4])  # one fan-out time per message

    def test_a_member_on_its_way_out_costs_nobody_anything(self):
        a, b, c, d = self.members
        b.closing = True
        self.room.publish(a, b"A1")
        self.clock.advance(0)
        self.assertEqual((b.writes, c.writes, d.writes), ([], [b"A1"], [b"A1"]))
        self.assertEqual(self.stats.deliveries, 2)

    def test_a_sender_that_left_before_the_flush_still_reaches_the_others(self):
        a, b, _c, _d = self.members
        self.room.publish(a, b"A1")
        self.rooms.leave(self.room, a)
        self.clock.advance(0)
        self.assertEqual((a.writes, b.writes), ([], [b"A1"]))

    def test_a_big_turn_reaches_a_sender_as_views_around_its_own_frames(self):
        a, b, c, _d = self.members
        big = [b"A" * 40_000, b"B" * 40_000, b"C" * 40_000, b"A" * 10, b"B" * 10]
        for sender, frame in zip((a, b, c, a, b), big, strict=True):
            self.room.publish(sender, frame)
        self.clock.advance(0)
        # Not copied: each run of other people's frames is a view of the one
        # buffer that everybody else gets.
        self.assertEqual([bytes(w) for w in a.writes], [big[1] + big[2], big[4]])
        self.assertEqual([bytes(w) for w in b.writes], [big[0], big[2] + big[3]])
        self.assertEqual(
            [bytes(w) for w in c.writes], [big[0] + big[1], big[3] + big[4]]
        )
        self.assertTrue(all(isinstance(w, memoryview) for w in a.writes + b.writes))
        self.assertEqual(self.members[3].writes, [b"".join(big)])
        # Each frame to the three members that did not send it.
        self.assertEqual(self.stats.deliveries, 3 * len(big))
        self.assertEqual(self.stats.bytes_sent, 3 * len(b"".join(big)))

    def test_memory_is_handed_back_after_a_big_turn_only(self):
        released = []
        rooms = Rooms(self.clock, self.stats, release_memory=lambda: released.append(1))
        a, b = Recorder(1), Recorder(2)
        rooms.join("lobby", a, PLAIN)
        room = rooms.join("lobby", b, PLAIN)
        room.publish(a, b"small")
        self.clock.advance(0)
        self.assertEqual(released, [])
        for _ in range(5):
            room.publish(a, b"x" * (RELEASE_ABOVE // 4))
        self.clock.advance(0)
        self.assertEqual(released, [1])
        self.assertEqual(len(b.writes[-1]), 5 * (RELEASE_ABOVE // 4))

    def test_ids_count_up_and_are_never_reused(self):
        factory = WebChatFactory(self.clock)
        ids = [factory.allocate_id() for _ in range(4)]
        self.assertEqual(ids, [1, 2, 3, 4])
        self.rooms.leave(self.room, self.members[3])
        self.assertEqual(factory.allocate_id(), 5)


class FrameTests(SynchronousTestCase):
    def test_lengths(self):
        self.assertEqual(text_frame(b"id 1: ", b"hi"), b"\x81\x08id 1: hi")
        self.assertEqual(text_frame(b"x" * 126)[:4], b"\x81\x7e\x00\x7e")
        self.assertEqual(
            text_frame(b"x" * 65536)[:10], b"\x81\x7f" + (65536).to_bytes(8, "big")
        )


class Broken(Recorder):
    def deliver(self, data: bytes) -> bool:
        raise RuntimeError("a bug in delivering")


class FailureTests(SynchronousTestCase):
    def test_a_member_whose_delivery_raises_costs_the_others_nothing(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        rooms = Rooms(clock, ChatStats())
        a, broken, c = Recorder(1), Broken(2), Recorder(3)
        for member in (a, broken, c):
            room = rooms.join("lobby", member, PLAIN)
        room.publish(a, b"A1")
        clock.advance(0)
        self.assertEqual(c.writes, [b"A1"])  # after the broken member: still served
        room.publish(a, b"A2")
        clock.advance(0)
        self.assertEqual(c.writes, [b"A1", b"A2"])
        failures = [
            e
            for e in events
            if e.get("log_format", "").startswith("An error has occurred: delivering")
        ]
        self.assertEqual(len(failures), 1)  # once, not once a turn
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(room), 2)


class RoomsTests(SynchronousTestCase):
    def test_one_end_of_turn_flush_for_all_busy_rooms(self):
        clock = Clock()
        rooms = Rooms(clock, ChatStats())
        a, b, c, d = (Recorder(i) for i in range(1, 5))
        red = rooms.join("red", a, PLAIN)
        rooms.join("red", b, PLAIN)
        blue = rooms.join("blue", c, PLAIN)
        rooms.join("blue", d, PLAIN)
        red.publish(a, b"R")
        blue.publish(c, b"B")
        red.publish(b, b"R2")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertEqual((a.writes, b.writes), ([b"R2"], [b"R"]))
        self.assertEqual((c.writes, d.writes), ([], [b"B"]))  # rooms do not mix

    def test_a_room_is_made_on_first_join_and_freed_when_empty(self):
        clock = Clock()
        rooms = Rooms(clock, ChatStats())
        a, b = Recorder(1), Recorder(2)
        room = rooms.join("red", a, PLAIN)
        self.assertIs(rooms.join("red", b, PLAIN), room)
        self.assertEqual((rooms.names, len(rooms)), (["red"], 2))
        room.publish(a, b"bye")
        rooms.leave(room, a)
        rooms.leave(room, b)
        # Its last turn is still owed (to nobody now): it goes at the flush.
        clock.advance(0)
        self.assertEqual((rooms.names, len(rooms)), ([], 0))
        self.assertIsNone(rooms.get("red"))
        self.assertIsNot(rooms.join("red", a, PLAIN), room)


class Timed(Recorder):
    """A member whose every write takes a millisecond of the room's timer."""

    def __init__(self, chat_id: int, now: list[float]) -> None:
        super().__init__(chat_id)
        self.now = now

    def deliver(self, data: bytes) -> bool:
        self.now[0] += 0.001
        return super().deliver(data)


class PassTests(SynchronousTestCase):
    """
    A pass over a room's members yields to the reactor once it has taken its
    slice's time, and whoever's turn comes next is sent everything it is owed
    up to then: what arrived mid-pass included.
    """

    def setUp(self):
        self.clock = Clock()
        self.stats = ChatStats()
        self.now = [0.0]
        self.rooms = Rooms(self.clock, self.stats)
        self.rooms.timer = lambda: self.now[0]
        # Three writes (3 ms) are more than a slice: a slice serves three.
        self.rooms.slice_seconds = 0.0025
        self.rooms.slice_check = 1
        self.members = [Timed(chat_id, self.now) for chat_id in range(1, 7)]
        for member in self.members:
            self.room = self.rooms.join("lobby", member, PLAIN)

    def writes(self) -> list[list[bytes]]:
        return [[bytes(w) for w in m.writes] for m in self.members]

    def turn(self) -> None:
        """
        One reactor iteration: the one call due (``Clock.advance(0)`` would
        also run the calls that call makes, the next slices included).
        """
        (call,) = self.clock.getDelayedCalls()
        self.clock.calls.remove(call)
        call.func(*call.args, **call.kw)

    def test_what_arrives_mid_pass_reaches_the_rest_of_the_pass_and_then_the_rest(
        self,
    ):
        m1, m2, _m3, _m4, _m5, m6 = self.members
        self.room.publish(m1, b"A1")
        self.turn()
        # The first slice: 1 (its own message only), 2, 3, 4; then the reactor.
        self.assertEqual(self.writes(), [[], [b"A1"], [b"A1"], [b"A1"], [], []])
        # Read meanwhile: one from a member served already, one from a member
        # not served yet.  The room is due once, not once more per message.
        self.room.publish(m2, b"B1")
        self.room.publish(m6, b"F1")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.turn()
        # The rest of the pass: everything up to now, in one write, less a
        # sender's own.
        self.assertEqual(
            self.writes(),
            [[], [b"A1"], [b"A1"], [b"A1"], [b"A1B1F1"], [b"A1B1"]],
        )
        self.turn()  # the next pass: the first three
        self.turn()  # ... and the fourth; 5 and 6 are owed nothing
        self.assertEqual(
            self.writes(),
            [
                [b"B1F1"],
                [b"A1", b"F1"],
                [b"A1", b"B1F1"],
                [b"A1", b"B1F1"],
                [b"A1B1F1"],
                [b"A1B1"],
            ],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])  # nothing owed
        self.assertEqual(self.stats.deliveries, 15)  # 3 messages to 5 each
        (histogram,) = self.stats.fanout_seconds.collect()
        counts = [s.value for s in histogram.samples if s.name.endswith("_count")]
        self.assertEqual(counts, [3])  # taken once each, once sent to everyone

    def test_a_joiner_mid_pass_is_sent_what_comes_after_its_history_only(self):
        m1, _m2, _m3, _m4, m5, m6 = self.members
        self.room.publish(m1, b"A1")
        self.turn()
        # A1 has been kept: a member joining now has it as history (up to
        # ``flushed``), never live, even though the pass is not over.
        self.assertEqual(self.room.flushed, 1)
        joiner = Timed(7, self.now)
        self.rooms.join("lobby", joiner, PLAIN)
        self.rooms.leave(self.room, m5)  # not served yet: gets nothing more
        self.room.publish(m6, b"F1")
        self.turn()  # the rest of the pass: 6 (5 has gone)
        self.turn()  # the next pass: 1, 2, 3
        self.turn()  # ... 4, 6 (nothing owed) and the joiner
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(
            [*self.writes(), joiner.writes],
            [
                [b"F1"],
                [b"A1", b"F1"],
                [b"A1", b"F1"],
                [b"A1", b"F1"],
                [],
                [b"A1"],
                [b"F1"],
            ],
        )

    def test_a_pass_that_fits_its_slice_is_one_turn_as_before(self):
        m1 = self.members[0]
        self.rooms.slice_seconds = 1.0
        rooms = Rooms(self.clock, self.stats)
        rooms.timer = lambda: self.now[0]
        rooms.slice_seconds = 1.0
        rooms.slice_check = 1
        for member in self.members:
            room = rooms.join("lounge", member, PLAIN)
        room.publish(m1, b"A1")
        self.turn()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.writes(), [[]] + [[b"A1"]] * 5)

    def test_a_member_released_mid_pass_gets_its_history_first_then_live(self):
        m1, _m2, _m3, _m4, m5, _m6 = self.members
        self.room.hold(m5)
        self.room.publish(m1, b"A1")
        self.turn()  # 1-4; 5's history is still being read
        self.assertTrue(self.room.release(m5, [b"H"]))  # before its turn came
        self.room.publish(m1, b"A2")
        self.turn()  # 5 and 6: everything up to now
        self.assertEqual([bytes(w) for w in m5.writes], [b"H", b"A1A2"])

    def test_a_big_share_across_chunks_reaches_a_sender_around_its_own(self):
        m1, _m2, _m3, _m4, m5, m6 = self.members
        big = [b"A" * 40_000, b"F" * 40_000, b"B" * 10]
        self.room.publish(m1, big[0])
        self.turn()
        self.room.publish(m6, big[1])  # mid-pass, from a member not yet served
        self.room.publish(m1, big[2])
        self.turn()
        self.assertEqual([bytes(w) for w in m6.writes], [big[0], big[2]])
        self.assertTrue(all(isinstance(w, memoryview) for w in m6.writes))
        self.assertEqual([bytes(w) for w in m5.writes], [b"".join(big)])
