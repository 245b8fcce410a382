"""The server API of real twistd nodes: options, and with --redis, the cluster.

Two nodes share a real redis-server (tests/test_cluster.py's ``Cluster``):
a message published through one node's API reaches both nodes' members
once, with the same offset, and a disconnect closes the user's connections
on both.  The API key is grepped for in every node's whole log.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import jwt
from twisted.trial.unittest import SynchronousTestCase
from websockets.exceptions import ConnectionClosed

from tests.support import Twistd, free_port, slow, twistd_command
from tests.test_cluster import Cluster

KEY = "cluster-api-key-that-must-never-be-logged"
SECRET = b"jwt-secret-for-the-cluster-tests-32-bytes!"


def call(port: int, method: str, path: str, body: dict | None = None, key=KEY):
    """One API request; (status, JSON answer, headers)."""
    data = json.dumps(body).encode() if body is not None else None
    request = Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read()), reply.headers
    except HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def token(user: str) -> str:
    claims = {"sub": user, "exp": time.time() + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def write(directory: Path, name: str, content: bytes) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(content)
    return str(path)


@slow
class ApiClusterTests(Cluster):
    nodes = 2

    def setUp(self):
        secrets = Path(self.mktemp()).resolve()
        self.node_args = (
            "--api-key-file", write(secrets, "api.key", KEY.encode() + b"\n"),
            "--auth", "optional",
            "--jwt-secret-file", write(secrets, "jwt.key", SECRET),
        )  # fmt: skip
        super().setUp()

    def port(self, node: int) -> int:
        return self.servers[node][1]

    def test_a_message_reaches_every_node_once_with_one_offset(self):
        seed = self.client(1, "news")
        js0, welcome0 = self.json_client(0, "news")
        js1, welcome1 = self.json_client(1, "news")
        self.assertEqual(welcome0["epoch"], welcome1["epoch"])
        self.wait_remote(0, 2)
        js0.recv(timeout=5)  # node 1's JSON member joined
        status, answer, _ = call(
            self.port(0),
            "POST",
            "/api/rooms/news/messages",
            {"text": "deploy at 5", "from": "ops", "idempotency_key": "d-1"},
        )
        self.assertEqual((status, answer), (202, {"room": "news", "offset": 1}))
        self.assertEqual(seed.recv(timeout=5), "server: deploy at 5")
        for client in (js0, js1):
            event = json.loads(client.recv(timeout=5))
            self.assertEqual(
                (event["id"], event["name"], event["server"], event["text"]),
                (0, "ops", True, "deploy at 5"),
            )
            self.assertEqual(event["offset"], 1)
        # The same key through the other node: the first answer, nothing sent.
        again = call(
            self.port(1),
            "POST",
            "/api/rooms/news/messages",
            {"text": "deploy at 5", "idempotency_key": "d-1"},
        )
        self.assertEqual(again[:2], (202, {"room": "news", "offset": 1}))
        for client in (seed, js0, js1):
            self.assert_silent(client)
        # Kept in the room's Stream: node 1 reads it back.
        status, history, _ = call(self.port(1), "GET", "/api/rooms/news/history")
        self.assertEqual(status, 200)
        self.assertEqual(history["epoch"], welcome0["epoch"])
        self.assertEqual(
            [(m["offset"], m["server"], m["text"]) for m in history["messages"]],
            [(1, True, "deploy at 5")],
        )
        # Counts are the cluster's.
        status, rooms, _ = call(self.port(0), "GET", "/api/rooms")
        self.assertEqual(rooms, {"rooms": [{"room": "news", "members": 3}]})
        self.assert_key_never_logged()
        self.logs_are_clean()

    def test_a_disconnect_closes_the_user_on_every_node(self):
        mine0, _ = self.json_client(0, f"a?token={token('u1')}")
        mine1 = self.client(1, f"a?token={token('u1')}")
        other, _ = self.json_client(1, f"a?token={token('u2')}")
        self.wait_remote(0, 2)
        status, answer, _ = call(
            self.port(0), "POST", "/api/users/u1/disconnect", {"reason": "banned"}
        )
        self.assertEqual((status, answer), (200, {"user": "u1", "disconnected": 1}))
        while True:
            event = json.loads(mine0.recv(timeout=5))
            if event["type"] == "error":
                break
        self.assertEqual(
            event, {"type": "error", "code": "disconnected", "reason": "banned"}
        )
        for client in (mine0, mine1):
            with self.assertRaises(ConnectionClosed):
                while True:
                    client.recv(timeout=5)
            self.assertEqual(client.close_code, 4002)
            self.assertEqual(client.close_reason, "disconnected by the app: banned")
        other.ping().wait(5)  # still there
        self.assertIsNone(other.close_code)
        self.assert_key_never_logged()
        self.logs_are_clean()

    def test_a_wrong_key_is_401_and_not_logged_either(self):
        status, answer, _ = call(self.port(1), "GET", "/api/rooms", key="nope")
        self.assertEqual((status, answer["error"]), (401, "unauthorized"))
        self.servers[1][0].wait_for_log("HTTP 401 unauthorized")
        self.assert_key_never_logged()

    def test_while_redis_is_away_nothing_is_half_done(self):
        seed = self.client(0, "news")
        mine = self.client(0, f"a?token={token('u1')}")
        self.redis.stop()
        deadline = time.monotonic() + 10
        while self.health(0).get("redis") == "up":
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        for body in ({"text": "x"}, {"text": "x", "idempotency_key": "k"}):
            status, answer, _ = call(
                self.port(0), "POST", "/api/rooms/news/messages", body
            )
            self.assertEqual((status, answer["error"]), (503, "unavailable"))
        status, answer, _ = call(self.port(0), "POST", "/api/users/u1/disconnect", {})
        self.assertEqual((status, answer["error"]), (503, "unavailable"))
        self.assert_silent(seed)
        mine.ping().wait(5)  # not disconnected
        self.assertIsNone(mine.close_code)
        self.logs_are_clean()

    def assert_key_never_logged(self) -> None:
        for server, _ in self.servers:
            self.assertNotIn(KEY, server.log())


@slow
class ApiOptionsTests(SynchronousTestCase):
    """The options as an operator meets them: a real twistd."""

    def run_twistd(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*twistd_command(), "-n", "--pidfile=", "webchat", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def test_an_empty_key_file_or_api_port_alone_stops_the_server(self):
        empty = write(Path(self.mktemp()).resolve(), "empty.key", b"\n  \n")
        result = self.run_twistd("--api-key-file", empty)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(
            result.stderr, f"webchat: --api-key-file {empty}: the file is empty\n"
        )
        result = self.run_twistd("--api-port", "tcp:0")
        self.assertEqual(
            (result.returncode, result.stderr),
            (2, "webchat: --api-port needs --api-key-file\n"),
        )
        result = self.run_twistd("--api-key-file", "/nonexistent/key")
        self.assertEqual(
            result.stderr,
            "webchat: --api-key-file /nonexistent/key: No such file or directory\n",
        )

    def test_help_lists_the_api_options(self):
        out = self.run_twistd("--help").stdout
        for option in (
            "--api-key-file=FILE",
            "--api-port=ENDPOINT",
            "--api-rate-limit=N",
        ):
            self.assertIn(option, out)
        self.assertIn("[default: 1000]", out)

    def test_the_api_on_its_own_port(self):
        workdir = Path(self.mktemp()).resolve()
        key_file = write(workdir, "api.key", KEY.encode() + b"\n")
        api_port = free_port()
        server = Twistd(
            workdir,
            "--port", "tcp:0:interface=127.0.0.1",
            "--api-key-file", key_file,
            "--api-port", f"tcp:{api_port}:interface=127.0.0.1",
        )  # fmt: skip
        self.addCleanup(server.stop, signal.SIGKILL)
        server.wait_for_log(f"Server API on --api-port tcp:{api_port}")
        deadline = time.monotonic() + 10
        while True:
            try:
                status, answer, _ = call(api_port, "GET", "/api/rooms")
                break
            except OSError:
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.05)
        self.assertEqual((status, answer), (200, {"rooms": []}))
        status, answer, _ = call(
            api_port, "POST", "/api/rooms/lobby/messages", {"text": "hi"}
        )
        self.assertEqual((status, answer), (202, {"room": "lobby", "offset": 1}))
        self.assertNotIn(KEY, server.log())
        self.assertEqual(server.stop(), 0)
