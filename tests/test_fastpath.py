"""
The small-frame fast path against Autobahn's parser: a differential fuzz.

``WebChatProtocol.dataReceived`` relays whole, small, masked text frames (and
pongs) itself and hands everything else to Autobahn.  It is the server's
front door, so it must change nothing anyone can see: for the same bytes in
the same reads, a server with the fast path and one without it must send the
same frames to the bystanders and to the sender, close with the same code
and reason, log the same lines and count the same counters.

Each case is a seeded byte stream (well-formed small frames mixed with
every kind of bad one: RSV bits, unmasked, bad opcodes, oversized, invalid
or truncated UTF-8, fragments with control frames and text inside, close
frames with data after them, garbage), cut into reads at random places
(whole, one byte at a time, or random sizes) with the clock moved between
some reads.  It is played into two in-memory servers (``webchat.testing``),
one of them with the fast path turned off on the sender's connection, under
one of a few sets of limits; then the bystanders chat, and the clock runs
past every deadline.  The first case whose outcomes differ fails the test,
with its seed, reads and both outcomes.
"""

from __future__ import annotations

import random
import re
import struct
import time
from itertools import accumulate, pairwise
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.support import LogCapture, slow
from webchat.connection import WebChatProtocol, _unmask
from webchat.limits import Limits
from webchat.testing import ChatPump, MemoryClient, client_frame

#: A welcome's epoch: the two servers' differ, and nothing else does.
_EPOCH = re.compile(rb'"epoch":"[A-Za-z0-9_-]+"')

#: How many byte streams are played (each into both servers).
CASES = 1000
#: The fuzz stops early after this many seconds (at least 100 cases must
#: have run), so a slow, shared machine gives a shorter run, not a timeout.
BUDGET_SECONDS = 25.0
SEED = 1313

#: How the clock runs after a case: past every deadline (the unfinished
#: message, the close timeout, a ping and its timeout), a turn at a time.
END_STEPS = (0.5, 1.0, 2.0, 5.0, 10.0, 10.0, 10.0, 10.0)

JSON_PROTOCOL = {"Sec_WebSocket_Protocol": "webchat.v1.json"}

#: The limits a case runs under: (name, limits, handshake headers).  Small
#: message sizes put the limit itself under 126 bytes, where the fast path
#: must step aside; low rates make the budgets trip inside a case.
CONFIGS: list[tuple[str, Limits, dict[str, str]]] = [
    ("defaults", Limits(), {}),
    (
        "tight",
        Limits(
            max_message_size=40,
            rate_limit=5,
            rate_burst=3,
            frame_rate_limit=4,
            max_message_frames=3,
            ping_interval=5,
            ping_timeout=2,
        ),
        {},
    ),
    (
        "byte-budget",
        Limits(max_message_size=100, rate_limit=1, rate_burst=1),
        {},
    ),
    (
        "frame-budget",
        Limits(max_message_size=125, rate_limit=50, rate_burst=50, frame_rate_limit=2),
        {},
    ),
    ("no-limits", Limits(max_message_size=0, rate_limit=0, frame_rate_limit=0), {}),
    ("json", Limits(max_message_size=300, rate_limit=3, rate_burst=4), JSON_PROTOCOL),
]


def _passthrough(data: bytes) -> bytes:
    """The fast path turned off: every byte goes to Autobahn's parser."""
    return data


