"""/metrics after a scripted chat: every counter moved by exactly the right amount.

Scraped over HTTP from a real server and parsed with prometheus_client's own
text parser, the way Prometheus would read it.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python.threadable import isInIOThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.redis_server import RedisServer
from tests.support import (
    HANDSHAKE,
    ROOT,
    ServerMixin,
    Twistd,
    connect_raw,
    deferLater,
    free_port,
    slow,
)
from webchat.limits import Limits
from webchat.metrics import DROP_REASONS, REFUSAL_REASONS, MetricsPage, make_registry
from webchat.web import make_site


class MetricsTests(ServerMixin, TestCase):
    timeout = 30

    @inlineCallbacks
    def setUp(self):
        yield self.start_server(limits=Limits(rate_limit=0, max_message_size=100))
        # The same server, with /metrics mounted, on a second port.
        self.registry = make_registry(self.factory)
        metrics = MetricsPage(self.registry)
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.metrics_port = yield endpoint.listen(
            make_site(self.factory, metrics=metrics)
        )
        self.addCleanup(self.metrics_port.stopListening)

    @inlineCallbacks
    def get(self, path: bytes, headers: bytes = b"") -> bytes:
        peer = yield connect_raw(self.metrics_port.getHost().port)
        peer.transport.write(b"GET " + path + b" HTTP/1.0\r\n" + headers + b"\r\n")
        yield peer.lost
        return peer.data

    @inlineCallbacks
    def scrape(self) -> dict[str, float]:
        reply = yield self.get(b"/metrics")
        self.assertTrue(reply.startswith(b"HTTP/1.0 200 "), reply[:100])
        text = reply.split(b"\r\n\r\n", 1)[1].decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = (
                    sample.value
                )
        return samples

    @inlineCallbacks
    def test_counters_move_by_exactly_the_chat(self):
        before = yield self.scrape()
        a, b, c = yield self.connect_many(3)
        a.send_text("hello")  # 2 deliveries of "id 1: hello" (11 bytes + 2 header)
        b.send_text("hi")  # 2 deliveries of "id 2: hi" (8 + 2)
        yield b.received.get()
        yield c.received.get()
        yield a.received.get()
        yield c.received.get()
        c.sendClose()  # 1000
        yield c.closed
        b.send_text("x" * 101)  # too big: 1009
        yield b.closed
        peer = yield connect_raw(self.port.getHost().port)
        peer.transport.write(
            HANDSHAKE.replace(b"\r\n\r\n", b"\r\nOrigin: http://evil.example\r\n\r\n")
        )
        yield peer.lost
        yield deferLater(0.05)
        after = yield self.scrape()

        def moved(name: str) -> float:
            return after.get(name, 0) - before.get(name, 0)

        self.assertEqual(after["webchat_connections"], 1)
        self.assertEqual(moved("webchat_connections_opened_total"), 3)
        self.assertEqual(moved("webchat_connections_closed_total{code=1000}"), 1)
        self.assertEqual(moved("webchat_connections_closed_total{code=1009}"), 1)
        self.assertEqual(moved("webchat_handshakes_refused_total{reason=origin}"), 1)
        self.assertEqual(
            moved("webchat_connections_dropped_total{reason=message_too_big}"), 1
        )
        self.assertEqual(moved("webchat_connections_dropped_total{reason=too_slow}"), 0)
        self.assertEqual(moved("webchat_messages_received_total"), 2)
        self.assertEqual(moved("webchat_deliveries_total"), 4)
        self.assertEqual(moved("webchat_sent_bytes_total"), 2 * 13 + 2 * 10)
        self.assertEqual(moved("webchat_fanout_seconds_count"), 2)
        self.assertGreater(moved("webchat_received_bytes_total"), 0)
        self.assertGreater(after["process_resident_memory_bytes"], 0)
        self.assertIn("process_open_fds", after)

    @inlineCallbacks
    def test_collectors_run_on_the_reactor_thread(self):
        # The chat's state changes on the reactor thread only; a scrape read
        # from another thread could see a connection counted as opened but
        # not yet in the set, or a dict change size mid-iteration.
        threads = ThreadRecorder()
        self.registry.register(threads)
        threads.in_io_thread.clear()  # registering describes it: not a scrape
        yield self.connect_many(2)
        samples = yield self.scrape()
        self.assertEqual(samples["webchat_connections"], 2)
        self.assertEqual(threads.in_io_thread, [True])

    @inlineCallbacks
    def test_openmetrics_when_asked_for(self):
        reply = yield self.get(
            b"/metrics", b"Accept: application/openmetrics-text; version=1.0.0\r\n"
        )
        head, body = reply.split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.0 200 "), head)
        self.assertIn(b"content-type: application/openmetrics-text", head.lower())
        self.assertTrue(body.endswith(b"# EOF\n"), body[-50:])
        self.assertIn(b"webchat_connections 0", body)
        plain = yield self.get(b"/metrics")
        self.assertIn(b"content-type: text/plain", plain.lower())
        self.assertNotIn(b"# EOF", plain)

    @inlineCallbacks
    def test_healthz(self):
        import json

        yield self.connect_many(2)
        reply = yield self.get(b"/healthz")
        self.assertTrue(reply.startswith(b"HTTP/1.0 200 "), reply[:100])
        body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["connections"], 2)
        self.assertGreaterEqual(body["uptime"], 0)
        self.factory.draining = True
        reply = yield self.get(b"/healthz")
        self.assertTrue(reply.startswith(b"HTTP/1.0 503 "), reply[:100])
        self.assertEqual(
            json.loads(reply.split(b"\r\n\r\n", 1)[1])["status"], "shutting_down"
        )


class ThreadRecorder(Collector):
    """A collector that yields nothing and notes, per scrape, where it ran."""

    def __init__(self) -> None:
        self.in_io_thread: list[bool] = []

    def collect(self):
        self.in_io_thread.append(isInIOThread())
        return iter(())


@slow
class DocumentedMetricsTests(SynchronousTestCase):
    """Every metric the docs and the README name is one a live node exports."""

    def test_every_documented_metric_exists(self):
        texts = {
            path.relative_to(ROOT): path.read_text()
            for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        }
        mentioned = {
            (name, str(path))
            for path, text in texts.items()
            # webchat_plugin.py is a file, not a metric.
            for name in re.findall(r"\bwebchat_[a-z0-9_]+\b(?!\.py)", text)
        }
        self.assertGreater(len(mentioned), 10)

        # A node with --redis: the relay's metrics exist only on such a node.
        redis = RedisServer()
        self.addCleanup(redis.stop)
        redis.start()
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        # And webhooks (to nowhere): their metrics exist only then.
        secret = workdir / "webhook-secret"
        secret.write_text("secret\n")
        node = Twistd(
            workdir,
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--redis",
            redis.url,
            "--webhook-url",
            f"http://127.0.0.1:{free_port()}/hooks",
            "--webhook-secret-file",
            str(secret),
        )
        self.addCleanup(node.stop, signal.SIGKILL)
        log = node.wait_for_log("Redis link up")
        port = int(re.search(r"Site starting on (\d+)", log).group(1))
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            families = list(text_string_to_metric_families(reply.read().decode()))
        # What a query can name: every sample, a histogram or gauge by its
        # family name, and a counter only with its _total (a labelled counter
        # with no sample yet, such as closes by code, exists all the same).
        exported = {sample.name for family in families for sample in family.samples}
        exported |= {f.name for f in families if f.type != "counter"}
        exported |= {f"{f.name}_total" for f in families if f.type == "counter"}
        missing = sorted(f"{name} ({where})" for name, where in mentioned
                         if name not in exported)  # fmt: skip
        self.assertEqual(missing, [])

        # Every reason a series can carry is in the metrics reference.
        operations = texts[Path("docs/operations.md")]
        for reason in (*DROP_REASONS, *REFUSAL_REASONS):
            self.assertIn(f"`{reason}`", operations)
