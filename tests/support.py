"""Real servers and real clients for the tests, on 127.0.0.1 and ephemeral ports."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest

# One copy of these for the tests and the benchmarks (re-exported: tests
# import free_port from here).
from benchmarks.helpers import free_port as free_port
from benchmarks.helpers import twistd_path
from webchat.chat import WebChatFactory
from webchat.web import make_site

ROOT = Path(__file__).resolve().parents[1]

#: Marks a test that starts a real part besides an in-process server (a
#: twistd or other subprocess, Redis, nginx, Chromium, a compiler, a wheel
#: build) or that runs for seconds (the fuzz run).  ``make test-fast``
#: (pytest -m "not slow") leaves these out; trial ignores the mark.
slow = pytest.mark.slow


def require(what: str, reason: str) -> SkipTest:
    """
    A skip for a missing real part — or a failure under WEBCHAT_REQUIRE_ALL=1,
    where CI has installed every part and a skip would hide a broken install.
    """
    message = f"{what} is not available: {reason}"
    if os.environ.get("WEBCHAT_REQUIRE_ALL") == "1":
        raise AssertionError(f"WEBCHAT_REQUIRE_ALL=1 but {message}")
    return SkipTest(message)


# -- in-process server -----------------------------------------------------------


class LogCapture:
    """Collects the events of the `webchat` namespace: our own log lines."""

    def __init__(self) -> None:
        from twisted.logger import formatEvent

        self._format = formatEvent
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "webchat":
            self.events.append(event)

    @property
    def lines(self) -> list[str]:
        return [self._format(e) for e in self.events]


class ServerMixin:
    """
    Start a webchat server in this process for each test, and tear it down
    with every connection closed, so trial's dirty-reactor check stays quiet.

    With ``tls = True`` the server listens on an ``ssl:`` endpoint (a test
    CA's certificate, made per test), as ``--port ssl:...`` does, and the
    test's clients speak TLS to it (``client_tls``).
    """

    quiet = False
    tls = False
    #: The clients' TLS options (trusting the test CA), or None: plain TCP.
    client_tls: Any = None

    @inlineCallbacks
    def start_server(self, **factory_kwargs: Any):
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)
        self.factory = WebChatFactory(reactor, quiet=self.quiet, **factory_kwargs)
        site = make_site(self.factory)
        if self.tls:
            endpoint = self._tls_endpoint()
        else:
            endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = yield endpoint.listen(site)
        self.addCleanup(self._stop_server)
        scheme = "wss" if self.tls else "ws"
        self.url = f"{scheme}://127.0.0.1:{self.port.getHost().port}/"
        self.clients: list[ChatClient] = []

    def _tls_endpoint(self) -> Any:
        """An ``ssl:`` endpoint parsed the way ``--port`` parses one."""
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        from tests.tls_cert import make_certificate
        from webchat.tap import resume_tls_sessions, with_backlog

        directory = Path(self.mktemp()).resolve()  # type: ignore[attr-defined]
        directory.mkdir(parents=True)
        self.certificate = make_certificate(directory)
        trust = Certificate.loadPEM(self.certificate.ca.read_bytes())
        self.client_tls = optionsForClientTLS("localhost", trustRoot=trust)
        description = (
            f"ssl:0:interface=127.0.0.1:privateKey={self.certificate.key}"
            f":certKey={self.certificate.cert}"
        )
        endpoint = serverFromString(reactor, with_backlog(description))
        resume_tls_sessions(endpoint)  # as tap.listen does
        return endpoint

    def client_ssl_context(self) -> Any:
        """A stdlib ``ssl`` client context trusting the test CA (``tls`` only)."""
        import ssl

        return ssl.create_default_context(cafile=str(self.certificate.ca))

    @inlineCallbacks
    def _stop_server(self):
        yield self.port.stopListening()
        for client in self.clients:
            if client.transport is not None and client.closed_code is None:
                client.transport.abortConnection()
        yield self.factory.close_all(grace=1.0)
        for client in self.clients:
            yield client.closed
        # Connections closed for cause may still be waiting out their close
        # timeout (their peers were aborted above, but the server has not
        # read that yet): end them now, so their timers go with them.
        for protocol in list(self.factory.connections):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        # Let Autobahn's protocol teardown finish inside this reactor turn.
        yield deferLater(0)
        cancel_batched_timers()

    @inlineCallbacks
    def connect(self, path: str = "/", **headers: str):
        client = yield connect_client(
            self.port.getHost().port, path, headers, self.client_tls
        )
        self.clients.append(client)
        return client

    @inlineCallbacks
    def open_raw(self):
        """A raw TCP (or TLS) peer that has completed the opening handshake."""
        peer = yield connect_raw(self.port.getHost().port, self.client_tls)
        # (Twisted's TLS layer fails to abort a connection already lost.)
        self.addCleanup(lambda: peer.lost.called or peer.transport.abortConnection())
        peer.transport.write(HANDSHAKE)
        yield peer.wait_for(lambda data: b"\r\n\r\n" in data)
        if not peer.data.startswith(b"HTTP/1.1 101 "):
            raise AssertionError(f"handshake refused: {peer.data[:200]!r}")
        return peer

    @inlineCallbacks
    def connect_many(self, count: int):
        clients = []
        for _ in range(count):
            clients.append((yield self.connect()))
        # Each client's id is announced in the server log; wait for them all.
        return clients


def cancel_batched_timers() -> None:
    """
    Autobahn schedules its handshake timeouts through txaio's batched timer,
    whose bucket call stays in the reactor after the timeouts inside it are
    cancelled.  Those calls do nothing once the connections are gone, but
    trial rightly counts them as a dirty reactor, so they are cleared here.
    """
    for call in reactor.getDelayedCalls():
        if "_BatchedTimer" in getattr(call.func, "__qualname__", ""):
            call.cancel()


def deferLater(seconds: float, value: Any = None) -> Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: value)


# -- a real WebSocket client (Autobahn) ------------------------------------------


class ChatClient(WebSocketClientProtocol):
    """A chat participant that records what it receives and how it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[ChatClient] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.received: DeferredQueue[str | bytes] = DeferredQueue()
        self.closed_code: int | None = None
        self.closed_reason: str | None = None

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.put(payload if isBinary else payload.decode("utf-8"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # The code the *server* sent, when it sent one; else what Autobahn saw.
        self.closed_code = self.remoteCloseCode if self.remoteCloseCode else code
        self.closed_reason = self.remoteCloseReason or reason
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {reason}"))
        if not self.closed.called:
            self.closed.callback((self.closed_code, self.closed_reason))

    def pending(self) -> list[str | bytes]:
        """Everything received and not yet taken with ``received.get()``."""
        return list(self.received.pending)

    def send_text(self, text: str) -> None:
        self.sendMessage(text.encode("utf-8"), isBinary=False)


def connect_client(
    port: int,
    path: str = "/",
    headers: dict[str, str] | None = None,
    tls: Any = None,
):
    """A ``ChatClient`` once open; over TLS with ``tls`` (client TLS options)."""
    scheme = "wss" if tls is not None else "ws"
    factory = WebSocketClientFactory(
        f"{scheme}://127.0.0.1:{port}{path}", headers=headers or {}
    )
    factory.protocol = ChatClient
    factory.setProtocolOptions(failByDrop=False, openHandshakeTimeout=5)
    endpoint = _client_endpoint(port, tls)
    d = endpoint.connect(factory)
    return d.addCallback(lambda client: client.opened)


# -- raw bytes on the wire ----------------------------------------------------------


def client_frame(
    opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """Build one client-to-server frame by hand, masked as RFC 6455 requires."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    length = len(payload)
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def parse_server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split unmasked server frames into ``(opcode, payload)`` pairs."""
    frames = []
    while len(data) >= 2:
        opcode = data[0] & 0x0F
        length = data[1] & 0x7F
        offset = 2
        if length == 126:
            (length,) = struct.unpack("!H", data[2:4])
            offset = 4
        elif length == 127:
            (length,) = struct.unpack("!Q", data[2:10])
            offset = 10
        if len(data) < offset + length:
            break
        frames.append((opcode, data[offset : offset + length]))
        data = data[offset + length :]
    return frames


def close_code_of(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0]


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


class RawPeer(Protocol):
    """A TCP peer that sends whatever bytes a test hands it and records the reply."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()
        self._waiters: list[tuple[Callable[[bytes], bool], Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for entry in list(self._waiters):
            test, d = entry
            if test(self.data):
                self._waiters.remove(entry)
                d.callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        for _, d in self._waiters:
            d.callback(self.data)
        self._waiters.clear()
        self.lost.callback(None)

    def wait_for(self, test: Callable[[bytes], bool]) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if test(self.data):
            d.callback(self.data)
        else:
            self._waiters.append((test, d))
        return d

    def body(self) -> bytes:
        """What came after the HTTP response headers."""
        return self.data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.data else b""


def connect_raw(port: int, tls: Any = None) -> Deferred[RawPeer]:
    """A raw peer; with ``tls`` (client TLS options) its bytes go inside TLS."""
    return _client_endpoint(port, tls).connect(Factory.forProtocol(RawPeer))


def _client_endpoint(port: int, tls: Any) -> Any:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    if tls is None:
        return endpoint
    from twisted.internet.endpoints import wrapClientTLS

    return wrapClientTLS(tls, endpoint)


# -- a real twistd subprocess ------------------------------------------------------


def twistd_command() -> list[str]:
    return [twistd_path()]


class Twistd:
    """``twistd -n webchat ...`` in a subprocess, with its log in a file."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        twistd_args: tuple[str, ...] = (),
        **popen: Any,
    ) -> None:
        workdir = Path(workdir).resolve()  # trial's mktemp() paths are relative
        self.logfile = workdir / "twistd.log"
        self.command = [
            *twistd_command(),
            "-n",
            "--pidfile=",
            f"--logfile={self.logfile}",
            *twistd_args,  # twistd's own options (--reactor=poll) go before webchat
            "webchat",
            *args,
        ]
        self.process = subprocess.Popen(
            self.command,
            cwd=workdir,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            **popen,
        )

    def log(self) -> str:
        return self.logfile.read_text() if self.logfile.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode() if self.process.stdout else ""
                raise AssertionError(
                    f"twistd exited {self.process.returncode} before logging "
                    f"{needle!r}:\n{text}\n{out}"
                )
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {needle!r} in:\n{self.log()}")

    def stop(self, sig: int = 15, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self.process.stdout:
                self.process.stdout.close()


@inlineCallbacks
def take(client: ChatClient, count: int):
    """The next ``count`` messages ``client`` receives, in order."""
    got = []
    for _ in range(count):
        got.append((yield client.received.get()))
    return got
