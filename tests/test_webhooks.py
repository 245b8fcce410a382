"""The webhook machinery on a fake clock: signing, the queue, the retry
schedule, what is dropped and why, draining at shutdown, the counts of
users and rooms.  (tests/test_webhooks_http.py sends them to a real HTTP
receiver from a real chat.)"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import TestCase
from twisted.web.http import datetimeToString

from tests.support import ROOT, LogCapture
from webchat.limits import (
    WEBHOOK_OFFLINE_DELAY,
    WEBHOOK_QUEUE,
    WEBHOOK_SIGNATURE_TOLERANCE,
    WEBHOOK_TIMEOUT,
)
from webchat.tap import Options
from webchat.webhooks import (
    AppEvents,
    LocalTally,
    WebhookCollector,
    WebhookSender,
    parse_event_types,
    sign,
    verify,
)
from webchat.webhooks.sender import Answer, retry_after_seconds, safe_url

SECRET = b"s3cret-webhook-key"


class FakeReceiver:
    """Records each request; answers each with the next Deferred of ``answers``."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes, dict[str, str]]] = []
        self.answers: list[Deferred[Answer]] = []

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Deferred[Answer]:
        self.requests.append((url, body, headers))
        d: Deferred[Answer] = Deferred()
        self.answers.append(d)
        return d

    def answer(self, status: int, retry_after: str = "") -> None:
        self.answers[-1].callback(Answer(status, retry_after))


def make_sender(clock, receiver, **kwargs) -> WebhookSender:
    kwargs.setdefault("rng", lambda: 0.0)  # no jitter: the full delay
    sender = WebhookSender(
        clock, "http://user:pw@127.0.0.1:9/hook?token=abc", SECRET, receiver.post,
        **kwargs,
    )  # fmt: skip
    sender.startService()
    return sender


class Logged:
    def capture(self, test: TestCase) -> LogCapture:
        logs = LogCapture()
        globalLogPublisher.addObserver(logs)
        test.addCleanup(globalLogPublisher.removeObserver, logs)
        return logs


class SigningTests(TestCase):
    def test_signature_is_hmac_of_timestamp_dot_body(self):
        import hashlib
        import hmac

        body = b'{"id":"x"}'
        expected = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256)
        self.assertEqual(sign(SECRET, 1700000000, body), "v1=" + expected.hexdigest())

    def test_verify(self):
        body = b"{}"
        good = sign(SECRET, 1000, body)
        self.assertTrue(verify(SECRET, "1000", good, body, now=1000))
        self.assertFalse(verify(b"other", "1000", good, body, now=1000))
        self.assertFalse(verify(SECRET, "1000", good, body + b" ", now=1000))
        self.assertFalse(verify(SECRET, "1001", good, body, now=1001))
        late = 1000 + WEBHOOK_SIGNATURE_TOLERANCE + 1
        self.assertFalse(verify(SECRET, "1000", good, body, now=late))
        self.assertFalse(verify(SECRET, "soon", good, body, now=1000))

    def test_safe_url_hides_credentials(self):
        self.assertEqual(
            safe_url("https://u:p@hooks.example:8443/in?token=abc#x"),
            "https://hooks.example:8443/in",
        )
        # A log line must never be what fails: no port parsing, no raising.
        self.assertEqual(safe_url("http://h:99999/x"), "http://h:99999/x")
        self.assertEqual(safe_url("http://[::1/x"), "(an unparsable URL)")

    def test_event_types(self):
        self.assertEqual(
            parse_event_types("message, user.online"),
            frozenset({"message", "user.online"}),
        )
        with self.assertRaisesRegex(ValueError, "unknown event type 'user.typing'"):
            parse_event_types("user.online,user.typing")
        with self.assertRaises(ValueError):
            parse_event_types(" , ")


