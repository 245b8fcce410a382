"""An in-memory chat server and clients, for tests that need no sockets.

In the spirit of ``twisted.test.iosim`` and ``treq.testing``: ``ChatPump``
builds the real site and factory on a ``Clock``, and ``connect`` joins a
``MemoryClient`` to it through ``iosim``'s fake transports, so the opening
handshake, the frames both ways, the end-of-turn flush and the closing
handshake all run as in production, byte for byte, without a socket, a
port or a real reactor.  ``pump()`` moves bytes until both sides are
quiet, advancing the clock by nothing but the end of the turn.

What it does not cover is what lives below ``transport.write``: the
direct-socket fast path and ``SO_SNDBUF`` (``webchat.flow``) need a real
TCP connection, as do tests of TLS, proxies and ``twistd``.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim

from webchat.chat import WebChatFactory
from webchat.web import make_site

#: Bounds ``ChatPump.pump``: a conversation that has not settled after this
#: many exchanges is a bug (an endless ping-pong), not a slow test.
PUMP_ROUNDS = 1000

#: Where the in-memory server listens, as its transports report it.
SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 8080)


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One client-to-server frame, masked as RFC 6455 requires."""
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


class MemoryClient(Protocol):
    """
    A WebSocket client that records what the server sends: the response
    head (``status``, ``response``) and every frame after it (``frames``).
    """

    def __init__(self, path: str, headers: dict[str, str]) -> None:
        self.path = path
        self.headers = headers
        #: The HTTP status of the handshake's answer (101 when admitted).
        self.status = 0
        #: The whole HTTP response head, and the body of a refusal.
        self.response = b""
        #: Server frames so far: (opcode, payload).
        self.frames: list[tuple[int, bytes]] = []
        self.lost = False
        #: Answer the server's close frame, as a browser does.
        self.answer_close = True
        self._closing = False
        self._buffer = b""
        self._head_done = False

    def connectionMade(self) -> None:
        lines = [
            f"GET {self.path} HTTP/1.1",
            "Host: 127.0.0.1:8080",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._head_done:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.response = self._buffer[: end + 4]
            self.status = int(self.response.split(b" ", 2)[1])
            self._buffer = self._buffer[end + 4 :]
            self._head_done = True
            if self.status != 101:
                self.response += self._buffer
                self._buffer = b""
                return
        if self.status == 101:
            self._parse_frames()

    def _parse_frames(self) -> None:
        data = self._buffer
        while len(data) >= 2:
            opcode = data[0] & 0x0F
            length = data[1] & 0x7F
            offset = 2
            if length == 126:
                if len(data) < 4:
                    break
                (length,) = struct.unpack("!H", data[2:4])
                offset = 4
            elif length == 127:
                if len(data) < 10:
                    break
                (length,) = struct.unpack("!Q", data[2:10])
                offset = 10
            if len(data) < offset + length:
                break
            payload = data[offset : offset + length]
            self.frames.append((opcode, payload))
            data = data[offset + length :]
            if opcode == 0x8 and self.answer_close and not self._closing:
                self._closing = True
                self.transport.write(client_frame(0x8, payload[:2]))
        self._buffer = data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True

    # -- what a test does and asks --------------------------------------------------

    def send_text(self, text: str | bytes) -> None:
        payload = text.encode("utf-8") if isinstance(text, str) else text
        self.transport.write(client_frame(0x1, payload))

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        self.transport.write(client_frame(opcode, payload, fin))

    @property
    def texts(self) -> list[str]:
        """The text messages received, in order."""
        return [p.decode("utf-8") for op, p in self.frames if op == 0x1]

    @property
    def close_code(self) -> int | None:
        """The code of the server's close frame, if it sent one."""
        for opcode, payload in self.frames:
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0] if payload else 1005
        return None


class ChatPump:
    """
    A chat server in memory: the production site and factory on ``clock``,
    and any number of ``MemoryClient`` connections to it.
    """

    def __init__(
        self,
        factory: WebChatFactory | None = None,
        clock: Clock | None = None,
        **factory_kwargs: Any,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        if factory is None:
            factory = WebChatFactory(self.clock, **factory_kwargs)
        self.factory = factory
        self.site = make_site(factory)
        self._pumps: list[iosim.IOPump] = []
        self._next_port = 40000

    def connect(
        self, path: str = "/", peer: str = "127.0.0.1", **headers: str
    ) -> MemoryClient:
        """
        Open a connection from ``peer`` and send the opening handshake with
        ``headers`` (``Origin="http://..."``; underscores become dashes);
        return the client once the server has answered.
        """
        self._next_port += 1
        client_address = IPv4Address("TCP", peer, self._next_port)
        server = self.site.buildProtocol(client_address)
        client = MemoryClient(
            path, {name.replace("_", "-"): value for name, value in headers.items()}
        )
        server_io = iosim.FakeTransport(
            server,
            isServer=True,
            hostAddress=SERVER_ADDRESS,
            peerAddress=client_address,
        )
        client_io = iosim.FakeTransport(
            client,
            isServer=False,
            hostAddress=client_address,
            peerAddress=SERVER_ADDRESS,
        )
        pump = iosim.connect(
            server, server_io, client, client_io, greet=False, clock=self.clock
        )
        self._pumps.append(pump)
        self.pump()
        return client

    def pump(self) -> None:
        """Move bytes both ways, turn by turn, until every connection is quiet."""
        for _ in range(PUMP_ROUNDS):
            moved = False
            for pump in list(self._pumps):
                if pump.pump():
                    moved = True
            if not moved:
                return
        raise AssertionError(f"still talking after {PUMP_ROUNDS} rounds")
