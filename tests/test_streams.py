"""Rooms' history in Redis Streams (issue #14, Redis part): offsets the same
from every node, the channel in offset order, trimming, TTL and epochs,
against a real redis-server."""

from __future__ import annotations

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.test_relay import RedisTestCase, wait_until
from webchat.redis import RedisRelay
from webchat.redis.streams import RoomStreams


class RoomStreamsTests(RedisTestCase):
    @inlineCallbacks
    def start(self, nodes: int = 2, **kwargs):
        self.server = self.start_redis()
        relays = [
            self.start_relay(self.server.url, node_id=f"n{i}")[0] for i in range(nodes)
        ]
        self.listener, self.heard = self.start_relay(self.server.url, node_id="ear")
        yield self.wait_up(*relays, self.listener)
        return [RoomStreams(relay.command, "webchat", **kwargs) for relay in relays]

    @inlineCallbacks
    def test_offsets_are_the_same_from_every_node_and_the_channel_keeps_their_order(
        self,
    ):
        a, b = yield self.start()
        said = []
        for n in range(40):
            store = a if n % 3 else b
            envelope = (
                b"wc2 n%d m r %d 1000 guest-%d\noffset " % (n % 2, n + 1, n + 1),
                b" epoch ",
                b" said %d" % n,
            )
            said.append(
                store.append(
                    "r",
                    n + 1,
                    f"guest-{n + 1}",
                    1000,
                    b"said %d" % n,
                    b"webchat",
                    envelope,
                )
            )
        results = yield gatherResults(said)
        offsets = [offset for offset, _ in results]
        self.assertEqual(sorted(offsets), list(range(1, 41)))
        self.assertEqual(len({epoch for _, epoch in results}), 1)
        epoch = results[0][1]
        # A third node hears them in offset order, whoever appended them.
        yield wait_until(lambda: len(self.heard) == 40, what="40 envelopes")
        texts = [e.text.decode() for e in self.heard]
        self.assertEqual(
            [int(t.split()[1]) for t in texts], list(range(1, 41)), texts[:5]
        )
        self.assertTrue(all(f"epoch {epoch} said" in t for t in texts))
        # And the history reads back the same from either node.
        for store in (a, b):
            got = yield store.read("r", 10, 20)
            self.assertEqual([m.offset for m in got], list(range(11, 21)))
            by_offset = dict(zip(offsets, range(40), strict=True))
            self.assertEqual(
                [m.text for m in got],
                [b"said %d" % by_offset[o] for o in range(11, 21)],
            )
            self.assertEqual(got[0].room, "r")
            self.assertEqual(got[0].ts, 1000)
            self.assertEqual(got[0].name, f"guest-{got[0].sender_id}")
        opened = yield b.open_room("r")
        self.assertEqual(opened, (epoch, 40))

    @inlineCallbacks
    def test_trimmed_to_about_the_limit_and_expiring_with_the_room(self):
        (store,) = yield self.start(nodes=1, limit=10, ttl=600)
        for n in range(300):
            yield store.append("busy", 1, "ann", 1000, b"%d" % n)
        kept = yield store.read("busy", 0, 300)
        offsets = [m.offset for m in kept]
        self.assertLess(len(offsets), 300)  # trimmed (MAXLEN ~: roughly)
        self.assertGreaterEqual(len(offsets), 10)
        self.assertEqual(offsets, list(range(301 - len(offsets), 301)))
        for key in ("webchat:webchat:room:busy", "webchat:webchat:stream:busy"):
            ttl = self.server.command("TTL", key)
            self.assertTrue(590 <= ttl <= 600, (key, ttl))

    @inlineCallbacks
    def test_a_lost_room_starts_a_new_epoch_at_1(self):
        (store,) = yield self.start(nodes=1)
        first = yield store.append("r", 1, "ann", 1000, b"old")
        yield store.append("r", 1, "ann", 1000, b"old 2")
        self.assertEqual(first[0], 1)
        self.server.command("DEL", "webchat:webchat:room:r")  # expired, say
        again = yield store.append("r", 1, "ann", 1000, b"new")
        self.assertEqual(again[0], 1)
        self.assertNotEqual(again[1], first[1])
        got = yield store.read("r", 0, 5)
        self.assertEqual([m.text for m in got], [b"new"])  # no old epoch's

    @inlineCallbacks
    def test_a_signed_sender_s_user_is_kept_and_an_anonymous_entry_does_not_grow(
        self,
    ):
        """
        Issue #15: a replay from Redis shows a signed sender's ``user``, as
        the live message did; an anonymous one's entry has the four fields it
        always had, and an entry without ``user`` reads as anonymous.
        """
        (store,) = yield self.start(nodes=1)
        yield store.append("r", 7, "Ann", 1000, b"signed", user="u 42 \u00e9")
        yield store.append("r", 8, "guest-8", 1001, b"anonymous")
        got = yield store.read("r", 0, 2)
        self.assertEqual(
            [(m.text, m.name, m.user) for m in got],
            [(b"signed", "Ann", "u 42 \u00e9"), (b"anonymous", "guest-8", "")],
        )
        stream = "webchat:webchat:stream:r"
        (_, signed), (_, anonymous) = self.server.command("XRANGE", stream, "-", "+")
        self.assertEqual(signed[0::2], [b"id", b"name", b"ts", b"text", b"user"])
        self.assertEqual(anonymous[0::2], [b"id", b"name", b"ts", b"text"])
        # Kept by an earlier version, or not a user admission gives out.
        self.server.command("XADD", stream, "3-0", "id", "9", "name", "x", "ts",
                            "1002", "text", "old", "user", "\x1b")  # fmt: skip
        (old,) = yield store.read("r", 2, 3)
        self.assertEqual((old.text, old.user), (b"old", ""))

    @inlineCallbacks
    def test_messages_older_than_the_ttl_are_not_read(self):
        now = [10_000.0]
        (store,) = yield self.start(nodes=1, ttl=60, clock=lambda: now[0])
        yield store.append("r", 1, "ann", 9_000_000, b"too old")  # ts in ms
        yield store.append("r", 1, "ann", 9_990_000, b"recent")
        got = yield store.read("r", 0, 2)
        self.assertEqual([m.text for m in got], [b"recent"])

    @inlineCallbacks
    def test_commands_fail_at_once_while_redis_is_away(self):
        (store,) = yield self.start(nodes=1)
        self.server.kill()
        yield wait_until(lambda: self.listener.state != "up", what="the outage")
        d = store.append("r", 1, "ann", 1, b"x")
        failures = []
        d.addErrback(failures.append)
        yield wait_until(lambda: failures, what="the failure")
        self.assertIn("Redis", str(failures[0].value))


