"""Wire formats: the seed's bytes, and one encoding per codec per turn."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_room import Recorder
from webchat.codecs import SEED, Message
from webchat.metrics import ChatStats
from webchat.rooms import Rooms


class Counting:
    """A second wire format, made up for the test: ``<N>text``, encodes counted."""

    name = "counting"

    def __init__(self) -> None:
        self.encoded: list[bytes] = []

    def encode(self, message: Message) -> bytes:
        self.encoded.append(message.text)
        return b"<%d>%s" % (message.sender_id, message.text)


class SeedCodecTests(SynchronousTestCase):
    def test_the_seed_frame_byte_for_byte(self):
        self.assertEqual(SEED.encode(Message(7, b"hi", 0.0, 7)), b"\x81\x08id 7: hi")
        self.assertEqual(SEED.encode(Message(12, b"", 0.0, 0)), b"\x81\x07id 12: ")


class MixedRoomTests(SynchronousTestCase):
    def test_each_codec_encodes_the_turn_once_for_all_its_members(self):
        clock = Clock()
        rooms = Rooms(clock, ChatStats())
        other = Counting()
        seed_a, seed_b = Recorder(1), Recorder(2)
        other_c, other_d = Recorder(3), Recorder(4)
        rooms.join("lobby", seed_a, SEED)
        rooms.join("lobby", other_c, other)
        rooms.join("lobby", seed_b, SEED)
        room = rooms.join("lobby", other_d, other)
        room.publish(seed_a, b"one")
        room.publish(other_c, b"two")
        room.publish(None, b"three", sender_id=9)  # another node's client
        clock.advance(0)
        self.assertEqual(other.encoded, [b"one", b"two", b"three"])  # once each
        seed = [
            SEED.encode(Message(i, t, 0.0, 0))
            for i, t in ((1, b"one"), (3, b"two"), (9, b"three"))
        ]
        self.assertEqual(seed_a.writes, [seed[1] + seed[2]])
        self.assertEqual(seed_b.writes, [b"".join(seed)])
        self.assertEqual(other_c.writes, [b"<1>one<9>three"])
        self.assertEqual(other_d.writes, [b"<1>one<3>two<9>three"])
