"""The Redis relay: envelopes, URLs and ids on their own, then against a real
redis-server that each test starts, kills, freezes and restarts itself."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.redis_server import RedisServer
from tests.support import free_port, slow
from tests.tls_cert import make_certificate
from webchat.redis import (
    FALLBACK_PER_NODE,
    MAX_CHAT_ID,
    PROVISIONAL_BASE,
    REDIS_ID_LIMIT,
    RETRY_MAX,
    STABLE_AFTER,
    Envelope,
    IdAllocator,
    MalformedEnvelopeError,
    RedisRelay,
    decode_envelope,
    encode_envelope,
    parse_redis_url,
    retry_delay,
)


class Logs:
    """The log lines one relay (and its id allocator) wrote."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "webchat":
            self.events.append(event)

    def of(self, *sources: object) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_source") in sources]

    def matching(self, needle: str, *sources: object) -> list[str]:
        return [line for line in self.of(*sources) if needle in line]


def sent_as(node: str, chat_id: int, text: bytes) -> Envelope:
    """What ``RedisRelay.publish(chat_id, text)`` arrives as: the lobby, ``guest-N``."""
    return Envelope(node, chat_id, text, "lobby", f"guest-{chat_id}", 0)


# -- the parts, without Redis -------------------------------------------------------


class EnvelopeTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        for text in [b"", b"hi", b"two words", b"line\nbreak \r\n", "é 😀".encode()]:
            payload = encode_envelope("node-1", 42, text)
            self.assertEqual(decode_envelope(payload), sent_as("node-1", 42, text))

    def test_wire_form(self) -> None:
        self.assertEqual(
            encode_envelope("a.b:c_d-1", 7, b"x y"),
            b"wc2 a.b:c_d-1 m lobby 7 0 guest-7\nx y",
        )

    def test_the_previous_version_still_reads_into_the_lobby(self) -> None:
        self.assertEqual(
            decode_envelope(b"wc1 old-node 7 x y"), Envelope("old-node", 7, b"x y")
        )

    def test_largest_id(self) -> None:
        payload = encode_envelope("n", MAX_CHAT_ID, b"t")
        self.assertEqual(decode_envelope(payload).chat_id, MAX_CHAT_ID)

    def test_rejects(self) -> None:
        bad = {
            b"": "fewer than four",
            b"wc1 n 1": "fewer than four",
            b"wc3 n 1 hi": "unknown format",
            b'{"v": 1, "node": "n", "id": 1, "text": "hi"}': "unknown format",
            b"wc1 n/x 1 hi": "invalid node id",
            b"wc1  1 hi": "invalid node id",
            b"wc1 " + b"n" * 65 + b" 1 hi": "invalid node id",
            b"wc1 n 0 hi": "invalid connection id",
            b"wc1 n 01 hi": "invalid connection id",
            b"wc1 n -1 hi": "invalid connection id",
            b"wc1 n x hi": "invalid connection id",
            b"wc1 n \xd9\xa1 hi": "invalid connection id",  # Arabic-Indic one
            b"wc1 n %d hi" % (MAX_CHAT_ID + 1): "out of range",
            b"wc1 n 1 \xff": "not valid UTF-8",
            b"wc1 n 1 \xed\xa0\x80": "not valid UTF-8",  # a lone surrogate
        }
        for payload, error in bad.items():
            with self.assertRaises(MalformedEnvelopeError, msg=payload) as caught:
                decode_envelope(payload)
            self.assertIn(error, str(caught.exception), payload)
        self.assertRaises(MalformedEnvelopeError, decode_envelope, 42)
        self.assertRaises(MalformedEnvelopeError, decode_envelope, "wc1 n 1 hi")


