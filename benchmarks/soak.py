"""
Soak the chat server: steady chat, a reader that never reads, and churn.

Run from the repository root::

    .venv/bin/python -m benchmarks.soak --duration 60 --out bench-results/soak.json

It starts ``twistd -n --pidfile= webchat --port tcp:PORT:interface=127.0.0.1
--rate-limit 0 --frame-rate-limit 0`` itself (or, with ``--url``, talks to a
server already running; its memory is then only read with ``--pid``), and
runs, all on 127.0.0.1:

* ``--chatters`` clients that each send a message every ``--interval`` seconds
  and read everything, counting what arrives and in what order;
* one client that completes the handshake and then never reads its socket
  (a small ``SO_RCVBUF``), so the server's send buffer for it fills up until
  the server drops it as too slow;
* ``--churners`` loops that open and close connections as fast as the server
  takes them: some close cleanly, some drop TCP after the handshake, some
  drop it half-way through the handshake.

Phases: warm-up (chatters only; then "RSS at start" is taken), soak (everything),
settle (churn stopped, chatters still chatting; then "RSS after churn"), drain
(sending stopped, deliveries counted).  It prints progress once a second and,
at the end, the figures, also written as JSON to ``--out``.  The verdict is
whether the server's RSS after the churn is back within ``--rss-tolerance``
(10 %) of its RSS at the start.

Messages are 1 KiB by default so that the never-reader fills its allowance
quickly: the server fixes each socket's kernel send buffer at half of
``--max-send-buffer`` (1 MiB) and counts the rest in Twisted's buffer, so
about 1 MiB of unread chat gets the never-reader dropped.

This is a soak, not a throughput benchmark: the clients are ``websockets`` on
asyncio in one process, and a busy client process shows up as latency, not as
server trouble.  Loss, though, is loss: TCP does not drop messages, the
server might.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fcntl
import json
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from benchmarks.helpers import free_port, process_rss_kb, twistd_path

#: Linux TCP states, as ``tcp_info.tcpi_state`` reports them.
TCP_ESTABLISHED = 1
TCP_STATES = {
    1: "ESTABLISHED",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    11: "CLOSING",
}
CHATTER_MESSAGE = re.compile(r"id (\d+): c(\d+):(\d+):")


# -- the server's process -----------------------------------------------------------


def read_rss(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes; None once it is gone."""
    kib = process_rss_kb(pid)
    return None if kib is None else kib * 1024