class SenderTests(TestCase, Logged):
    def setUp(self):
        self.logs = self.capture(self)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.receiver = FakeReceiver()

    def test_request_is_signed_and_carries_the_event(self):
        sender = make_sender(self.clock, self.receiver)
        sender.enqueue("ev1", b'{"id":"ev1"}')
        _, body, headers = self.receiver.requests[0]
        self.assertEqual(body, b'{"id":"ev1"}')
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(headers["Webchat-Event-Id"], "ev1")
        self.assertEqual(headers["Webchat-Timestamp"], "1700000000")
        self.assertTrue(
            verify(SECRET, "1700000000", headers["Webchat-Signature"], body, now=1.7e9)
        )

    def test_one_at_a_time_in_order(self):
        sender = make_sender(self.clock, self.receiver)
        for n in range(3):
            sender.enqueue(f"ev{n}", b"%d" % n)
        self.assertEqual(len(self.receiver.requests), 1)
        self.receiver.answer(200)
        self.receiver.answer(204)
        self.receiver.answer(200)
        self.assertEqual([r[1] for r in self.receiver.requests], [b"0", b"1", b"2"])
        self.assertEqual(len(sender.queue), 0)
        self.assertEqual(dict(sender.sent), {"200": 2, "204": 1})

    def test_backoff_schedule_capped_then_delivered(self):
        sender = make_sender(self.clock, self.receiver, retry_initial=0.5, retry_max=8)
        sender.enqueue("ev", b"body")
        times = []
        for _ in range(7):
            times.append(self.clock.seconds())
            self.receiver.answer(503)
            self.clock.advance(sender._retry.getTime() - self.clock.seconds())
        gaps = [b - a for a, b in itertools.pairwise(times)]
        self.assertEqual(gaps, [0.5, 1.0, 2.0, 4.0, 8.0, 8.0])
        self.receiver.answer(200)
        self.assertEqual(len(sender.queue), 0)
        self.assertEqual(sender.failures, 0)
        # Each try signed with its own time: a receiver's 5-minute window
        # never refuses a retry just for being late.
        stamps = [h["Webchat-Timestamp"] for _, _, h in self.receiver.requests]
        self.assertEqual(len(set(stamps)), len(stamps) - 1)  # 0.5 s apart at first
        self.assertEqual(
            len({r[2]["Webchat-Event-Id"] for r in self.receiver.requests}), 1
        )
        failing = [line for line in self.logs.lines if "failing" in line]
        self.assertEqual(len(failing), 1, self.logs.lines)  # once per episode
        self.assertIn("http://127.0.0.1:9/hook", failing[0])
        self.assertTrue(
            any("delivered again after 7" in line for line in self.logs.lines)
        )

    def test_retry_after_on_429_and_503_is_waited_out_up_to_the_cap(self):
        sender = make_sender(self.clock, self.receiver, retry_initial=0.5, retry_max=8)
        sender.enqueue("ev", b"body")
        # (answer, Retry-After) -> seconds until the next try; the backoff
        # alone would be 0.5, 1, 2, 4, 8.
        cases = [
            (503, "86400", 8.0),  # no longer than the backoff's cap
            (503, "2", 2.0),  # seconds: waited out
            (429, "a date 3 s ahead", 3.0),  # an HTTP date
            (500, "30", 4.0),  # only 429 and 503 say when: the backoff
            (503, "soon", 8.0),  # not a Retry-After: the backoff
        ]
        for status, retry_after, wait in cases:
            if retry_after.startswith("a date"):
                retry_after = datetimeToString(self.clock.seconds() + 3).decode()
            self.receiver.answer(status, retry_after)
            self.assertEqual(
                sender._retry.getTime() - self.clock.seconds(), wait, retry_after
            )
            self.clock.advance(wait)
        self.assertEqual(len(self.receiver.requests), len(cases) + 1)
        self.receiver.answer(200)
        self.assertEqual(len(sender.queue), 0)
        failing = [line for line in self.logs.lines if "failing" in line]
        self.assertEqual(len(failing), 1, self.logs.lines)
        self.assertIn("(HTTP 503, Retry-After 8 s)", failing[0])

    def test_retry_after_seconds(self):
        now = 1_000_000_000.0
        self.assertEqual(retry_after_seconds(" 120 ", now), 120.0)
        later = datetimeToString(now + 90).decode()
        self.assertEqual(retry_after_seconds(later, now), 90.0)
        self.assertEqual(retry_after_seconds("Sun, 06 Nov 1994 08:49:37 GMT", now), 0)
        self.assertEqual(retry_after_seconds("9" * 5000, now), float("inf"))
        for bad in ("", "-1", "1.5", "\u0661", "soon", "Wed, 21 Foo 2015 07:28:00"):
            self.assertIsNone(retry_after_seconds(bad, now), bad)

    def test_jitter_shortens_by_up_to_half(self):
        draws = iter([1.0, 0.5])
        sender = make_sender(self.clock, self.receiver, rng=lambda: next(draws))
        self.assertEqual(sender.delay(0), 0.25)
        self.assertEqual(sender.delay(3), 3.0)

    def test_timeout_and_connection_errors_are_retried(self):
        sender = make_sender(self.clock, self.receiver, timeout=10)
        sender.enqueue("ev", b"body")
        self.clock.advance(10)  # no answer: timed out, cancelled
        self.assertEqual(sender.sent["timeout"], 1)
        self.assertEqual(len(sender.queue), 1)
        self.clock.advance(0.5)
        self.assertEqual(len(self.receiver.requests), 2)
        self.receiver.answers[-1].errback(ConnectionRefusedError())
        self.assertEqual(sender.sent["error"], 1)
        self.clock.advance(1.0)
        self.receiver.answer(408)
        self.clock.advance(2.0)
        self.receiver.answer(429)
        self.clock.advance(4.0)
        self.receiver.answer(200)
        self.assertEqual(len(self.receiver.requests), 5)
        self.assertEqual(len(sender.queue), 0)

    def test_4xx_is_dropped_and_counted_not_retried(self):
        sender = make_sender(self.clock, self.receiver)
        sender.enqueue("bad", b"1")
        sender.enqueue("good", b"2")
        self.receiver.answer(400)
        self.assertEqual(sender.dropped["rejected"], 1)
        self.assertEqual(len(self.receiver.requests), 2)
        self.receiver.answer(200)
        self.assertEqual(len(sender.queue), 0)
        refused = [line for line in self.logs.lines if "refused" in line]
        self.assertEqual(len(refused), 1)
        self.assertIn("bad", refused[0])

    def test_queue_full_drops_newest_counts_logs_once_per_episode(self):
        sender = make_sender(self.clock, self.receiver, queue_size=3)
        for n in range(10):
            sender.enqueue(f"ev{n}", b"%d" % n)
        self.assertEqual(len(sender.queue), 3)
        self.assertEqual(sender.dropped["queue_full"], 7)
        full = [line for line in self.logs.lines if "queue full" in line]
        self.assertEqual(len(full), 1)
        self.receiver.answer(200)  # room again: the episode is over
        self.assertTrue(
            any("7 event(s) were dropped" in line for line in self.logs.lines)
        )
        sender.enqueue("ev10", b"10")
        sender.enqueue("ev11", b"11")
        full = [line for line in self.logs.lines if "queue full" in line]
        self.assertEqual(len(full), 2)
        bodies = [b for _, b, _ in sender.queue]
        self.assertEqual(bodies, [b"1", b"2", b"10"])  # the oldest kept

    def test_the_secret_is_never_logged(self):
        sender = make_sender(self.clock, self.receiver, queue_size=1)
        sender.enqueue("ev", b"x")
        sender.enqueue("ev2", b"y")
        self.receiver.answer(500)
        self.clock.advance(0.5)
        self.receiver.answer(403)
        text = "\n".join(self.logs.lines)
        self.assertNotIn(SECRET.decode(), text)
        self.assertNotIn("pw", text)
        self.assertNotIn("token=abc", text)

    def test_an_error_naming_the_urls_userinfo_is_logged_without_it(self):
        # treq refuses a URL with userinfo, naming the netloc in its error.
        sender = make_sender(self.clock, self.receiver)
        sender.enqueue("ev", b"x")
        self.receiver.answers[-1].errback(
            ValueError("invalid hostname: user:pw@127.0.0.1:9")
        )
        failing = [line for line in self.logs.lines if "failing" in line]
        self.assertEqual(len(failing), 1)
        self.assertIn("(invalid hostname: 127.0.0.1:9)", failing[0])
        self.assertNotIn("user", failing[0])

    def test_a_full_queue_evicts_room_vacated_then_message_for_user_events(self):
        # Anyone may open and leave rooms: a flood of room.vacated while the
        # receiver is slow must not crowd out a user's user.offline.
        sender = make_sender(self.clock, self.receiver, queue_size=4)
        sender.enqueue("m0", b"m0", "message")  # the head, being tried
        sender.enqueue("m1", b"m1", "message")
        for n in range(20):
            sender.enqueue(f"v{n}", b"v%d" % n, "room.vacated")
        self.assertEqual([i for i, _, _ in sender.queue], ["m0", "m1", "v0", "v1"])
        self.assertTrue(sender.enqueue("off", b"off", "user.offline"))
        self.assertEqual([i for i, _, _ in sender.queue], ["m0", "m1", "v1", "off"])
        self.assertTrue(sender.enqueue("m2", b"m2", "message"))  # evicts v1
        self.assertTrue(sender.enqueue("on", b"on", "user.online"))  # then m1
        self.assertEqual([i for i, _, _ in sender.queue], ["m0", "off", "m2", "on"])
        self.assertTrue(sender.enqueue("on2", b"on2", "user.online"))  # m2
        self.assertFalse(sender.enqueue("on3", b"on3", "user.online"))  # none left
        self.assertFalse(sender.enqueue("v99", b"v99", "room.vacated"))
        self.assertEqual([i for i, _, _ in sender.queue], ["m0", "off", "on", "on2"])
        self.assertEqual(sender.dropped["queue_full"], 18 + 1 + 3 + 2)
        full = [line for line in self.logs.lines if "queue full" in line]
        self.assertEqual(len(full), 1)
        for _ in range(4):  # the slow receiver catches up
            self.receiver.answer(200)
        delivered = [json_id for _, json_id, _ in self.receiver.requests]
        self.assertEqual(delivered, [b"m0", b"off", b"on", b"on2"])

    def test_stop_drains_within_grace(self):
        sender = make_sender(self.clock, self.receiver, drain_grace=5)
        sender.enqueue("a", b"1")
        sender.enqueue("b", b"2")
        stopped = sender.stopService()
        self.assertFalse(stopped.called)
        self.receiver.answer(200)
        self.receiver.answer(200)
        self.assertTrue(stopped.called)
        self.assertEqual(sender.dropped["shutdown"], 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_gives_up_after_grace(self):
        sender = make_sender(self.clock, self.receiver, drain_grace=5, timeout=60)
        sender.enqueue("a", b"1")
        sender.enqueue("b", b"2")
        stopped = sender.stopService()
        self.clock.advance(5)
        self.assertTrue(stopped.called)
        self.assertEqual(sender.dropped["shutdown"], 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(
            any("2 webhook event(s) not delivered" in line for line in self.logs.lines)
        )

    def test_metrics(self):
        sender = make_sender(self.clock, self.receiver, queue_size=1)
        sender.enqueue("a", b"1")
        sender.enqueue("b", b"2")
        self.receiver.answer(200)
        families = {m.name: m for m in WebhookCollector(sender).collect()}
        sent = {
            s.labels["status"]: s.value
            for s in families["webchat_webhook_sent"].samples
        }
        self.assertEqual(sent, {"200": 1})
        dropped = {
            s.labels["reason"]: s.value
            for s in families["webchat_webhook_dropped"].samples
        }
        self.assertEqual(
            dropped, {"queue_full": 1, "rejected": 0, "shutdown": 0, "redis": 0}
        )
        self.assertEqual(families["webchat_webhook_queue"].samples[0].value, 0)


class AppEventsTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.events: list[dict] = []

    def app(self, wanted=("user.online", "user.offline", "room.vacated"), delay=3.0):
        def enqueue(event_id: str, body: bytes, kind: str) -> bool:
            event = json.loads(body)
            self.assertEqual((event["id"], event["type"]), (event_id, kind))
            self.events.append(event)
            return True

        sender = SimpleNamespace(enqueue=enqueue)
        app = AppEvents(self.clock, sender, wanted, offline_delay=delay)
        app.startService()
        return app

    def kinds(self):
        return [(e["type"], e["data"]) for e in self.events]

    def test_online_once_offline_after_delay(self):
        app = self.app()
        app.opened("u1", "lobby")
        app.opened("u1", "other")  # a second tab
        app.closed("u1", "other")
        self.assertEqual(
            self.kinds(),
            [("user.online", {"user": "u1"}), ("room.vacated", {"room": "other"})],
        )
        app.closed("u1", "lobby")
        self.clock.advance(2.9)
        self.assertEqual(len(self.events), 3)  # lobby vacated, no offline yet
        self.clock.advance(0.1)
        self.assertEqual(self.kinds()[-1], ("user.offline", {"user": "u1"}))

    def test_reload_is_neither_offline_nor_online(self):
        app = self.app(wanted=("user.online", "user.offline"))
        app.opened("u1", "lobby")
        app.closed("u1", "lobby")
        self.clock.advance(1.0)
        app.opened("u1", "lobby")
        self.clock.advance(10)
        self.assertEqual(self.kinds(), [("user.online", {"user": "u1"})])

    def test_anonymous_connections_make_no_user_events(self):
        app = self.app()
        app.opened(None, "lobby")
        app.closed(None, "lobby")
        self.clock.advance(10)
        self.assertEqual(self.kinds(), [("room.vacated", {"room": "lobby"})])

    def test_only_wanted_events(self):
        app = self.app(wanted=("message",))
        app.opened("u1", "lobby")
        app.closed("u1", "lobby")
        app.message({"room": "lobby", "text": "hi"})
        self.clock.advance(10)
        self.assertEqual(self.kinds(), [("message", {"room": "lobby", "text": "hi"})])
        self.assertEqual(self.events[0]["ts"], 10_000 - 10_000)

    def test_stop_settles_pending_offline_checks(self):
        app = self.app()
        app.opened("u1", "lobby")
        app.closed("u1", "lobby")
        app.stopService()
        self.assertEqual(self.kinds()[-1], ("user.offline", {"user": "u1"}))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_tally_that_fails_is_counted_and_logged_once_an_outage(self):
        logs = LogCapture()
        globalLogPublisher.addObserver(logs)
        self.addCleanup(globalLogPublisher.removeObserver, logs)
        answers: list[Deferred] = []

        class SlowTally(LocalTally):
            shared = True

            def room_opened(self, room):
                d = Deferred()
                answers.append(d)
                return d

        dropped: Counter = Counter()
        sender = SimpleNamespace(enqueue=lambda *_: True, dropped=dropped)
        app = AppEvents(self.clock, sender, ["room.vacated"], offline_delay=1,
                        tally=SlowTally())  # fmt: skip
        app.startService()
        for _ in range(3):
            app.opened(None, "lobby")
        for d in answers:
            d.errback(ConnectionError("Redis is down"))
        self.assertEqual(dropped["redis"], 3)
        app.opened(None, "lobby")
        answers[-1].callback(None)
        lines = [line for line in logs.lines if "in Redis" in line]
        self.assertEqual(len(lines), 2, logs.lines)  # the outage, its end
        self.assertIn("cannot count in Redis (Redis is down)", lines[0])
        self.assertIn("3 change(s) could not be counted", lines[1])

    def test_stop_with_a_shared_tally_leaves_offline_to_the_others(self):
        class Shared(LocalTally):
            shared = True

        sender = SimpleNamespace(enqueue=lambda i, b, k: self.events.append(b) or True)
        app = AppEvents(self.clock, sender, ["user.offline"], offline_delay=3,
                        tally=Shared())  # fmt: skip
        app.startService()
        app.opened("u1", "lobby")
        app.closed("u1", "lobby")
        app.stopService()
        self.clock.advance(10)
        self.assertEqual(self.events, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_local_tally(self):
        tally = LocalTally()
        self.assertTrue(tally.user_opened("u"))
        self.assertFalse(tally.user_opened("u"))
        self.assertFalse(tally.user_closed("u"))
        self.assertTrue(tally.user_closed("u"))
        self.assertTrue(tally.user_check("u"))
        self.assertFalse(tally.user_check("u"))  # once
        self.assertFalse(tally.user_closed("never"))


class OptionsTests(TestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def secret_file(self, text: str = "the secret\n") -> str:
        path = Path(self.mktemp())
        path.write_text(text)
        return str(path)

    def test_defaults_from_limits(self):
        options = self.parse()
        self.assertIsNone(options["webhook-url"])
        self.assertEqual(options["webhook-timeout"], WEBHOOK_TIMEOUT)
        self.assertEqual(options["webhook-offline-delay"], WEBHOOK_OFFLINE_DELAY)
        self.assertEqual(options["webhook-queue"], WEBHOOK_QUEUE)
        self.assertEqual(
            options["webhook-events"],
            frozenset({"user.online", "user.offline", "room.vacated"}),
        )

    def test_url_and_secret(self):
        options = self.parse(
            "--webhook-url", "https://app.example/hooks",
            "--webhook-secret-file", self.secret_file(),
            "--webhook-events", "message,room.vacated",
        )  # fmt: skip
        self.assertEqual(options["webhook-secret"], b"the secret")
        self.assertEqual(options["webhook-events"], {"message", "room.vacated"})

    def test_mistakes_are_one_line_and_never_show_the_secret(self):
        secret = self.secret_file()
        for argv, expected in [
            (("--webhook-url", "https://a.example/"), "needs --webhook-secret-file"),
            (("--webhook-secret-file", secret), "needs --webhook-url"),
            (
                ("--webhook-url", "ftp://u:pw@a.example/x?k=v",
                 "--webhook-secret-file", secret),
                "--webhook-url: ftp://a.example/x: expected http://",
            ),
            (
                ("--webhook-url", "http://a.example/",
                 "--webhook-secret-file", self.secret_file("")),
                "the file is empty",
            ),
            (("--webhook-events", "user.typing"), "unknown event type"),
            (("--webhook-queue", "-1"), "--webhook-queue: must not be negative"),
        ]:  # fmt: skip
            with self.assertRaises(UsageError) as caught:
                self.parse(*argv)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn("the secret", str(caught.exception))
            self.assertNotIn("pw", str(caught.exception))

    def test_a_url_with_credentials_or_a_bad_port_is_refused(self):
        secret = self.secret_file()
        for url, expected in [
            ("http://hookuser:pw@127.0.0.1/x", "no credentials in the URL"),
            ("http://hookuser@127.0.0.1/x", "no credentials in the URL"),
            ("http://127.0.0.1:99999/x", "not a valid URL"),
            ("http://127.0.0.1:abc/x", "not a valid URL"),
            ("http://[::1/x", "(an unparsable URL): not a valid URL"),
        ]:
            with self.assertRaises(UsageError) as caught:
                self.parse("--webhook-url", url, "--webhook-secret-file", secret)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn("hookuser", str(caught.exception))

    def test_help_lists_every_webhook_option(self):
        usage = Options().getUsage(width=400)
        for shown in (
            "--webhook-url=URL",
            "--webhook-secret-file=FILE",
            "--webhook-timeout=S",
            "--webhook-offline-delay=S",
            "--webhook-events=LIST",
            "--webhook-queue=N",
        ):
            self.assertIn(shown, usage)
        readme = (ROOT / "README.md").read_text()
        operations = (ROOT / "docs" / "operations.md").read_text()
        for shown in usage.split():
            if shown.startswith("--webhook-") and "=" in shown:
                option = shown[2:].split("=")[0]
                self.assertIn(f"| `--{option} ", readme)
        for option in ("webhook-queue", "webhook-timeout", "webhook-offline-delay"):
            self.assertIn(f"`--{option} ", operations)


class DocsTests(TestCase):
    def test_the_python_receiver_in_the_docs_verifies_our_signature(self):
        text = (ROOT / "docs" / "webhooks.md").read_text()
        code = text.split("```python\n", 1)[1].split("```", 1)[0]
        namespace: dict = {}
        exec(compile(code, "docs/webhooks.md", "exec"), namespace)
        doc_verify = namespace["verify"]
        import time

        now = int(time.time())
        body = b'{"id":"x","type":"user.online","ts":1,"data":{"user":"\xc3\xa9"}}'
        good = sign(SECRET, now, body)
        self.assertTrue(doc_verify(SECRET, str(now), good, body))
        self.assertFalse(doc_verify(SECRET, str(now), good, body + b" "))
        self.assertFalse(
            doc_verify(SECRET, str(now - 301), sign(SECRET, now - 301, body), body)
        )

    def test_every_option_and_metric_is_in_the_webhooks_doc(self):
        text = (ROOT / "docs" / "webhooks.md").read_text()
        for name in ("webhook-url", "webhook-secret-file", "webhook-events",
                     "webhook-offline-delay", "webhook-timeout", "webhook-queue",
                     "webchat_webhook_sent_total", "webchat_webhook_dropped_total",
                     "webchat_webhook_queue", "Webchat-Signature",
                     "Webchat-Timestamp", "Webchat-Event-Id"):  # fmt: skip
            self.assertIn(name, text)
        from webchat.webhooks.sender import DROP_REASONS

        for reason in DROP_REASONS:
            self.assertIn(f'reason="{reason}"', text)
