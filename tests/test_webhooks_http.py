"""Webhooks from a real chat to a real HTTP receiver (in this process, on a
free port), which checks every signature: the events, a receiver that is
down then up, one that never answers."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import jwt
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support import (
    LogCapture,
    ServerMixin,
    Twistd,
    connect_client,
    deferLater,
    free_port,
    slow,
    take,
)
from tests.webhook_receiver import ThreadedReceiver, start_receiver
from webchat.auth import TokenVerifier
from webchat.limits import Limits
from webchat.webhooks import AppEvents, WebhookSender, treq_post

SECRET = b"webhook secret for the tests"
JWT_SECRET = b"a shared secret of at least 32 bytes, for HS256"


def as_user(user: str) -> str:
    """The path of a connection signed in as ``user`` (an HS256 token)."""
    claims = {"sub": user, "exp": time.time() + 600}
    return "/?token=" + jwt.encode(claims, JWT_SECRET, algorithm="HS256")


class WebhookChatMixin(ServerMixin):
    timeout = 30

    @inlineCallbacks
    def setUp(self):
        verifier = TokenVerifier(secret=JWT_SECRET, clock=reactor.seconds)
        yield self.start_server(
            limits=Limits(rate_limit=0), auth="optional", verifier=verifier
        )

    def attach(
        self,
        url: str,
        wanted: tuple[str, ...],
        offline_delay: float = 0.5,
        **sender_options: Any,
    ) -> WebhookSender:
        """Webhooks to ``url`` from this test's chat, as --webhook-url does."""
        sender_options.setdefault("retry_initial", 0.05)
        sender_options.setdefault("retry_max", 0.2)
        sender_options.setdefault("drain_grace", 0.5)
        post = treq_post(reactor)
        sender = WebhookSender(reactor, url, SECRET, post, **sender_options)
        app = AppEvents(reactor, sender, wanted, offline_delay=offline_delay)
        app.startService()
        self.factory.app_events = app
        # Cleanups run last-in first-out: after the server has closed.
        self.addCleanup(post.pool.closeCachedConnections)
        self.addCleanup(app.stopService)
        return sender


@slow  # a real HTTP receiver, and seconds of waiting for retries
class WebhookEventTests(WebhookChatMixin, TestCase):
    @inlineCallbacks
    def test_message_and_room_vacated(self):
        receiver = yield start_receiver(self, SECRET)
        self.attach(receiver.url, ("message", "room.vacated"))
        alice, bob = yield self.connect_many(2)
        alice.send_text("hello ✓")
        self.assertEqual((yield bob.received.get()), "id 1: hello ✓")
        event = yield receiver.events.get()
        self.assertEqual(event["type"], "message")
        self.assertEqual(len(event["id"]), 32)
        data = event["data"]
        self.assertIsInstance(data.pop("ts"), int)
        self.assertEqual(
            data,
            {
                "room": "lobby",
                "id": 1,
                "name": "guest-1",
                "text": "hello ✓",
                "offset": 1,
            },
        )
        alice.sendClose()
        yield alice.closed
        # A signed member's message names the user, after the name.
        ann = yield self.connect(as_user("u-ann"))
        ann.send_text("from ann")
        self.assertEqual((yield bob.received.get()), "id 3: from ann")
        event = yield receiver.events.get()
        self.assertEqual(
            list(event["data"]), ["room", "id", "name", "user", "text", "offset", "ts"]
        )
        self.assertEqual(event["data"]["user"], "u-ann")
        self.assertEqual(event["data"]["offset"], 2)
        for client in (ann, bob):
            client.sendClose()
            yield client.closed
        event = yield receiver.events.get()
        self.assertEqual(
            (event["type"], event["data"]), ("room.vacated", {"room": "lobby"})
        )
        self.assertEqual(receiver.bad, [])

    @inlineCallbacks
    def test_user_online_offline_and_a_reload_in_between(self):
        receiver = yield start_receiver(self, SECRET)
        self.attach(receiver.url, ("user.online", "user.offline"), offline_delay=0.5)
        anonymous = yield self.connect()
        first = yield self.connect(as_user("u1"))
        event = yield receiver.events.get()
        self.assertEqual(
            (event["type"], event["data"]), ("user.online", {"user": "u1"})
        )
        second = yield self.connect(as_user("u1"))  # a second tab
        for client in (first, second):  # a reload of both
            client.sendClose()
            yield client.closed
        again = yield self.connect(as_user("u1"))
        yield deferLater(1.0)  # twice the offline delay
        self.assertEqual(len(receiver.taken), 1, receiver.taken)
        again.sendClose()
        yield again.closed
        event = yield receiver.events.get()
        self.assertEqual(
            (event["type"], event["data"]), ("user.offline", {"user": "u1"})
        )
        anonymous.sendClose()
        yield anonymous.closed
        yield deferLater(0.7)
        self.assertEqual(len(receiver.taken), 2, receiver.taken)
        self.assertEqual(receiver.bad, [])

    @inlineCallbacks
    def test_receiver_down_then_up_gets_every_event_once_by_id(self):
        port = free_port()
        sender = self.attach(
            f"http://127.0.0.1:{port}/hooks", ("message",), timeout=0.5
        )
        alice, bob = yield self.connect_many(2)
        for n in range(5):
            alice.send_text(f"m{n}")
        self.assertEqual(len((yield take(bob, 5))), 5)
        for _ in range(100):  # a few refused connections
            if sender.sent["error"] >= 2:
                break
            yield deferLater(0.05)
        self.assertGreaterEqual(
            sender.sent["error"], 2, (dict(sender.sent), self.logs.lines)
        )
        self.assertEqual(len(sender.queue), 5)
        receiver = yield start_receiver(self, SECRET, port)
        # The first two answers are lost: those two arrive twice.
        receiver.stall_after_taking = 2
        while len({e["id"] for e in receiver.taken}) < 5:
            yield receiver.events.get()
        yield deferLater(0.3)
        by_id = {e["id"]: e["data"]["text"] for e in receiver.taken}
        self.assertEqual(sorted(by_id.values()), [f"m{n}" for n in range(5)])
        self.assertGreater(len(receiver.taken), 5)  # at least once, not exactly
        self.assertEqual(len(sender.queue), 0)
        self.assertEqual(receiver.bad, [])


