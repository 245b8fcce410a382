"""
Simultaneous big messages: what one reactor turn of them costs the server's memory.

Run from the repository root::

    .venv/bin/python -m benchmarks.burst --connections 150 --size 60000

It starts ``twistd -n --pidfile= webchat --port tcp:PORT:interface=127.0.0.1
--rate-limit 0`` (plus any ``--server-arg``), opens ``--connections``
WebSockets to it from plain sockets, and then has each send one text message
of ``--size`` bytes so that all of them arrive in the *same* reactor turn: the
server is stopped (SIGSTOP) while the frames are written into its sockets'
receive buffers and continued (SIGCONT) once they all are, so its next poll
finds every socket readable at once.  Every client reads whatever it is sent
(as fast as one Python thread can) until the server closes it or
``--drain`` seconds pass.  Then all of them leave, and after ``--settle``
seconds the server's RSS is read again.  ``--rounds`` repeats all that with
new connections: a leak grows round by round, the allocator's leftovers of
the first round (heap it has not given back yet) do not.

The figures come from ``/proc/PID/status``: ``VmRSS`` once the connections are
open (start, of the first round), ``VmHWM`` (the peak) after the last burst,
``VmRSS`` after everyone of the last round left.  The targets (issue #9):
the peak at most 200 MB above the start, and RSS back within 10 % of the
start after they leave.

Not a test: how far the peak goes depends on the machine, so it is measured
here and quoted, never asserted in the suite.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import selectors
import signal
import socket
import struct
import time
from pathlib import Path

from benchmarks.helpers import free_port
from benchmarks.soak import ServerProcess

#: Where the figures go unless --out says otherwise.
DEFAULT_OUT = "bench-results/burst.json"


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` and friends of ``pid``, in bytes."""
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name.startswith("Vm") and value.strip().endswith("kB"):
                figures[name] = int(value.split()[0]) * 1024
    return figures


def masked_text_frame(payload: bytes) -> bytes:
    """One client-to-server text frame, masked as RFC 6455 requires."""
    key = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x81, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
    mask = (key * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(
        length, "big"
    )
    return head + key + masked


def open_websocket(port: int) -> socket.socket:
    """A completed opening handshake on a blocking socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: %b\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n" % (port, key)
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(1)
        if not chunk:
            raise OSError("closed during the handshake")
        answer += chunk
    if not answer.startswith(b"HTTP/1.1 101"):
        raise OSError(f"handshake refused: {answer[:40]!r}")
    return sock


def drain(socks: list[socket.socket], seconds: float) -> tuple[int, int, int]:
    """
    Read every socket until the server closes it or ``seconds`` pass; return
    (bytes read, connections the server closed, those whose last bytes were
    a close frame with code 1008).
    """
    selector = selectors.DefaultSelector()
    tails: dict[socket.socket, bytes] = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    total = closed = closed_1008 = 0
    deadline = time.monotonic() + seconds
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                total += len(data)
                tails[sock] = (tails.get(sock, b"") + data)[-64:]
                continue
            selector.unregister(sock)
            closed += 1
            # A close frame from the server: 0x88, length, 2-byte code, reason.
            tail = tails.get(sock, b"")
            at = tail.rfind(b"\x88")
            if at >= 0 and tail[at + 2 : at + 4] == struct.pack("!H", 1008):
                closed_1008 += 1
    selector.close()
    return total, closed, closed_1008


def burst(port: int, pid: int, args: argparse.Namespace) -> dict:
    """One round: connect, one turn of messages, read, leave, settle."""
    socks = [open_websocket(port) for _ in range(args.connections)]
    time.sleep(1.0)  # let the last handshakes' garbage go
    start = proc_status(pid)
    frames = [
        masked_text_frame(b"%d " % n + b"x" * (args.size - 8))
        for n in range(args.connections)
    ]
    os.kill(pid, signal.SIGSTOP)
    try:
        for sock, frame in zip(socks, frames, strict=True):
            sock.sendall(frame)
    finally:
        os.kill(pid, signal.SIGCONT)
    received, closed, closed_1008 = drain(socks, args.drain)
    after_burst = proc_status(pid)
    for sock in socks:
        sock.close()
    time.sleep(args.settle)
    after_leaving = proc_status(pid)
    return {
        "rss_start": start["VmRSS"],
        "hwm_before_burst": start["VmHWM"],
        "hwm_after_burst": after_burst["VmHWM"],
        "rss_after_leaving": after_leaving["VmRSS"],
        "bytes_received": received,
        "closed_by_server": closed,
        "closed_1008": closed_1008,
    }


def run(args: argparse.Namespace) -> dict:
    port = free_port()
    log_path = Path(args.out).with_suffix(".log")
    server = ServerProcess(port, log_path, args.server_arg)
    try:
        server.wait_until_listening(port)
        rounds = [burst(port, server.pid, args) for _ in range(args.rounds)]
    finally:
        server.stop()
    first, last = rounds[0], rounds[-1]
    rss_start = first["rss_start"]
    peak_rise = last["hwm_after_burst"] - rss_start
    back = last["rss_after_leaving"] / rss_start - 1

    def mib(value: int) -> float:
        return round(value / 2**20, 1)

    return {
        "config": {k: v for k, v in vars(args).items() if k != "out" and v is not None},
        "server_command": server.command,
        # The first round's start, the highest peak, the last round's end.
        "mib": {
            "rss_start": mib(rss_start),
            "hwm_before_burst": mib(first["hwm_before_burst"]),
            "hwm_after_burst": mib(last["hwm_after_burst"]),
            "peak_rise": mib(peak_rise),
            "rss_after_leaving": mib(last["rss_after_leaving"]),
        },
        "rss_after_leaving_vs_start": round(back, 4),
        "rounds_mib": [
            {
                "rss_start": mib(r["rss_start"]),
                "hwm_after_burst": mib(r["hwm_after_burst"]),
                "rss_after_leaving": mib(r["rss_after_leaving"]),
            }
            for r in rounds
        ],
        "clients": {
            "bytes_received": sum(r["bytes_received"] for r in rounds),
            "closed_by_server": sum(r["closed_by_server"] for r in rounds),
            "closed_1008": sum(r["closed_1008"] for r in rounds),
        },
        "verdict": {
            "peak_rise_at_most_200MB": peak_rise <= 200e6,
            "rss_back_within_10pct": back <= 0.10,
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Memory cost of one reactor turn of simultaneous big messages."
    )
    add = parser.add_argument
    add("--connections", type=int, default=150, help="senders [150]")
    add("--size", type=int, default=60_000, help="bytes per message [60000]")
    add("--drain", type=float, default=30.0, help="seconds to read replies [30]")
    add("--settle", type=float, default=10.0, help="seconds after leaving [10]")
    add(
        "--rounds",
        type=int,
        default=1,
        help="bursts one after another, new connections each [1]: the first "
        "round's leftovers are partly the allocator's, which later rounds reuse",
    )
    add("--out", default=DEFAULT_OUT, help=f"JSON figures [{DEFAULT_OUT}]")
    add(
        "--server-arg",
        action="append",
        default=[],
        help="extra webchat option, repeatable: --server-arg=--max-send-buffer=4194304",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures["mib"] | figures["clients"] | figures["verdict"]))
    for n, r in enumerate(figures["rounds_mib"]):
        print(f"round {n}: {r}")
    print(f"RSS after leaving vs start: {figures['rss_after_leaving_vs_start']:+.1%}")
    return 0 if all(figures["verdict"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
