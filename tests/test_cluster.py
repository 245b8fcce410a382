"""Several real twistd nodes sharing one chat through a real redis-server.

Each test starts redis-server on a free port and webchat nodes as separate
processes, and talks to them with real WebSocket clients, as a deployment
behind a balancer would be used.
"""

from __future__ import annotations

import json
import re
import signal
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.redis_server import RedisServer
from tests.support import Twistd, slow

ID_TEXT = re.compile(r"^id (\d+): (.*)$", re.S)


@slow
class Cluster(SynchronousTestCase):
    """Redis plus ``nodes`` webchat processes, and clients to talk through them."""

    nodes = 3

    def setUp(self):
        self.redis = RedisServer()
        self.addCleanup(self.redis.stop)
        self.redis.start()
        self.servers = [self.start_node(f"node{n}") for n in range(self.nodes)]
        self.stack = ExitStack()
        self.addCleanup(self.stack.close)

    def start_node(self, name: str) -> tuple[Twistd, int]:
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        server = Twistd(
            workdir,
            "--port", "tcp:0:interface=127.0.0.1",
            "--redis", self.redis.url,
            "--node-id", name,
        )  # fmt: skip
        self.addCleanup(server.stop, signal.SIGKILL)
        log = server.wait_for_log("Redis link up")
        port = int(re.search(r"Site starting on (\d+)", log).group(1))
        return server, port

    def client(self, node: int) -> ClientConnection:
        url = f"ws://127.0.0.1:{self.servers[node][1]}/"
        return self.stack.enter_context(connect(url, open_timeout=5))

    def scrape(self, node: int) -> dict[str, float]:
        port = self.servers[node][1]
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def health(self, node: int) -> dict:
        port = self.servers[node][1]
        with urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return json.loads(reply.read())

    def receive_all(
        self, client: ClientConnection, count: int
    ) -> list[tuple[int, str]]:
        got = []
        for _ in range(count):
            chat_id, text = ID_TEXT.match(client.recv(timeout=5)).groups()
            got.append((int(chat_id), text))
        return got

    def assert_silent(self, client: ClientConnection, wait: float = 0.3) -> None:
        with self.assertRaises(TimeoutError):
            extra = client.recv(timeout=wait)
            self.fail(f"unexpected message {extra!r}")

    def logs_are_clean(self) -> None:
        for server, _ in self.servers:
            self.assertNotIn("Traceback", server.log())
            self.assertNotIn("Unhandled", server.log())


class ClusterChatTests(Cluster):
    def test_every_message_reaches_every_other_client_once_and_ids_are_unique(self):
        # Two clients on each of three nodes.
        clients = [self.client(node) for node in (0, 0, 1, 1, 2, 2)]
        time.sleep(0.2)  # every subscription is live before anyone speaks
        for index, client in enumerate(clients):
            client.send(f"hello from client {index}")
        ids = {}
        for index, client in enumerate(clients):
            got = self.receive_all(client, len(clients) - 1)
            texts = sorted(text for _, text in got)
            others = sorted(f"hello from client {i}" for i in range(6) if i != index)
            self.assertEqual(texts, others)  # exactly once each, never its own
            for chat_id, text in got:
                ids.setdefault(text, set()).add(chat_id)
        for client in clients:
            self.assert_silent(client)
        # Everyone saw one id per sender, and no two senders share one.
        self.assertTrue(all(len(seen) == 1 for seen in ids.values()), ids)
        self.assertEqual(len({next(iter(seen)) for seen in ids.values()}), 6)
        self.logs_are_clean()

    def test_order_is_kept_per_sender_across_nodes(self):
        sender, local, remote = self.client(0), self.client(0), self.client(1)
        time.sleep(0.2)
        for n in range(50):
            sender.send(f"m{n}")
        for receiver in (local, remote):
            texts = [text for _, text in self.receive_all(receiver, 50)]
            self.assertEqual(texts, [f"m{n}" for n in range(50)])