@slow  # a real HTTP receiver, and seconds of waiting for retries
class StalledReceiverTests(WebhookChatMixin, TestCase):
    @inlineCallbacks
    def test_a_receiver_that_never_answers_never_slows_the_chat(self):
        receiver = yield start_receiver(self, SECRET)
        receiver.hang = True
        sender = self.attach(receiver.url, ("message",), queue_size=5, timeout=60)
        alice, bob = yield self.connect_many(2)
        for n in range(200):
            alice.send_text(f"m{n}")
        got = yield take(bob, 200)
        self.assertEqual(got, [f"id 1: m{n}" for n in range(200)])
        bob.send_text("and back")
        self.assertEqual((yield alice.received.get()), "id 2: and back")
        self.assertEqual(receiver.requests, 1)  # one request at a time
        self.assertEqual(len(sender.queue), 5)  # bounded
        self.assertEqual(sender.dropped["queue_full"], 196)
        full = [line for line in self.logs.lines if "queue full" in line]
        self.assertEqual(len(full), 1)


@slow  # a real HTTP receiver, and seconds of waiting for retries
class FloodedQueueTests(WebhookChatMixin, TestCase):
    @inlineCallbacks
    def test_a_room_vacated_flood_does_not_crowd_out_user_offline(self):
        receiver = yield start_receiver(self, SECRET)
        receiver.hang = True  # slow: the first request is held
        sender = self.attach(
            receiver.url,
            ("user.online", "user.offline", "room.vacated"),
            offline_delay=0.1,
            queue_size=5,
            timeout=60,
        )
        ann = yield self.connect(as_user("u-ann"))  # user.online, held
        bob, carol = yield self.connect_many(2)  # bystanders, chatting
        for n in range(20):  # anonymous: open and leave rooms r0..r19
            client = yield self.connect(f"/ws/r{n}")
            client.sendClose()
            yield client.closed
        bob.send_text("still here")
        self.assertEqual((yield carol.received.get()), "id 2: still here")
        ann.sendClose()
        yield ann.closed
        for _ in range(100):  # the offline delay
            if any(kind == "user.offline" for _, _, kind in sender.queue):
                break
            yield deferLater(0.05)
        self.assertGreaterEqual(sender.dropped["queue_full"], 16)
        receiver.hang = False
        receiver.release()  # 503: tried again, then everything is taken
        for _ in range(100):
            if any(e["type"] == "user.offline" for e in receiver.taken):
                break
            yield deferLater(0.05)
        kinds = [(e["type"], e["data"].get("user")) for e in receiver.taken]
        self.assertIn(("user.offline", "u-ann"), kinds)
        self.assertEqual(kinds[0], ("user.online", "u-ann"))
        full = [line for line in self.logs.lines if "queue full" in line]
        self.assertEqual(len(full), 1)
        self.assertEqual(receiver.bad, [])


