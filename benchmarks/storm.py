"""The reconnect storm (issue #14): every client comes back at once, behind.

N JSON clients (``--storm-clients``, 10,000) spread over R rooms
(``--storm-rooms``, 1,000) reconnect at the same moment, each with
``?since=<offset>&epoch=<epoch>`` from ``--storm-behind`` (50) messages ago,
as after a network blip: the server must send every one of them the messages
it missed (``"recovered":true``) while it accepts them all.  Measured: the
time from the first connect until the last client has its last missed
message, each client's time from its own connect, and the server's RSS
before and its peak (``VmHWM`` in ``/proc/PID/status``).

Before the storm each room is given its history by one plain-socket JSON
client (not measured): ``LEAD`` messages the storm's clients saw, then
``--storm-behind`` they missed.  It reads the room's epoch from its welcome
and the offsets from its acks, so the storm asks exactly what a page would.
The storm itself is the C load generator's: ``open resume N CONCURRENCY``
(its clock starts there), then ``catchup BEHIND``.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.burst import masked_text_frame
from benchmarks.scenarios import Bench, _foreign, _kib, _open_timeout, _usage_text

#: Messages each room had before the ones its clients missed: they resume
#: from the last of these, so ``since`` is not simply 0.
LEAD = 10
#: The rooms' paths: /ws/storm0 .. /ws/storm<R-1>.
ROOM_PREFIX = "/ws/storm"
#: Seconds one seeding client may take for its handshake or any answer.
SEED_TIMEOUT = 30.0


@dataclass
class ResumePoint:
    """Where a room's storm clients stood: the epoch and the offset they saw."""

    epoch: str
    since: int
    last: int


def process_hwm_kb(pid: int | None) -> int | None:
    """Peak resident set size of ``pid`` in KiB (``VmHWM``); None once it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- seeding: a minimal blocking JSON-events client ------------------------------


class SeedClient:
    """One JSON client on a blocking socket: enough to say things and read acks."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=SEED_TIMEOUT)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            b"GET %b HTTP/1.1\r\nHost: %b:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %b\r\n"
            b"Sec-WebSocket-Protocol: webchat.v1.json\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
            % (path.encode(), host.encode(), port, key)
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"storm seeding: handshake refused: {head[:60]!r}")

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("storm seeding: the server closed the connection")
        self.buffer += chunk

    def event(self) -> dict[str, Any]:
        """The next text frame, as JSON (pings are answered on the way)."""
        while True:
            while len(self.buffer) < 2:
                self._fill()
            opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            start = 2
            if length == 126:
                start, length = 4, None
            elif length == 127:
                start, length = 10, None
            while len(self.buffer) < start:
                self._fill()
            if length is None:
                length = int.from_bytes(self.buffer[2:start], "big")
            while len(self.buffer) < start + length:
                self._fill()
            payload = self.buffer[start : start + length]
            self.buffer = self.buffer[start + length :]
            if opcode == 1:
                return json.loads(payload)
            if opcode == 8:
                raise RuntimeError(f"storm seeding: closed by the server: {payload!r}")
            if opcode == 9:
                self.sock.sendall(bytes([0x8A, 0x80]) + os.urandom(4))

    def close(self) -> None:
        try:
            self.sock.sendall(bytes([0x88, 0x82]) + b"\0\0\0\0" + b"\x03\xe8")
        except OSError:
            pass
        self.sock.close()


def seed_room(host: str, port: int, room: int, count: int) -> ResumePoint:
    """Say ``count`` messages in room ``room``; its epoch and where LEAD ended."""
    client = SeedClient(host, port, f"{ROOM_PREFIX}{room}")
    try:
        welcome = client.event()
        if welcome.get("type") != "welcome" or "epoch" not in welcome:
            raise RuntimeError(f"storm seeding: no epoch in the welcome: {welcome}")
        frames = b"".join(
            masked_text_frame(
                json.dumps(
                    {"type": "message", "text": f"storm {room} {n}", "ref": n}
                ).encode()
            )
            for n in range(count)
        )
        client.sock.sendall(frames)
        offsets: dict[int, int] = {}
        while len(offsets) < count:
            event = client.event()
            if event.get("type") == "ack":
                offsets[event["ref"]] = event["offset"]
            elif event.get("type") == "error":
                raise RuntimeError(f"storm seeding: refused: {event}")
    finally:
        client.close()
    lead = min(LEAD, count)
    return ResumePoint(
        epoch=welcome["epoch"],
        since=offsets[lead - 1] if lead else welcome["offset"],
        last=offsets[count - 1] if count else welcome["offset"],
    )


# -- the storm -------------------------------------------------------------------


