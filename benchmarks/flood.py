"""
Flood the chat server with frames that no message limit sees (issue #9).

Run from the repository root::

    .venv/bin/python -m benchmarks.flood --kind empty
    .venv/bin/python -m benchmarks.flood --kind continuation --src /path/to/old/src

It starts a server with every default limit (``--src`` picks the ``webchat``
package to run: another checkout's ``src``, to measure a baseline in the same
run), connects a bystander pair that chats under the message rate limit, and
one raw client that floods for ``--seconds``:

* ``empty``: one text frame with FIN=0, then empty continuation frames
  forever (a message that never ends);
* ``continuation``: 1-byte continuation frames, a message every 60,000
  frames (inside the size, frames-per-message and message rate limits of the
  old server);
* ``pong``: unsolicited 125-byte pongs.

It prints when (if ever) the flooder got its close frame, the server's CPU
time and RSS (``/proc/PID``) over the run, and the bystanders' median round
trip before and during the flood.
"""

from __future__ import annotations

import argparse
import atexit
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from websockets.sync.client import ClientConnection, connect

from benchmarks.helpers import process_cpu_seconds, process_rss_kb

SERVER = """
import sys
sys.path.insert(0, {src!r})
import webchat
assert webchat.__file__.startswith({src!r}), webchat.__file__
from twisted.internet import reactor
from webchat.chat import WebChatFactory
from webchat.web import make_site
port = reactor.listenTCP(0, make_site(WebChatFactory(reactor, quiet=True)),
                         interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""

HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame (mask 0: the payload goes as it is)."""
    head = bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)])
    return head + b"\0\0\0\0" + payload


def flood_bytes(kind: str) -> tuple[bytes, bytes]:
    """What the flooder sends once, then what it sends over and over."""
    if kind == "empty":
        return frame(0x1, b"a", fin=False), frame(0x0, b"", fin=False) * 100_000
    if kind == "continuation":
        message = (
            frame(0x1, b"a", fin=False)
            + frame(0x0, b"b", fin=False) * 59_998
            + frame(0x0, b"c")
        )
        return b"", message
    return b"", frame(0xA, b"p" * 125) * 10_000


class Process:
    """The server's CPU seconds and RSS, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu(self) -> float:
        return process_cpu_seconds(self.pid) or 0.0

    def rss_mib(self) -> float:
        return (process_rss_kb(self.pid) or 0) / 1024


def round_trips(a: ClientConnection, b: ClientConnection, count: int) -> list[float]:
    """Seconds from A sending to B receiving, 16 a second (under the rate limit)."""
    times = []
    for n in range(count):
        started = time.perf_counter()
        a.send(f"m{n}")
        while not str(b.recv(timeout=30)).startswith("id 1: m"):
            pass  # the flood's own messages, where the server relays them
        times.append(time.perf_counter() - started)
        time.sleep(0.06)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("empty", "continuation", "pong"))
    parser.add_argument("--src", default=str(Path(__file__).parents[1] / "src"))
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    server = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(src=str(Path(args.src).resolve()))],
        stdout=subprocess.PIPE,
    )
    atexit.register(server.kill)
    port = int(server.stdout.readline())
    process = Process(server.pid)
    url = f"ws://127.0.0.1:{port}/"
    with connect(url) as a, connect(url) as b:
        before = round_trips(a, b, 40)
        flooder = socket.create_connection(("127.0.0.1", port))
        flooder.sendall(HANDSHAKE)
        flooder.recv(4096)
        first, again = flood_bytes(args.kind)
        started = time.monotonic()
        cpu_at_start, rss_at_start = process.cpu(), process.rss_mib()
        closed_after: list[float] = []

        def flood() -> None:
            try:
                flooder.sendall(first)
                while time.monotonic() - started < args.seconds:
                    flooder.sendall(again)
            except OSError:
                pass  # the server dropped it

        def watch() -> None:
            flooder.settimeout(args.seconds + 5)
            try:
                while chunk := flooder.recv(65536):
                    if b"\x88" in chunk and not closed_after:
                        closed_after.append(time.monotonic() - started)
            except OSError:
                pass

        for target in (flood, watch):
            threading.Thread(target=target, daemon=True).start()
        time.sleep(0.2)
        during = round_trips(a, b, 40)
        time.sleep(max(0.0, args.seconds - (time.monotonic() - started)))
        cpu = process.cpu() - cpu_at_start
        rss = process.rss_mib()
        elapsed = time.monotonic() - started

    closed = f"{closed_after[0]:.3f} s" if closed_after else "never"
    print(
        f"{args.kind}: flooder closed after {closed}; server CPU {cpu:.2f} s in "
        f"{elapsed:.1f} s; RSS {rss_at_start:.0f} -> {rss:.0f} MiB; bystander "
        f"median round trip {statistics.median(before) * 1000:.2f} ms before, "
        f"{statistics.median(during) * 1000:.2f} ms during"
    )


if __name__ == "__main__":
    main()