class UrlTests(SynchronousTestCase):
    def test_tcp(self) -> None:
        a = parse_redis_url("redis://127.0.0.1:6380/2")
        self.assertEqual(
            (a.tls, a.host, a.port, a.db, a.password),
            (False, "127.0.0.1", 6380, 2, None),
        )
        a = parse_redis_url("redis://redis.internal")
        self.assertEqual((a.host, a.port, a.db), ("redis.internal", 6379, 0))
        self.assertEqual(a.display, "redis://redis.internal:6379/0")
        a = parse_redis_url("redis://[::1]:7000/")
        self.assertEqual(
            (a.host, a.port, a.display), ("::1", 7000, "redis://[::1]:7000/0")
        )

    def test_password(self) -> None:
        a = parse_redis_url("redis://:s%40cret@127.0.0.1:6379/1")
        self.assertEqual((a.username, a.password), (None, "s@cret"))
        self.assertEqual(a.display, "redis://127.0.0.1:6379/1")
        self.assertNotIn("cret", repr(a))
        a = parse_redis_url("rediss://chat:pw@redis.example:6380/0")
        self.assertEqual((a.tls, a.username, a.password), (True, "chat", "pw"))
        self.assertEqual(a.display, "rediss://chat@redis.example:6380/0")

    def test_unix(self) -> None:
        for url in [
            "unix:///run/redis/redis.sock",
            "redis+unix:///run/redis/redis.sock",
        ]:
            a = parse_redis_url(url)
            self.assertEqual((a.path, a.db, a.host), ("/run/redis/redis.sock", 0, None))
        a = parse_redis_url("unix:///run/r.sock?db=3&password=pw")
        self.assertEqual((a.path, a.db, a.password), ("/run/r.sock", 3, "pw"))
        self.assertEqual(a.display, "unix:///run/r.sock?db=3")
        a = parse_redis_url("unix://:pw@/run/r.sock")
        self.assertEqual((a.path, a.password), ("/run/r.sock", "pw"))

    def test_tls_ca(self) -> None:
        a = parse_redis_url("rediss://h:1/0?ssl_ca_certs=/etc/ca.pem")
        self.assertEqual(a.ca_certs, "/etc/ca.pem")

    def test_errors_are_clear_and_keep_the_password(self) -> None:
        bad = {
            "http://h:6379/0": "use redis://",
            "127.0.0.1:6379": "use redis://",
            "redis://:hunter2@h:port/0": "invalid Redis URL",
            "redis://:hunter2@h:99999/0": "invalid Redis URL",
            "redis://:hunter2@/0": "no host",
            "redis://:hunter2@h:6379/zero": "database must be a number",
            "redis://:hunter2@h:6379/0/1": "database must be a number",
            "redis://:hunter2@h/0?db=1": "unknown parameter 'db'",
            "rediss://:hunter2@h/0?ca=x": "unknown parameter 'ca'",
            "unix://relative/path.sock": "has no host",
            "unix:relative.sock": "must be absolute",
            "unix:///r.sock?db=x": "database must be a number",
            "unix:///r.sock?db=1&db=2": "given twice",
            "unix://:hunter2@/r.sock?password=x": "two passwords",
        }
        for url, error in bad.items():
            with self.assertRaises(ValueError, msg=url) as caught:
                parse_redis_url(url)
            self.assertIn(error, str(caught.exception), url)
            self.assertNotIn("hunter2", str(caught.exception))

    def test_bad_channel_and_node(self) -> None:
        def relay(**kwargs: Any) -> RedisRelay:
            return RedisRelay(Clock(), "redis://127.0.0.1", on_envelope=print, **kwargs)

        self.assertRaises(ValueError, relay, channel="two words")
        self.assertRaises(ValueError, relay, node_id="a/b")
        self.assertRaises(ValueError, relay, node_id="x" * 65)
        self.assertEqual(relay(node_id="web-1").node_id, "web-1")


class RetryDelayTests(SynchronousTestCase):
    def test_doubles_capped_and_jittered(self) -> None:
        rng = random.Random(1)
        for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (7, 5.0), (1000, 5.0)]:
            for _ in range(50):
                delay = retry_delay(attempt, 0.1, 5.0, rng)
                self.assertTrue(ceiling / 2 <= delay <= ceiling, (attempt, delay))


