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
from urllib.parse import quote
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
    #: More options for every node, and for redis-server.
    node_args: tuple[str, ...] = ()
    redis_args: tuple[str, ...] = ()

    def setUp(self):
        self.redis = RedisServer(extra=self.redis_args)
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
            *self.node_args,
        )  # fmt: skip
        self.addCleanup(server.stop, signal.SIGKILL)
        log = server.wait_for_log("Redis link up")
        port = int(re.search(r"Site starting on (\d+)", log).group(1))
        return server, port

    def client(self, node: int, room: str = "") -> ClientConnection:
        path = f"/ws/{room}" if room else "/"
        url = f"ws://127.0.0.1:{self.servers[node][1]}{path}"
        return self.stack.enter_context(connect(url, open_timeout=5))

    def json_client(
        self, node: int, room: str, name: str = ""
    ) -> tuple[ClientConnection, dict]:
        """A JSON client of ``node`` in ``room``, and its welcome."""
        query = f"?name={quote(name)}" if name else ""
        url = f"ws://127.0.0.1:{self.servers[node][1]}/ws/{room}{query}"
        client = self.stack.enter_context(
            connect(url, open_timeout=5, subprotocols=["webchat.v1.json"])
        )
        welcome = json.loads(client.recv(timeout=5))
        self.assertEqual(welcome["type"], "welcome")
        return client, welcome

    def scrape(self, node: int) -> dict[str, float]:
        port = self.servers[node][1]
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def wait_remote(self, node: int, count: int, timeout: float = 10.0) -> None:
        """Until ``node`` knows of ``count`` members of other nodes."""
        deadline = time.monotonic() + timeout
        while self.scrape(node)["webchat_redis_remote_members"] != count:
            self.assertLess(time.monotonic(), deadline, f"{count} remote members")
            time.sleep(0.05)

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


