"""
Fuzzing the wire: Hypothesis-made frames and HTTP garbage against a real server.

How Hypothesis meets trial
--------------------------
Hypothesis wants to call a *synchronous* test function once per example;
trial (and pytest-twisted) want a test that returns a Deferred and lets the
reactor run.  The two are joined in two steps:

1. ``collect_examples`` runs a throwaway ``@given`` function whose only job is
   to append each drawn example to a list.  It runs with ``derandomize=True``
   (the seed comes from the function, so every run draws the same list),
   ``database=None`` and only the *generate* phase: no example database, no
   shrinking, nothing carried between runs.
2. The one ``@inlineCallbacks`` test then replays that list against a real
   in-process server over real sockets, one fresh connection per example.

This is sound because every example is plain data (bytes to send) that does
not depend on anything the server answers: drawing all of them before the
first one is sent gives the same inputs as drawing each just in time, and
each example runs on its own connection, so one cannot change what another
means.  What is given up is shrinking: a failure is reported with the
example's place in its list (``frames[17]``) and a shortened ``repr``
instead, and because the draw is derandomized,
``collect_examples(frame_examples, FRAME_EXAMPLES)[17]`` is that same example
on every run (with this Hypothesis version) until it is fixed.

A fuzzed connection ends the way a conforming client ends it: once the server
had a moment to close first, the client sends its own close (a reply, if the
server did close).  Sending it at once, in the same write as a bad frame, hits
a known bug (``KnownServerBugs``) on every such example instead of finding
new ones.

What is checked, for every example
-----------------------------------
* Frames after a good handshake (``FrameExample``): the server answers with
  well-formed server frames only (FIN set, no RSV, unmasked), a pong for each
  ping, exactly one close frame, last, with the close code a small reference
  model of RFC 6455 and the chat's rules predicts (``expected_outcome``).
  The chat's two bystanders receive exactly the text messages the model
  says were complete and valid before the first violation.
* Bytes instead of an HTTP request (``RawExample``): nothing, or an HTTP
  response that is never 5xx; a ``101`` only where the request was a valid
  upgrade, followed by valid server frames.
* Always: no traceback, no failure and no unexpected error in the log; the
  bystanders still chat (checked every few examples); at the end the
  server's memory grew less than ``RSS_BOUND`` over a warmed-up baseline and
  only the bystanders are still connected.
"""

from __future__ import annotations

import codecs
import gc
import os
import re
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from typing import Any, NamedTuple

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from benchmarks.helpers import process_rss_kb
from tests.support import HANDSHAKE, ServerMixin, connect_raw, deferLater, slow
from webchat.limits import Limits

#: A small message-size limit, so examples near it are cheap to send.
LIMIT = 1024
#: How many examples of each kind are drawn (fewer run if the budget is spent).
FRAME_EXAMPLES = 200
RAW_EXAMPLES = 100
#: The first examples of each kind warm the server up before RSS is measured.
WARMUP_FRAMES = 20
WARMUP_RAW = 10
#: Wall-clock seconds the replay may take (the draw comes on top).
BUDGET = 20.0
#: How much the server's process may grow over the fuzz run.
RSS_BOUND = 20 * 1024 * 1024
#: Talk to the bystanders after every this many examples.
CHECK_EVERY = 10
#: Seconds a fuzzed connection waits for the server's close before sending
#: its own; and the longer wait before an example is judged a failure.
QUIET = 0.02
SLOW_PATIENCE = 0.5
#: Close codes the server may end a fuzzed connection with.
ALLOWED_CLOSE_CODES = frozenset({1000, 1002, 1003, 1007, 1008, 1009})

_RESERVED_OPCODES = (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
_CLOSE_CODES = (
    *(0, 1, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009),
    *(1010, 1011, 1012, 1013, 1014, 1015, 1016, 2000, 2999, 3000, 3999),
    *(4000, 4999, 5000, 65535),
)
#: Close codes a client may send (RFC 6455 7.4.1) ...
_VALID_CLIENT_CLOSE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011})
#: ... and those registered with IANA since, which servers may or may not know.
_NEWER_CLOSE = frozenset({1012, 1013, 1014})
_BAD_UTF8 = (
    b"\xff",
    b"\xfe\xff",
    b"\x80",
    b"\xc0\xaf",  # overlong "/"
    b"\xe0\x80\xaf",  # overlong, three bytes
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf8\x88\x80\x80\x80",
    b"\xe2\x82",  # cut short (invalid only at the end of a message)
    b"\xf0\x9f\x98",
)


# -- what is sent ------------------------------------------------------------------


