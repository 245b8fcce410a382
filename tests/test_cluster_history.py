"""Issue #14 across nodes: rooms' history and offsets kept in Redis, and
nothing lost across a Redis outage; real twistd nodes, a real redis-server
and real WebSocket clients (``tests.test_cluster``)."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

from websockets.sync.client import ClientConnection, connect

from tests.support import slow
from tests.test_cluster import Cluster, events_until


def read_messages(
    client: ClientConnection, count: int, timeout: float = 15.0
) -> tuple[list[dict], list[dict]]:
    """The next ``count`` message events ``client`` gets, and its acks meanwhile."""
    messages: list[dict] = []
    acks: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(messages) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"{len(messages)} of {count} messages within {timeout} s: "
                f"{[m['text'] for m in messages]}"
            )
        try:
            event = json.loads(client.recv(timeout=left))
        except TimeoutError:
            continue
        if event["type"] == "message":
            messages.append(event)
        elif event["type"] == "ack":
            acks.append(event)
    return messages, acks


class KeptCluster(Cluster):
    """JSON clients in room ``r`` of the nodes."""

    def join(self, node: int, room: str = "r", query: str = "") -> ClientConnection:
        url = f"ws://127.0.0.1:{self.servers[node][1]}/ws/{room}{query}"
        return self.stack.enter_context(
            connect(url, open_timeout=5, subprotocols=["webchat.v1.json"])
        )

    def fresh_join(self, node: int, query: str = "") -> tuple[dict, list[dict]]:
        """A new JSON client of ``node``: its welcome, and the history it is sent."""
        client = self.join(node, query=query)
        welcome = json.loads(client.recv(timeout=5))
        self.assertEqual(welcome["type"], "welcome")
        history = []
        while True:
            try:
                event = json.loads(client.recv(timeout=0.5))
            except TimeoutError:
                break
            if event.get("history"):
                history.append(event)
        client.close()
        return welcome, history


@slow
class KeptHistoryTests(KeptCluster):
    """With --redis, Redis numbers every message: one sequence on every node."""

    def test_offsets_acks_and_history_are_the_same_on_every_node(self):
        clients = [self.join(node, query=f"?name=p{node}") for node in range(3)]
        for client in clients:
            events_until(client, lambda e: e["type"] == "welcome")
        self.wait_remote(0, 2)
        for round_ in range(3):
            for node, client in enumerate(clients):
                client.send(
                    json.dumps(
                        {"type": "message", "text": f"{node}.{round_}", "ref": round_}
                    )
                )
        seen: dict[str, int] = {}
        for node, client in enumerate(clients):
            messages, acks = read_messages(client, 6)
            # Live order is the offset order, the same for everyone.
            offsets = [m["offset"] for m in messages]
            self.assertEqual(offsets, sorted(offsets))
            for message in messages:
                self.assertNotEqual(message["text"].split(".")[0], str(node))
                self.assertEqual(seen.setdefault(message["text"], message["offset"]),
                                 message["offset"])  # fmt: skip
            # Acks come with the offset the others saw (possibly after the
            # last message: read them to the end).
            while len(acks) < 3:
                event, _ = events_until(client, lambda e: e["type"] == "ack")
                acks.append(event)
            self.assertEqual([a["ref"] for a in acks], [0, 1, 2])
            for ack in acks:
                seen.setdefault(f"{node}.{ack['ref']}", ack["offset"])
                self.assertEqual(seen[f"{node}.{ack['ref']}"], ack["offset"])
        self.assertEqual(sorted(seen.values()), list(range(1, 10)))
        in_order = [text for text, _ in sorted(seen.items(), key=lambda i: i[1])]
        # Every node replays the same history, in offset order, to a joiner.
        epochs = set()
        for node in range(3):
            welcome, history = self.fresh_join(node)
            self.assertEqual(welcome["offset"], 9)
            epochs.add(welcome["epoch"])
            self.assertEqual([m["text"] for m in history], in_order)
            self.assertEqual([m["offset"] for m in history], list(range(1, 10)))
        # A node started now has heard none of it: it asks Redis (the joiner
        # waits for the answer).
        self.servers.append(self.start_node("late"))
        welcome, history = self.fresh_join(3)
        self.assertEqual(welcome["offset"], 9)
        epochs.add(welcome["epoch"])
        self.assertEqual([m["text"] for m in history], in_order)
        self.assertEqual(len(epochs), 1)
        # A resume on any node gets exactly what it missed.
        (epoch,) = epochs
        welcome, history = self.fresh_join(2, f"?since=6&epoch={quote(epoch)}")
        self.assertIs(welcome["recovered"], True)
        self.assertEqual([m["offset"] for m in history], [7, 8, 9])
        self.logs_are_clean()


@slow
class OutageWithoutLossTests(KeptCluster):
    """Redis stopped for seconds while clients on every node chat."""

    # Redis keeps its data across the restart (as a production one does).
    redis_args = ("--appendonly", "yes", "--appendfsync", "always")

    def test_every_message_reaches_every_client_and_history_once(self):
        clients = [
            self.join(node, query=f"?name=c{node}{k}") for node in range(3)
            for k in range(2)
        ]  # fmt: skip
        for client in clients:
            events_until(client, lambda e: e["type"] == "welcome")
        self.wait_remote(0, 4)
        said: list[str] = []

        def everyone_says(phase: str) -> None:
            for index, client in enumerate(clients):
                text = f"{phase} {index}"
                said.append(text)
                client.send(json.dumps({"type": "message", "text": text}))

        everyone_says("before")
        # Heard everywhere before Redis stops (else an echo the stop cut
        # off is caught up later, delayed: a different test).
        received = [read_messages(client, 5)[0] for client in clients]
        self.redis.shutdown()  # a clean stop: SIGTERM
        for server, _ in self.servers:
            server.wait_for_log("Redis link lost")
        for n in range(5):  # ~10 s without Redis, everyone chatting
            everyone_says(f"during{n}")
            time.sleep(2)
        self.redis.start()
        for server, _ in self.servers:
            deadline = time.monotonic() + 15
            while server.log().count("Redis link up") < 2:
                self.assertLess(time.monotonic(), deadline, server.log())
                time.sleep(0.05)
        everyone_says("after")

        # Every client hears every other client's message exactly once.
        for index, client in enumerate(clients):
            messages, _ = read_messages(client, len(said) - len(said) // 6 - 5)
            messages = received[index] + messages
            texts = [m["text"] for m in messages]
            mine = {t for t in said if t.endswith(f" {index}")}
            self.assertEqual(sorted(texts), sorted(set(said) - mine))
            node = index // 2
            for message in messages:
                sender = int(message["text"].split()[1])
                if message["text"].startswith("during"):
                    if sender // 2 == node:  # said on this node: at once
                        self.assertIsNone(message["offset"])
                    else:
                        self.assertIs(message.get("delayed"), True, message)
                        self.assertIsInstance(message["offset"], int)
                else:
                    self.assertNotIn("delayed", message)
        # Every node's history of the room is one sequence with all of them.
        histories = []
        for node in range(3):
            welcome, history = self.fresh_join(node)
            histories.append([(m["offset"], m["text"]) for m in history])
            self.assertEqual(welcome["offset"], len(said))
        self.assertEqual(histories[0], histories[1])
        self.assertEqual(histories[0], histories[2])
        self.assertEqual([o for o, _ in histories[0]], list(range(1, len(said) + 1)))
        self.assertEqual(sorted(t for _, t in histories[0]), sorted(said))
        for server, _ in self.servers:
            self.assertIn(
                "Appending 10 message(s) said during the Redis outage", server.log()
            )
        metrics = self.scrape(0)
        self.assertEqual(metrics["webchat_outage_buffered"], 0)
        self.assertEqual(metrics["webchat_outage_dropped_total"], 0)
        self.logs_are_clean()
