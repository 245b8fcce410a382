"""Signed identities (--auth): the token matrix over a real socket, private rooms,
the token kept out of every log line, and the options on a real twistd."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from websockets.sync.client import connect as ws_connect

from tests.support import (
    ServerMixin,
    Twistd,
    connect_raw,
    deferLater,
    free_port,
    slow,
    twistd_command,
)
from tests.test_cluster import Cluster
from webchat.auth import Identity, TokenVerifier
from webchat.limits import JWT_LEEWAY, JWT_MAX_LENGTH, Limits
from webchat.logtext import redact_query
from webchat.redis import RedisRelay
from webchat.redis.envelope import (
    Envelope,
    MalformedEnvelopeError,
    PresenceEvent,
    decode_envelope,
    encode_presence,
)
from webchat.testing import ChatPump

REFUSED = "Refused connection from 127.0.0.1: "
SECRET = b"a shared secret of at least 32 bytes, for HS256"


@cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**overrides: object) -> dict[str, object]:
    now = time.time()
    base: dict[str, object] = {"sub": "u-42", "name": "Ann", "exp": now + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(key: bytes = SECRET, **overrides: object) -> str:
    return jwt.encode(claims(**overrides), key, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned(**overrides: object) -> str:
    """A token with ``alg: none`` and no signature."""
    head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims(**overrides)).encode())
    return f"{head}.{body}."


def hmac_over_public_key() -> str:
    """HS256 "signed" with the server's RSA public key PEM as the HMAC secret."""
    import hashlib
    import hmac

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    signing_input = f"{head}.{body}".encode()
    mac = hmac.new(public_pem(rsa_key()), signing_input, hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


class AllLogs:
    """Every log event of every namespace (the access log is Twisted's)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict) -> None:
        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        self.lines.append(text)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class TokenMatrixTests(ServerMixin, TestCase):
    """Every kind of token, over a real socket: the status and its reason."""

    auth = "required"

    @inlineCallbacks
    def setUp(self):
        self.all_logs = AllLogs()
        globalLogPublisher.addObserver(self.all_logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.all_logs)
        verifier = TokenVerifier(
            secret=SECRET,
            public_key=public_pem(rsa_key()),
            audience="chat",
            issuer="https://app.example",
            clock=reactor.seconds,
        )
        yield self.start_server(auth=self.auth, verifier=verifier)
        self.tokens: list[str] = []

    def token(self, **overrides: object) -> str:
        overrides.setdefault("aud", "chat")
        overrides.setdefault("iss", "https://app.example")
        token = hs256(**overrides)
        self.tokens.append(token)
        return token

    @inlineCallbacks
    def handshake(self, path: str, headers: str = ""):
        """The status and reason a raw handshake for ``path`` is answered with."""
        peer = yield connect_raw(self.port.getHost().port)
        self.addCleanup(lambda: peer.transport.abortConnection())
        peer.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{headers}\r\n".encode()
        )
        data = yield peer.wait_for(lambda data: b"\r\n\r\n" in data)
        status_line = data.split(b"\r\n", 1)[0].decode()
        if not status_line.startswith("HTTP/1.1 101"):
            yield peer.lost  # a refusal: the body says why, then the server hangs up
        return int(status_line.split()[1]), peer.data.decode("utf-8", "replace")

    @inlineCallbacks
    def expect(self, token: str, status: int, reason: str, room: str = "lobby"):
        self.tokens.append(token)
        got, response = yield self.handshake(f"/ws/{room}?token={token}")
        self.assertEqual(got, status, response)
        if reason:
            self.assertIn(reason, response)
        self.assertNotIn(token, response)
        return response

    def assertTokensNeverLogged(self):
        text = self.all_logs.text
        self.assertTrue(text)
        for token in self.tokens:
            self.assertNotIn(token, text)
            # Nor its signature alone (a line cut at a dot).
            signature = token.rsplit(".", 1)[-1]
            if len(signature) >= 16:
                self.assertNotIn(signature, text)

    @inlineCallbacks
    def test_valid_hs256_and_rs256_tokens_are_admitted(self):
        yield self.expect(self.token(), 101, "")
        rs = jwt.encode(
            claims(aud="chat", iss="https://app.example"), rsa_key(), algorithm="RS256"
        )
        yield self.expect(rs, 101, "")
        self.assertEqual(self.factory.refused.total(), 0)
        self.assertTokensNeverLogged()

    @inlineCallbacks
    def test_each_bad_token_gets_its_status_count_and_one_line(self):
        # Two signed bystanders chat on through the whole matrix.
        alice = yield self.connect(f"/ws/lobby?token={self.token(sub='a')}")
        bob = yield self.connect(f"/ws/lobby?token={self.token(sub='b')}")
        alice.send_text("before")
        self.assertTrue((yield bob.received.get()).endswith(": before"))
        now = time.time()
        cases = [
            (
                self.token(exp=now - JWT_LEEWAY - 5),
                401,
                "token expired",
                "token_expired",
            ),
            (
                self.token(nbf=now + JWT_LEEWAY + 60),
                401,
                "token not yet valid",
                "token_not_yet_valid",
            ),
            (self.token(aud="other"), 401, "invalid token", "invalid_token"),
            (self.token(iss="https://evil.example"), 401, "invalid token", None),
            (
                self.token(key=b"another secret, also 32 bytes long!!"),
                401,
                "invalid token",
                None,
            ),
            (
                unsigned(aud="chat", iss="https://app.example"),
                401,
                "invalid token",
                None,
            ),
            (hmac_over_public_key(), 401, "invalid token", None),
            ("not.a.token", 401, "invalid token", None),
            ("garbage", 401, "invalid token", None),
            (self.token(exp=None), 401, "invalid token", None),
            (self.token(sub=None), 401, "invalid token", None),
            ("x" * (JWT_MAX_LENGTH + 1), 401, "token too long", "token_too_long"),
        ]
        for token, status, reason, _ in cases:
            yield self.expect(token, status, reason)
        alice.send_text("after")
        self.assertTrue((yield bob.received.get()).endswith(": after"))
        self.assertIsNone(alice.closed_code)
        self.assertIsNone(bob.closed_code)
        refused = self.factory.refused
        self.assertEqual(refused["token_expired"], 1)
        self.assertEqual(refused["token_not_yet_valid"], 1)
        self.assertEqual(refused["token_too_long"], 1)
        self.assertEqual(refused["invalid_token"], len(cases) - 3)
        warns = [line for line in self.logs.lines if line.startswith("Refused")]
        self.assertEqual(len(warns), len(cases), warns)
        self.assertIn(
            "Refused connection from 127.0.0.1: token of user u-42 expired (HTTP 401)",
            warns,
        )
        self.assertIn(
            f"{REFUSED}invalid token: wrong audience (HTTP 401)",
            warns,
        )
        self.assertIn(
            "Refused connection from 127.0.0.1: invalid token: wrong issuer (HTTP 401)",
            warns,
        )
        self.assertIn(
            f"{REFUSED}invalid token: algorithm none not accepted (HTTP 401)",
            warns,
        )
        self.assertTokensNeverLogged()

    @inlineCallbacks
    def test_a_huge_exp_or_nbf_is_an_invalid_token(self):
        # Signed, so well past the signature check: 10**400 is no float.
        for claim in ("exp", "nbf"):
            yield self.expect(self.token(**{claim: 10**400}), 401, "invalid token")
        self.assertEqual(self.factory.refused["invalid_token"], 2)
        warns = [line for line in self.logs.lines if line.startswith("Refused")]
        self.assertEqual(
            warns,
            [
                f"{REFUSED}invalid token: exp is not a finite number (HTTP 401)",
                f"{REFUSED}invalid token: nbf is not a finite number (HTTP 401)",
            ],
        )
        self.assertNotIn("Traceback", self.all_logs.text)
        self.assertTokensNeverLogged()

    @inlineCallbacks
    def test_a_token_within_the_leeway_is_still_good(self):
        now = time.time()
        yield self.expect(self.token(exp=now - JWT_LEEWAY + 10), 101, "")
        yield self.expect(self.token(nbf=now + JWT_LEEWAY - 10), 101, "")

    @inlineCallbacks
    def test_no_token_is_401_when_required(self):
        got, response = yield self.handshake("/ws/lobby")
        self.assertEqual(got, 401)
        self.assertIn("missing token", response)
        self.assertEqual(self.factory.refused["missing_token"], 1)

    @inlineCallbacks
    def test_rooms_claim_grants_names_and_patterns_and_private_rooms(self):
        token = self.token(rooms=["lobby", "team-*", "private-u-42"])
        yield self.expect(token, 101, "", room="lobby")
        yield self.expect(token, 101, "", room="team-blue")
        yield self.expect(token, 101, "", room="private-u-42")
        yield self.expect(token, 403, "room not granted", room="other")
        yield self.expect(token, 403, "room not granted", room="private-u-43")
        # No rooms claim: every room but the private ones.
        anywhere = self.token()
        yield self.expect(anywhere, 101, "", room="anything")
        yield self.expect(anywhere, 403, "room not granted", room="private-x")
        # "*" does not open a private room: only a private- pattern does.
        star = self.token(rooms=["*"])
        yield self.expect(star, 403, "room not granted", room="private-x")
        self.assertEqual(self.factory.refused["room_not_granted"], 4)
        self.assertIn(
            f"{REFUSED}room other not granted to user u-42 (HTTP 403)",
            self.logs.lines,
        )
        self.assertTokensNeverLogged()

    @inlineCallbacks
    def test_the_token_is_kept_out_of_the_access_log_and_a_bad_room_line(self):
        token = self.token()
        got, _ = yield self.handshake(f"/ws/bad%20room?token={token}")
        self.assertEqual(got, 400)
        # A page request with the token in its address (and as the Referer).
        peer = yield connect_raw(self.port.getHost().port)
        self.addCleanup(lambda: peer.transport.abortConnection())
        peer.transport.write(
            f"GET /r/lobby?token={token}&x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Referer: http://127.0.0.1/r/lobby?%74oken={token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        yield peer.lost
        self.assertIn(b"200 OK", peer.data)
        access = [line for line in self.all_logs.lines if "/r/lobby?" in line]
        self.assertEqual(len(access), 1, self.all_logs.lines)
        self.assertIn("/r/lobby?token=[redacted]&x=1", access[0])
        self.assertIn("?%74oken=[redacted]", access[0])
        self.assertTokensNeverLogged()

    @inlineCallbacks
    def test_a_token_in_a_refused_origin_is_redacted_in_the_log(self):
        token = self.token()
        got, _ = yield self.handshake(
            f"/ws/lobby?token={token}",
            f"Origin: http://evil.example/?x=1&token={token}\r\n",
        )
        self.assertEqual(got, 403)
        warns = [line for line in self.logs.lines if line.startswith("Refused")]
        self.assertEqual(len(warns), 1, warns)
        self.assertIn(
            "origin http://evil.example/?x=1&token=[redacted] not allowed", warns[0]
        )
        self.assertEqual(self.factory.refused["origin"], 1)
        self.assertTokensNeverLogged()

    @inlineCallbacks
    def test_an_admitted_connection_knows_who_it_is(self):
        yield self.expect(self.token(sub="u-7", name="Bea"), 101, "")
        yield self.expect(self.token(sub="u-7", name="Bea"), 101, "")
        # Let both open (the server's onOpen runs after the 101 is sent).
        for _ in range(50):
            if len(self.factory.connections_of("u-7")) == 2:
                break
            yield deferLater(0.01)
        mine = self.factory.connections_of("u-7")
        self.assertEqual(len(mine), 2)
        self.assertEqual(mine[0].identity.user, "u-7")
        self.assertEqual(mine[0].identity.name, "Bea")
        self.assertEqual(self.factory.connections_of("nobody"), [])


class OptionalAuthTests(TokenMatrixTests):
    """--auth optional: no token is anonymous, a bad one is still refused."""

    auth = "optional"

    @inlineCallbacks
    def test_no_token_is_401_when_required(self):
        got, _ = yield self.handshake("/ws/lobby")
        self.assertEqual(got, 101)
        got, response = yield self.handshake("/ws/private-x")
        self.assertEqual(got, 403)
        self.assertIn("room not granted", response)


class AuthOffTests(ServerMixin, TestCase):
    """--auth off: no token is read, and private rooms are closed to all."""

    @inlineCallbacks
    def test_private_rooms_need_a_token(self):
        yield self.start_server()
        peer = yield connect_raw(self.port.getHost().port)
        self.addCleanup(lambda: peer.transport.abortConnection())
        peer.transport.write(
            b"GET /ws/private-x?token=whatever HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        yield peer.lost
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 403"), peer.data)
        self.assertIn(b"private room needs a token", peer.data)
        self.assertEqual(self.factory.refused["private_room"], 1)


class IdentityTests(SynchronousTestCase):
    def test_es256_tokens_verify_with_an_ec_public_key(self):
        verifier = TokenVerifier(public_key=public_pem(ec_key()), clock=time.time)
        self.assertEqual(verifier.algorithms, ("ES256",))
        token = jwt.encode(claims(rooms=["a"]), ec_key(), algorithm="ES256")
        identity = verifier.verify(token)
        self.assertEqual(
            (identity.user, identity.name, identity.rooms), ("u-42", "Ann", ("a",))
        )
        # An RS256 token means nothing to a server with only an EC key.
        rs = jwt.encode(claims(), rsa_key(), algorithm="RS256")
        from webchat.auth import TokenError

        with self.assertRaises(TokenError) as caught:
            verifier.verify(rs)
        self.assertEqual(caught.exception.kind, "invalid_token")

    def test_each_claim_and_header_is_judged_as_jwt_decode_judges_it(self):
        """
        The verifier checks the registered claims itself (PyJWT parses and
        verifies the signature): the same verdicts, and log details, as
        ``jwt.decode`` with our options gave.
        """
        from webchat.auth import TokenError

        verifier = TokenVerifier(
            secret=SECRET,
            audience="chat",
            issuer="https://app.example",
            clock=time.time,
        )
        good = {"aud": "chat", "iss": "https://app.example"}
        for aud in ("chat", ["other", "chat"]):
            token = hs256(**{**good, "aud": aud})
            self.assertEqual(verifier.verify(token).user, "u-42")

        def signed(payload: bytes, **header: object) -> str:
            return jwt.PyJWS().encode(payload, SECRET, "HS256", headers=header)

        head = b64(json.dumps({"alg": "HS256"}).encode())
        refused = [
            (hs256(**{**good, "aud": None}), "no aud claim"),
            (hs256(**{**good, "aud": []}), "no aud claim"),
            (hs256(**{**good, "aud": ["other"]}), "wrong audience"),
            (hs256(**{**good, "aud": [1, "chat"]}), "wrong audience"),
            (hs256(**{**good, "aud": {"chat": 1}}), "wrong audience"),
            (hs256(**{**good, "iss": None}), "no iss claim"),
            (signed(json.dumps(claims(**{**good, "iss": 5})).encode()), "wrong issuer"),
            (hs256(**{**good, "exp": None}), "no exp claim"),
            (hs256(**{**good, "sub": None}), "no sub claim"),
            (hs256(**{**good, "jti": 5}), "malformed"),
            (signed(b"[1]"), "malformed"),
            (signed(b"{not json"), "malformed"),
            (jwt.encode(claims(**good), SECRET * 2, "HS512"), "algorithm another"),
            (
                signed(json.dumps(claims(**good)).encode(), alg=None),
                "algorithm another",
            ),
            (f"{head}.{b64(json.dumps(claims(**good)).encode())}.", "bad signature"),
            ("a.b.c.d", "malformed"),
        ]
        for token, detail in refused:
            with self.assertRaises(TokenError, msg=detail) as caught:
                verifier.verify(token)
            self.assertEqual(caught.exception.kind, "invalid_token")
            self.assertIn(f"invalid token: {detail}", caught.exception.detail)

    def test_the_name_defaults_to_the_sub(self):
        identity = Identity("u-1", None, ("*",), 0.0)
        self.assertEqual(identity.display_name, "u-1")

    def test_redact_query(self):
        self.assertEqual(redact_query("/ws/x"), "/ws/x")
        self.assertEqual(
            redact_query("/ws/x?name=a&token=abc.def.ghi&since=1"),
            "/ws/x?name=a&token=[redacted]&since=1",
        )
        self.assertEqual(
            redact_query("?TOKEN=a;token=b"), "?TOKEN=[redacted];token=[redacted]"
        )
        self.assertEqual(redact_query("?tokens=a"), "?tokens=a")


class CommandLineTests(SynchronousTestCase):
    """--auth and the key files are checked before the server starts."""

    def options(self, *args: str):
        from webchat.tap import Options

        options = Options(environ={})
        options.parseOptions(list(args))
        return options

    def key_file(self, data: bytes) -> str:
        fd, path = tempfile.mkstemp()
        os.write(fd, data)
        os.close(fd)
        self.addCleanup(os.unlink, path)
        return path

    def test_defaults_and_errors(self):
        from twisted.python.usage import UsageError

        self.assertEqual(self.options()["auth"], "off")
        self.assertIsNone(self.options().verifier(time.time))
        secret = self.key_file(SECRET + b"\n")
        options = self.options("--auth", "required", "--jwt-secret-file", secret)
        self.assertEqual(options["jwt-secret"], SECRET)
        self.assertEqual(options.verifier(time.time).algorithms, ("HS256",))
        public_key = self.key_file(public_pem(rsa_key()))
        cases = [
            (("--auth", "maybe"), "--auth: expected one of off, optional, required"),
            (("--auth", "required"), "--auth required needs --jwt-secret-file or"),
            (("--jwt-secret-file", secret), "need --auth optional or --auth required"),
            (
                ("--auth", "optional", "--jwt-secret-file", self.key_file(b" \n")),
                "the file is empty",
            ),
            (
                ("--auth", "optional", "--jwt-secret-file", "/nonexistent/secret"),
                "/nonexistent/secret: No such file or directory",
            ),
            (
                ("--auth", "optional", "--jwt-public-key-file", secret),
                "not a PEM public key",
            ),
            # The HS/RS confusion set up by the operator: every token would
            # be refused, so the server must not start.
            (
                ("--auth", "optional", "--jwt-secret-file", public_key),
                f"{public_key}: a public key or certificate, not an HMAC secret",
            ),
        ]
        for args, message in cases:
            with self.assertRaises(UsageError) as caught:
                self.options(*args)
            self.assertIn(message, str(caught.exception))
            self.assertNotIn(SECRET.decode(), str(caught.exception))


class TwistdAuthTests(SynchronousTestCase):
    """A real twistd with --auth required and an RS256 key file."""

    @slow
    def test_tokens_on_a_real_server_and_a_bad_key_file_stops_it(self):
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir(parents=True)
        (tmp / "key.pem").write_bytes(public_pem(rsa_key()))
        (tmp / "empty").write_bytes(b"")
        result = subprocess.run(
            [*twistd_command(), "-n", "--pidfile=", "webchat", "--auth", "required",
             "--jwt-secret-file", str(tmp / "empty")],
            capture_output=True, text=True, timeout=60, cwd=tmp,
        )  # fmt: skip
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn(
            f"webchat: --jwt-secret-file {tmp / 'empty'}: the file is empty",
            result.stderr,
        )
        port = free_port()
        server = Twistd(
            tmp, *["--port", f"tcp:{port}:interface=127.0.0.1", "--auth", "required",
             "--jwt-public-key-file", str(tmp / "key.pem"), "--jwt-audience", "chat"],
        )  # fmt: skip
        self.addCleanup(server.stop)
        server.wait_for_log("Site starting")
        good = jwt.encode(claims(aud="chat"), rsa_key(), algorithm="RS256")
        bad = jwt.encode(claims(aud="other"), rsa_key(), algorithm="RS256")
        self.assertEqual(_status(port, f"/ws/lobby?token={good}"), 101)
        self.assertEqual(_status(port, f"/ws/lobby?token={bad}"), 401)
        self.assertEqual(_status(port, "/ws/lobby"), 401)
        log = server.wait_for_log("missing token")
        self.assertIn("invalid token: wrong audience (HTTP 401)", log)
        self.assertNotIn(good, log)
        self.assertNotIn(bad, log)


def _status(port: int, path: str) -> int:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split()[1])


#: 2025-12-02 00:00:00 UTC, in seconds: the pump's clock starts here.
T0 = 1764633600.0
JSON_PROTOCOL = {"Sec_WebSocket_Protocol": "webchat.v1.json"}


def events(client) -> list[dict]:
    return [json.loads(text) for text in client.texts]


class MemoryAuthCase(SynchronousTestCase):
    """A server in memory (webchat.testing) on a Clock, with --auth ``auth``."""

    auth = "optional"

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.all_logs = AllLogs()
        globalLogPublisher.addObserver(self.all_logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.all_logs)
        verifier = TokenVerifier(secret=SECRET, clock=self.clock.seconds)
        self.pump = ChatPump(
            clock=self.clock,
            limits=Limits(rate_limit=0, ping_interval=0),
            auth=self.auth,
            verifier=verifier,
        )
        self.factory = self.pump.factory

    def token(self, sub: str = "u-1", ttl: float = 600, **more: object) -> str:
        body = {"sub": sub, "exp": self.clock.seconds() + ttl, **more}
        return jwt.encode(body, SECRET, algorithm="HS256")

    def json_client(self, path: str = "/ws/lobby", token: str | None = None):
        if token is not None:
            path += ("&" if "?" in path else "?") + f"token={token}"
        client = self.pump.connect(path, **JSON_PROTOCOL)
        self.assertEqual(client.status, 101, client.response)
        return client

    def send(self, client, **event: object) -> None:
        client.send_text(json.dumps(event))
        self.pump.pump()


class IdentityEventsTests(MemoryAuthCase):
    def test_signed_members_carry_their_user_everywhere_a_member_appears(self):
        ann = self.json_client("/ws/lobby?name=Mallory", self.token(name="Ann"))
        guest = self.json_client("/ws/lobby?name=bob")
        seed = self.pump.connect("/ws/lobby")
        tab2 = self.json_client(token=self.token(name="Ann"))
        noname = self.json_client(token=self.token(sub="u-2"))
        welcome = events(tab2)[0]
        self.assertEqual(
            (welcome["id"], welcome["name"], welcome["user"]), (4, "Ann", "u-1")
        )
        self.assertEqual(
            welcome["members"],
            [
                {"id": 1, "name": "Ann", "user": "u-1"},  # ?name= not read
                {"id": 2, "name": "bob"},
                {"id": 3, "name": "guest-3"},
                {"id": 4, "name": "Ann", "user": "u-1"},  # one name, two tabs
            ],
        )
        self.assertEqual(
            welcome["users"], [{"user": "u-1", "name": "Ann", "connections": 2}]
        )
        self.assertEqual(events(noname)[0]["name"], "u-2")  # no name claim: the sub
        joins = [e["member"] for e in events(guest) if e["type"] == "join"]
        self.assertEqual(joins[1], {"id": 4, "name": "Ann", "user": "u-1"})
        # An anonymous member cannot take a signed user's name.
        self.send(guest, type="name", name="ann")
        self.assertEqual(events(guest)[-1]["code"], "name_taken")

        del guest.frames[:]
        self.send(ann, type="message", text="hi", ref=1)
        self.send(ann, type="typing")
        self.assertEqual(seed.texts, ["id 1: hi"])  # the seed's bytes, unchanged
        message, typing = events(guest)
        self.assertEqual(
            list(message)[:6], ["type", "room", "id", "name", "user", "text"]
        )
        self.assertEqual((message["user"], message["text"]), ("u-1", "hi"))
        self.assertEqual(
            typing,
            {"type": "typing", "room": "lobby", "id": 1, "name": "Ann", "user": "u-1"},
        )
        # The name is the app's: a rename is refused, and nobody else hears of it.
        del guest.frames[:]
        self.send(ann, type="name", name="Eve")
        self.assertEqual(events(ann)[-1]["code"], "name_locked")
        self.assertEqual(events(guest), [])
        # A leave names the user; the other tab keeps the name.
        ann.transport.loseConnection()
        self.pump.pump()
        self.assertEqual(
            events(guest)[-1]["member"], {"id": 1, "name": "Ann", "user": "u-1"}
        )
        self.send(guest, type="name", name="Ann")
        self.assertEqual(events(guest)[-1]["code"], "name_taken")
        self.assertEqual(len(self.factory.connections_of("u-1")), 1)
        later = self.json_client()
        self.assertEqual(
            events(later)[0]["users"],
            [
                {"user": "u-1", "name": "Ann", "connections": 1},
                {"user": "u-2", "name": "u-2", "connections": 1},
            ],
        )

    def test_a_signed_member_takes_its_name_from_an_anonymous_holder(self):
        anon = self.json_client("/ws/lobby?name=Alice")
        taken = self.json_client("/ws/lobby?name=alice-2")
        seed = self.pump.connect("/ws/lobby")
        signed = self.json_client(token=self.token(sub="alice"))
        renamed = {
            "type": "name",
            "room": "lobby",
            "id": 1,
            "old": "Alice",
            "name": "Alice-3",
        }
        joined = {
            "type": "join",
            "room": "lobby",
            "member": {"id": 4, "name": "alice", "user": "alice"},
        }
        # The holder and everyone hear of the rename, then of the join.
        self.assertEqual(events(anon)[-2:], [renamed, joined])
        self.assertEqual(events(taken)[-2:], [renamed, joined])
        self.assertEqual(
            events(signed)[0]["members"],
            [
                {"id": 1, "name": "Alice-3"},
                {"id": 2, "name": "alice-2"},
                {"id": 3, "name": "guest-3"},
                {"id": 4, "name": "alice", "user": "alice"},
            ],
        )
        self.assertEqual(seed.texts, [])  # the seed format has no name events
        # It answers to its new name; the old one is the signed user's.
        self.send(anon, type="name", name="alice")
        self.assertEqual(events(anon)[-1]["code"], "name_taken")
        self.send(anon, type="message", text="hi")
        self.assertEqual(events(taken)[-1]["name"], "Alice-3")
        # A second tab of the user, and a signed user whose name claim is
        # the same, share it: nobody else is renamed.
        self.json_client(token=self.token(sub="alice"))
        self.json_client(token=self.token(sub="u-9", name="ALICE"))
        self.assertEqual(events(taken)[-1]["type"], "join")
        lines = [line for line in self.all_logs.lines if "is now called" in line]
        self.assertEqual(
            lines,
            [
                "Connection 1 is now called Alice-3 in room lobby: "
                "signed user alice has the name Alice"
            ],
        )

    def test_with_auth_off_nothing_changes(self):
        pump = ChatPump(clock=self.clock, limits=Limits(rate_limit=0))
        client = pump.connect("/ws/lobby?token=abc", **JSON_PROTOCOL)
        welcome = json.loads(client.texts[0])
        self.assertNotIn("users", welcome)
        self.assertNotIn("user", welcome)
        self.assertEqual(welcome["members"], [{"id": 1, "name": "guest-1"}])


class ExpiryTests(MemoryAuthCase):
    """A token's end, on the factory's clock: error, close 4001; refresh moves it."""

    def test_at_expiry_json_gets_an_error_then_4001_and_seed_just_4001(self):
        ann = self.json_client(token=self.token(ttl=100))
        seed = self.pump.connect(f"/ws/lobby?token={self.token(sub='u-2', ttl=100)}")
        self.assertEqual(seed.status, 101)
        bystander = self.json_client()
        self.clock.advance(100 + JWT_LEEWAY - 1)
        self.pump.pump()
        self.assertIsNone(ann.close_code)
        self.clock.advance(1)
        self.pump.pump()
        self.assertEqual(
            events(ann)[-1],
            {"type": "error", "code": "token_expired", "reason": "token expired"},
        )
        self.assertEqual(ann.close_code, 4001)
        self.assertEqual(seed.close_code, 4001)
        self.assertEqual(seed.texts, [])
        self.assertIsNone(bystander.close_code)
        self.assertEqual(self.factory.stats.closed[4001], 2)
        expired = [line for line in self.all_logs.lines if "expired" in line]
        self.assertEqual(
            expired,
            [
                "Connection 1 from 127.0.0.1: token of user u-1 expired",
                "Connection 2 from 127.0.0.1: token of user u-2 expired",
            ],
        )
        self.assertEqual(self.factory.connections_of("u-1"), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_refresh_moves_the_expiry_on(self):
        ann = self.json_client(token=self.token(ttl=100))
        self.clock.advance(90)
        fresh = self.token(ttl=600, name="Someone else")
        self.send(ann, type="refresh", token=fresh)
        self.assertEqual(
            events(ann)[-1], {"type": "refreshed", "exp": int(T0 + 90 + 600)}
        )
        self.clock.advance(100)
        self.pump.pump()
        self.assertIsNone(ann.close_code)
        self.assertEqual(self.factory.connections_of("u-1")[0].chat_name, "u-1")
        self.clock.advance(600 - 100 + JWT_LEEWAY)
        self.pump.pump()
        self.assertEqual(ann.close_code, 4001)
        self.assertNotIn(fresh, "\n".join(self.all_logs.lines))

    def test_each_token_ends_its_connection_on_time_with_one_timer_for_all(self):
        """
        Tokens ending at different times, given out of order, one connection
        gone early and one refreshed: each connection is closed at its own
        token's end, not before; the server holds one timer for them all.
        """
        ttls = {"u-1": 300, "u-2": 100, "u-3": 200, "u-4": 100, "u-5": 150}
        clients = {
            sub: self.json_client(token=self.token(sub=sub, ttl=ttl))
            for sub, ttl in ttls.items()
        }
        # Anonymous connections hold the same timers but for the token's.
        anonymous = [self.json_client() for _ in ttls]
        self.assertEqual(
            len(self.clock.getDelayedCalls()), 1, self.clock.getDelayedCalls()
        )
        clients["u-4"].transport.loseConnection()
        self.pump.pump()
        self.clock.advance(50)
        self.send(clients["u-5"], type="refresh", token=self.token(sub="u-5", ttl=400))
        ends = {sub: T0 + ttl + JWT_LEEWAY for sub, ttl in ttls.items()}
        ends["u-5"] = T0 + 50 + 400 + JWT_LEEWAY
        for sub in sorted(ends, key=ends.get):
            client = clients[sub]
            if sub == "u-4":
                continue
            self.clock.advance(ends[sub] - 1 - self.clock.seconds())
            self.pump.pump()
            self.assertIsNone(client.close_code, sub)
            self.clock.advance(1)
            self.pump.pump()
            self.assertEqual(client.close_code, 4001, sub)
        self.assertEqual(self.factory.stats.closed[4001], 4)
        self.assertEqual([c.close_code for c in anonymous], [None] * len(ttls))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_bad_refresh_is_refused_and_the_old_expiry_stands(self):
        ann = self.json_client(token=self.token(ttl=100, rooms=["lobby"]))
        anonymous = self.json_client()
        bad = [
            (self.token(sub="u-2"), "the token is for another user"),
            (self.token(rooms=["other"]), "the token does not grant this room"),
            (self.token(ttl=-600), "token expired"),
            ("not-a-token", "invalid token"),
            (jwt.encode({"sub": "u-1", "exp": T0 + 900}, b"x" * 32), "invalid token"),
        ]
        for token, reason in bad:
            self.send(ann, type="refresh", token=token)
            self.assertEqual(
                events(ann)[-1],
                {"type": "error", "code": "bad_token", "reason": reason},
            )
        self.send(anonymous, type="refresh", token=self.token())
        self.assertEqual(events(anonymous)[-1]["code"], "bad_token")
        self.send(ann, type="refresh", token="")
        self.assertEqual(events(ann)[-1]["code"], "bad_event")
        self.clock.advance(100 + JWT_LEEWAY)
        self.pump.pump()
        self.assertEqual(ann.close_code, 4001)
        self.assertIsNone(anonymous.close_code)
        text = "\n".join(self.all_logs.lines)
        for token, _ in bad:
            self.assertNotIn(token, text)

    def test_a_huge_or_deeply_nested_refresh_is_a_bad_token_not_a_1011(self):
        ann = self.json_client(token=self.token(ttl=100))
        bad = [
            (self.token(exp=10**400), "invalid token"),
            (self.token(nbf=10**400), "invalid token"),
            # A header or signed claims nested deeper than json.loads recurses.
            (b64(b"[" * 2900) + ".e30.c2ln", "invalid token"),
            (
                jwt.PyJWS().encode(
                    b'{"sub":"u-1","exp":1e10,"x":' + b"[" * 2900 + b"}",
                    SECRET,
                    "HS256",
                ),
                "invalid token",
            ),
        ]
        for token, reason in bad:
            self.send(ann, type="refresh", token=token)
            self.assertEqual(
                events(ann)[-1],
                {"type": "error", "code": "bad_token", "reason": reason},
            )
        self.assertIsNone(ann.close_code)
        self.assertNotIn("error has occurred", self.all_logs.text)
        self.clock.advance(100 + JWT_LEEWAY)
        self.pump.pump()
        self.assertEqual(ann.close_code, 4001)


class ClusterIdentityTests(MemoryAuthCase):
    """--redis: a signed member's user travels in presence, compatibly."""

    def setUp(self):
        super().setUp()
        self.relay = RedisRelay(
            self.clock, "redis://127.0.0.1", node_id="me", on_envelope=lambda e: None
        )
        self.factory.attach_link(self.relay)
        self.presence = self.relay.presence
        self.presence.ask("a")
        # Node "a": Ann signed as u-1 (LF user after the name), Bob anonymous
        # (as every node wrote it before, byte for byte).
        self.presence.snapshot(
            "a", [b"_v", b"3", b"500", b"lobby Ann\nu-1", b"501", b"lobby Bob"], 30000
        )

    def test_presence_envelopes_carry_the_user_and_old_ones_still_read(self):
        join = PresenceEvent("a", "join", 4, "lobby", 502, "Cy Dee", "u 3")
        payload = encode_presence(join)
        self.assertEqual(payload, b"wc2 a j 4 lobby 502 Cy Dee\nu 3")
        self.assertEqual(decode_envelope(payload), join)
        typing = PresenceEvent("a", "typing", 0, "lobby", 502, "Cy", "u-3")
        self.assertEqual(decode_envelope(encode_presence(typing)), typing)
        old = decode_envelope(b"wc2 a j 4 lobby 502 Cy Dee")
        self.assertEqual((old.name, old.user), ("Cy Dee", ""))
        for bad in (b"wc2 a j 4 lobby 502 Cy\n", b"wc2 a j 4 lobby 502 Cy\nu\x1b"):
            with self.assertRaises(MalformedEnvelopeError):
                decode_envelope(bad)

    def test_welcome_users_and_events_span_the_nodes(self):
        tab = self.json_client(token=self.token(name="Ann"))
        welcome = events(tab)[0]
        self.assertEqual(
            welcome["members"],
            [
                {"id": welcome["id"], "name": "Ann", "user": "u-1"},
                {"id": 500, "name": "Ann", "user": "u-1"},
                {"id": 501, "name": "Bob"},
            ],
        )
        self.assertEqual(
            welcome["users"], [{"user": "u-1", "name": "Ann", "connections": 2}]
        )
        self.assertEqual(self.presence.user_of(500), "u-1")
        self.assertEqual(self.presence.user_of(501), "")
        # What this node publishes about its signed member carries the user.
        self.assertEqual(self.relay._mine[welcome["id"]], ("lobby", "Ann", "u-1"))
        self.presence.event(PresenceEvent("a", "join", 4, "lobby", 502, "Cy", "u-3"))
        self.presence.event(PresenceEvent("a", "typing", 0, "lobby", 502, "Cy", "u-3"))
        self.factory.deliver_remote(Envelope("a", 500, b"hi", "lobby", "Ann", 1))
        self.presence.event(PresenceEvent("a", "leave", 5, "lobby", 502))
        self.pump.pump()
        join, typing, message, leave = events(tab)[1:]
        self.assertEqual(join["member"], {"id": 502, "name": "Cy", "user": "u-3"})
        self.assertEqual(typing["user"], "u-3")
        self.assertEqual((message["id"], message["user"]), (500, "u-1"))
        self.assertEqual(leave["member"], {"id": 502, "name": "Cy", "user": "u-3"})

    def test_a_signed_member_of_another_node_takes_its_name_here_too(self):
        anon = self.json_client("/ws/lobby?name=cy")
        self.presence.event(PresenceEvent("a", "join", 4, "lobby", 502, "Cy", "u-3"))
        self.pump.pump()
        me = events(anon)[0]["id"]
        renamed, join = events(anon)[-2:]
        self.assertEqual(
            renamed,
            {"type": "name", "room": "lobby", "id": me, "old": "cy", "name": "cy-2"},
        )
        self.assertEqual(join["member"], {"id": 502, "name": "Cy", "user": "u-3"})
        # The other nodes hear of it too.
        self.assertEqual(self.relay._mine[me], ("lobby", "cy-2", ""))
        self.assertEqual(
            [line for line in self.all_logs.lines if "is now called" in line],
            [
                f"Connection {me} is now called cy-2 in room lobby: "
                "signed user u-3 has the name cy"
            ],
        )
        # An anonymous member of another node takes nothing from anyone.
        self.presence.event(PresenceEvent("a", "join", 5, "lobby", 503, "cy-2", ""))
        self.pump.pump()
        self.assertEqual(events(anon)[-1]["type"], "join")

    def test_a_sub_or_name_that_cannot_travel_is_an_invalid_token(self):
        for claims in (
            {"sub": "a\nb"},
            {"sub": "x" * 257},
            {"sub": "\u202e"},
            {"sub": "   "},
            {"name": "x" * 33},
            {"name": "a\u202eb"},
            {"name": 7},
        ):
            client = self.pump.connect(f"/ws/lobby?token={self.token(**claims)}")
            self.assertEqual(client.status, 401)
        # A long sub is a name of 32 characters, as everywhere.
        long = self.json_client(token=self.token(sub="u" * 40))
        self.assertEqual(events(long)[0]["name"], "u" * 32)
        self.assertEqual(events(long)[0]["user"], "u" * 40)
        self.assertEqual(self.relay._mine[events(long)[0]["id"]][1], "u" * 32)


class ClusterAuthTests(Cluster):
    """Two real twistd nodes, --auth required, one real redis-server."""

    nodes = 2

    def setUp(self):
        secret = Path(self.mktemp()).resolve()
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_bytes(SECRET + b"\n")
        self.node_args = ("--auth", "required", "--jwt-secret-file", str(secret))
        super().setUp()

    def signed(self, node: int, sub: str, name: str):
        token = hs256(sub=sub, name=name)
        url = f"ws://127.0.0.1:{self.servers[node][1]}/ws/team?token={token}"
        client = self.stack.enter_context(
            ws_connect(url, open_timeout=5, subprotocols=["webchat.v1.json"])
        )
        welcome = json.loads(client.recv(timeout=5))
        self.assertEqual(welcome["type"], "welcome")
        return client, welcome, token

    def next_event(self, client, kind: str, **fields: object) -> dict:
        """The next event of ``kind`` (with ``fields`` in it) ``client`` gets."""
        for _ in range(20):
            event = json.loads(client.recv(timeout=5))
            if event["type"] == kind and fields.items() <= event.items():
                return event
        self.fail(f"no {kind} event")

    def test_a_user_s_tabs_on_two_nodes_are_one_user(self):
        tab1, first, token1 = self.signed(0, "u-1", "Ann")
        self.wait_remote(1, 1)
        _tab2, welcome, token2 = self.signed(1, "u-1", "Ann")
        self.assertEqual(
            welcome["users"], [{"user": "u-1", "name": "Ann", "connections": 2}]
        )
        self.assertIn(
            {"id": first["id"], "name": "Ann", "user": "u-1"}, welcome["members"]
        )
        bob, _, token3 = self.signed(1, "u-2", "Bob")
        # Heard from the other node: first Ann's second tab, then Bob.
        joins = [self.next_event(tab1, "join")["member"] for _ in range(2)]
        self.assertEqual([m["user"] for m in joins], ["u-1", "u-2"])
        tab1.send(json.dumps({"type": "message", "text": "hi from node 0"}))
        message = self.next_event(bob, "message")
        self.assertEqual(
            (message["name"], message["user"], message["text"]),
            ("Ann", "u-1", "hi from node 0"),
        )
        for server, _ in self.servers:
            for token in (token1, token2, token3):
                self.assertNotIn(token, server.log())
        self.logs_are_clean()

    def test_a_message_replayed_from_redis_keeps_its_user(self):
        """
        The history in Redis keeps a signed sender's user: a joiner of
        another node, after the sender has gone, sees the same ``user`` the
        live message had.
        """
        ann, _, _ = self.signed(0, "u-1", "Ann")
        ann.send(json.dumps({"type": "message", "text": "kept", "ref": 1}))
        self.next_event(ann, "ack", ref=1)
        ann.close()
        bob, welcome, _ = self.signed(1, "u-2", "Bob")
        self.assertEqual(welcome["offset"], 1)
        replayed = self.next_event(bob, "message")
        self.assertEqual(
            (replayed["text"], replayed["name"], replayed.get("user")),
            ("kept", "Ann", "u-1"),
        )
        self.assertIs(replayed["history"], True)
        self.logs_are_clean()