def run_storm(bench: Bench) -> dict[str, Any]:
    """Seed the rooms, then every client reconnects at once with ``since=``."""
    cfg = bench.config
    clients, behind = cfg.storm_clients, cfg.storm_behind
    rooms = max(1, min(cfg.storm_rooms, clients))
    label = f"webchat storm {clients:,} x {behind} behind"
    result: dict[str, Any] = {
        "target": "webchat",
        "clients": clients,
        "rooms": rooms,
        "behind": behind,
        "lead": LEAD,
        "concurrency": cfg.storm_concurrency,
    }
    with bench.server("webchat") as server:
        result["server"] = server.describe()
        started = time.monotonic()
        points = []
        for room in range(rooms):
            points.append(seed_room(server.ip, server.port, room, LEAD + behind))
            if room % 50 == 0:
                bench.progress.update(f"{label} | seeding room {room + 1:,}/{rooms:,}")
        result["seed_s"] = round(time.monotonic() - started, 2)
        bench.progress.done(
            f"{label} | {rooms:,} rooms seeded with {LEAD + behind} messages each"
            f" in {result['seed_s']:.1f} s"
        )
        with bench.loadgen(server, "storm") as generator:
            generator.codec("json")
            generator.rooms(rooms, ROOM_PREFIX)
            for room, point in enumerate(points):
                generator.query(room, f"?since={point.since}&epoch={point.epoch}")
            time.sleep(1.0)  # let the seeding's garbage go before reading RSS
            result["rss_before_kb"] = server.rss_kb()
            result["hwm_before_kb"] = process_hwm_kb(server.pid)
            meter = bench.meter(server, generator)

            def on_progress(p: dict[str, Any]) -> None:
                bench.progress.update(
                    f"{label} | {p['phase']} {p['elapsed_s']:.0f}s"
                    f" {p['opened']:,} open, {p['failed']:,} failed,"
                    f" {p['received']:,} replayed"
                    f" | {_usage_text(meter.read(), p['loadgen_cpu'])}"
                )

            # Generous: SYNs the accept queue dropped are retried after 1, 3,
            # 7, 15, 31 s; bounded all the same.
            timeout = max(_open_timeout(clients), clients / 50.0, 60.0)
            opened = generator.open(
                "resume", clients, cfg.storm_concurrency, timeout, on_progress
            )
            caught = generator.catchup(behind, timeout)
            usage = meter.read()
            result["hwm_after_kb"] = process_hwm_kb(server.pid)
            result["rss_after_kb"] = server.rss_kb()
            generator.reset()
    result.update(
        opened=opened["ok"],
        failed=opened["failed"],
        errors=opened["errors"],
        handshake_p50_ms=opened["handshake"]["p50_ms"],
        handshake_p99_ms=opened["handshake"]["p99_ms"],
        caught_up=caught["caught_up"],
        messages=caught["messages"],
        history_messages=caught["history"],
        extra_messages=caught["extra"],
        error_events=caught["errors"],
        recovered=caught["recovered"],
        all_caught_up_s=None
        if caught["all_caught_up_s"] < 0
        else caught["all_caught_up_s"],
        from_connect=caught["from_connect"],
        from_start=caught["from_start"],
        server_cpu=usage["process"],
        loadgen_cpu=caught["loadgen_cpu"],
        foreign_cpu=_foreign(usage),
        disturbed=any((v or 0) > 0.10 for v in _foreign(usage).values()),
    )
    rss, hwm = result["rss_before_kb"], result["hwm_after_kb"]
    result["peak_rise_kb"] = None if rss is None or hwm is None else hwm - rss
    done = result["all_caught_up_s"]
    bench.progress.done(
        f"{label}: {result['caught_up']:,}/{clients:,} caught up"
        + ("" if done is None else f" in {done:.2f} s")
        + f" (per client p50 {caught['from_connect']['p50_ms']:.0f}"
        f" p99 {caught['from_connect']['p99_ms']:.0f} ms),"
        f" recovered {caught['recovered']['true']:,},"
        f" server RSS {_kib(rss)} -> peak {_kib(hwm)}"
    )
    return result


def storm_lines(storm: dict[str, Any]) -> list[str]:
    """The storm's part of the printed report."""
    if "error" in storm and "caught_up" not in storm:
        return [f"storm: error: {storm['error']}"]
    done = storm.get("all_caught_up_s")
    per = storm.get("from_connect") or {}
    rec = storm.get("recovered") or {}
    lines = [
        f"storm: {storm['clients']:,} JSON clients in {storm['rooms']:,} rooms"
        f" reconnect at once ({storm['concurrency']:,} handshakes in flight),"
        f" each {storm['behind']} messages behind (?since=&epoch=):",
        f"  caught up {storm['caught_up']:,}/{storm['clients']:,}"
        + ("" if done is None else f", the last after {done:.2f} s")
        + f"; per client from its connect p50/p99/max"
        f" {per.get('p50_ms', -1):.0f}/{per.get('p99_ms', -1):.0f}"
        f"/{per.get('max_ms', -1):.0f} ms",
        f"  recovered true/false/absent {rec.get('true', 0):,}/{rec.get('false', 0):,}"
        f"/{rec.get('absent', 0):,}; {storm['messages']:,} messages replayed,"
        f" {storm['extra_messages']:,} more than owed",
        f"  server RSS before {_kib(storm.get('rss_before_kb'))},"
        f" peak (VmHWM) {_kib(storm.get('hwm_after_kb'))}"
        + ("  ~ disturbed by other processes" if storm.get("disturbed") else ""),
    ]
    return lines