@slow
class TwistdWebhookTests(TestCase):
    """``twistd webchat --webhook-url``: wired up, and drained at shutdown."""

    timeout = 60

    @inlineCallbacks
    def test_events_reach_the_app_and_the_last_ones_survive_shutdown(self):
        receiver = yield start_receiver(self, SECRET)
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        secret = workdir / "secret"
        secret.write_bytes(SECRET + b"\n")
        node = Twistd(
            workdir,
            "--port", "tcp:0:interface=127.0.0.1",
            "--webhook-url", receiver.url + "?key=hidden",
            "--webhook-secret-file", str(secret),
            "--webhook-events", "message,room.vacated",
        )  # fmt: skip
        self.addCleanup(node.stop, signal.SIGKILL)
        log = yield deferToThread(node.wait_for_log, "Site starting on")
        port = int(re.search(r"Site starting on (\d+)", log).group(1))
        alice = yield connect_client(port, "/ws/team")
        alice.send_text("hi app")
        event = yield receiver.events.get()
        self.assertEqual(event["data"]["text"], "hi app")
        self.assertEqual(event["data"]["room"], "team")
        receiver.hang = True  # the next answers are late ...
        alice.send_text("late")
        yield deferLater(0.2)
        reactor.callLater(0.5, setattr, receiver, "hang", False)
        reactor.callLater(0.5, receiver.release)  # ... a 503 then taken
        status = yield deferToThread(node.stop, signal.SIGTERM)
        self.assertEqual(status, 0)
        texts = [e["data"].get("text") for e in receiver.taken]
        kinds = [e["type"] for e in receiver.taken]
        self.assertEqual(texts[:2], ["hi app", "late"])
        self.assertEqual(kinds[-1], "room.vacated")  # sent while shutting down
        self.assertEqual(receiver.bad, [])
        text = node.log()
        self.assertNotIn(SECRET.decode(), text)
        self.assertNotIn("hidden", text)
        self.assertNotIn("HTTP11ClientFactory", text)  # quiet pool


@slow  # a real HTTP receiver, and seconds of waiting for retries
class ClosingReceiverTests(WebhookChatMixin, TestCase):
    @inlineCallbacks
    def test_a_receiver_that_closes_after_each_answer_costs_no_retries(self):
        # HTTP/1.0: the receiver closes the connection after every answer,
        # and the kept-alive connection the sender had is dead on reuse.
        receiver = ThreadedReceiver(SECRET)
        receiver.server.RequestHandlerClass.protocol_version = "HTTP/1.0"
        self.addCleanup(receiver.stop)
        sender = self.attach(receiver.url, ("message",))
        alice, bob = yield self.connect_many(2)
        for n in range(5):
            alice.send_text(f"m{n}")  # queued: each sent the moment the last
        yield take(bob, 5)  # is answered, before the receiver's close arrives
        for _ in range(100):
            if len(receiver.events) == 5:
                break
            yield deferLater(0.05)
        self.assertEqual([e["data"]["text"] for e in receiver.events],
                         [f"m{n}" for n in range(5)])  # fmt: skip
        self.assertEqual(dict(sender.sent), {"200": 5})