def raw_frame(
    rng: random.Random,
    first: int,
    payload: bytes,
    masked: bool = True,
    length: int | None = None,
) -> bytes:
    """A frame with any first byte, mask or not, and any length encoding."""
    size = len(payload) if length is None else length
    bit = 0x80 if masked else 0
    if size < 126:
        head = bytes([first, bit | size])
    elif size < 1 << 16:
        head = bytes([first, bit | 126]) + struct.pack("!H", size)
    else:
        head = bytes([first, bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    key = rng.randbytes(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text_payload(rng: random.Random, size: int) -> bytes:
    """Mostly valid UTF-8 of about ``size`` bytes; sometimes not."""
    kind = rng.random()
    if kind < 0.5:
        return bytes(rng.randrange(0x20, 0x7F) for _ in range(size))
    if kind < 0.75:
        chars = "aé€😀\x00ÿ\u0800\ufffe\U0010ffff"
        text = "".join(rng.choice(chars) for _ in range(size))
        return text.encode("utf-8")[:size]  # may cut a character: invalid
    if kind < 0.9:
        bad = [b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff", b"\x80"]
        body = bytearray(rng.randbytes(size // 2).replace(b"\x00", b"a"))
        body[rng.randrange(len(body) + 1) : 0] = rng.choice(bad)
        return bytes(body)
    return rng.randbytes(size)


def one_frame(rng: random.Random, limit: int, bad: float) -> bytes | list[bytes]:
    """One frame, or a fragmented message's frames: good most often, then every bad."""
    size = rng.choice([0, 1, 2, 5, 20, 39, 40, 41, 99, 100, 101, 124, 125])
    if limit and rng.random() < 0.2:
        size = max(0, limit + rng.choice([-1, 0, 1]))
    if rng.random() >= bad:  # a frame a browser sends: good text, or a pong
        if rng.random() < 0.8:
            text = "".join(rng.choice("ab é€😀") for _ in range(size))
            return raw_frame(
                rng, 0x81, text.encode()[:size].decode(errors="ignore").encode()
            )
        return raw_frame(rng, 0x8A, rng.randbytes(min(size, 125)))
    pick = rng.random()
    if pick < 0.4:
        return raw_frame(rng, 0x81, text_payload(rng, size))
    if pick < 0.5:
        return raw_frame(rng, 0x8A, rng.randbytes(min(size, 125)))
    if pick < 0.55:
        return raw_frame(rng, 0x89, rng.randbytes(min(size, 125)))
    if pick < 0.6:  # a fragmented message, maybe with frames inside it
        parts = [raw_frame(rng, 0x01, text_payload(rng, rng.randrange(0, 30)))]
        for _ in range(rng.randrange(0, 5)):
            inner = rng.choice([0x00, 0x00, 0x8A, 0x89, 0x81, 0x01, 0x82, 0x88])
            parts.append(raw_frame(rng, inner, text_payload(rng, rng.randrange(0, 20))))
        parts.append(raw_frame(rng, 0x80, text_payload(rng, rng.randrange(0, 30))))
        return parts
    if pick < 0.65:  # a close, with or without a good code and reason
        body = rng.choice(
            [b"", b"\x03", b"\x03\xe8", b"\x03\xe8bye", b"\x03\xe9\xff", b"\x00\x01"]
        )
        return raw_frame(rng, 0x88, body)
    if pick < 0.7:  # RSV bits, or a reserved opcode
        first = rng.choice([0xC1, 0xA1, 0x91, 0xF1, 0xCA, 0x83, 0x87, 0x8B, 0x8F])
        return raw_frame(rng, first, text_payload(rng, size))
    if pick < 0.75:  # unmasked
        return raw_frame(
            rng, rng.choice([0x81, 0x8A, 0x01]), b"hi" * (size // 2), False
        )
    if pick < 0.8:  # longer: the extended length, and non-minimal encodings
        long = rng.choice([126, 127, 200, 300, 1000])
        if rng.random() < 0.3:
            return raw_frame(rng, 0x81, b"x" * 10, length=126)[:4] + b"\x00" * 14
        return raw_frame(rng, 0x81, text_payload(rng, long))
    if pick < 0.85:
        return raw_frame(rng, 0x82, rng.randbytes(size))
    if pick < 0.9:  # continuation, or a fin-less control frame, out of place
        return raw_frame(rng, rng.choice([0x80, 0x00, 0x0A, 0x09]), rng.randbytes(size))
    if pick < 0.93:
        return rng.randbytes(rng.randrange(1, 12))
    return raw_frame(rng, 0x81, b"ok")


def make_case(index: int) -> dict[str, Any]:
    """Case ``index``: its limits, the reads and the clock moves between them."""
    rng = random.Random(f"{SEED}-{index}")
    name, limits, _ = CONFIGS[index % len(CONFIGS)]
    count = rng.choice([1, 2, 3, 5, 8, 20, 40])
    bad = rng.choice([0.0, 0.05, 0.2, 1.0])  # the share of frames drawn from all
    frames: list[bytes] = []
    for _ in range(count):
        made = one_frame(rng, limits.max_message_size, bad)
        frames.extend([made] if isinstance(made, bytes) else made)
    stream = b"".join(frames)
    ends = list(accumulate(len(frame) for frame in frames))
    how = rng.random()
    if how < 0.15:  # all in one read
        cuts = [len(stream)]
    elif how < 0.3 and len(stream) < 400:  # a byte at a time
        cuts = list(range(1, len(stream) + 1))
    elif how < 0.55:  # a frame a read
        cuts = ends
    elif how < 0.8:  # a few whole frames a read
        cuts = sorted(
            {*rng.sample(ends, min(len(ends), rng.randrange(1, 6))), ends[-1]}
        )
    else:  # anywhere
        cuts = sorted({*rng.sample(range(1, len(stream) + 1), min(4, len(stream)))})
        if cuts[-1] != len(stream):
            cuts.append(len(stream))
    reads = [stream[a:b] for a, b in pairwise([0, *cuts])]
    waits = [rng.choice([0, 0, 0, 0.1, 0.6, 3.0]) for _ in reads]
    return {"config": name, "reads": reads, "waits": waits}


def answer_pings(pump: ChatPump, answered: dict[MemoryClient, int]) -> None:
    """Answer every ping the bystanders have had, as a browser does."""
    for client, done in answered.items():
        pings = sum(1 for opcode, _ in client.frames if opcode == 0x9)
        if pings > done and not client.lost:
            for _ in range(pings - done):
                client.send_frame(0xA, b"")
            answered[client] = pings
    pump.pump()


def play(case: dict[str, Any], fast: bool) -> dict[str, Any]:
    """Play ``case`` into a fresh server; return everything anyone could see."""
    _, limits, headers = next(c for c in CONFIGS if c[0] == case["config"])
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    try:
        pump = ChatPump(clock=Clock(), limits=limits)
        pump.clock.advance(1000.0)
        one = pump.connect("/", **headers)
        two = pump.connect("/", **headers)
        attacker = pump.connect("/", **headers)
        # Its answer to a close would carry a random mask (``client_frame``),
        # and when that answer lands inside an unfinished frame the random
        # bytes decide what follows: the cases send their own closes.
        attacker.answer_close = False
        pongs = {one: 0, two: 0}
        (server,) = (
            c
            for c in pump.factory.connections
            if c.chat_id == max(p.chat_id for p in pump.factory.connections)
        )
        if not fast:
            server._whole_small_messages = _passthrough
        # Each read is one dataReceived: pump the sender's connection until it
        # is quiet (the bystanders' turn comes with the clock, or at the end).
        own = pump._pumps[-1]
        for data, wait in zip(case["reads"], case["waits"], strict=True):
            attacker.transport.write(data)
            for _ in range(100):
                if not own.pump():
                    break
            if wait:
                pump.clock.advance(wait)
                pump.pump()
                answer_pings(pump, pongs)
        if headers:
            one.send_text('{"type": "message", "text": "still here"}')
            two.send_text('{"type": "message", "text": "me too"}')
        else:
            one.send_text("still here")
            two.send_text("me too")
        pump.pump()
        # Whatever the sender did, the bystanders still chat.
        assert any(b"still here" in payload for _, payload in two.frames), two.frames
        assert any(b"me too" in payload for _, payload in one.frames), one.frames
        for step in END_STEPS:
            pump.clock.advance(step)
            pump.pump()
        stats = pump.factory.stats
        return {
            "attacker": _one_epoch(attacker.frames),
            "attacker_lost": attacker.lost,
            "bystanders": [
                _one_epoch(one.frames),
                _one_epoch(two.frames),
                one.lost,
                two.lost,
            ],
            "drop_reason": server.drop_reason,
            "stats": [
                stats.opened,
                dict(stats.closed),
                dict(stats.dropped),
                dict(stats.bad_events),
                stats.messages_received,
                stats.deliveries,
                stats.bytes_received,
                stats.bytes_sent,
            ],
            "logs": capture.lines,
        }
    finally:
        globalLogPublisher.removeObserver(capture)


def _one_epoch(frames: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """
    ``frames`` with the room's epoch (random for each server's memory
    history, and of one length) written the same for both servers.
    """
    return [(opcode, _EPOCH.sub(b'"epoch":"E"', payload)) for opcode, payload in frames]


def differences(slow: dict[str, Any], fast: dict[str, Any]) -> str:
    return "\n".join(
        f"  {key}:\n    autobahn:  {slow[key]!r}\n    fast path: {fast[key]!r}"
        for key in slow
        if slow[key] != fast[key]
    )


class FastPathDifferentialTests(SynchronousTestCase):
    @slow  # ~25 s: a fuzz budget, not for `make test-fast`
    def test_same_as_autobahn(self) -> None:
        """
        Every case ends the same with the fast path as without it: the same
        frames to everyone, the same close, log lines and counters.
        """
        started = time.monotonic()
        played = 0
        for index in range(CASES):
            if time.monotonic() - started > BUDGET_SECONDS:
                break
            case = make_case(index)
            slow = play(case, fast=False)
            fast = play(case, fast=True)
            if slow != fast:
                self.fail(
                    f"case {index} ({case['config']}) differs; reads:\n"
                    f"  {[r.hex() for r in case['reads']]}\n"
                    f"  waits {case['waits']}\n{differences(slow, fast)}"
                )
            played += 1
        self.assertGreater(played, 100, "too few cases in the time budget")

    def test_unmask_every_length(self) -> None:
        """``_unmask`` is the byte-wise XOR with the repeated key, 0..125 bytes."""
        rng = random.Random(SEED)
        for size in range(126):
            for _ in range(3):
                payload = rng.randbytes(size)
                key = rng.randbytes(4)
                expected = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
                self.assertEqual(_unmask(payload, key), expected, size)


class FastPathTakenTests(SynchronousTestCase):
    def test_fast_path_is_taken(self) -> None:
        """The differential test compares two different paths, not one twice."""
        pump = ChatPump(clock=Clock(), limits=Limits())
        one = pump.connect("/")
        attacker = pump.connect("/")
        calls: list[bytes] = []
        (server,) = (c for c in pump.factory.connections if c.chat_id == 2)
        self.assertIsInstance(server, WebChatProtocol)
        server._dataReceived = calls.append
        attacker.transport.write(client_frame(0x1, b"hello"))
        pump.pump()
        self.assertEqual(calls, [])
        self.assertEqual(one.texts, ["id 2: hello"])