def events_until(
    client: ClientConnection, wanted, timeout: float = 5.0
) -> tuple[dict, list[dict]]:
    """Read JSON events until one makes ``wanted(event)`` true: it, and the rest."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no such event within {timeout} s; got {seen}")
        try:
            event = json.loads(client.recv(timeout=left))
        except TimeoutError:
            continue
        if wanted(event):
            return event, seen
        seen.append(event)


def drain(client: ClientConnection, wait: float = 0.5) -> list:
    """Everything ``client`` receives until it has been quiet ``wait`` seconds."""
    got = []
    while True:
        try:
            got.append(client.recv(timeout=wait))
        except TimeoutError:
            return got


def member_ids(welcome: dict) -> dict[int, str]:
    return {member["id"]: member["name"] for member in welcome["members"]}


@slow
class ClusterRoomTests(Cluster):
    """Issue #13 across nodes: rooms, names and presence with --redis."""

    nodes = 2
    node_args = ("--presence-timeout", "3")

    def test_a_room_spans_the_nodes_and_no_other_room_hears_it(self):
        # Bystanders chatting in the lobby on both nodes throughout.
        lobby = [self.client(0), self.client(1)]
        ann, _ = self.json_client(0, "red", "ann")
        seed0 = self.client(0, "red")
        bob, _ = self.json_client(1, "red", "bob")
        seed1 = self.client(1, "red")
        blue_json, _ = self.json_client(1, "blue", "carl")
        blue_seed = self.client(1, "blue")
        # Everyone's presence has gone round (the lobby's members count too).
        self.wait_remote(0, 5)
        self.wait_remote(1, 3)
        for client in (ann, bob, blue_json):
            drain(client, 0.3)
        lobby[0].send("lobby before")
        ann.send(json.dumps({"type": "message", "text": "from ann\nline 2"}))
        seed0.send("from seed0")
        bob.send(json.dumps({"type": "message", "text": "from bob"}))
        seed1.send("from seed1")
        lobby[1].send("lobby after")

        def messages(client: ClientConnection) -> list[tuple[str, str]]:
            events = [json.loads(raw) for raw in drain(client, 1.0)]
            for event in events:
                if event["type"] == "message":
                    self.assertEqual(event["room"], "red")
                    self.assertIsInstance(event["ts"], int)
            return sorted(
                (e["name"], e["text"]) for e in events if e["type"] == "message"
            )

        got_ann = messages(ann)
        got_bob = messages(bob)
        # Exactly once each, never its own, names from either node.
        self.assertEqual(len(got_ann), 3, got_ann)
        self.assertEqual(
            {text for _, text in got_ann}, {"from seed0", "from bob", "from seed1"}
        )
        self.assertIn(("bob", "from bob"), got_ann)
        self.assertEqual(len(got_bob), 3, got_bob)
        self.assertEqual(
            {text for _, text in got_bob},
            {"from ann\nline 2", "from seed0", "from seed1"},
        )
        self.assertIn(("ann", "from ann\nline 2"), got_bob)
        # Seed-format clients get exactly "id N: text", from remote senders too.
        for seed, others in [
            (seed0, {"from ann\nline 2", "from bob", "from seed1"}),
            (seed1, {"from ann\nline 2", "from bob", "from seed0"}),
        ]:
            lines = drain(seed, 1.0)
            self.assertEqual(len(lines), 3, lines)
            self.assertEqual({ID_TEXT.match(line).group(2) for line in lines}, others)
        # The other room heard nothing of it.
        self.assertEqual(
            [
                e
                for e in map(json.loads, drain(blue_json, 0.5))
                if e["type"] == "message"
            ],
            [],
        )
        self.assert_silent(blue_seed)
        # The bystanders' chat went on across the nodes.
        self.assertEqual(
            [t for _, t in self.receive_all(lobby[1], 1)], ["lobby before"]
        )
        self.assertEqual([t for _, t in self.receive_all(lobby[0], 1)], ["lobby after"])
        self.logs_are_clean()

    def test_presence_spans_the_nodes(self):
        ann, ann_welcome = self.json_client(0, "r", "ann")
        self.wait_remote(1, 1)
        bob, welcome = self.json_client(1, "r", "bob")
        members = member_ids(welcome)
        self.assertEqual(sorted(members.values()), ["ann", "bob"])
        self.assertEqual(members[ann_welcome["id"]], "ann")
        joined, _ = events_until(ann, lambda e: e["type"] == "join")
        self.assertEqual(joined["member"], {"id": welcome["id"], "name": "bob"})
        # A name a member of the other node has is not free here.
        twin, twin_welcome = self.json_client(1, "r", "ANN")
        self.assertEqual(twin_welcome["name"], "ANN-2")
        twin.send(json.dumps({"type": "name", "name": "ann"}))
        refused, _ = events_until(twin, lambda e: e["type"] == "error")
        self.assertEqual(refused["code"], "name_taken")
        # Join, rename, typing and leave on node 0 reach node 1.
        cy, cy_welcome = self.json_client(0, "r", "cy")
        self.assertEqual(len(cy_welcome["members"]), 4)
        event, _ = events_until(
            bob, lambda e: e["type"] == "join" and e["member"]["name"] == "cy"
        )
        self.assertEqual(
            event,
            {
                "type": "join",
                "room": "r",
                "member": {"id": cy_welcome["id"], "name": "cy"},
            },
        )
        cy.send(json.dumps({"type": "name", "name": "dee"}))
        event, _ = events_until(bob, lambda e: e["type"] == "name")
        self.assertEqual(
            event,
            {
                "type": "name",
                "room": "r",
                "id": cy_welcome["id"],
                "old": "cy",
                "name": "dee",
            },
        )
        cy.send(json.dumps({"type": "typing"}))
        event, _ = events_until(bob, lambda e: e["type"] == "typing")
        self.assertEqual(event["id"], cy_welcome["id"])
        cy.close()
        event, _ = events_until(bob, lambda e: e["type"] == "leave")
        self.assertEqual(event["member"], {"id": cy_welcome["id"], "name": "dee"})
        self.assertEqual(self.scrape(1)["webchat_redis_remote_members"], 1)
        self.logs_are_clean()

    def test_a_killed_node_s_members_leave_within_the_timeout(self):
        self.json_client(0, "r", "ann")
        self.client(0, "r")  # a seed-format member: it leaves too
        lobby = [self.client(1), self.client(1)]
        self.wait_remote(1, 2)
        bob, welcome = self.json_client(1, "r", "bob")
        self.assertEqual(len(welcome["members"]), 3)
        gone = {i for i, n in member_ids(welcome).items() if n != "bob"}
        self.servers[0][0].process.send_signal(signal.SIGKILL)
        self.servers[0][0].process.wait(5)
        killed_at = time.monotonic()
        left = set()
        while left != gone:
            event, _ = events_until(bob, lambda e: e["type"] == "leave", timeout=10)
            left.add(event["member"]["id"])
        took = time.monotonic() - killed_at
        self.assertLess(took, 3 * 3.0, took)  # 3 x --presence-timeout
        self.assertEqual(self.scrape(1)["webchat_redis_remote_members"], 0)
        self.servers[1][0].wait_for_log("Node node0 not heard from for 3 s")
        # A newcomer on the surviving node sees only the living.
        _, late = self.json_client(1, "r", "late")
        self.assertEqual(sorted(member_ids(late).values()), ["bob", "late"])
        # Bystanders never noticed.
        lobby[0].send("fine")
        self.assertEqual([t for _, t in self.receive_all(lobby[1], 1)], ["fine"])
        self.assertNotIn("Traceback", self.servers[1][0].log())

    def test_a_node_that_stops_cleanly_takes_its_members_at_once(self):
        self.json_client(0, "r", "ann")
        self.wait_remote(1, 1)
        bob, _ = self.json_client(1, "r", "bob")
        self.servers[0][0].stop()
        event, _ = events_until(bob, lambda e: e["type"] == "leave", timeout=2.5)
        self.assertEqual(event["member"]["name"], "ann")

    def test_presence_converges_after_a_redis_restart(self):
        ann, _ = self.json_client(0, "r", "ann")
        self.json_client(1, "r", "bob")
        self.wait_remote(1, 1)
        self.redis.kill()
        for server, _ in self.servers:
            server.wait_for_log("Redis link lost")
        # Meanwhile on node 0: ann goes, cy comes.
        ann.close()
        self.json_client(0, "r", "cy")
        time.sleep(1.0)
        self.redis.start()
        # Whatever node 1 said meanwhile (it may have timed node 0 out), its
        # room ends up as node 0 has it: cy and bob, no ann.
        deadline = time.monotonic() + 20
        while True:
            self.assertLess(time.monotonic(), deadline, "presence did not converge")
            _, late = self.json_client(1, "r", "late")
            names = sorted(
                n for n in member_ids(late).values() if not n.startswith("late")
            )
            if names == ["bob", "cy"]:
                break
            time.sleep(0.5)
        # And the other way round.
        _, late0 = self.json_client(0, "r", "late0")
        self.assertIn("bob", member_ids(late0).values())
        self.assertNotIn("Traceback", self.servers[0][0].log())
        self.assertNotIn("Traceback", self.servers[1][0].log())
