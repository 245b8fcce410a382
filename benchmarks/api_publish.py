"""How many messages a second the server API publishes (issue #15).

``python -m benchmarks.api_publish``: starts ``twistd webchat --quiet
--api-key-file ... --api-rate-limit 0`` pinned to one core, and clients on
another core that publish over HTTP keep-alive (``POST
/api/rooms/bench/messages``, a new connection every 100 requests, the
server's cap), while a seed-format member of the room reads every message.
The baseline, from the same server in the same run, is ``GET /healthz`` over
the same kind of connections: what twisted.web answers with no API work.

Prints one JSON object: requests/s and the server's CPU seconds per request
for both, and the messages the member received (each publish must reach
it).  Goal (issue #15): at least 5,000 publishes a second on one core.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.helpers import free_port, process_cpu_seconds, twistd_path

KEY = "bench-api-key"


def _request(kind: str) -> bytes:
    if kind == "healthz":
        return b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"
    body = b'{"text":"hello from the app"}'
    return (
        b"POST /api/rooms/bench/messages HTTP/1.1\r\nHost: bench\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)


def _client(port: int, kind: str, seconds: float, cpu: int, out) -> None:
    """One keep-alive client: request, whole response, again; count them."""
    os.sched_setaffinity(0, {cpu})
    request = _request(kind)
    expected = b"HTTP/1.1 202" if kind == "publish" else b"HTTP/1.1 200"
    done = 0
    bad = 0
    end = time.monotonic() + seconds
    sock = None
    while time.monotonic() < end:
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = b""
        sock.sendall(request)
        while True:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end >= 0:
                match = _LENGTH.search(buffer, 0, head_end + 2)
                length = int(match.group(1)) if match else 0
                if len(buffer) >= head_end + 4 + length:
                    break
            data = sock.recv(65536)
            if not data:
                break
            buffer += data
        if not buffer.startswith(expected):
            bad += 1
        closing = b"connection: close" in buffer[:head_end].lower() or not buffer
        buffer = buffer[head_end + 4 + length :] if buffer else b""
        done += 1
        if closing:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    out.put((done, bad))


def _member(port: int, stop: threading.Event, counts: list[int]) -> None:
    """A seed-format member of room ``bench``: reads and counts text frames."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /ws/bench HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(4096)
    buffer = buffer.split(b"\r\n\r\n", 1)[1]
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            break
        buffer += data
        while len(buffer) >= 2:
            length = buffer[1] & 0x7F
            start = 2
            if length == 126:
                if len(buffer) < 4:
                    break
                length, start = int.from_bytes(buffer[2:4], "big"), 4
            if len(buffer) < start + length:
                break
            if buffer[0] & 0x0F == 0x1:  # text, not the server's pings
                counts[0] += 1
            buffer = buffer[start + length :]
    sock.close()


def _run(port: int, kind: str, clients: int, seconds: float, cpu: int, pid: int):
    queue: multiprocessing.Queue = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=_client, args=(port, kind, seconds, cpu, queue))
        for _ in range(clients)
    ]
    cpu_before = process_cpu_seconds(pid) or 0.0
    started = time.monotonic()
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=seconds + 30) for _ in workers]
    elapsed = time.monotonic() - started
    for worker in workers:
        worker.join()
    cpu_used = (process_cpu_seconds(pid) or 0.0) - cpu_before
    done = sum(r[0] for r in results)
    return {
        "requests": done,
        "unexpected_status": sum(r[1] for r in results),
        "requests_per_s": round(done / elapsed),
        "server_cpu_s": round(cpu_used, 2),
        "server_cpu_us_per_request": round(cpu_used / done * 1e6, 1) if done else None,
        "requests_per_server_cpu_s": round(done / cpu_used) if cpu_used else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="webchat-api-bench-"))
    (workdir / "api.key").write_text(KEY + "\n")
    port = free_port()
    server = subprocess.Popen(
        [
            twistd_path(),
            "-n",
            "--pidfile=",
            f"--logfile={workdir / 'twistd.log'}",
            "webchat",
            "--quiet",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--api-key-file",
            str(workdir / "api.key"),
            "--api-rate-limit",
            "0",
        ],
        preexec_fn=lambda: os.sched_setaffinity(0, {args.server_cpu}),
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        stop = threading.Event()
        received = [0]
        member = threading.Thread(target=_member, args=(port, stop, received))
        member.start()
        time.sleep(0.5)
        baseline = _run(
            port, "healthz", args.clients, args.seconds, args.client_cpu, server.pid
        )
        publish = _run(
            port, "publish", args.clients, args.seconds, args.client_cpu, server.pid
        )
        time.sleep(1.0)
        stop.set()
        member.join()
        print(
            json.dumps(
                {
                    "clients": args.clients,
                    "seconds": args.seconds,
                    "baseline_get_healthz": baseline,
                    "api_publish": publish,
                    "member_received": received[0],
                },
                indent=2,
            )
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


if __name__ == "__main__":
    main()