class ReconnectBackoffTests(SynchronousTestCase):
    """
    The relay's reconnecting (ClientService, with the link's retry policy)
    against a Redis that refuses every connection, on a fake reactor: the
    waits it schedules between attempts.
    """

    def test_waits_double_to_the_cap_and_are_jittered_there(self) -> None:
        fake = MemoryReactorClock()
        relay = RedisRelay(
            fake,
            "redis://127.0.0.1:6379",
            on_envelope=print,
            retry_initial=0.5,
            retry_max=4.0,
            rng=random.Random(11),
            presence_timeout=0,  # no heartbeat timer among the waits
        )
        relay.startService()
        self.addCleanup(relay.stopService)
        refused = 0
        waits: list[list[float]] = []  # per round: the waits both links chose
        for _ in range(20):
            # Both links (publisher, subscriber) try; Redis refuses them.
            attempts = fake.tcpClients[refused:]
            self.assertEqual(len(attempts), 2)
            for _host, _port, factory, _timeout, _bind in attempts:
                factory.clientConnectionFailed(
                    fake.connectors[refused], Failure(ConnectionRefusedError())
                )
                refused += 1
            retries = [c for c in fake.getDelayedCalls() if c.active()]
            self.assertEqual(len(retries), 2)
            waits.append(sorted(c.getTime() - fake.seconds() for c in retries))
            fake.advance(relay.retry_max)  # every wait is over by then
        self.assertEqual(relay.state, "down")
        for attempt, pair in enumerate(waits, start=1):
            ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
            for wait in pair:
                self.assertTrue(ceiling / 2 <= wait <= ceiling, (attempt, wait))
        # From the 4th attempt on the ceiling is the cap: the waits under it
        # still differ, so nodes that lost Redis together do not return together.
        capped = [wait for pair in waits[3:] for wait in pair]
        self.assertGreater(len(set(capped)), len(capped) // 2, capped)


class LinkOnFakeReactorTests(SynchronousTestCase):
    """One relay's links (ClientService underneath) on a fake reactor."""

    def setUp(self) -> None:
        self.fake = MemoryReactorClock()
        self.relay = RedisRelay(
            self.fake,
            "redis://127.0.0.1:6379",
            on_envelope=print,
            retry_initial=0.5,
            retry_max=4.0,
            rng=random.Random(3),
            presence_timeout=0,  # no heartbeat timer among the waits
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.relay.startService()
        self.addCleanup(self.relay.stopService)
        self.dialled = 0

    def refuse(self) -> None:
        """Refuse every connection attempt made since the last call."""
        for _host, _port, factory, *_ in self.fake.tcpClients[self.dialled :]:
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.dialled = len(self.fake.tcpClients)

    def accept(self) -> list[tuple[Any, StringTransport]]:
        """Accept the attempts made since the last call and answer the handshakes."""
        transports = []
        for _host, _port, factory, *_ in self.fake.tcpClients[self.dialled :]:
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            if b"SUBSCRIBE" in transport.value():
                protocol.dataReceived(b"+OK\r\n*3\r\n$9\r\nsubscribe\r\n"
                                      b"$7\r\nwebchat\r\n:1\r\n")  # fmt: skip
            else:  # CLIENT SETNAME, then the id allocator's INCR and INCRBY
                protocol.dataReceived(b"+OK\r\n:1\r\n:100\r\n")
            transport.clear()
            transports.append((protocol, transport))
        self.dialled = len(self.fake.tcpClients)
        self.assertEqual(self.relay.state, "up")
        return transports

    def lose(self, connections: list[Any]) -> None:
        for protocol, _transport in connections:
            protocol.connectionLost(Failure(ConnectionRefusedError("gone")))

    def waits(self) -> list[float]:
        """The waits before the next attempts: both links down, no other timer."""
        now = self.fake.seconds()
        waits = [c.getTime() - now for c in self.fake.getDelayedCalls() if c.active()]
        self.assertEqual(len(waits), 2)
        return waits

    def test_an_outage_is_one_log_line(self) -> None:
        """ClientService's own line per retry stays out of the log."""
        for _ in range(10):
            self.refuse()
            self.fake.advance(self.relay.retry_max)
        lines = [formatEvent(e) for e in self.events]
        failed = [line for line in lines if "Redis connection failed" in line]
        self.assertEqual(len(failed), 1, lines)
        self.assertEqual([line for line in lines if "etry" in line], failed)

    def test_a_link_that_flaps_keeps_backing_off(self) -> None:
        """
        ClientService starts its count over at every connection; a Redis
        that takes connections and drops them at once still gets ever longer
        waits, and a link that stayed up ``STABLE_AFTER`` starts over.
        """
        self.refuse()
        self.assertTrue(all(0.25 <= w <= 0.5 for w in self.waits()), self.waits())
        self.fake.advance(4.0)
        self.lose(self.accept())  # up, and lost at once: the 2nd wait
        self.assertTrue(all(0.5 <= w <= 1.0 for w in self.waits()), self.waits())
        self.fake.advance(4.0)
        self.lose(self.accept())  # again: the 3rd
        self.assertTrue(all(1.0 <= w <= 2.0 for w in self.waits()), self.waits())
        self.fake.advance(4.0)
        connections = self.accept()
        for _ in range(round(STABLE_AFTER / self.relay.ping_interval)):
            self.fake.advance(self.relay.ping_interval)
            for protocol, transport in connections:  # up, and answering PINGs
                self.assertIn(b"PING", transport.value())
                transport.clear()
                protocol.dataReceived(b"+PONG\r\n")
        self.assertEqual(self.relay.state, "up")
        self.lose(connections)  # lost after a stable spell: the 1st wait again
        self.assertTrue(all(0.25 <= w <= 0.5 for w in self.waits()), self.waits())


class ReceivingTests(SynchronousTestCase):
    """What the relay does with whatever arrives on the channel."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.got: list[Envelope] = []
        self.relay = RedisRelay(
            self.clock, "redis://127.0.0.1", node_id="me", on_envelope=self.got.append
        )
        self.logs = Logs()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)

    def test_own_echo_is_skipped(self) -> None:
        self.relay.message_received(encode_envelope("me", 1, b"mine"))
        self.relay.message_received(encode_envelope("other", 2, b"theirs"))
        self.assertEqual(self.got, [sent_as("other", 2, b"theirs")])
        self.assertEqual((self.relay.received, self.relay.malformed), (1, 0))

    def test_malformed_logged_escaped_and_rate_limited(self) -> None:
        self.relay.message_received(b"wc9 x 1 \x1b[2Jfake\nNew connection! (1)")
        self.relay.message_received(b"junk")
        self.relay.message_received(12)
        lines = self.logs.matching("malformed", self.relay)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("unknown format or version", lines[0])
        self.assertIn("\\x1b[2Jfake\\nNew connection!", lines[0])
        self.assertNotIn("\n", lines[0])
        self.clock.advance(61)
        self.relay.message_received(b"more junk")
        lines = self.logs.matching("malformed", self.relay)
        self.assertEqual(len(lines), 2)
        self.assertIn("(and 2 more since the last such line)", lines[1])
        self.assertEqual(
            (self.relay.malformed, self.relay.received, self.got), (4, 0, [])
        )

    def test_a_failing_callback_is_logged_not_raised(self) -> None:
        def explode(envelope: Envelope) -> None:
            raise RuntimeError("boom")

        self.relay.on_envelope = explode
        self.relay.message_received(encode_envelope("other", 2, b"x"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.relay.received, 1)

    def test_publish_before_start(self) -> None:
        self.assertFalse(self.relay.publish(1, b"x"))
        self.assertEqual(self.relay.relay_failures, 1)
        self.assertEqual(self.relay.state, "down")


class FakeRedis:
    """Stands in for the command connection: commands wait for a hand-made reply."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], Deferred[Any]]] = []

    def execute(self, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((args, d))
        return d

    def answer(self, reply: Any) -> tuple[Any, ...]:
        """Answer the oldest command not answered yet; what it was."""
        args, d = self.calls.pop(0)
        d.callback(reply)
        return args

    def fail_all(self) -> None:
        from txredisapi import ConnectionError

        calls, self.calls = self.calls, []
        for _, d in calls:
            d.errback(ConnectionError("Lost connection"))


class IdAllocatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.redis = FakeRedis()
        self.ids = IdAllocator(self.clock, "room", block_size=10, rng=random.Random(5))

    def connect(self, node_number: int = 3, block_end: int = 10) -> None:
        self.ids.connected(self.redis.execute)
        self.assertEqual(
            self.redis.answer(node_number), (b"INCR", b"webchat:room:nodes")
        )
        self.assertEqual(
            self.redis.answer(block_end), (b"INCRBY", b"webchat:room:ids", 10)
        )

    def test_blocks_reserved_ahead_of_need(self) -> None:
        self.connect()
        self.assertTrue(self.ids.ready)
        self.assertEqual([self.ids.next_id() for _ in range(5)], [1, 2, 3, 4, 5])
        self.assertEqual(self.redis.calls[0][0], (b"INCRBY", b"webchat:room:ids", 10))
        self.redis.answer(30)  # another node took 11..20
        self.assertEqual(
            [self.ids.next_id() for _ in range(10)],
            [6, 7, 8, 9, 10, 21, 22, 23, 24, 25],
        )
        self.assertEqual(len(self.redis.calls), 1)  # the next block is on its way

    def test_fallback_ranges(self) -> None:
        first = self.ids.next_id()  # never reached Redis: a random slot
        self.assertGreaterEqual(first, PROVISIONAL_BASE)
        self.assertLess(first, 1 << 53)
        self.assertEqual(self.ids.next_id(), first + 1)
        self.connect(node_number=3)
        [self.ids.next_id() for _ in range(10)]
        self.ids.disconnected()
        self.redis.fail_all()
        fallback = self.ids.next_id()
        self.assertEqual(fallback, REDIS_ID_LIMIT + 3 * FALLBACK_PER_NODE + 2)
        self.assertEqual(self.ids.fallbacks, 3)

    def test_lost_counter_moves_past_every_id(self) -> None:
        self.connect(block_end=10)
        used = [self.ids.next_id() for _ in range(6)]
        self.redis.answer(20)
        used += [self.ids.next_id() for _ in range(14)]
        self.assertEqual(used, list(range(1, 21)))
        self.ids.disconnected()
        self.redis.fail_all()
        # Redis restarted empty: the counter answers 10 again.
        self.ids.connected(self.redis.execute)
        self.redis.answer(10)
        args, d = self.redis.calls.pop(0)
        self.assertEqual(args[0], b"EVAL")
        floor = args[4]
        self.assertEqual(floor, 1_700_000_000 << 20)
        d.callback(floor + 10)
        claim, _ = self.redis.calls.pop(0)
        self.assertEqual(claim[3:], (b"webchat:room:nodes", 3, 0))
        after = [self.ids.next_id() for _ in range(3)]
        self.assertEqual(after, [floor + 1, floor + 2, floor + 3])
        self.assertEqual(len(set(used + after)), len(used + after))


# -- against a real redis-server ------------------------------------------------------


def wait_until(test: Callable[[], bool], timeout: float = 10.0, what: str = ""):
    """Poll ``test`` every 10 ms, without blocking the reactor, for ``timeout`` s."""

    async def poll() -> None:
        deadline = time.monotonic() + timeout
        while not test():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await deferLater(reactor, 0.01, lambda: None)

    return Deferred.fromCoroutine(poll())


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


@slow
class RedisTestCase(TestCase):
    def setUp(self) -> None:
        self.logs = Logs()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)

    def start_redis(self, **kwargs: Any) -> RedisServer:
        server = RedisServer(**kwargs)
        self.addCleanup(server.stop)
        server.start()
        return server

    def start_relay(self, url: str, **kwargs: Any) -> tuple[RedisRelay, list[Envelope]]:
        got: list[Envelope] = []
        relay = RedisRelay(reactor, url, on_envelope=got.append, **kwargs)
        relay.startService()
        self.addCleanup(self.stop_relay, relay)
        return relay, got

    @inlineCallbacks
    def stop_relay(self, relay: RedisRelay):
        yield relay.stopService()
        self.assertEqual(relay.state, "down")

    def wait_up(self, *relays: RedisRelay, timeout: float = 10.0):
        return wait_until(
            lambda: all(r.state == "up" for r in relays), timeout, "the relays to be up"
        )


class RelayTests(RedisTestCase):
    @inlineCallbacks
    def test_three_nodes_hear_each_other_but_not_themselves(self):
        server = self.start_redis()
        nodes = [self.start_relay(server.url, node_id=f"node-{i}") for i in range(3)]
        relays = [relay for relay, _ in nodes]
        yield self.wait_up(*relays)
        self.assertEqual(
            self.logs.matching("Redis link up (redis://127.0.0.1:", relays[0]),
            [f"Redis link up (redis://127.0.0.1:{server.port}/0)"],
        )
        sent: dict[str, list[Envelope]] = {}
        for i, relay in enumerate(relays):
            sent[relay.node_id] = []
            for n in range(20):
                text = f"from {i}: message {n} with spaces\nand a newline".encode()
                self.assertTrue(relay.publish(100 * i + n + 1, text))
                sent[relay.node_id].append(
                    sent_as(relay.node_id, 100 * i + n + 1, text)
                )
        yield wait_until(
            lambda: all(len(got) == 40 for _, got in nodes), what="40 each"
        )
        yield sleep(0.2)  # anything extra would have arrived by now
        for relay, got in nodes:
            expected = [
                e for node, es in sent.items() if node != relay.node_id for e in es
            ]
            self.assertEqual(sorted(got), sorted(expected))
            # Each sender's messages arrive in the order it sent them.
            for node, es in sent.items():
                if node != relay.node_id:
                    self.assertEqual([e for e in got if e.node == node], es)
            self.assertEqual((relay.published, relay.received), (20, 40))
            self.assertEqual((relay.relay_failures, relay.malformed), (0, 0))

    @inlineCallbacks
    def test_ids_unique_across_nodes_and_increasing_within_each(self):
        server = self.start_redis()
        relays = [self.start_relay(server.url, id_block=8)[0] for _ in range(3)]
        yield self.wait_up(*relays)
        yield wait_until(lambda: all(r.ids.ready for r in relays), what="id blocks")
        issued: dict[int, list[int]] = {i: [] for i in range(3)}
        for _ in range(50):
            # As between real connections, the next blocks get time to arrive.
            yield wait_until(lambda: all(r.ids.ready for r in relays), what="blocks")
            for i, relay in enumerate(relays):
                issued[i].append(relay.ids.next_id())
        everything = [chat_id for ids in issued.values() for chat_id in ids]
        self.assertEqual(len(set(everything)), len(everything))
        for ids in issued.values():
            self.assertEqual(ids, sorted(ids))
            self.assertLess(max(ids), REDIS_ID_LIMIT)
        self.assertEqual(sum(r.ids.fallbacks for r in relays), 0)
        numbers = sorted(r.ids.node_number for r in relays)
        self.assertEqual(numbers, [1, 2, 3])
        self.assertEqual(int(server.command("GET", "webchat:webchat:nodes")), 3)

    @inlineCallbacks
    def test_malformed_payload_is_logged_once_and_dropped(self):
        server = self.start_redis()
        (relay, got), (other, _) = (self.start_relay(server.url) for _ in range(2))
        yield self.wait_up(relay, other)
        self.assertEqual(server.command("PUBLISH", "webchat", b"\x00garbage\n\xff"), 2)
        yield wait_until(lambda: relay.malformed == 1, what="the malformed payload")
        lines = self.logs.matching("malformed", relay)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("\\x00garbage\\n\\xff", lines[0])
        self.assertTrue(other.publish(5, b"still here"))
        yield wait_until(lambda: len(got) == 1, what="a message after the garbage")
        self.assertEqual(got, [sent_as(other.node_id, 5, b"still here")])
        self.assertEqual((relay.state, relay.received, relay.malformed), ("up", 1, 1))

    @inlineCallbacks
    def test_an_envelope_over_the_size_limit_is_dropped_and_counted(self):
        server = self.start_redis()
        relay, got = self.start_relay(server.url, max_text_size=1000)
        yield self.wait_up(relay)
        # A rogue publisher on the channel: a well-formed envelope, 8 MB of text.
        rogue = encode_envelope("rogue", 7, b"x" * (8 << 20))
        self.assertEqual(server.command("PUBLISH", "webchat", rogue), 1)
        at_limit = encode_envelope("rogue", 7, b"y" * 1000)
        self.assertEqual(server.command("PUBLISH", "webchat", at_limit), 1)
        yield wait_until(lambda: len(got) == 1, what="the message at the limit")
        self.assertEqual(got, [sent_as("rogue", 7, b"y" * 1000)])
        self.assertEqual((relay.oversized, relay.received), (1, 1))
        self.assertEqual(
            self.logs.matching("oversized", relay),
            [
                "Dropped an oversized message from Redis channel webchat: "
                "connection 7 on node rogue: 8388608 bytes, over "
                "--max-message-size (1000)"
            ],
        )

    @inlineCallbacks
    def test_outage_and_recovery(self):
        """
        Kill Redis: publishing fails fast and says so once; ids keep coming.
        Restart it on the same port: the relays come back by themselves
        within the backoff cap, relay again, and no id has repeated, though
        the restarted Redis lost the id counter.
        """
        server = self.start_redis()
        nodes = [self.start_relay(server.url, id_block=4) for _ in range(3)]
        relays = [relay for relay, _ in nodes]
        relay, other_got = relays[0], nodes[1][1]
        yield self.wait_up(*relays)
        yield wait_until(lambda: all(r.ids.ready for r in relays), what="id blocks")
        issued = [r.ids.next_id() for r in relays for _ in range(3)]

        server.kill()
        yield wait_until(
            lambda: all(r.state in ("down", "connecting") for r in relays),
            what="the relays to notice",
        )
        self.assertEqual(len(self.logs.matching("Redis link lost: ", relay)), 1)
        results = [relay.publish(1, b"lost %d" % n) for n in range(100)]
        self.assertEqual(results, [False] * 100)
        self.assertEqual(relay.relay_failures, 100)
        for _ in range(5):  # new connections keep getting ids during the outage
            issued += [r.ids.next_id() for r in relays for _ in range(4)]
        yield sleep(1.5)  # several reconnect attempts fail meanwhile
        self.assertEqual(relay.state, "down")
        self.assertEqual(len(self.logs.matching("Redis connection failed: ", relay)), 1)
        down = self.logs.matching("messages are not being relayed", relay)
        self.assertEqual(
            down, ["Redis is down: messages are not being relayed to other nodes"]
        )
        self.assertTrue(any(i >= REDIS_ID_LIMIT for i in issued))

        yield server.restart()
        restarted = time.monotonic()
        yield self.wait_up(*relays, timeout=RETRY_MAX + 3)
        self.assertLess(time.monotonic() - restarted, RETRY_MAX + 1)
        self.assertEqual([r.reconnects for r in relays], [1, 1, 1])
        self.assertEqual(len(self.logs.matching("Redis link up", relay)), 2)
        self.assertTrue(relay.publish(7, b"back again"))
        yield wait_until(lambda: len(other_got) == 1, what="relaying after the restart")
        self.assertEqual(other_got, [sent_as(relay.node_id, 7, b"back again")])
        back = self.logs.matching("Redis is back: relaying again", relay)
        self.assertEqual(
            back, ["Redis is back: relaying again (100 message(s) were not relayed)"]
        )
        self.assertEqual(
            self.logs.matching("messages are not being relayed", relay), down
        )

        yield wait_until(lambda: all(r.ids.ready for r in relays), what="new id blocks")
        issued += [r.ids.next_id() for r in relays for _ in range(10)]
        self.assertEqual(len(set(issued)), len(issued), Counter(issued).most_common(3))
        # The restarted Redis had no counter: some node noticed and said so.
        noticed = self.logs.matching(
            "has lost the connection id counter", *(r.ids for r in relays)
        )
        self.assertTrue(noticed)

    @inlineCallbacks
    def test_a_frozen_redis_is_noticed_by_ping(self):
        """SIGSTOP keeps the sockets open but nothing answers: PING finds out."""
        server = self.start_redis()
        relay, _ = self.start_relay(
            server.url, ping_interval=0.2, ping_timeout=1.0, connect_timeout=1.0
        )
        yield self.wait_up(relay)
        server.freeze()
        self.addCleanup(server.thaw)
        yield wait_until(
            lambda: relay.state != "up", timeout=3, what="the PING timeout"
        )
        lost = self.logs.matching("Redis link lost", relay)
        self.assertEqual(len(lost), 1)
        self.assertIn("no answer to PING within 1 s", lost[0])
        server.thaw()
        yield self.wait_up(relay)
        self.assertEqual(relay.reconnects, 1)


class ConnectionFormsTests(RedisTestCase):
    @inlineCallbacks
    def test_password(self):
        server = self.start_redis(password="s3cret pass")
        url = f"redis://:s3cret%20pass@127.0.0.1:{server.port}/3"
        (relay, got), (other, _) = self.start_relay(url), self.start_relay(url)
        yield self.wait_up(relay, other)
        up = f"Redis link up (redis://127.0.0.1:{server.port}/3)"
        self.assertEqual(self.logs.matching("Redis link up", relay), [up])
        self.assertTrue(other.publish(1, b"authenticated"))
        yield wait_until(lambda: got, what="the message")
        # The id keys live in the database the URL names.
        yield wait_until(lambda: relay.ids.ready and other.ids.ready, what="ids")
        self.assertIsNotNone(_get_in_db(server, 3, "webchat:webchat:ids"))
        self.assertIsNone(_get_in_db(server, 0, "webchat:webchat:ids"))
        self.assertNotIn("s3cret", "\n".join(self.logs.of(relay, relay.ids)))

    @inlineCallbacks
    def test_wrong_password_is_retried_and_said_once(self):
        server = self.start_redis(password="right")
        relay, _ = self.start_relay(f"redis://:wrong@127.0.0.1:{server.port}/0",
                                    retry_initial=0.02, retry_max=0.05)  # fmt: skip
        yield sleep(0.5)
        self.assertEqual(relay.state, "down")
        failed = self.logs.matching("Redis connection failed", relay)
        self.assertEqual(len(failed), 1, failed)
        self.assertIn("WRONGPASS", failed[0])
        self.assertIn("during the handshake", failed[0])

    @inlineCallbacks
    def test_unix_socket(self):
        server = self.start_redis(unix_socket=True)
        url = f"unix://{server.socket_path}?db=1"
        (relay, got), (other, _) = self.start_relay(url), self.start_relay(url)
        yield self.wait_up(relay, other)
        self.assertEqual(self.logs.matching("Redis link up", relay),
                         [f"Redis link up ({url})"])  # fmt: skip
        self.assertTrue(other.publish(9, b"over a unix socket"))
        yield wait_until(lambda: got, what="the message")
        self.assertEqual(got, [sent_as(other.node_id, 9, b"over a unix socket")])
        yield wait_until(lambda: relay.ids.ready, what="ids")
        self.assertIsNotNone(_get_in_db(server, 1, "webchat:webchat:ids"))

    @inlineCallbacks
    def test_tls(self):
        """rediss:// with a private CA: verified, and refused without the CA."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        cert = make_certificate(directory)
        tls_port = free_port()
        server = self.start_redis(
            extra=(
                "--tls-port", str(tls_port),
                "--tls-cert-file", str(cert.cert),
                "--tls-key-file", str(cert.key),
                "--tls-ca-cert-file", str(cert.ca),
                "--tls-auth-clients", "no",
            )
        )  # fmt: skip
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert.ca}"
        (relay, got), (other, _) = self.start_relay(url), self.start_relay(url)
        yield self.wait_up(relay, other)
        self.assertTrue(other.publish(3, b"encrypted"))
        yield wait_until(lambda: got, what="the message")
        self.assertEqual(got, [sent_as(other.node_id, 3, b"encrypted")])
        self.assertEqual(server.command("GET", "webchat:webchat:nodes"), b"2")

        untrusting, _ = self.start_relay(
            f"rediss://127.0.0.1:{tls_port}/0", retry_initial=0.05, retry_max=0.1
        )
        yield wait_until(lambda: untrusting.state == "down", what="a TLS failure")
        yield sleep(0.3)
        (failed,) = self.logs.matching("Redis connection failed", untrusting)
        self.assertIn("certificate verify failed", failed)
        self.assertEqual(untrusting.state, "down")

    @inlineCallbacks
    def test_channels_are_separate_chats(self):
        server = self.start_redis()
        (a, a_got), (b, b_got) = (
            self.start_relay(server.url, channel="room-a"),
            self.start_relay(server.url, channel="room-b"),
        )
        (a2, _) = self.start_relay(server.url, channel="room-a")
        yield self.wait_up(a, b, a2)
        a2.publish(1, b"for room a")
        yield wait_until(lambda: a_got, what="room a's message")
        yield sleep(0.1)
        self.assertEqual(b_got, [])


def _get_in_db(server: RedisServer, db: int, key: str) -> Any:
    """GET ``key`` in database ``db`` (one connection for both commands)."""
    import socket

    from tests.redis_server import encode_command, read_reply

    with socket.create_connection(("127.0.0.1", server.port), 5) as sock:
        reader = sock.makefile("rb")
        if server.password:
            sock.sendall(encode_command("AUTH", server.password))
            read_reply(reader)
        sock.sendall(encode_command("SELECT", db) + encode_command("GET", key))
        read_reply(reader)
        return read_reply(reader)
