"""
docs/integration.md: its examples are quoted verbatim, and they work — the PHP
ones under a real ``php`` (Debian's php-cli), the Python ones with the venv's
PyJWT, the curl one under bash — against a real ``twistd webchat``.

Parts whose server side lives on a branch not merged yet (h15auth, h15api,
h15hooks) skip, naming the branch, until ``twistd webchat`` has the option
they need; the checks that need no server run today.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support import ROOT, Twistd, free_port, require, slow
from webchat.tap import Options

DOC = ROOT / "docs" / "integration.md"
EXAMPLES = ROOT / "docs" / "examples"
SECRET = "an HS256 secret of 32 characters!"  # what openssl rand -hex 16 would give
JSON = "webchat.v1.json"
#: The doc's quote marker: the fenced block after it is the file, verbatim.
QUOTE = re.compile(r"<!-- quoted from (\S+) -->\n```[a-z]*\n(.*?)```", re.S)


def server_option(option: str, branch: str) -> None:
    """Skip unless ``twistd webchat`` has ``--option`` (its branch is merged)."""
    options = Options()
    if f"{option}=" not in options.longOpt and option not in options.longOpt:
        raise SkipTest(f"needs --{option}, from branch {branch} (not merged yet)")


def php() -> str:
    path = shutil.which("php")
    if path is None:
        raise require("php", "install php-cli (Debian) to run docs/examples/*.php")
    return path


def run(argv: list[str], stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=60,
    )


def example(name: str) -> str:
    return str(EXAMPLES / name)


def listening_port(log: str) -> int:
    (port,) = {int(p) for p in re.findall(r"Site starting on (\d+)", log)}
    return port


class DocQuotesTests(SynchronousTestCase):
    def test_every_quote_is_its_file_verbatim(self):
        doc = DOC.read_text()
        quoted = QUOTE.findall(doc)
        self.assertEqual(doc.count("<!-- quoted from "), len(quoted))
        for path, text in quoted:
            self.assertEqual(text, (ROOT / path).read_text(), f"{path} in {DOC.name}")

    def test_every_example_is_quoted(self):
        quoted = {path for path, _ in QUOTE.findall(DOC.read_text())}
        files = {f"docs/examples/{p.name}" for p in EXAMPLES.iterdir()}
        self.assertEqual(files, quoted)


@slow
class TokenTests(SynchronousTestCase):
    """Tokens minted by the examples, checked by PyJWT with the server's key."""

    def secret_file(self) -> Path:
        path = Path(self.mktemp()).resolve()  # the examples run from the root
        path.write_text(SECRET + "\n")  # with its line end, as openssl writes it
        return path

    def decode(self, token: str) -> dict[str, Any]:
        return jwt.decode(
            token,
            SECRET,
            algorithms=["HS256"],
            options={"require": ["exp", "sub"]},
        )

    def check(self, argv: list[str]) -> None:
        before = int(time.time())
        done = run(argv, WEBCHAT_TOKEN_TTL="600")
        self.assertEqual(done.returncode, 0, done.stderr)
        token = done.stdout.decode().strip()
        self.assertEqual(jwt.get_unverified_header(token)["alg"], "HS256")
        claims = self.decode(token)
        self.assertEqual(claims["sub"], "u42")
        self.assertEqual(claims["name"], "Zoë Ng")
        self.assertEqual(claims["rooms"], ["lobby", "team-*"])
        self.assertTrue(before + 600 <= claims["exp"] <= int(time.time()) + 600)
        # Signed with the server's key, not anything else.
        with self.assertRaises(jwt.InvalidSignatureError):
            jwt.decode(token, SECRET + "x", algorithms=["HS256"])

    def test_php_token_is_accepted_by_pyjwt(self):
        secret = self.secret_file()
        self.check(
            [php(), example("mint_token.php"), str(secret), "u42", "Zoë Ng",
             "lobby,team-*"]
        )  # fmt: skip

    def test_python_token_is_accepted_by_pyjwt(self):
        secret = self.secret_file()
        self.check(
            [sys.executable, example("mint_token.py"), str(secret), "u42", "Zoë Ng",
             "lobby,team-*"]
        )  # fmt: skip

    def test_php_token_without_name_or_rooms(self):
        secret = self.secret_file()
        done = run([php(), example("mint_token.php"), str(secret), "u1"])
        claims = self.decode(done.stdout.decode().strip())
        self.assertEqual(set(claims), {"sub", "iat", "exp"})


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """What webchat puts in Webchat-Signature (the contract, re-derived here)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


@slow
class VerifyWebhookTests(SynchronousTestCase):
    """The verifiers, fed requests signed by the test (no server needed)."""

    def setUp(self) -> None:
        self.secret = Path(self.mktemp()).resolve()
        self.secret.write_text(SECRET + "\n")
        self.body = b'{"id":"e1","type":"room.vacated","ts":1,"data":{"room":"lobby"}}'

    def verifiers(self) -> list[list[str]]:
        return [
            [php(), example("verify_webhook.php")],
            [sys.executable, example("verify_webhook.py")],
        ]

    def verify(self, body: bytes, timestamp: str, signature: str) -> list[int]:
        codes = []
        for argv in self.verifiers():
            done = run(
                [*argv, timestamp, signature],
                body,
                WEBCHAT_WEBHOOK_SECRET_FILE=str(self.secret),
            )
            if done.returncode == 0:
                self.assertEqual(done.stdout, b"room.vacated e1\n", argv)
            codes.append(done.returncode)
        return codes

    def test_fresh_and_signed_is_accepted(self):
        now = str(int(time.time()))
        signature = sign(SECRET, now, self.body)
        self.assertEqual(self.verify(self.body, now, signature), [0, 0])

    def test_a_rotated_secret_list_is_accepted(self):
        now = str(int(time.time()))
        header = f"{sign('old', now, self.body)}, {sign(SECRET, now, self.body)}"
        self.assertEqual(self.verify(self.body, now, header), [0, 0])

    def test_tampered_body_wrong_secret_old_or_future_are_rejected(self):
        now = int(time.time())
        ts = str(now)
        tampered = self.body.replace(b"lobby", b"lobbz")
        for body, timestamp, signature in [
            (tampered, ts, sign(SECRET, ts, self.body)),
            (self.body, ts, sign("another secret", ts, self.body)),
            (self.body, str(now - 301), sign(SECRET, str(now - 301), self.body)),
            # (The verifier runs a moment later: a future one well past the window.)
            (self.body, str(now + 360), sign(SECRET, str(now + 360), self.body)),
            (self.body, ts, ""),
            (self.body, "", sign(SECRET, "", self.body)),
        ]:
            self.assertEqual(self.verify(body, timestamp, signature), [1, 1], timestamp)


@slow
class PhpEndpointTests(SynchronousTestCase):
    """verify_webhook.php as the endpoint itself, under ``php -S``."""

    def setUp(self) -> None:
        secret = Path(self.mktemp()).resolve()
        secret.write_text(SECRET + "\n")
        port = free_port()
        self.php = subprocess.Popen(
            [php(), "-S", f"127.0.0.1:{port}", example("verify_webhook.php")],
            env={**os.environ, "WEBCHAT_WEBHOOK_SECRET_FILE": str(secret)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(self.stop)
        self.url = f"http://127.0.0.1:{port}/events"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("php -S did not listen")

    def stop(self) -> None:
        self.php.terminate()
        self.php.wait(10)
        self.php.stderr.close()

    def post(self, body: bytes, timestamp: str, signature: str) -> int:
        request = urllib.request.Request(
            self.url,
            data=body,
            headers={
                "Content-Type": "application/json",
                "Webchat-Timestamp": timestamp,
                "Webchat-Signature": signature,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    def test_answers_204_to_webchat_and_400_to_a_forgery(self):
        body = b'{"id":"e9","type":"user.online","ts":1,"data":{"user":"u42"}}'
        now = str(int(time.time()))
        self.assertEqual(self.post(body, now, sign(SECRET, now, body)), 204)
        forged = body.replace(b"u42", b"u43")
        self.assertEqual(self.post(forged, now, sign(SECRET, now, body)), 400)
        old = str(int(now) - 600)
        self.assertEqual(self.post(body, old, sign(SECRET, old, body)), 400)


# -- against a live server ------------------------------------------------------------


class Receiver:
    """A webhook endpoint: records each request, answers 204."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                self.send_response(204)
                self.end_headers()
                with receiver.arrived:
                    receiver.requests.append((dict(self.headers.items()), body))
                    receiver.arrived.notify_all()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, event_type: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                for headers, body in self.requests:
                    if json.loads(body).get("type") == event_type:
                        return headers, body
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {event_type} webhook: {self.requests}")
                self.arrived.wait(left)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@slow