class RetryAfterTests(TestCase):
    """A real receiver, busy for a moment, says when to come back."""

    timeout = 30

    @inlineCallbacks
    def test_a_503_with_retry_after_2_is_retried_no_sooner_than_2_s(self):
        receiver = yield start_receiver(self, SECRET)
        receiver.first_answers.append((503, {b"Retry-After": b"2"}))
        # The sender's clock is a fake one (the backoff's and the retry's
        # time), at the real time: the receiver checks the signatures' age.
        clock = Clock()
        clock.advance(time.time())
        post = treq_post(reactor)
        sender = WebhookSender(
            clock, receiver.url, SECRET, post, rng=lambda: 0.0, drain_grace=0
        )  # (no jitter: without the Retry-After it would be 0.5 s)
        sender.startService()
        self.addCleanup(post.pool.closeCachedConnections)
        self.addCleanup(sender.stopService)
        sender.enqueue("ev", b'{"id":"ev"}', "user.offline")
        for _ in range(100):
            if sender.sent["503"]:
                break
            yield deferLater(0.05)
        self.assertEqual(dict(sender.sent), {"503": 1})
        clock.advance(1.9)
        yield deferLater(0.3)  # time for a retry to reach the receiver
        self.assertEqual(receiver.requests, 1)
        clock.advance(0.1)
        event = yield receiver.events.get()
        self.assertEqual((event["id"], receiver.requests), ("ev", 2))
        for _ in range(100):
            if not sender.queue:
                break
            yield deferLater(0.05)
        self.assertEqual(dict(sender.sent), {"503": 1, "200": 1})
        self.assertEqual(receiver.bad, [])


class DrippingReceiver(Protocol):
    """
    Answers any request ``200`` with a huge Content-Length, then drips one
    byte of body every 0.1 s, never finishing: a hostile or broken receiver.
    """

    def connectionMade(self) -> None:
        self.factory.open.add(self)
        self.drip: LoopingCall | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.drip is None and b"\r\n\r\n" in data:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n"
            )
            self.drip = LoopingCall(self.transport.write, b"x")
            self.drip.start(0.1)

    def connectionLost(self, reason: Failure = None) -> None:
        self.factory.open.discard(self)
        if self.drip is not None and self.drip.running:
            self.drip.stop()


@slow  # a real HTTP receiver, and seconds of waiting for retries
class HostileReceiverTests(TestCase):
    """A timed-out request lets go of its connection and is counted a timeout."""

    timeout = 30

    @inlineCallbacks
    def listen(self, protocol: type[Protocol]) -> Any:
        factory = Factory.forProtocol(protocol)
        factory.open = set()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            factory
        )
        self.addCleanup(port.stopListening)
        self.addCleanup(
            lambda: [p.transport.abortConnection() for p in list(factory.open)]
        )
        factory.url = f"http://127.0.0.1:{port.getHost().port}/hooks"
        return factory

    def sender(self, url: str) -> WebhookSender:
        post = treq_post(reactor)
        sender = WebhookSender(
            reactor, url, SECRET, post,
            timeout=0.3, retry_initial=0.05, retry_max=0.1, drain_grace=0,
        )  # fmt: skip
        sender.startService()
        self.addCleanup(post.pool.closeCachedConnections)
        self.addCleanup(sender.stopService)
        return sender

    @inlineCallbacks
    def test_a_dripping_receiver_leaks_no_connection_per_timeout(self):
        receiver = yield self.listen(DrippingReceiver)
        sender = self.sender(receiver.url)
        sender.enqueue("ev", b'{"id":"ev"}', "user.offline")
        most = 0
        for _ in range(200):  # at most 10 s
            most = max(most, len(receiver.open))
            if sender.sent["timeout"] >= 5:
                break
            yield deferLater(0.05)
        self.assertGreaterEqual(sender.sent["timeout"], 5, dict(sender.sent))
        # One connection per attempt, each closed at its timeout: never
        # more than the one being tried (and the one just let go).
        self.assertLessEqual(most, 2)
        self.assertEqual(len(sender.queue), 1)  # still to be delivered

    @inlineCallbacks
    def test_no_answer_in_time_is_a_timeout_not_an_error(self):
        receiver = yield start_receiver(self, SECRET)
        receiver.hang = True
        logs = LogCapture()
        globalLogPublisher.addObserver(logs)
        self.addCleanup(globalLogPublisher.removeObserver, logs)
        sender = self.sender(receiver.url)
        sender.enqueue("ev", b'{"id":"ev"}', "user.offline")
        for _ in range(100):
            if sum(sender.sent.values()) >= 2:
                break
            yield deferLater(0.05)
        self.assertEqual(set(sender.sent), {"timeout"}, dict(sender.sent))
        failing = [line for line in logs.lines if "failing" in line]
        self.assertEqual(len(failing), 1, logs.lines)
        self.assertIn("(no answer within 0.3 s)", failing[0])
