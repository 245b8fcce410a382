"""Webhooks from a cluster: two real twistd nodes, a real redis-server, and
a real receiver (a threaded HTTP server checking every signature).  Each
event is sent by one node only; a node killed with SIGKILL has its users go
offline (once) and its rooms vacate."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import jwt
from websockets.exceptions import ConnectionClosed

from tests.test_cluster import Cluster
from tests.webhook_receiver import ThreadedReceiver

SECRET = b"cluster webhook secret"
JWT_SECRET = b"a shared secret of at least 32 bytes, for HS256"


class WebhookClusterTests(Cluster):
    nodes = 2

    def setUp(self):
        self.receiver = ThreadedReceiver(SECRET)
        self.addCleanup(self.receiver.stop)
        keys = Path(self.mktemp()).resolve()
        keys.mkdir(parents=True)
        (keys / "webhook").write_bytes(SECRET + b"\n")
        (keys / "jwt").write_bytes(JWT_SECRET)
        self.node_args = (
            "--auth", "optional",
            "--jwt-secret-file", str(keys / "jwt"),
            "--webhook-url", self.receiver.url,
            "--webhook-secret-file", str(keys / "webhook"),
            "--webhook-offline-delay", "0.5",
            "--presence-timeout", "1.5",
            "--webhook-events", "user.online,user.offline,room.vacated,message",
        )  # fmt: skip
        super().setUp()

    def signed(self, node: int, user: str, room: str):
        token = jwt.encode(
            {"sub": user, "exp": time.time() + 600}, JWT_SECRET, algorithm="HS256"
        )
        port = self.servers[node][1]
        from websockets.sync.client import connect

        url = f"ws://127.0.0.1:{port}/ws/{room}?token={token}"
        return self.stack.enter_context(connect(url, open_timeout=5))

    def test_a_user_on_both_nodes_closing_on_one_is_still_online(self):
        first = self.signed(0, "u1", "team")
        self.receiver.wait_for(lambda seen: ("user.online", "u1") in seen)
        second = self.signed(1, "u1", "team")
        time.sleep(0.3)  # counted in Redis (a join is not instant there)
        first.close()
        time.sleep(1.5)  # three times the offline delay
        self.assertEqual(self.receiver.seen(), [("user.online", "u1")])
        second.close()
        self.receiver.wait_for(lambda seen: len(seen) >= 3)
        time.sleep(1.0)
        self.assertEqual(
            sorted(self.receiver.seen()),
            [("room.vacated", "team"), ("user.offline", "u1"), ("user.online", "u1")],
        )
        ids = [e["id"] for e in self.receiver.events]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(self.receiver.bad, 0)
        self.logs_are_clean()

    def test_a_reload_onto_the_other_node_sends_nothing(self):
        client = self.signed(0, "u2", "lobby")
        self.receiver.wait_for(lambda seen: ("user.online", "u2") in seen)
        client.close()
        self.signed(1, "u2", "lobby")  # the page came back through the other
        time.sleep(1.5)
        self.assertEqual(
            self.receiver.seen(), [("user.online", "u2"), ("room.vacated", "lobby")]
        )

    def test_kill_9_of_a_node_takes_its_users_offline_once(self):
        self.signed(1, "gone", "doomed")
        self.signed(1, "both", "shared")
        self.signed(0, "both", "shared")
        self.receiver.wait_for(
            lambda seen: {("user.online", "gone"), ("user.online", "both")} <= set(seen)
        )
        node, _ = self.servers[1]
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(10)
        # Its presence lapses (1.5 s), then the next reap (every 0.5 s).
        self.receiver.wait_for(lambda seen: ("user.offline", "gone") in seen)
        self.receiver.wait_for(lambda seen: ("room.vacated", "doomed") in seen)
        time.sleep(1.5)  # a few more reaps: nothing else
        self.assertEqual(
            sorted(self.receiver.seen()),
            [
                ("room.vacated", "doomed"),
                ("user.offline", "gone"),
                ("user.online", "both"),
                ("user.online", "gone"),
            ],
        )
        self.assertEqual(self.receiver.bad, 0)

    def test_a_message_is_sent_once_by_its_senders_node(self):
        here = self.client(0, "talk")
        there = self.client(1, "talk")
        self.wait_remote(0, 1)
        here.send("said once")
        self.assertRegex(there.recv(timeout=5), r"^id \d+: said once$")
        self.receiver.wait_for(lambda seen: ("message", "talk") in seen)
        time.sleep(0.5)
        messages = [e for e in self.receiver.events if e["type"] == "message"]
        self.assertEqual(len(messages), 1)
        self.assertEqual(messages[0]["data"]["text"], "said once")
        self.assertEqual(messages[0]["data"]["offset"], 1)  # numbered by Redis

    def test_a_clean_stop_leaves_offline_to_the_other_nodes(self):
        self.client(0, "r1")  # r1 is never empty (room.vacated is not debounced)
        rolling = self.signed(1, "rolling", "r1")
        leaving = self.signed(1, "leaving", "r2")
        self.receiver.wait_for(
            lambda seen: (
                {("user.online", "rolling"), ("user.online", "leaving")} <= set(seen)
            )
        )
        node, _ = self.servers[1]
        node.process.send_signal(signal.SIGTERM)
        # The page of one comes back at once through the other node, as
        # pages do in a rolling restart; the other's does not.
        with self.assertRaises(ConnectionClosed):
            rolling.recv(timeout=10)
        self.signed(0, "rolling", "r1")
        self.assertEqual(node.process.wait(15), 0)
        self.receiver.wait_for(lambda seen: ("user.offline", "leaving") in seen)
        time.sleep(1.5)  # a few reaps more: nothing else
        self.assertEqual(
            sorted(self.receiver.seen()),
            [
                ("room.vacated", "r2"),
                ("user.offline", "leaving"),
                ("user.online", "leaving"),
                ("user.online", "rolling"),
            ],
        )
        del leaving