class RedisOutageTests(Cluster):
    nodes = 2

    def test_local_chat_survives_redis_and_relaying_resumes_by_itself(self):
        a, b = self.client(0), self.client(0)
        far = self.client(1)
        time.sleep(0.2)
        a.send("before")
        self.assertEqual([t for _, t in self.receive_all(far, 1)], ["before"])
        self.receive_all(b, 1)

        self.redis.kill()
        self.servers[0][0].wait_for_log("Redis link lost")
        for n in range(20):
            a.send(f"during {n}")
        # Local clients keep chatting with each other.
        self.assertEqual(
            [t for _, t in self.receive_all(b, 20)], [f"during {n}" for n in range(20)]
        )
        # New connections during the outage still get working ids.
        late = self.client(0)
        late.send("late joiner")
        self.assertEqual([t for _, t in self.receive_all(a, 1)], ["late joiner"])
        self.receive_all(b, 1)
        log = self.servers[0][0].log()
        self.assertEqual(log.count("Redis is down: messages are not being relayed"), 1)
        self.assertNotEqual(self.health(0)["redis"], "up")
        self.assertEqual(self.health(0)["status"], "ok")  # it still serves its own

        self.redis.start()
        deadline = time.monotonic() + 10
        # The node that failed to relay says it relays again; both reconnect.
        self.servers[0][0].wait_for_log("Redis is back: relaying again", timeout=10)
        for server, _ in self.servers:
            while server.log().count("Redis link up") < 2:
                self.assertLess(time.monotonic(), deadline, server.log())
                time.sleep(0.05)
        # The far client missed the outage, but hears new messages: no one
        # reconnected.
        while time.monotonic() < deadline:
            a.send("after")
            try:
                got = far.recv(timeout=0.5)
            except TimeoutError:
                continue
            if got.endswith(": after"):
                break
        else:
            self.fail("cross-node chat did not resume within 10 s")
        self.assertEqual(self.health(0)["redis"], "up")
        metrics = self.scrape(0)
        self.assertEqual(metrics["webchat_redis_up"], 1)
        self.assertGreaterEqual(metrics["webchat_redis_relay_failures_total"], 21)
        self.assertGreaterEqual(metrics["webchat_redis_reconnects_total"], 1)
        self.assertGreaterEqual(metrics["webchat_redis_published_total"], 2)
        self.assertGreaterEqual(self.scrape(1)["webchat_redis_received_total"], 2)
        self.logs_are_clean()


class NodeCrashTests(Cluster):
    def test_a_node_killed_takes_only_its_own_clients_with_it(self):
        a, b, doomed = self.client(0), self.client(1), self.client(2)
        time.sleep(0.2)
        self.servers[2][0].process.send_signal(signal.SIGKILL)
        self.servers[2][0].process.wait(5)
        with self.assertRaises(ConnectionClosed):
            doomed.recv(timeout=5)
        a.send("still here")
        self.assertEqual([t for _, t in self.receive_all(b, 1)], ["still here"])
        b.send("me too")
        self.assertEqual([t for _, t in self.receive_all(a, 1)], ["me too"])
        for server, _ in self.servers[:2]:
            self.assertNotIn("Traceback", server.log())


class ClusterLogTests(Cluster):
    nodes = 2

    def test_message_lines_count_the_clients_of_this_node(self):
        # Node 0: one sender alone; node 1: two listeners.
        sender = self.client(0)
        listeners = [self.client(1), self.client(1)]
        self.servers[1][0].wait_for_log("New connection!")
        sender.send("hello")
        for listener in listeners:
            self.assertEqual(ID_TEXT.match(listener.recv(timeout=5)).group(2), "hello")
        sent = self.servers[0][0].wait_for_log("sending message hello")
        got = self.servers[1][0].wait_for_log("sending message hello")
        # Where it came from: no "0 other connection(s)" as if nobody heard it.
        self.assertRegex(
            sent,
            r"Connection \d+ sending message hello to 0 other connection\(s\) "
            r"here, and published to the other nodes\n",
        )
        # Where it arrived: both local listeners counted (issue #11, item 10).
        self.assertRegex(
            got,
            r"Connection \d+ on node node0 sending message hello to 2 "
            r"connection\(s\) here\n",
        )