class Frame(NamedTuple):
    """One client frame, described rather than encoded, so it can be modelled."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    key: bytes = b"\x37\xfa\x21\x3d"
    #: The payload length the header claims, when it claims more than is sent.
    declared: int | None = None
    #: Encode the length in more bytes than needed (RFC 6455 forbids it).
    wide: bool = False

    @property
    def length(self) -> int:
        return len(self.payload) if self.declared is None else self.declared

    def encode(self) -> bytes:
        head = bytes([(0x80 if self.fin else 0) | (self.rsv << 4) | self.opcode])
        mask_bit = 0x80 if self.masked else 0
        length = self.length
        if length < 126 and not self.wide:
            head += bytes([mask_bit | length])
        elif length < 1 << 16 and not (self.wide and length >= 126):
            head += bytes([mask_bit | 126]) + struct.pack("!H", length)
        else:
            head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
        if not self.masked:
            return head + self.payload
        key = self.key
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(self.payload))


#: How every frame example ends: the client's own close (or its reply to the server's).
CLIENT_CLOSE = Frame(0x8, struct.pack("!H", 1000) + b"bye")


def _browser_handshake(*lines: bytes) -> bytes:
    return b"\r\n".join([b"GET / HTTP/1.1", *lines]) + b"\r\n\r\n"


#: Opening handshakes as browsers send them: more headers, other spellings,
#: and an offer of permessage-deflate, which this server must decline.
BROWSER_HANDSHAKES = (
    _browser_handshake(
        b"Host: 127.0.0.1",
        b"Connection: Upgrade",
        b"Pragma: no-cache",
        b"Cache-Control: no-cache",
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0 Safari/537.36",
        b"Upgrade: websocket",
        b"Origin: http://127.0.0.1",
        b"Sec-WebSocket-Version: 13",
        b"Accept-Encoding: gzip, deflate, br, zstd",
        b"Accept-Language: en-GB,en;q=0.9",
        b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==",
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
    ),
    _browser_handshake(
        b"Host: 127.0.0.1",
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Firefox/133.0",
        b"Accept: */*",
        b"Sec-WebSocket-Version: 13",
        b"Origin: http://127.0.0.1",
        b"Sec-WebSocket-Extensions: permessage-deflate",
        b"Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEC==",
        b"Connection: keep-alive, Upgrade",
        b"Sec-Fetch-Mode: websocket",
        b"Pragma: no-cache",
        b"Upgrade: websocket",
    ),
)
#: The handshakes a frame example may open with.
HANDSHAKES = (HANDSHAKE, *BROWSER_HANDSHAKES)


class FrameExample(NamedTuple):
    """Frames sent after a good handshake, then ``CLIENT_CLOSE``."""

    #: Which of ``HANDSHAKES`` opens the connection.
    handshake: int
    frames: tuple[Frame, ...]
    #: A last frame whose header promises more bytes than ever come (and
    #: more than the limit), so the server must decide on the header alone.
    tail: Frame | None
    #: Offsets where the byte stream is split into separate writes.
    cuts: tuple[int, ...]

    def stream(self) -> bytes:
        """Everything but the client's close, which comes once the server spoke."""
        frames = [*self.frames] if self.tail is None else [*self.frames, self.tail]
        return b"".join(f.encode() for f in frames)


class RawExample(NamedTuple):
    """Bytes sent instead of an HTTP request, and what the answer must be."""

    blob: bytes
    #: "upgrade": must get 101; "no-upgrade": must not; "any": either.
    oracle: str
    why: str


# -- strategies --------------------------------------------------------------------


def _one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws (a bare integer draw leans on its ends)."""
    return st.integers(0, 4 * n - 1).map(lambda k: k % n == n // 2)


_keys = st.binary(min_size=4, max_size=4) | st.just(b"\x00\x00\x00\x00")
_utf8 = st.text(max_size=40).map(str.encode)
_invalid_utf8 = st.builds(
    lambda a, bad, b: a + bad + b, _utf8, st.sampled_from(_BAD_UTF8), _utf8
)
#: Whole valid text messages, up to exactly the limit.
_texts = st.one_of(
    _utf8, _utf8, st.integers(LIMIT - 24, LIMIT).map(lambda n: "é".encode() * (n // 2))
)


def _near_limit(size: int, unit: str) -> bytes:
    data = (unit * (size // len(unit.encode()) + 1)).encode()
    return data[:size]  # may cut a multi-byte character: invalid at the end


_near_limit_payloads = st.builds(
    _near_limit, st.integers(LIMIT - 24, LIMIT + 24), st.sampled_from("a€😀")
)
_data_payloads = st.one_of(
    _utf8, _utf8, _invalid_utf8, st.binary(max_size=64), _near_limit_payloads
)
_close_payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=3),
    st.builds(
        lambda code, reason: struct.pack("!H", code) + reason,
        st.sampled_from(_CLOSE_CODES),
        st.one_of(_utf8, _invalid_utf8).map(lambda r: r[:100]),
    ),
)


def _frames(**fields: st.SearchStrategy) -> st.SearchStrategy[Frame]:
    """Frames with the given fields drawn and every other field at its default."""
    defaults = {name: st.just(value) for name, value in Frame._field_defaults.items()}
    return st.builds(Frame, **{**defaults, **fields})


def _fragments(payload: bytes, cuts: list[int], key: bytes) -> list[Frame]:
    """One text message in fragments (cuts may fall inside a character)."""
    bounds = [0, *sorted(c % (len(payload) + 1) for c in cuts), len(payload)]
    pieces = [payload[a:b] for a, b in pairwise(bounds)]
    return [
        Frame(0x1 if i == 0 else 0x0, piece, fin=i == len(pieces) - 1, key=key)
        for i, piece in enumerate(pieces)
    ]


@st.composite
def _valid_frames(draw: Any) -> list[Frame]:
    """A conforming client's frames: text messages, whole or in parts; pings; pongs."""
    frames: list[Frame] = []
    for _ in range(draw(st.integers(0, 4))):
        key = draw(_keys)
        kind = draw(st.sampled_from(("text", "fragmented", "ping", "pong")))
        if kind == "text":
            frames.append(Frame(0x1, draw(_texts), key=key))
        elif kind == "fragmented":
            cuts = draw(st.lists(st.integers(0, 2000), min_size=1, max_size=3))
            for frame in _fragments(draw(_texts), cuts, key):
                frames.append(frame)
                if draw(_one_in(4)):  # control frames may come between fragments
                    frames.append(Frame(0x9, draw(st.binary(max_size=8)), key=key))
        else:
            opcode = 0x9 if kind == "ping" else 0xA
            frames.append(Frame(opcode, draw(st.binary(max_size=125)), key=key))
    return frames