class KeptMessagesOnTheChannelTests(RedisTestCase):
    @inlineCallbacks
    def test_every_node_hears_kept_messages_in_offset_order_its_own_included(self):
        self.server = self.start_redis()
        nodes = [self.start_relay(self.server.url, node_id=f"n{i}") for i in range(2)]
        relays = [relay for relay, _ in nodes]
        yield self.wait_up(*relays)
        heard: dict[str, list] = {}
        for relay in relays:
            relay.keep_history(100, 600)
            heard[relay.node_id] = []
            relay.on_stream = heard[relay.node_id].append
        appended = []
        for n in range(10):
            relay = relays[n % 2]
            appended.append(
                relay.append_message(
                    "r",
                    n + 1,
                    "Ann Lee",
                    1000 + n,
                    b"text %d\nline" % n,
                    delayed=n == 9,
                )
            )
        results = yield gatherResults(appended)
        self.assertEqual(sorted(o for o, _ in results), list(range(1, 11)))
        yield wait_until(
            lambda: all(len(got) == 10 for got in heard.values()), what="10 each"
        )
        for relay in relays:
            got = heard[relay.node_id]
            self.assertEqual([e.offset for e in got], list(range(1, 11)))
            self.assertEqual({e.epoch for e in got}, {results[0][1]})
            # (Two relays' connections: the offsets need not follow the order
            # the appends were made in, so the delayed one is found by text.)
            self.assertEqual([e.text for e in got if e.delayed], [b"text 9\nline"])
            self.assertEqual(
                {(e.node, e.chat_id, e.name, e.room) for e in got if e.chat_id == 1},
                {("n0", 1, "Ann Lee", "r")},
            )
        # Ordinary messages are still not echoed to their own node.
        self.assertTrue(relays[0].publish(5, b"plain"))
        yield wait_until(lambda: len(nodes[1][1]) == 1, what="the plain message")
        self.assertEqual(nodes[0][1], [])


class OutageBufferTests(SynchronousTestCase):
    def test_kept_in_order_up_to_the_buffer_then_counted_and_logged_once(self):
        logs: list[dict] = []
        globalLogPublisher.addObserver(logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, logs.append)
        relay = RedisRelay(
            Clock(),
            "redis://127.0.0.1",
            node_id="me",
            on_envelope=lambda e: None,
            outage_buffer=3,
        )
        relay.keep_history(100, 600)
        relay.running = True  # as started, with Redis away
        kept = [relay.keep_later("r", 7, "ann", n, b"m%d" % n) for n in range(6)]
        self.assertEqual(kept, [True] * 3 + [False] * 3)
        self.assertEqual([m[4] for m in relay.later], [b"m0", b"m1", b"m2"])
        self.assertEqual(relay.outage_dropped, 3)
        lines = [formatEvent(e) for e in logs if e.get("log_namespace") == "webchat"]
        full = [line for line in lines if line.startswith("Outage buffer full")]
        self.assertEqual(len(full), 1, lines)
        self.assertIn("(3 messages)", full[0])