class LiveServerTests(SynchronousTestCase):
    """The walk-through of docs/integration.md, against ``twistd webchat``."""

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.secret = self.workdir / "jwt.secret"
        self.secret.write_text(SECRET + "\n")
        self.api_key = self.workdir / "api.key"
        self.api_key.write_text("an API key for the tests\n")
        self.hook_secret = self.workdir / "webhook.secret"
        self.hook_secret.write_text("a webhook secret\n")

    def start(self, *args: str) -> tuple[Twistd, int]:
        server = Twistd(self.workdir, "--port", "tcp:0:interface=127.0.0.1", *args)
        self.addCleanup(server.stop, signal.SIGKILL)
        return server, listening_port(server.wait_for_log("Site starting on"))

    def mint_php(self, user: str, *more: str) -> str:
        done = run([php(), example("mint_token.php"), str(self.secret), user, *more])
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.decode().strip()

    def test_a_php_token_opens_the_chat_as_its_user(self):
        php()
        server_option("auth", "h15auth")
        server, port = self.start(
            "--auth", "required", "--jwt-secret-file", str(self.secret)
        )
        url = f"ws://127.0.0.1:{port}/ws/lobby"
        # The Python example's token too (the PHP one is checked below).
        minted = run(
            [sys.executable, example("mint_token.py"), str(self.secret), "u7", "Bo"]
        )
        python_token = minted.stdout.decode().strip()
        with connect(f"{url}?token={python_token}", subprotocols=[JSON]) as client:
            self.assertEqual(json.loads(client.recv(timeout=5))["name"], "Bo")
        token = self.mint_php("u42", "Ann Lee", "lobby")
        with connect(f"{url}?token={token}", subprotocols=[JSON]) as client:
            welcome = json.loads(client.recv(timeout=5))
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual(welcome["name"], "Ann Lee")
        (me,) = [m for m in welcome["members"] if m["id"] == welcome["id"]]
        # Without a token, or with one for another room: refused before the upgrade.
        with self.assertRaises(InvalidStatus) as caught:
            connect(url, subprotocols=[JSON], open_timeout=5)
        self.assertEqual(caught.exception.response.status_code, 401)
        with self.assertRaises(InvalidStatus) as caught:
            connect(f"{url}x?token={token}", subprotocols=[JSON], open_timeout=5)
        self.assertEqual(caught.exception.response.status_code, 403)
        server.stop(signal.SIGTERM)
        self.assertNotIn(token, server.log())
        for secret in (token, python_token):
            self.assertNotIn(secret.split(".")[2], server.log())
        if "user" not in me:
            raise SkipTest("the welcome names no user yet: h15auth's JSON events")
        self.assertEqual(me, {"id": welcome["id"], "name": "Ann Lee", "user": "u42"})

    def test_a_fresh_php_token_refreshes_the_connection(self):
        php()
        server_option("auth", "h15auth")
        _server, port = self.start(
            "--auth", "required", "--jwt-secret-file", str(self.secret)
        )
        first = self.mint_php("u42", "Ann Lee")
        url = f"ws://127.0.0.1:{port}/ws/lobby?token={first}"
        with connect(url, subprotocols=[JSON]) as client:
            self.assertEqual(json.loads(client.recv(timeout=5))["type"], "welcome")
            done = run(
                [php(), example("mint_token.php"), str(self.secret), "u42", "Ann Lee"],
                WEBCHAT_TOKEN_TTL="7200",
            )
            fresh = done.stdout.decode().strip()
            client.send(json.dumps({"type": "refresh", "token": fresh}))
            answer = json.loads(client.recv(timeout=5))
        exp = jwt.decode(fresh, SECRET, algorithms=["HS256"])["exp"]
        self.assertEqual(answer, {"type": "refreshed", "exp": exp})

    def publishers(self) -> list[tuple[str, list[str]]]:
        return [
            ("php", [php(), example("publish.php")]),
            ("python", [sys.executable, example("publish.py")]),
        ]

    def test_published_messages_reach_json_and_seed_clients(self):
        php()
        server_option("api-key-file", "h15api")
        _server, port = self.start("--api-key-file", str(self.api_key))
        env = {
            "WEBCHAT_URL": f"http://127.0.0.1:{port}",
            "WEBCHAT_API_KEY_FILE": str(self.api_key),
        }
        with (
            connect(f"ws://127.0.0.1:{port}/ws/lobby", subprotocols=[JSON]) as member,
            connect(f"ws://127.0.0.1:{port}/ws/lobby") as seed,
        ):
            self.assertEqual(json.loads(member.recv(timeout=5))["type"], "welcome")
            offsets = []
            for label, argv in self.publishers():
                text = f"hello from {label}, ünïcode"
                done = run([*argv, "lobby", text, f"key-{label}"], **env)
                self.assertEqual(done.returncode, 0, done.stderr)
                answer = json.loads(done.stdout)
                self.assertEqual(answer["room"], "lobby")
                offsets.append(answer["offset"])
                event = self.next_message(member)
                self.assertEqual((event["text"], event["server"]), (text, True))
                self.assertEqual(event["offset"], answer["offset"])
                self.assertEqual(seed.recv(timeout=5), f"server: {text}")
                # The same idempotency key again: the first answer, nothing sent.
                again = run([*argv, "lobby", text, f"key-{label}"], **env)
                self.assertEqual(json.loads(again.stdout), answer)
            done = run(["bash", example("publish.sh")], **env)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(self.next_message(member)["text"], "Deploy finished")
            self.assertEqual(seed.recv(timeout=5), "server: Deploy finished")
            self.assertEqual(offsets, sorted(set(offsets)))
            # A wrong key: refused, with the API's error in the message.
            bad = self.workdir / "wrong.key"
            bad.write_text("not the key\n")
            for label, argv in self.publishers():
                done = run(
                    [*argv, "lobby", "nope"],
                    **{**env, "WEBCHAT_API_KEY_FILE": str(bad)},
                )
                self.assertEqual(done.returncode, 1, label)
                self.assertIn(b"401", done.stderr, label)

    def next_message(self, client: Any) -> dict[str, Any]:
        while True:
            event = json.loads(client.recv(timeout=5))
            if event["type"] == "message":
                return event

    def test_a_real_webhook_verifies_and_a_tampered_one_does_not(self):
        php()
        server_option("webhook-url", "h15hooks")
        receiver = Receiver()
        self.addCleanup(receiver.stop)
        _server, port = self.start(
            "--webhook-url", receiver.url,
            "--webhook-secret-file", str(self.hook_secret),
        )  # fmt: skip
        with connect(f"ws://127.0.0.1:{port}/ws/hooked") as client:
            client.send("hi")
        headers, body = receiver.wait_for("room.vacated")
        event = json.loads(body)
        self.assertEqual(event["data"], {"room": "hooked"})
        self.assertEqual(headers["Webchat-Event-Id"], event["id"])
        timestamp, signature = (
            headers["Webchat-Timestamp"],
            headers["Webchat-Signature"],
        )
        env = {"WEBCHAT_WEBHOOK_SECRET_FILE": str(self.hook_secret)}
        secret = "a webhook secret"
        old = str(int(timestamp) - 301)
        for argv in ([php(), example("verify_webhook.php")],
                     [sys.executable, example("verify_webhook.py")]):  # fmt: skip
            done = run([*argv, timestamp, signature], body, **env)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout.decode(), f"room.vacated {event['id']}\n")
            tampered = body.replace(b"hooked", b"hacked")
            forged = run([*argv, timestamp, signature], tampered, **env)
            self.assertEqual(forged.returncode, 1)
            replayed = run([*argv, old, sign(secret, old, body)], body, **env)
            self.assertEqual(replayed.returncode, 1)

    def test_the_afternoon_walk_through(self):
        """docs/integration.md end to end: token, page, publish, events back."""
        php()
        for option, branch in [("auth", "h15auth"), ("api-key-file", "h15api"),
                               ("webhook-url", "h15hooks")]:  # fmt: skip
            server_option(option, branch)
        receiver = Receiver()
        self.addCleanup(receiver.stop)
        server, port = self.start(
            "--auth", "required", "--jwt-secret-file", str(self.secret),
            "--api-key-file", str(self.api_key),
            "--webhook-url", receiver.url,
            "--webhook-secret-file", str(self.hook_secret),
            "--webhook-offline-delay", "0.5",
        )  # fmt: skip
        token = self.mint_php("u42", "Ann Lee", "lobby,team-*")
        env = {
            "WEBCHAT_URL": f"http://127.0.0.1:{port}",
            "WEBCHAT_API_KEY_FILE": str(self.api_key),
            "WEBCHAT_WEBHOOK_SECRET_FILE": str(self.hook_secret),
        }
        url = f"ws://127.0.0.1:{port}/ws/team-a?token={token}"
        with connect(url, subprotocols=[JSON]) as page:
            self.assertEqual(json.loads(page.recv(timeout=5))["user"], "u42")
            headers, body = receiver.wait_for("user.online")
            verified = run(
                [php(), example("verify_webhook.php"),
                 headers["Webchat-Timestamp"], headers["Webchat-Signature"]],
                body, **env,
            )  # fmt: skip
            self.assertEqual(verified.returncode, 0, verified.stderr)
            self.assertEqual(json.loads(body)["data"], {"user": "u42"})
            done = run(
                [php(), example("publish.php"), "team-a", "Build is green"], **env
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            event = self.next_message(page)
            self.assertEqual(
                (event["name"], event["text"]), ("server", "Build is green")
            )
        headers, body = receiver.wait_for("user.offline")
        verified = run(
            [sys.executable, example("verify_webhook.py"),
             headers["Webchat-Timestamp"], headers["Webchat-Signature"]],
            body, **env,
        )  # fmt: skip
        self.assertEqual(verified.returncode, 0, verified.stderr)
        server.stop(signal.SIGTERM)
        self.assertNotIn(token.split(".")[2], server.log())