_plain_frames = _frames(
    opcode=st.sampled_from((0x1, 0x2, 0x8, 0x9, 0xA)), payload=_utf8, key=_keys
)
_control_opcodes = st.sampled_from((0x8, 0x9, 0xA))
#: One thing a client does wrong (or, last, does unusually), as a few frames.
_faults = st.one_of(
    st.builds(lambda f, rsv: [f._replace(rsv=rsv)], _plain_frames, st.integers(1, 7)),
    _plain_frames.map(lambda f: [f._replace(masked=False)]),
    _plain_frames.map(lambda f: [f._replace(wide=True)]),
    _frames(
        opcode=st.sampled_from(_RESERVED_OPCODES),
        payload=st.binary(max_size=32),
        fin=st.booleans(),
        key=_keys,
    ).map(lambda f: [f]),
    _frames(opcode=_control_opcodes, payload=st.binary(min_size=126, max_size=200)).map(
        lambda f: [f]
    ),
    _frames(opcode=_control_opcodes, fin=st.just(False), key=_keys).map(lambda f: [f]),
    _frames(opcode=st.just(0x8), payload=_close_payloads, key=_keys).map(lambda f: [f]),
    _frames(opcode=st.just(0x8), payload=_close_payloads, key=_keys).map(lambda f: [f]),
    _frames(opcode=st.just(0x2), payload=st.binary(max_size=64), key=_keys).map(
        lambda f: [f]
    ),
    *[
        _frames(opcode=st.just(0x1), payload=_invalid_utf8, key=_keys).map(
            lambda f: [f]
        ),
        st.builds(
            _fragments, _invalid_utf8, st.lists(st.integers(0, 200), max_size=2), _keys
        ),
    ]
    * 2,
    _frames(opcode=st.sampled_from((0x1, 0x2)), payload=_near_limit_payloads).map(
        lambda f: [f]
    ),
    st.builds(
        lambda a, b: [Frame(0x1, b"a" * a, fin=False), Frame(0x0, b"b" * b)],
        st.integers(LIMIT // 2, LIMIT),
        st.integers(0, LIMIT // 2),
    ),
    _frames(opcode=st.just(0x0), payload=_utf8, fin=st.booleans()).map(lambda f: [f]),
    st.builds(
        lambda a, op, b: [Frame(0x1, a, fin=False), Frame(op, b)],
        _utf8,
        st.sampled_from((0x1, 0x2)),
        _utf8,
    ),
    _utf8.map(lambda a: [Frame(0x1, a, fin=False)]),  # cut short by the close
)
_wild_frames = _frames(
    opcode=st.integers(0, 15),
    payload=st.one_of(st.binary(max_size=40), _data_payloads),
    fin=st.booleans(),
    rsv=st.integers(0, 7),
    masked=st.booleans(),
    key=_keys,
    wide=st.booleans(),
)
_lying_tails = _frames(
    opcode=st.sampled_from((0x0, 0x1, 0x2, 0x9)),
    payload=st.binary(max_size=16),
    declared=st.one_of(
        st.integers(LIMIT + 1, (1 << 16) - 1),
        st.integers(1 << 16, (1 << 63) - 1),
        st.integers(1 << 63, (1 << 64) - 1),  # the top bit must be 0
    ),
    key=_keys,
)

frame_examples = st.builds(
    FrameExample,
    handshake=st.sampled_from((0, 0, 1, 2)),
    frames=st.one_of(
        # A good client; one that goes wrong once; one that never goes right.
        _valid_frames(),
        *[
            st.builds(
                lambda a, fault, b: [*a, *fault, *b],
                _valid_frames(),
                _faults,
                _valid_frames(),
            )
        ]
        * 3,
        st.lists(_wild_frames, min_size=1, max_size=6),
    ).map(tuple),
    # One example in eight ends in a header that promises too much.
    tail=st.tuples(_one_in(8), _lying_tails).map(lambda t: t[1] if t[0] else None),
    cuts=st.lists(st.integers(1, 3000), max_size=3).map(lambda c: tuple(sorted(c))),
)

_HEADERS = (
    (b"Host", b"127.0.0.1"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"Sec-WebSocket-Version", b"13"),
)
#: Values that break a required header for sure.
_BROKEN_VALUES = {
    b"Upgrade": (b"", b"h2c", b"websocket2"),
    b"Connection": (b"", b"close", b"keep-alive"),
    b"Sec-WebSocket-Key": (b"", b"short", b"dGhlIHNhbXBsZSBub25jZQ"),
    b"Sec-WebSocket-Version": (b"", b"8", b"12", b"14", b"abc"),
}


@st.composite
def _handshakes(draw: Any) -> RawExample:
    """A WebSocket handshake with headers dropped, broken, or added."""
    keep = draw(st.lists(_one_in(6).map(lambda drop: not drop), min_size=5, max_size=5))
    path = draw(
        st.sampled_from(
            (b"/", b"/ws", b"/ws/x", b"/?room=1", b"/nope", b"/ws/x/y", b"/ws/a%20b")
        )
    )
    lines = [b"GET " + path + b" HTTP/1.1"]
    dropped: list[str] = []
    broken: list[str] = []
    for (name, value), kept in zip(_HEADERS, keep, strict=True):
        if not kept:
            dropped.append(name.decode())
            continue
        if name in _BROKEN_VALUES and draw(_one_in(8)):
            value = draw(st.sampled_from(_BROKEN_VALUES[name]))
            broken.append(f"{name.decode()}: {value!r}")
        lines.append(name + b": " + value)
    extra = draw(
        st.lists(
            st.sampled_from(
                (
                    b"Origin: http://evil.example",
                    b"Origin: http://127.0.0.1",
                    b"Sec-WebSocket-Protocol: chat",
                    b"Sec-WebSocket-Extensions: permessage-deflate",
                    b"X-Forwarded-For: 10.0.0.1",
                    b"Content-Length: 5",
                    b"Transfer-Encoding: chunked",
                )
            ),
            max_size=2,
            unique=True,
        )
    )
    lines += extra
    blob = b"\r\n".join(lines) + b"\r\n\r\n"
    # Required headers, by RFC 6455 4.2.1 (Host by HTTP/1.1).
    # /ws/<room> is a room (issue #13); a path that is no room name is not.
    if dropped or broken or path in (b"/nope", b"/ws/x/y", b"/ws/a%20b"):
        oracle = "no-upgrade"
    elif b"Origin: http://evil.example" in extra:
        oracle = "no-upgrade"
    elif any(h.startswith((b"Content-Length", b"Transfer-Encoding")) for h in extra):
        oracle = "any"  # a body on a GET: servers may differ
    else:
        oracle = "upgrade"
    why = f"handshake on {path!r} dropping {dropped} breaking {broken} adding {extra}"
    return RawExample(blob, oracle, why)


_methods = st.sampled_from((b"GET", b"POST", b"HEAD", b"PUT", b"G ET", b"", b"\x00"))
_targets = st.sampled_from((b"/", b"/ws", b"*", b"", b"//", b"/ws/x", b"/%00", b"x"))
_versions = st.sampled_from(
    (b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1", b"http/1.1", b"", b"HTTP/1.1 x")
)


@st.composite
def _request_lines(draw: Any) -> RawExample:
    """A malformed (or odd) request line, with or without headers after it."""
    parts = [draw(_methods), draw(_targets), draw(_versions)]
    if draw(st.booleans()):
        parts.append(draw(st.binary(max_size=20)))
    line = b" ".join(parts)
    ending = draw(st.sampled_from((b"\r\n\r\n", b"\n\n", b"\r\n", b"\r\r", b"")))
    headers = draw(
        st.sampled_from((b"", b"Host: x\r\n", b": empty-name\r\n", b"NoColon\r\n"))
    )
    if headers and ending.startswith(b"\r\n"):
        blob = line + b"\r\n" + headers + b"\r\n"
    else:
        blob = line + ending
    return RawExample(blob, "any", "request line")


@st.composite
def _bloated(draw: Any) -> RawExample:
    """A handshake with a header line or a header count past Twisted's limits."""
    if draw(st.booleans()):
        size = draw(st.integers(16_000, 17_000))
        extra = b"X-Big: " + b"a" * size + b"\r\n"
    else:
        count = draw(st.integers(480, 520))
        extra = b"".join(b"X-H%d: v\r\n" % n for n in range(count))
    return RawExample(HANDSHAKE[:-2] + extra + b"\r\n", "any", "bloated headers")


raw_examples = st.one_of(
    st.binary(max_size=300).map(lambda b: RawExample(b, "any", "random bytes")),
    st.builds(
        lambda cut: RawExample(HANDSHAKE[:cut], "no-upgrade", f"truncated at {cut}"),
        st.integers(0, len(HANDSHAKE) - 1),
    ),
    _handshakes(),
    _handshakes(),
    _request_lines(),
    _bloated(),
    st.binary(min_size=1, max_size=60).map(
        lambda b: RawExample(HANDSHAKE + b, "upgrade", "handshake, then raw bytes")
    ),
    st.sampled_from(BROWSER_HANDSHAKES).map(
        lambda b: RawExample(b, "upgrade", "a browser's handshake")
    ),
)


def collect_examples(strategy: st.SearchStrategy, count: int) -> list:
    """Draw ``count`` examples from ``strategy``, the same ones on every run."""
    found: list = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def record(example: Any) -> None:
        found.append(example)

    record()
    return found


# -- what a conforming server answers ------------------------------------------------


class Outcome(NamedTuple):
    #: The close codes the server may answer with.
    codes: frozenset[int]
    #: Text messages that must be relayed to the others, in order.
    relayed: tuple[str, ...]
    #: Whether more may be relayed after those (after an application close).
    more_allowed: bool
    #: Payloads of pings the server must answer, in order ...
    pongs: tuple[bytes, ...]
    #: ... and of later pings it may answer.
    later_pings: tuple[bytes, ...]


def expected_outcome(example: FrameExample) -> Outcome:
    """
    What RFC 6455 and the chat's rules say the server does with these frames.

    The model stops at the first frame that decides how the connection ends
    (a violation, a binary message, a close frame); only the pings after it
    are still looked at, since a server may answer or ignore those.
    """
    frames = [*example.frames]
    if example.tail is not None:
        frames.append(example.tail)
    frames.append(CLIENT_CLOSE)
    relayed: list[str] = []
    pongs: list[bytes] = []
    inside: int | None = None  # opcode of the message being received
    total = 0
    parts: list[bytes] = []
    decoder = codecs.getincrementaldecoder("utf-8")()

    def decided(codes: Iterable[int], more: bool, at: int) -> Outcome:
        """The outcome, once frame ``at`` decided how the connection ends."""
        later = tuple(f.payload for f in frames[at + 1 :] if f.opcode == 0x9)
        return Outcome(frozenset(codes), tuple(relayed), more, tuple(pongs), later)

    for index, frame in enumerate(frames):
        length = frame.length
        control = frame.opcode >= 8
        # Header checks: RFC 6455 5.2 and 5.5 (all "protocol error").
        header_errors = (
            frame.rsv != 0
            or not frame.masked
            or frame.opcode in _RESERVED_OPCODES
            or (control and (not frame.fin or length > 125))
            or (frame.opcode == 0x8 and length == 1)
            or (frame.opcode == 0x0 and inside is None)
            or (frame.opcode in (0x1, 0x2) and inside is not None)
            or (frame.wide and length < 1 << 16)
            or length >= 1 << 63
        )
        codes = {1002} if header_errors else set()
        so_far = total if inside is not None else 0
        if not control and (length > LIMIT or so_far + length > LIMIT):
            codes.add(1009)  # which of two violations is named first is open
        if codes:
            return decided(codes, False, index)
        if frame.declared is not None:
            raise AssertionError(
                f"the strategy made a lying frame that passes: {frame}"
            )
        if frame.opcode == 0x9:
            pongs.append(frame.payload)
            continue
        if frame.opcode == 0xA:
            continue
        if frame.opcode == 0x8:
            payload = frame.payload
            if payload:
                (code,) = struct.unpack("!H", payload[:2])
                if code in _NEWER_CLOSE:
                    return decided({1000, 1002}, False, index)
                if not (code in _VALID_CLIENT_CLOSE or 3000 <= code <= 4999):
                    return decided({1002}, False, index)
                try:
                    payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    return decided({1007}, False, index)
            # A close answered with 1000: this server never echoes codes.
            return decided({1000}, False, index)
        if inside is None:
            inside = frame.opcode
            total = 0
            parts = []
            decoder.reset()
        total += length
        parts.append(frame.payload)
        if inside == 0x1:
            try:
                decoder.decode(frame.payload, final=frame.fin)
            except UnicodeDecodeError:
                return decided({1007}, False, index)
        if frame.fin:
            if inside == 0x2:
                # An application close, not a failure: messages already on
                # their way after it may or may not be relayed.
                return decided({1003}, True, index)
            relayed.append(b"".join(parts).decode("utf-8"))
            inside = None
    raise AssertionError("the model never reached the closing frame")


# -- what the server said --------------------------------------------------------------


class ServerFrame(NamedTuple):
    fin: bool
    rsv: int
    masked: bool
    opcode: int
    payload: bytes


def parse_frames_strictly(data: bytes) -> tuple[list[ServerFrame], bytes]:
    """Split server frames, keeping the bits the support parser ignores."""
    frames = []
    while len(data) >= 2:
        masked = bool(data[1] & 0x80)
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
        key = b""
        if masked:
            key = data[offset : offset + 4]
            offset += 4
        if len(data) < offset + length:
            break
        payload = data[offset : offset + length]
        if masked:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        frames.append(
            ServerFrame(
                bool(data[0] & 0x80),
                (data[0] >> 4) & 7,
                masked,
                data[0] & 0x0F,
                payload,
            )
        )
        data = data[offset + length :]
    return frames, data


def frame_problems(frames: list[ServerFrame], rest: bytes) -> list[str]:
    """What is wrong with a server's frames, as RFC 6455 and the chat see it."""
    problems = []
    if rest:
        problems.append(f"{len(rest)} trailing byte(s) after the last frame")
    for frame in frames:
        if not frame.fin or frame.rsv or frame.masked:
            problems.append(f"malformed server frame {frame}")
        if frame.opcode not in (0x8, 0xA):
            problems.append(f"unexpected opcode {frame.opcode:#x}: {frame}")
    closes = [i for i, f in enumerate(frames) if f.opcode == 0x8]
    if len(closes) > 1:
        problems.append(f"{len(closes)} close frames")
    if closes and closes[0] != len(frames) - 1:
        problems.append("frames after the close frame")
    if closes:
        payload = frames[closes[0]].payload
        if len(payload) < 2 or len(payload) > 125:
            problems.append(f"close payload of {len(payload)} bytes")
        else:
            (code,) = struct.unpack("!H", payload[:2])
            if code not in ALLOWED_CLOSE_CODES:
                problems.append(f"close code {code} is not one of the allowed")
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"close reason is not UTF-8: {payload!r}")
    return problems


def close_code(frames: list[ServerFrame]) -> int | None:
    for frame in frames:
        if frame.opcode == 0x8 and len(frame.payload) >= 2:
            return struct.unpack("!H", frame.payload[:2])[0]
    return None


def split_response(data: bytes) -> tuple[int | None, bytes]:
    """The status of an HTTP response and what followed its headers."""
    match = re.match(rb"HTTP/1\.[01] (\d{3})[ \r]", data)
    if match is None:
        return None, b""
    _, _, body = data.partition(b"\r\n\r\n")
    return int(match.group(1)), body


def shorten(value: object, keep: int = 48) -> str:
    """``repr`` with long bytes and strings cut short, for readable failures."""
    if isinstance(value, bytes | str) and len(value) > keep:
        return f"{value[:keep]!r}...({len(value)} long)"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        fields = ", ".join(
            f"{name}={shorten(getattr(value, name), keep)}" for name in value._fields
        )
        return f"{type(value).__name__}({fields})"
    if isinstance(value, list | tuple):
        inner = ", ".join(shorten(item, keep) for item in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return repr(value)


def rss_bytes() -> int:
    """This process's resident set size (the server runs in this process)."""
    kib = process_rss_kb(os.getpid())
    if kib is None:
        raise RuntimeError("no VmRSS in /proc/self/status")
    return kib * 1024


def within(d: Deferred, seconds: float) -> Deferred[bool]:
    """True once ``d`` fires, False if ``seconds`` pass first; ``d`` is left alone."""
    result: Deferred[bool] = Deferred()

    def expire() -> None:
        if not result.called:
            result.callback(False)

    timer = reactor.callLater(seconds, expire)

    def fired(value: object) -> object:
        if not result.called:
            timer.cancel()
            result.callback(True)
        return value

    d.addBoth(fired)
    return result


class TroubleLog:
    """
    Every log event, any namespace, that means something went wrong.

    ``LogCapture`` keeps only webchat's own lines; a traceback from Autobahn
    or Twisted would pass it by.  Webchat's "An error has occurred" lines for
    connections it closed on purpose are the only errors allowed.
    """

    _EXPECTED = re.compile(
        r"An error has occurred: connection \d+ from [\d.]+: "
        r"(1002|1003|1007|1008|1009) "
    )

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        level = event.get("log_level")
        text = formatEvent(event)
        if failure is not None:
            self.lines.append(f"{text}\n{failure.getTraceback()}")
        elif level in (LogLevel.error, LogLevel.critical) or "Traceback" in text:
            if not self._EXPECTED.match(text):
                self.lines.append(text)


# -- the test --------------------------------------------------------------------------


@slow  # one server, but thousands of examples: ten seconds
class FuzzTests(ServerMixin, TestCase):
    timeout = 120

    def setUp(self):
        self.trouble = TroubleLog()
        globalLogPublisher.addObserver(self.trouble)
        self.addCleanup(globalLogPublisher.removeObserver, self.trouble)
        return self.start_server(limits=Limits(max_message_size=LIMIT))

    @inlineCallbacks
    def test_fuzzed_frames_and_requests(self):
        frames = collect_examples(frame_examples, FRAME_EXAMPLES)
        raws = collect_examples(raw_examples, RAW_EXAMPLES)
        self.assertGreaterEqual(len(frames), FRAME_EXAMPLES // 2)
        self.assertGreaterEqual(len(raws), RAW_EXAMPLES // 2)
        self.bystanders = yield self.connect_many(2)
        self.expected_relays: dict[int, Outcome] = {}
        self.failures: list[str] = []
        #: What the examples ended in, for WEBCHAT_FUZZ_REPORT=1.
        self.seen: Counter[str] = Counter()

        # Labels name each example by its place in its list, which is all it
        # takes to draw it again: collect_examples(frame_examples, ...)[i].
        labelled_frames = [(f"frames[{i}]", e) for i, e in enumerate(frames)]
        labelled_raws = [(f"raws[{i}]", e) for i, e in enumerate(raws)]
        warmup = [*labelled_frames[:WARMUP_FRAMES], *labelled_raws[:WARMUP_RAW]]
        # The rest interleaved, so both kinds run should the budget run out.
        rest_frames = labelled_frames[WARMUP_FRAMES:]
        rest_raws = labelled_raws[WARMUP_RAW:]
        mixed: list[tuple[str, Any]] = []
        while rest_frames or rest_raws:
            mixed += rest_frames[:2] + rest_raws[:1]
            rest_frames, rest_raws = rest_frames[2:], rest_raws[1:]
        for label, example in warmup:
            if len(self.failures) >= 5:
                break
            yield self.run_example(label, example)
        yield self.check_bystanders("after the warm-up")
        gc.collect()
        baseline = rss_bytes()

        started = time.monotonic()
        ran = 0
        for label, example in mixed:
            if time.monotonic() - started > BUDGET or len(self.failures) >= 5:
                break
            yield self.run_example(label, example)
            ran += 1
            if ran % CHECK_EVERY == 0:
                yield self.check_bystanders(f"after {label}")
        yield self.check_bystanders("at the end")

        gc.collect()
        growth = rss_bytes() - baseline
        if os.environ.get("WEBCHAT_FUZZ_REPORT") == "1":
            print(
                f"\nfuzz: {len(warmup)} warm-up + {ran} examples in "
                f"{time.monotonic() - started:.1f} s; RSS {baseline / 2**20:.1f} MiB "
                f"then {growth / 2**20:+.2f} MiB; {sorted(self.seen.items())}",
                file=sys.stderr,
            )
        self.assertEqual(self.failures, [], "\n\n".join(self.failures))
        self.assertEqual(self.trouble.lines, [], "\n".join(self.trouble.lines))
        self.assertGreaterEqual(ran, 60, f"only {ran} examples ran within the budget")
        self.assertLess(growth, RSS_BOUND, f"RSS grew {growth / 2**20:.1f} MiB")
        self.assertEqual(set(self.factory.connections), {*self.bystander_protocols()})

    def bystander_protocols(self) -> list[Any]:
        ports = {c.transport.getHost().port for c in self.bystanders}
        return [
            p for p in self.factory.connections if p.transport.getPeer().port in ports
        ]

    def fail_example(self, label: str, example: object, problems: list[str]) -> None:
        self.failures.append(
            f"example {label}: {shorten(example)}\n  " + "\n  ".join(problems)
        )

    def run_example(self, label: str, example: FrameExample | RawExample) -> Deferred:
        if isinstance(example, FrameExample):
            return self.run_frames(label, example)
        return self.run_raw(label, example)

    @inlineCallbacks
    def send_in_pieces(self, peer: Any, data: bytes, cuts: Iterable[int]):
        """Write ``data`` in pieces, a reactor turn apart."""
        start = 0
        for cut in cuts:
            if start < cut < len(data):
                peer.transport.write(data[start:cut])
                start = cut
                yield deferLater(0)
        peer.transport.write(data[start:])

    @inlineCallbacks
    def run_frames(self, label: str, example: FrameExample, patience: float = QUIET):
        """
        Send the frames, then close the way a conforming client does.

        A client answers the server's close with its own, so the client's
        close goes out only once the server had ``patience`` seconds to close
        first.  Should the server's close still go missing (the server was
        slow, and the close crossed it: see ``KnownServerBugs``), the example
        runs once more with far more patience before it counts as failed.
        """
        peer = yield connect_raw(self.port.getHost().port)
        # Without it, Nagle's algorithm holds a split write back for the
        # delayed ACK (40 ms): the server would look slow when it is not.
        peer.transport.setTcpNoDelay(True)
        peer.transport.write(HANDSHAKES[example.handshake])
        yield within(peer.wait_for(lambda data: b"\r\n\r\n" in data), 3)
        status, _ = split_response(peer.data)
        head = peer.data.partition(b"\r\n\r\n")[0].lower()
        if status != 101 or b"sec-websocket-extensions" in head:
            # (The model knows no extensions: with one, RSV bits mean something.)
            peer.transport.abortConnection()
            self.fail_example(
                label, example, [f"handshake got {shorten(peer.data, 300)}"]
            )
            return
        chat_id = next(
            p.chat_id
            for p in self.factory.connections
            if p.transport.getPeer().port == peer.transport.getHost().port
        )
        expected = expected_outcome(example)
        self.expected_relays[chat_id] = expected
        yield self.send_in_pieces(peer, example.stream(), example.cuts)

        def has_close(_: bytes) -> bool:
            found, _ = parse_frames_strictly(peer.body())
            return any(f.opcode == 0x8 for f in found)

        answered = yield within(peer.wait_for(has_close), patience)
        if example.tail is None:
            peer.transport.write(CLIENT_CLOSE.encode())
            # The server must answer (or take the answer) and end the TCP link.
            ended = yield within(peer.lost, 3)
        else:
            # The lying header would swallow any close: the server has to
            # decide on the header alone, and its close timeout ends the rest.
            ended = answered or (yield within(peer.wait_for(has_close), 3))
        if not peer.lost.called:
            peer.transport.abortConnection()
        frames, rest = parse_frames_strictly(peer.body())
        code = close_code(frames)
        self.seen[f"frames: close {code}"] += 1
        self.seen["frames: retried"] += patience == SLOW_PATIENCE
        if code is None and patience < SLOW_PATIENCE:
            return (yield self.run_frames(f"{label} (again)", example, SLOW_PATIENCE))
        problems = frame_problems(frames, rest)
        if not ended:
            problems.append("the server neither closed nor answered within 3 s")
        if code is None:
            problems.append("no close frame with a code")
        elif code not in expected.codes:
            problems.append(f"close code {code}, expected one of {set(expected.codes)}")
        pongs = [f.payload for f in frames if f.opcode == 0xA]
        owed = list(expected.pongs)
        if pongs[: len(owed)] != owed[: len(pongs)]:
            problems.append(f"pongs {pongs}, expected {owed} first")
        elif len(pongs) < len(owed):
            problems.append(f"pongs {pongs}, expected {owed}")
        elif any(p not in expected.later_pings for p in pongs[len(owed) :]):
            problems.append(f"pongs {pongs} answer pings that were never sent")
        if problems:
            self.fail_example(
                label, example, [*problems, f"server sent {shorten(peer.body(), 300)}"]
            )

    @inlineCallbacks
    def run_raw(self, label: str, example: RawExample):
        peer = yield connect_raw(self.port.getHost().port)
        peer.transport.write(example.blob)
        # Most answers come at once; a request cut short gets none, so after a
        # moment the client half-closes, and the server must hang up then.
        ended = yield within(peer.lost, 0.05)
        if not ended:
            peer.transport.loseWriteConnection()
            ended = yield within(peer.lost, 3)
        if not ended:
            peer.transport.abortConnection()
        problems = [] if ended else ["still open 3 s after the client's FIN"]
        data = peer.data
        status, body = split_response(data)
        self.seen[f"raw: {status or 'no answer'}"] += 1
        if data and status is None:
            problems.append("the answer is not an HTTP response")
        if re.search(rb"(^|\n)HTTP/1\.[01] 5\d\d", data):
            problems.append("a 5xx response")
        if example.oracle == "upgrade" and status != 101:
            problems.append(f"a valid upgrade got status {status}")
        if example.oracle == "no-upgrade" and status == 101:
            problems.append("an invalid upgrade got 101")
        if status == 101:
            frames, rest = parse_frames_strictly(body)
            problems += frame_problems(frames, rest)
        if problems:
            self.fail_example(label, example, [*problems, f"got {shorten(data, 300)}"])

    @inlineCallbacks
    def drain_until(self, client: Any, wanted: str):
        """Everything ``client`` received up to and including ``wanted``."""
        got = []
        while True:
            try:
                message = yield client.received.get().addTimeout(3, reactor)
            except Exception:
                self.failures.append(
                    f"bystander never got {wanted!r} (closed: {client.closed_code}); "
                    f"got {shorten(got[-5:])}"
                )
                return got
            if message == wanted:
                return got
            got.append(message)

    @inlineCallbacks
    def check_bystanders(self, when: str):
        """The bystanders still chat, and heard exactly what they should have."""
        a, b = self.bystanders
        a.send_text(f"still here? ({when})")
        heard_b = yield self.drain_until(b, f"id 1: still here? ({when})")
        b.send_text(f"yes ({when})")
        heard_a = yield self.drain_until(a, f"id 2: yes ({when})")
        if heard_a != heard_b:
            self.failures.append(
                f"bystanders heard different relays {when}: "
                f"{shorten(heard_a)} / {shorten(heard_b)}"
            )
        by_sender: dict[int, list[str]] = {}
        for message in heard_b:
            match = re.match(r"id (\d+): (.*)\Z", message, re.DOTALL)
            if match is None or int(match.group(1)) in (1, 2):
                self.failures.append(f"bystander got {shorten(message)} {when}")
                continue
            by_sender.setdefault(int(match.group(1)), []).append(match.group(2))
        for chat_id, outcome in self.expected_relays.items():
            got = by_sender.get(chat_id, [])
            want = list(outcome.relayed)
            fits = got[: len(want)] == want if outcome.more_allowed else got == want
            self.seen["relayed after a 1003 close"] += len(got) > len(want)
            if not fits:
                self.failures.append(
                    f"connection {chat_id} relayed {shorten(got)}, "
                    f"expected {shorten(want)}"
                    + (" and maybe more" if outcome.more_allowed else "")
                )
        self.expected_relays.clear()
        # Every fuzzed connection is gone by now, or soon.
        deadline = time.monotonic() + 2
        while len(self.factory.connections) > 2 and time.monotonic() < deadline:
            yield deferLater(0.01)
        if len(self.factory.connections) != 2:
            self.failures.append(
                f"{len(self.factory.connections)} connections {when}, expected 2"
            )


class KnownServerBugs(ServerMixin, TestCase):
    """
    What the fuzz test found, as small reproductions.

    Both were real: Autobahn aborted the connection when the client's close
    arrived right behind the frame at fault, discarding the server's own close
    frame.  ``WebChatProtocol._closeConnection`` now lets it drain first.
    """

    timeout = 20

    def setUp(self):
        return self.start_server(limits=Limits(max_message_size=LIMIT))

    @inlineCallbacks
    def test_a_close_frame_with_a_reserved_code_gets_1002(self):
        peer = yield self.open_raw()
        # 1005 may never be sent (RFC 6455 7.4.1): a protocol error.
        peer.transport.write(Frame(0x8, struct.pack("!H", 1005)).encode())
        yield within(peer.lost, 3)
        frames, _ = parse_frames_strictly(peer.body())
        self.assertEqual(close_code(frames), 1002)

    @inlineCallbacks
    def test_a_close_right_behind_a_bad_frame_still_gets_the_code(self):
        peer = yield self.open_raw()
        # A frame with an RSV bit set, and the client's close in the same write.
        peer.transport.write(Frame(0x1, b"x", rsv=2).encode() + CLIENT_CLOSE.encode())
        yield within(peer.lost, 3)
        frames, _ = parse_frames_strictly(peer.body())
        self.assertEqual(close_code(frames), 1002)