class ServerProcess:
    """``twistd -n webchat`` in a subprocess, its log in a file."""

    def __init__(self, port: int, log_path: Path, extra: list[str]) -> None:
        self.command = [
            twistd_path(),
            "-n",
            "--pidfile=",
            "webchat",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--rate-limit",
            "0",
            "--frame-rate-limit",
            "0",
            *extra,
        ]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.process.pid

    def wait_until_listening(self, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"twistd exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"twistd did not listen on {port} within {timeout} s")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


# -- what is counted ------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    delivered: int = 0
    #: Arrivals whose sequence number skipped ahead (messages missing before them).
    gaps: int = 0
    #: Arrivals older than one already seen from the same sender.
    out_of_order: int = 0
    chatters_lost: int = 0
    churn_opened: int = 0
    churn_clean_closes: int = 0
    churn_tcp_drops: int = 0
    churn_handshake_drops: int = 0
    churn_errors: Counter[str] = field(default_factory=Counter)


@dataclass
class NeverReader:
    """What happened to the client that never reads."""

    connected_at: float | None = None
    closed_by_server_after: float | None = None
    tcp_state: str = "not connected"
    most_unread_bytes: int = 0


@dataclass
class RssSamples:
    pid: int | None
    peak: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)

    def sample(self, elapsed: float) -> int | None:
        if self.pid is None:
            return None
        rss = read_rss(self.pid)
        if rss is not None:
            self.peak = max(self.peak, rss)
            self.samples.append((round(elapsed, 2), rss))
        return rss

    def settled(self, seconds: float, elapsed: float) -> int | None:
        """The median of the samples of the last ``seconds``."""
        recent = sorted(r for t, r in self.samples if t >= elapsed - seconds)
        return recent[len(recent) // 2] if recent else None


# -- the soak ------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, pid: int | None) -> None:
        self.args = args
        self.url = url
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self.tally = Tally()
        self.never = NeverReader()
        self.rss = RssSamples(pid)
        self.started = time.monotonic()
        self.phase = "warm-up"
        self.stop_churn = asyncio.Event()
        self.stop_sending = asyncio.Event()
        self.stop_all = asyncio.Event()
        self.rng = random.Random(args.seed)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def handshake(self) -> bytes:
        key = base64.b64encode(self.rng.randbytes(16))
        return (
            b"GET %b HTTP/1.1\r\nHost: %b:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %b\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        ) % (self.path.encode(), self.host.encode(), self.port, key)

    # -- chatters -------------------------------------------------------------------

    async def open_chatter(self) -> ClientConnection:
        return await connect(
            self.url, open_timeout=10, compression=None, max_queue=None
        )

    async def chatter(self, index: int, ws: ClientConnection) -> None:
        try:
            receiving = asyncio.create_task(self._receive(ws))
            await self._send(ws, index)
            # Let the last messages arrive before counting them.
            await self.stop_all.wait()
            receiving.cancel()
            await ws.close()
        except ConnectionClosed:
            self.tally.chatters_lost += 1

    async def _send(self, ws: ClientConnection, index: int) -> None:
        padding = "x" * max(0, self.args.message_bytes - 16)
        interval = self.args.interval
        # Spread the chatters over the interval, then keep to a fixed schedule.
        due = time.monotonic() + interval * self.rng.random()
        seq = 0
        while not self.stop_sending.is_set():
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await ws.send(f"c{index}:{seq}:{padding}")
            self.tally.sent += 1
            seq += 1
            due += interval

    async def _receive(self, ws: ClientConnection) -> None:
        last: dict[int, int] = {}
        try:
            async for message in ws:
                match = CHATTER_MESSAGE.match(message)
                if match is None:
                    continue  # a churner's greeting
                sender, seq = int(match.group(2)), int(match.group(3))
                self.tally.delivered += 1
                previous = last.get(sender, -1)
                if seq <= previous:
                    self.tally.out_of_order += 1
                elif seq > previous + 1:
                    self.tally.gaps += 1
                last[sender] = max(previous, seq)
        except ConnectionClosed:
            if not self.stop_all.is_set():
                self.tally.chatters_lost += 1

    # -- the client that never reads ----------------------------------------------

    async def never_reader(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Small, and set before connecting, so the window it offers stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            await asyncio.to_thread(self._open_never_reader, sock)
        except OSError as e:
            self.never.tcp_state = f"could not connect: {e}"
            sock.close()
            return
        self.never.connected_at = self.elapsed()
        try:
            while not self.stop_all.is_set():
                state = self._tcp_state(sock)
                self.never.tcp_state = TCP_STATES.get(state, str(state))
                unread = self._unread(sock)
                self.never.most_unread_bytes = max(self.never.most_unread_bytes, unread)
                if state != TCP_ESTABLISHED:
                    self.never.closed_by_server_after = round(
                        self.elapsed() - self.never.connected_at, 1
                    )
                    return
                await asyncio.sleep(0.25)
        finally:
            sock.close()

    def _open_never_reader(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        sock.connect((self.host, self.port))
        sock.sendall(self.handshake())
        # Read the handshake's answer and nothing after it, ever.
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(1)
            if not chunk:
                raise OSError("closed during the handshake")
            answer += chunk
        if not answer.startswith(b"HTTP/1.1 101"):
            raise OSError(f"handshake refused: {answer[:40]!r}")

    @staticmethod
    def _tcp_state(sock: socket.socket) -> int:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[0]

    @staticmethod
    def _unread(sock: socket.socket) -> int:
        try:
            raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
        except OSError:
            return 0
        return struct.unpack("i", raw)[0]

    # -- churn ---------------------------------------------------------------------

    async def churner(self, number: int) -> None:
        rng = random.Random(self.args.seed * 1000 + number)
        while not self.stop_churn.is_set():
            kind = rng.choices(("clean", "drop", "handshake"), (45, 45, 10))[0]
            try:
                await asyncio.wait_for(self._churn_once(kind, rng), 10)
            except (
                OSError,
                InvalidHandshake,
                ConnectionClosed,
                asyncio.TimeoutError,
            ) as e:
                self.tally.churn_errors[type(e).__name__] += 1
            if self.args.churn_pause:
                await asyncio.sleep(self.args.churn_pause)

    async def _churn_once(self, kind: str, rng: random.Random) -> None:
        if kind == "handshake":
            _, writer = await asyncio.open_connection(self.host, self.port)
            self.tally.churn_opened += 1
            request = self.handshake()
            writer.write(request[: rng.randrange(1, len(request) - 1)])
            await writer.drain()
            writer.transport.abort()
            self.tally.churn_handshake_drops += 1
            return
        ws = await connect(
            self.url, open_timeout=5, close_timeout=2, ping_interval=None
        )
        self.tally.churn_opened += 1
        try:
            if rng.random() < 0.3:
                await ws.send("churner says hello")
            await asyncio.sleep(rng.uniform(0, self.args.churn_hold))
            if kind == "clean":
                await ws.close()
                self.tally.churn_clean_closes += 1
                return
        finally:
            # A drop by design, or whatever went wrong before the close.
            ws.transport.abort()  # no close frame, no FIN: a reset
        self.tally.churn_tcp_drops += 1

    # -- watching -------------------------------------------------------------------

    async def monitor(self) -> None:
        next_print = 1.0
        while not self.stop_all.is_set():
            elapsed = self.elapsed()
            rss = self.rss.sample(elapsed)
            if elapsed >= next_print:
                next_print += 1.0
                t = self.tally
                memory = f"{rss / 2**20:7.1f} MiB" if rss else "      n/a"
                print(
                    f"{elapsed:5.1f} s  {self.phase:<8} sent {t.sent:6d}  "
                    f"delivered {t.delivered:7d}  churn {t.churn_opened:5d}  "
                    f"rss {memory}  never-reader {self.never.tcp_state}",
                    flush=True,
                )
            await asyncio.sleep(0.2)

    async def run(self) -> None:
        args = self.args
        warmup, settle, drain = args.warmup, args.settle, 3.0
        soak = args.duration - warmup - settle - drain
        if soak < 5:
            raise SystemExit("--duration leaves less than 5 s of soak")
        monitor = asyncio.create_task(self.monitor())
        # Everyone is in the room before anyone speaks: every message sent
        # is owed to every other chatter.
        connections = await asyncio.gather(
            *(self.open_chatter() for _ in range(args.chatters))
        )
        chatters = [
            asyncio.create_task(self.chatter(i, ws)) for i, ws in enumerate(connections)
        ]
        await asyncio.sleep(warmup)
        self.rss_start = self.rss.settled(1.0, self.elapsed())

        self.phase = "soak"
        never = asyncio.create_task(self.never_reader())
        churners = [asyncio.create_task(self.churner(n)) for n in range(args.churners)]
        await asyncio.sleep(soak)
        self.stop_churn.set()
        await asyncio.gather(*churners)

        self.phase = "settle"
        await asyncio.sleep(settle)
        self.rss_after = self.rss.settled(1.0, self.elapsed())

        self.phase = "drain"
        self.stop_sending.set()
        await asyncio.sleep(drain)
        self.stop_all.set()
        await asyncio.gather(*chatters, never, monitor)


# -- the figures ---------------------------------------------------------------------


def scrape_metrics(host: str, port: int) -> dict[str, float]:
    """The server's own counters from /metrics, if it serves them there."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    wanted = ("webchat_connections_dropped", "webchat_connections_closed")
    found = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 2)


def results(
    soak: Soak,
    server: ServerProcess | None,
    server_log: str | None,
    metrics: dict[str, float],
) -> dict:
    args, t = soak.args, soak.tally
    expected = t.sent * (args.chatters - 1)
    start, after, peak = soak.rss_start, soak.rss_after, soak.rss.peak or None
    if start and after:
        growth = after / start - 1
        verdict = "PASS" if growth <= args.rss_tolerance else "FAIL"
    else:
        growth, verdict = None, "n/a (no RSS: pass --pid with --url)"
    error_lines = [
        line
        for line in (server_log or "").splitlines()
        if "An error has occurred: connection" in line
    ]
    too_slow_lines = [line for line in error_lines if "too slow" in line]
    return {
        "config": {
            k: v
            for k, v in vars(args).items()
            if k not in ("out", "server_arg") and v is not None
        }
        | {"server_args": args.server_arg, "url": soak.url},
        "server": {
            "pid": soak.rss.pid,
            "command": None if server is None else server.command,
            "exit_status": None if server is None else server.process.returncode,
        },
        "rss_mib": {
            "start": mib(start),
            "peak": mib(peak),
            "after_churn": mib(after),
            "growth_after_churn": None if growth is None else round(growth, 4),
        },
        "messages": {
            "sent": t.sent,
            "expected_deliveries": expected,
            "delivered": t.delivered,
            "lost": expected - t.delivered,
            "gaps": t.gaps,
            "out_of_order": t.out_of_order,
            "chatters_disconnected": t.chatters_lost,
        },
        "churn": {
            "connections_opened": t.churn_opened,
            "closed_cleanly": t.churn_clean_closes,
            "tcp_dropped_after_open": t.churn_tcp_drops,
            "dropped_mid_handshake": t.churn_handshake_drops,
            "errors": dict(t.churn_errors),
        },
        "dropped_by_policy": {
            "never_reader_closed_by_server": soak.never.closed_by_server_after
            is not None,
            "never_reader_seconds_to_drop": soak.never.closed_by_server_after,
            "never_reader_tcp_state": soak.never.tcp_state,
            "never_reader_most_unread_bytes": soak.never.most_unread_bytes,
            "too_slow_log_lines": None if server_log is None else len(too_slow_lines),
            # Every connection the server ended for cause, in its own words.
            "server_error_lines": [line.split("] ", 1)[-1] for line in error_lines],
            "server_counters": metrics,
        },
        "rss_back_within_tolerance": verdict,
        "rss_samples": soak.rss.samples,
    }


def print_summary(figures: dict) -> None:
    rss, msgs, churn = figures["rss_mib"], figures["messages"], figures["churn"]
    policy = figures["dropped_by_policy"]
    print()
    print(
        f"RSS: start {rss['start']} MiB, peak {rss['peak']} MiB, "
        f"after churn {rss['after_churn']} MiB ({rss['growth_after_churn']})"
    )
    print(
        f"messages: sent {msgs['sent']}, delivered {msgs['delivered']} of "
        f"{msgs['expected_deliveries']}, lost {msgs['lost']}, gaps {msgs['gaps']}, "
        f"out of order {msgs['out_of_order']}, chatters disconnected "
        f"{msgs['chatters_disconnected']}"
    )
    print(
        f"churn: {churn['connections_opened']} opened ({churn['closed_cleanly']} "
        f"clean, {churn['tcp_dropped_after_open']} dropped, "
        f"{churn['dropped_mid_handshake']} mid-handshake), errors {churn['errors']}"
    )
    print(
        f"dropped by policy: never-reader closed by server: "
        f"{policy['never_reader_closed_by_server']} after "
        f"{policy['never_reader_seconds_to_drop']} s "
        f"(TCP {policy['never_reader_tcp_state']}); 'too slow' in the log: "
        f"{policy['too_slow_log_lines']}"
    )
    if not policy["never_reader_closed_by_server"]:
        print(
            "  (the never-reader was not dropped: the kernel's send buffer takes "
            "the first MiBs; run longer, or use bigger --message-bytes)"
        )
    for line in policy["server_error_lines"]:
        print(f"  server: {line}")
    dropped = {
        name.split("reason=")[-1].strip('"}'): int(value)
        for name, value in policy["server_counters"].items()
        if name.startswith("webchat_connections_dropped") and value
    }
    print(f"  server counters, dropped for cause: {dropped}")
    print(
        f"RSS back within tolerance after churn: {figures['rss_back_within_tolerance']}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0].strip()
    )
    add = parser.add_argument
    add("--duration", type=float, default=60.0, help="total seconds (default 60)")
    add("--out", type=Path, default=Path("bench-results/soak.json"))
    add("--url", help="soak this running server instead of starting one")
    add("--pid", type=int, help="with --url: the server's pid, to read its RSS")
    add("--server-log", type=Path, help="with --url: its log, to look for drops")
    add("--server-arg", action="append", default=[], help="extra twistd option")
    add("--chatters", type=int, default=20)
    add("--interval", type=float, default=0.1, help="seconds between messages")
    add("--message-bytes", type=int, default=1024, help="size of each message")
    add("--churners", type=int, default=4, help="parallel churn loops")
    add("--churn-hold", type=float, default=0.05, help="most seconds held open")
    add("--churn-pause", type=float, default=0.01, help="seconds between churns")
    add("--warmup", type=float, default=5.0)
    add("--settle", type=float, default=6.0, help="seconds after churn stops")
    add("--rss-tolerance", type=float, default=0.10)
    add("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    if args.url:
        url, pid = args.url, args.pid
    else:
        port = free_port()
        log_path = args.out.with_suffix(".twistd.log")
        server = ServerProcess(port, log_path, args.server_arg)
        print("server:", " ".join(server.command), f"(pid {server.pid})", flush=True)
        server.wait_until_listening(port)
        url, pid = f"ws://127.0.0.1:{port}/", server.pid
    soak = Soak(args, url, pid)
    try:
        asyncio.run(soak.run())
        metrics = scrape_metrics(soak.host, soak.port)
    finally:
        if server is not None:
            code = server.stop()
            print(f"server stopped with exit status {code}")
    if server is not None:
        log_text: str | None = server.log()
    elif args.server_log is not None:
        log_text = args.server_log.read_text(errors="replace")
    else:
        log_text = None
    figures = results(soak, server, log_text, metrics)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print_summary(figures)
    print(f"written to {args.out}")
    return 0 if figures["rss_back_within_tolerance"] != "FAIL" else 1


if __name__ == "__main__":
    sys.exit(main())
