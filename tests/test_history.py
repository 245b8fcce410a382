"""History and resuming (issue #14), socket-free: the store, offsets and
epochs, every resume boundary, and the replay/live seam.

What a client sees on the wire comes from the production site and factory on
a ``Clock`` (``webchat.testing``); the memory ring is also driven directly,
with the same clock, for its bounds.  Real sockets, SQLite and twistd:
tests/test_history_db.py.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from tests.support import LogCapture, parse_server_frames
from tests.test_room import Recorder
from webchat.codecs import JSON, Message
from webchat.events import BadEvent, parse_event
from webchat.history import EPOCH
from webchat.history.memory import MemoryHistory
from webchat.history.sqlite import SQLiteHistory
from webchat.limits import HISTORY, HISTORY_TTL, Limits
from webchat.metrics import ChatStats, make_registry
from webchat.rooms import Rooms
from webchat.tap import Options, makeService
from webchat.testing import ChatPump, MemoryClient

PROTOCOL = {"Sec_WebSocket_Protocol": "webchat.v1.json"}
T0 = 1764633600.0


def message(offset: int, text: bytes = b"x", ts: int = int(T0 * 1000)) -> Message:
    return Message(1, text, 0.0, 1, "r", "guest-1", ts, offset)


def events(client: MemoryClient) -> list[dict]:
    return [json.loads(text) for text in client.texts]


def offsets(client: MemoryClient, history: bool | None = None) -> list[int]:
    return [
        e["offset"]
        for e in events(client)
        if e["type"] == "message"
        and (history is None or e.get("history", False) is history)
    ]


class RingTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)

    def store(self, **kwargs) -> MemoryHistory:
        return MemoryHistory(self.clock.seconds, **kwargs)

    def test_the_ring_keeps_the_last_n_and_counts_them(self):
        store = self.store(limit=3)
        epoch, last = store.open_room("r")
        self.assertTrue(EPOCH.fullmatch(epoch))
        self.assertEqual(last, 0)
        store.append("r", [message(1), message(2)])
        store.append("r", [message(3), message(4), message(5, b"xyz")])
        self.assertEqual([m.offset for m in store.read("r", 0, 5)], [3, 4, 5])
        self.assertEqual([m.offset for m in store.read("r", 3, 4)], [4])
        self.assertEqual(store.read("r", 5, 5), [])
        stats = store.stats
        self.assertEqual((stats.rooms, stats.messages, stats.bytes), (1, 3, 5))

    def test_the_byte_cap_drops_the_oldest(self):
        store = self.store(limit=100, max_bytes=10)
        store.open_room("r")
        store.append("r", [message(i, b"abcd") for i in range(1, 6)])
        self.assertEqual([m.offset for m in store.read("r", 0, 5)], [4, 5])
        self.assertEqual(store.stats.bytes, 8)

    def test_no_history_still_numbers(self):
        store = self.store(limit=0)
        epoch, _ = store.open_room("r")
        now = int(T0 * 1000)
        store.append("r", [message(1, ts=now), message(2, ts=now)])
        self.assertEqual(store.read("r", 0, 2), [])
        store.room_closed("r")
        self.assertEqual(store.open_room("r"), (epoch, 2))
        self.assertEqual(store.stats.messages, 0)

    def test_ttl_hides_old_messages_and_frees_an_emptied_room(self):
        store = self.store(limit=10, ttl=60)
        epoch, _ = store.open_room("r")
        store.append("r", [message(1, ts=int(T0 * 1000))])
        self.clock.advance(30)
        store.append("r", [message(2, ts=int((T0 + 30) * 1000))])
        store.room_closed("r")
        self.clock.advance(31)  # message 1 is 61 s old, 2 is 31 s old
        self.assertEqual([m.offset for m in store.read("r", 0, 2)], [2])
        # Emptied within the TTL of its newest message: the same history.
        self.assertEqual(store.open_room("r"), (epoch, 2))
        store.room_closed("r")
        self.clock.advance(30)  # now the newest is 61 s old
        store.open_room("other")  # any use sweeps
        self.assertEqual(store.stats.rooms, 1)
        again, last = store.open_room("r")
        self.assertNotEqual(again, epoch)
        self.assertEqual(last, 0)
        self.assertEqual(store.stats.messages, 0)

    def test_an_open_room_is_never_swept(self):
        store = self.store(limit=10, ttl=60)
        epoch, _ = store.open_room("r")
        store.append("r", [message(1, ts=int(T0 * 1000))])
        self.clock.advance(3600)
        store.open_room("other")
        self.assertEqual(store.open_room("r"), (epoch, 1))

    def test_past_the_room_cap_the_longest_idle_goes(self):
        store = self.store(limit=10, max_rooms=2)
        for room in ("a", "b"):
            store.open_room(room)
            store.append(room, [message(1)])
            store.room_closed(room)
        epoch_b = store.open_room("b")[0]
        store.room_closed("b")
        store.open_room("c")
        self.assertEqual(store.stats.rooms, 2)
        self.assertEqual(store.open_room("b"), (epoch_b, 1))
        self.assertEqual(store.open_room("a")[1], 0)  # forgotten: a new epoch

    def test_a_room_where_nothing_was_said_is_forgotten_at_once(self):
        store = self.store()
        store.open_room("r")
        store.room_closed("r")
        self.assertEqual(store.stats.rooms, 0)


class ResumeEventParsingTests(SynchronousTestCase):
    def test_resume_fields(self):
        event = parse_event(b'{"type":"resume","since":4,"epoch":"abc_-9"}')
        self.assertEqual(
            (event.type, event.since, event.value), ("resume", 4, "abc_-9")
        )
        for bad in (
            b'{"type":"resume","epoch":"e"}',
            b'{"type":"resume","since":-1,"epoch":"e"}',
            b'{"type":"resume","since":true,"epoch":"e"}',
            b'{"type":"resume","since":"4","epoch":"e"}',
            b'{"type":"resume","since":1.5,"epoch":"e"}',
            b'{"type":"resume","since":4}',
            b'{"type":"resume","since":4,"epoch":"a b"}',
            b'{"type":"resume","since":4,"epoch":""}',
            b'{"type":"resume","since":4,"epoch":7}',
        ):
            with self.assertRaises(BadEvent) as caught:
                parse_event(bad)
            self.assertEqual(caught.exception.code, "bad_event", bad)


class HistoryTestCase(SynchronousTestCase):
    limits = Limits(rate_limit=0, history=3, history_ttl=600)
    text_clients = False

    def setUp(self):
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)
        clock = Clock()
        clock.advance(T0)
        self.pump = ChatPump(
            clock=clock,
            limits=self.limits,
            history_for_text_clients=self.text_clients,
        )

    def json_client(self, path: str = "/ws/r") -> MemoryClient:
        client = self.pump.connect(path, **PROTOCOL)
        self.assertEqual(client.status, 101)
        return client

    def say(self, client: MemoryClient, *texts: str) -> None:
        for text in texts:
            client.send_text(text)
        self.pump.pump()

    def send(self, client: MemoryClient, **event: object) -> None:
        client.send_text(json.dumps(event))
        self.pump.pump()

    @property
    def room(self):
        return self.pump.factory.rooms.get("r")

    def resume_path(self, since: object, epoch: str | None = None) -> str:
        epoch = self.room.epoch if epoch is None else epoch
        return f"/ws/r?name=ann&since={since}&epoch={quote(epoch)}"


class OffsetTests(HistoryTestCase):
    def test_offsets_count_per_room_and_the_welcome_says_where_it_is(self):
        seed = self.pump.connect("/ws/r")
        other = self.pump.connect("/ws/o")
        ann = self.json_client()
        welcome = events(ann)[0]
        self.assertEqual(welcome["offset"], 0)
        self.assertEqual(welcome["epoch"], self.room.epoch)
        self.assertNotIn("recovered", welcome)
        self.say(seed, "a", "b")
        self.say(other, "elsewhere")
        self.send(ann, type="message", text="c", ref=1)
        self.assertEqual(offsets(ann), [1, 2])
        self.assertEqual(events(ann)[-1]["type"], "ack")
        self.assertEqual(events(ann)[-1]["offset"], 3)
        self.assertEqual(self.pump.factory.rooms.get("o").offset, 1)
        bob = self.json_client()
        self.assertEqual(events(bob)[0]["offset"], 3)
        self.assertEqual(offsets(bob, history=True), [1, 2, 3])

    def test_a_new_server_is_a_new_epoch(self):
        self.json_client()
        other = ChatPump(clock=self.pump.clock, limits=self.limits)
        client = other.connect("/ws/r", **PROTOCOL)
        self.assertNotEqual(events(client)[0]["epoch"], self.room.epoch)


class JoinHistoryTests(HistoryTestCase):
    def test_a_joiner_gets_the_last_n_marked_with_their_own_ids_and_times(self):
        seed = self.pump.connect("/ws/r")
        self.say(seed, "one")
        self.pump.clock.advance(2)
        self.say(seed, "two", "three", "four")
        ann = self.json_client()
        welcome, *rest = events(ann)
        self.assertEqual(welcome["offset"], 4)
        self.assertEqual(
            rest,
            [
                {"type": "message", "room": "r", "id": 1, "name": "guest-1",
                 "text": text, "ts": int(T0 * 1000) + 2000, "offset": offset,
                 "history": True}
                for offset, text in ((2, "two"), (3, "three"), (4, "four"))
            ],
        )  # fmt: skip
        self.say(seed, "live")
        self.assertEqual(events(ann)[-1]["offset"], 5)
        self.assertNotIn("history", events(ann)[-1])
        self.assertEqual(self.pump.factory.stats.history_replayed, 3)

    def test_a_room_emptied_keeps_its_history_for_the_ttl(self):
        seed = self.pump.connect("/ws/r")
        self.say(seed, "one")
        epoch = self.room.epoch
        seed.transport.loseConnection()
        self.pump.pump()
        self.assertIsNone(self.room)
        self.pump.clock.advance(599)
        ann = self.json_client(f"/ws/r?since=0&epoch={epoch}")
        self.assertEqual(events(ann)[0]["epoch"], epoch)
        self.assertEqual(events(ann)[0]["recovered"], True)
        self.assertEqual(offsets(ann, history=True), [1])
        ann.transport.loseConnection()
        self.pump.pump()
        self.pump.clock.advance(2)  # 601 s after "one"
        bob = self.json_client(f"/ws/r?since=1&epoch={epoch}")
        welcome = events(bob)[0]
        self.assertNotEqual(welcome["epoch"], epoch)
        self.assertEqual((welcome["offset"], welcome["recovered"]), (0, False))

    def test_messages_past_the_ttl_are_not_sent(self):
        seed = self.pump.connect("/ws/r")
        self.say(seed, "old")
        self.pump.clock.advance(601)
        self.say(seed, "new")
        ann = self.json_client()
        self.assertEqual(offsets(ann, history=True), [2])

    def test_a_message_of_this_turn_comes_live_not_twice(self):
        rooms = Rooms(self.pump.clock, ChatStats(), history=MemoryHistory(
            self.pump.clock.seconds))  # fmt: skip
        first = Recorder(1)
        room = rooms.join("r", first, JSON)
        room.publish(first, b"before")
        self.pump.clock.advance(0)
        room.publish(first, b"same turn")
        # Said in the turn a member joins: after the offset it is welcomed
        # with, so not history but live, at the end of the turn.
        self.assertEqual((room.offset, room.flushed), (2, 1))
        late = Recorder(2)
        rooms.join("r", late, JSON)
        self.assertEqual([m.offset for m in rooms.history.read("r", 0, room.flushed)],
                         [1])  # fmt: skip
        self.pump.clock.advance(0)
        self.assertEqual([json.loads(w[2:])["offset"] for w in late.writes], [2])


class NumberedElsewhereTests(SynchronousTestCase):
    def test_a_message_numbered_elsewhere_keeps_its_offset_and_time(self):
        clock = Clock()
        rooms = Rooms(clock, ChatStats(), history=MemoryHistory(clock.seconds, ttl=0))
        member = Recorder(1)
        room = rooms.join("r", member, JSON)
        room.publish(None, b"from afar", sender_id=9, offset=41, ts=123)
        room.publish(None, b"next", sender_id=9)
        clock.advance(0)
        got = [json.loads(p) for _, p in parse_server_frames(b"".join(member.writes))]
        self.assertEqual([(e["offset"], e["ts"]) for e in got], [(41, 123), (42, 0)])
        self.assertEqual([m.offset for m in rooms.history.read("r", 0, 42)], [41, 42])


class NoHistoryTests(HistoryTestCase):
    limits = Limits(rate_limit=0, history=0)

    def test_numbered_but_nothing_kept(self):
        seed = self.pump.connect("/ws/r")
        self.say(seed, "one", "two")
        epoch = self.room.epoch
        ann = self.json_client(self.resume_path(1))
        self.assertEqual(offsets(ann), [])
        self.assertEqual((events(ann)[0]["offset"], events(ann)[0]["recovered"]),
                         (2, False))  # fmt: skip
        bob = self.json_client(self.resume_path(2))
        self.assertEqual((events(bob)[0]["epoch"], events(bob)[0]["recovered"]),
                         (epoch, True))  # fmt: skip


class ResumeTests(HistoryTestCase):
    """Every boundary of ``?since=&epoch=``; the ring keeps 3, offsets 1..5."""

    def setUp(self):
        super().setUp()
        self.seed = self.pump.connect("/ws/r")
        self.say(self.seed, *"abcde")

    def resume(self, since: object, epoch: str | None = None) -> list[dict]:
        client = self.json_client(self.resume_path(since, epoch))
        return events(client)

    def assert_resume(self, since, epoch, recovered, got) -> None:
        welcome, *rest = self.resume(since, epoch)
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual((welcome["offset"], welcome["recovered"]), (5, recovered))
        self.assertEqual([e["offset"] for e in rest], got)
        self.assertTrue(all(e["history"] for e in rest))

    def test_exact(self):
        self.assert_resume(5, None, True, [])

    def test_all_still_kept(self):
        self.assert_resume(2, None, True, [3, 4, 5])
        self.assert_resume(4, None, True, [5])

    def test_since_0_and_too_old_for_the_ring(self):
        self.assert_resume(0, None, False, [3, 4, 5])
        self.assert_resume(1, None, False, [3, 4, 5])

    def test_too_old_for_the_ttl(self):
        self.pump.clock.advance(601)
        self.assert_resume(3, None, False, [])

    def test_future_offset_is_a_normal_join(self):
        self.assert_resume(6, None, False, [3, 4, 5])
        self.assert_resume(99, None, False, [3, 4, 5])

    def test_wrong_epoch_is_a_normal_join(self):
        self.assert_resume(5, "another-epoch", False, [3, 4, 5])
        self.assertEqual(self.pump.factory.stats.resumes["false"], 1)

    def test_bad_values_get_bad_resume_and_a_normal_join(self):
        epoch = self.room.epoch
        for query in (
            f"since=-1&epoch={epoch}",
            f"since=abc&epoch={epoch}",
            f"since=1.5&epoch={epoch}",
            f"since=9999999999999999&epoch={epoch}",
            f"since=&epoch={epoch}",
            "since=3",
            f"epoch={epoch}",
            "since=3&epoch=" + quote("bad epoch!"),
            "since=3&epoch=" + "e" * 65,
        ):
            client = self.json_client(f"/ws/r?name=ann&{query}")
            self.assertEqual(client.status, 101, query)
            welcome, error, *rest = events(client)
            self.assertNotIn("recovered", welcome, query)
            self.assertEqual((error["type"], error["code"]), ("error", "bad_resume"))
            self.assertEqual([e["offset"] for e in rest], [3, 4, 5], query)
        self.assertEqual(self.pump.factory.stats.bad_events["bad_resume"], 9)
        self.assertEqual(sum(self.pump.factory.stats.resumes.values()), 0)
        self.assertIn(
            "Connection 2 from 127.0.0.1: bad_resume (since must be an offset "
            "(an integer >= 0))",
            self.logs.lines,
        )

    def test_the_resume_event(self):
        ann = self.json_client()
        epoch = self.room.epoch
        self.say(self.seed, "f")
        self.send(ann, type="resume", since=4, epoch=epoch)
        resumed, *rest = events(ann)[-3:]
        self.assertEqual(
            resumed,
            {"type": "resumed", "room": "r", "offset": 6, "epoch": epoch,
             "recovered": True},
        )  # fmt: skip
        self.assertEqual([(e["offset"], e["history"]) for e in rest],
                         [(5, True), (6, True)])  # fmt: skip
        self.send(ann, type="resume", since=0, epoch="other")
        resumed, *rest = events(ann)[-4:]
        self.assertEqual((resumed["type"], resumed["recovered"]), ("resumed", False))
        self.assertEqual([e["offset"] for e in rest], [4, 5, 6])
        self.send(ann, type="resume", since="4", epoch=epoch)
        self.assertEqual(events(ann)[-1]["code"], "bad_event")
        self.say(self.seed, "g")
        self.assertEqual(events(ann)[-1]["offset"], 7)
        self.assertNotIn("history", events(ann)[-1])


class TextClientTests(HistoryTestCase):
    def test_seed_clients_get_no_history_by_default(self):
        seed = self.pump.connect("/ws/r")
        self.say(seed, "one")
        late = self.pump.connect("/ws/r")
        self.say(seed, "two")
        self.assertEqual(late.texts, ["id 1: two"])


class TextClientHistoryTests(HistoryTestCase):
    text_clients = True

    def test_seed_clients_get_id_lines_first(self):
        seed = self.pump.connect("/ws/r")
        ann = self.json_client("/ws/r?name=ann")
        self.say(seed, "one")
        self.send(ann, type="message", text="two")
        late = self.pump.connect("/ws/r")
        self.say(seed, "three")
        self.assertEqual(late.texts, ["id 1: one", "id 2: two", "id 1: three"])


class SlowStore:
    """A memory store whose reads answer when the test says (as a thread would)."""

    def __init__(self, inner: MemoryHistory) -> None:
        self.inner = inner
        self.limit = inner.limit
        self.reads: list[tuple[Deferred, tuple]] = []

    def open_room(self, room):
        return self.inner.open_room(room)

    def append(self, room, messages):
        self.inner.append(room, messages)

    def room_closed(self, room):
        self.inner.room_closed(room)

    @property
    def stats(self):
        return self.inner.stats

    def read(self, room, after, upto):
        d = Deferred()
        self.reads.append((d, (room, after, upto)))
        return d

    def answer(self) -> None:
        d, args = self.reads.pop(0)
        # What the store holds *now*, more than was asked for: the caller
        # must cut at the offset it asked up to.
        room, after, _ = args
        d.callback(self.inner.read(room, after, 10**9))


class SeamTests(SynchronousTestCase):
    """Live traffic while a store answers later: no gap, no duplicate."""

    def setUp(self):
        clock = Clock()
        clock.advance(T0)
        limits = Limits(rate_limit=0, history=50)
        self.store = SlowStore(MemoryHistory(clock.seconds, limit=50))
        self.pump = ChatPump(clock=clock, limits=limits, history=self.store)

    def test_live_traffic_waits_for_the_replay(self):
        seed = self.pump.connect("/ws/r")
        talker = self.pump.connect("/ws/r", **PROTOCOL)
        for i in range(5):
            seed.send_text(f"before {i}")
        self.pump.pump()
        epoch = self.pump.factory.rooms.get("r").epoch
        ann = self.pump.connect(f"/ws/r?since=2&epoch={epoch}", **PROTOCOL)
        self.assertEqual(ann.texts, [])  # the welcome waits for recovered
        # Traffic in many turns while the read is out, ann's own included.
        for i in range(5):
            seed.send_text(f"during {i}")
            talker.send_text(json.dumps({"type": "message", "text": f"t{i}"}))
            self.pump.pump()
        ann.send_text(json.dumps({"type": "message", "text": "mine", "ref": "m"}))
        self.pump.pump()
        self.assertEqual(ann.texts, [])
        self.store.answer()
        self.pump.pump()
        for i in range(3):
            seed.send_text(f"after {i}")
        self.pump.pump()
        got = events(ann)
        self.assertEqual(got[0]["type"], "welcome")
        self.assertEqual((got[0]["offset"], got[0]["recovered"]), (5, True))
        said = [e for e in got if e["type"] == "message"]
        self.assertEqual([e["offset"] for e in said],
                         [*range(3, 16), *range(17, 20)])  # fmt: skip
        self.assertEqual([e.get("history", False) for e in said[:3]], [True] * 3)
        self.assertFalse(any(e.get("history") for e in said[3:]))
        ack = [e for e in got if e["type"] == "ack"]
        self.assertEqual(ack[0]["offset"], 16)
        # The ack comes where the message was said: after offset 15.
        self.assertEqual(got.index(ack[0]), got.index(said[12]) + 1)

    def test_a_resume_event_waits_too_and_only_one_at_a_time(self):
        seed = self.pump.connect("/ws/r")
        ann = self.pump.connect("/ws/r", **PROTOCOL)  # nothing to read yet
        seed.send_text("one")
        self.pump.pump()
        epoch = self.pump.factory.rooms.get("r").epoch
        ann.send_text(json.dumps({"type": "resume", "since": 0, "epoch": epoch}))
        self.pump.pump()
        ann.send_text(json.dumps({"type": "resume", "since": 0, "epoch": epoch}))
        self.pump.pump()
        seed.send_text("two")
        self.pump.pump()
        self.store.answer()
        self.pump.pump()
        kinds = [(e["type"], e.get("offset"), e.get("code")) for e in events(ann)]
        self.assertEqual(
            kinds,
            [("welcome", 0, None), ("message", 1, None), ("resumed", 1, None),
             ("message", 1, None), ("error", None, "bad_event"),
             ("message", 2, None)],
        )  # fmt: skip


class HoldCapTests(SynchronousTestCase):
    def test_a_member_held_past_its_send_buffer_is_closed_too_slow(self):
        clock = Clock()
        clock.advance(T0)
        limits = Limits(rate_limit=0, history=50, max_send_buffer=2000)
        store = SlowStore(MemoryHistory(clock.seconds, limit=50))
        pump = ChatPump(clock=clock, limits=limits, history=store)
        seed = pump.connect("/ws/r")
        bystander = pump.connect("/ws/r")
        seed.send_text("before")
        pump.pump()
        ann = pump.connect("/ws/r", **PROTOCOL)
        for i in range(30):
            seed.send_text(f"{i:0>100}")
            pump.pump()
        store.answer()
        pump.pump()
        self.assertEqual(ann.close_code, 1008)
        self.assertEqual(events(ann)[-1]["code"], "too_slow")
        self.assertEqual(pump.factory.dropped["too_slow"], 1)
        self.assertEqual(len(bystander.texts), 31)  # everything, unaffected
        self.assertIsNone(bystander.close_code)


class HistoryMetricsTests(HistoryTestCase):
    def test_the_history_metrics(self):
        seed = self.pump.connect("/ws/r")
        self.say(seed, "abcd", "efgh")
        self.json_client(self.resume_path(0))
        self.json_client(self.resume_path(1, "nope"))
        text = generate_latest(make_registry(self.pump.factory)).decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        self.assertEqual(samples[("webchat_history_rooms", ())], 1)
        self.assertEqual(samples[("webchat_history_messages", ())], 2)
        self.assertEqual(samples[("webchat_history_bytes", ())], 8)
        self.assertEqual(samples[("webchat_history_replayed_total", ())], 4)
        self.assertEqual(
            samples[("webchat_resumes_total", (("recovered", "true"),))], 1
        )
        self.assertEqual(
            samples[("webchat_resumes_total", (("recovered", "false"),))], 1
        )
        self.assertEqual(samples[("webchat_history_write_failures_total", ())], 0)


class OptionTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options(environ={})
        options.parseOptions(list(argv))
        return options

    def test_defaults_and_zero(self):
        options = self.parse()
        limits = options.limits()
        self.assertEqual((limits.history, limits.history_ttl), (HISTORY, HISTORY_TTL))
        self.assertEqual((options["history-db"], options["history-for-text-clients"]),
                         (None, 0))  # fmt: skip
        limits = self.parse("--history", "0", "--history-ttl", "0").limits()
        self.assertEqual((limits.history, limits.history_ttl), (0, 0))
        self.assertTrue(self.parse("--history-for-text-clients")[
            "history-for-text-clients"])  # fmt: skip

    def test_bad_values_name_the_option(self):
        for argv in (("--history", "-1"), ("--history", "x"), ("--history-ttl", "nan")):
            with self.assertRaises(UsageError) as caught:
                self.parse(*argv)
            self.assertIn(argv[0], str(caught.exception))

    def test_a_db_is_for_one_process(self):
        with self.assertRaises(UsageError) as caught:
            self.parse("--history-db", "h.db", "--redis", "redis://127.0.0.1:6379")
        self.assertIn("--history-db", str(caught.exception))

    def test_the_service_tree_opens_the_db_before_listening(self):
        options = self.parse("--history-db", self.mktemp(), "--port", "tcp:0")
        top = makeService(options, MemoryReactorClock())
        history = top.getServiceNamed("history")
        self.assertIsInstance(history, SQLiteHistory)
        self.assertIs(next(iter(top)), history)
        self.assertEqual(history.limit, HISTORY)
        self.assertIs(top.factory.rooms.history, history)
        self.assertFalse(top.factory.history_for_text_clients)

    def test_the_flag_and_numbers_reach_the_chat(self):
        options = self.parse(
            "--history-for-text-clients", "--history", "7", "--history-ttl", "60"
        )
        factory = makeService(options, MemoryReactorClock()).factory
        self.assertTrue(factory.history_for_text_clients)
        store = factory.rooms.history
        self.assertIsInstance(store, MemoryHistory)
        self.assertEqual((store.limit, store.ttl), (7, 60))
