"""The server API's lean HTTP path (webchat.apiwire) against a hostile client.

Real servers on real sockets, each attack with a bystander pair chatting
through it.  What a correct answer is comes from twisted.web's path (the
one every other request takes, and the one the API took before the lean
path): the same status, headers and closing behaviour, and memory that
stays bounded whatever the client sends or fails to read.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support import connect_raw, deferLater
from tests.test_api import KEY, BystanderApiMixin
from tests.test_apiwire import keep_alive
from webchat.api import ServerApi
from webchat.chat import WebChatFactory
from webchat.limits import Limits
from webchat.web import make_site

_AUTH = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
_CLOSE = b"Connection: close\r\n"
_PUB = b'{"text":"hi"}'


def _get(path: bytes, *lines: bytes) -> bytes:
    """A GET of ``path`` with the key, ``lines`` and ``Connection: close``."""
    return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(lines) + _CLOSE


def _post(length: bytes, *lines: bytes, body: bytes = _PUB) -> bytes:
    """A publish with ``Content-Length: length`` (none if empty) and ``lines``."""
    given = b"Content-Length: " + length + b"\r\n" if length else b""
    return (
        b"POST /api/rooms/a/messages HTTP/1.1\r\nHost: x\r\n"
        + b"".join(lines)
        + given
        + _CLOSE
        + b"\r\n"
        + body
    )


#: Requests a hostile client sends, each read alone on its own connection.
#: The lean path must answer each exactly as twisted.web's does (status,
#: headers, body, closing): what it does not take it hands over unread.
HOSTILE_REQUESTS: dict[str, bytes] = {
    # Smuggling: conflicting or odd framing.
    "two equal Content-Lengths": _post(b"13", _AUTH, b"Content-Length: 13\r\n"),
    "two Content-Lengths": _post(b"13", _AUTH, b"Content-Length: 5\r\n"),
    "a Content-Length list": _post(b"13, 13", _AUTH),
    "Content-Length and chunked": _post(
        b"13", _AUTH, b"Transfer-Encoding: chunked\r\n", body=b"d\r\n" + _PUB
    ),
    "chunked, identity": _post(
        b"", _AUTH, b"Transfer-Encoding: chunked, identity\r\n", body=b"0\r\n\r\n"
    ),
    "a signed Content-Length": _post(b"+13", _AUTH),
    "a negative Content-Length": _post(b"-1", _AUTH),
    "leading zeros": _post(b"000000000000013", _AUTH),
    "more leading zeros": _post(b"0000000000000013", _AUTH),
    "spaces around the length": _post(b"  13  ", _AUTH),
    "a space inside the length": _post(b"1 3", _AUTH),
    "a hex length": _post(b"0x0d", _AUTH),
    "a huge length": _post(b"99999999999999999999999", _AUTH),
    "an empty length": _post(b"", _AUTH, b"Content-Length:\r\n"),
    "a space before the colon": _post(b"", _AUTH, b"Content-Length : 13\r\n"),
    "Transfer-Encoding with a space": _post(
        b"13", _AUTH, b"Transfer-Encoding : chunked\r\n"
    ),
    "obs-fold": _get(b"/api/rooms/q/members", _AUTH, b" folded: yes\r\n") + b"\r\n",
    "obs-fold in the key": _get(
        b"/api/rooms/q/members", b"Authorization: Bearer\r\n " + KEY.encode() + b"\r\n"
    )
    + b"\r\n",
    "a bare LF inside the head": _get(
        b"/api/rooms/q/members", b"X-A: 1\nX-B: 2\r\n", _AUTH
    )
    + b"\r\n",
    "NUL in a value": _get(b"/api/rooms/q/members", b"X-A: a\x00b\r\n", _AUTH)
    + b"\r\n",
    "CR in a value": _get(b"/api/rooms/q/members", b"X-A: a\rb\r\n", _AUTH) + b"\r\n",
    "NUL after the key": _get(
        b"/api/rooms/q/members", b"Authorization: Bearer " + KEY.encode() + b"\x00\r\n"
    )
    + b"\r\n",
    "no colon": _get(b"/api/rooms/q/members", b"nocolon\r\n", _AUTH) + b"\r\n",
    "an empty header name": _get(b"/api/rooms/q/members", b": v\r\n", _AUTH) + b"\r\n",
    "a non-ASCII header name": _get(
        b"/api/rooms/q/members", b"X-\xc3\xa9: v\r\n", _AUTH
    )
    + b"\r\n",
    "non-ASCII in a value": _get(
        b"/api/rooms/q/members", b"X-A: \xc3\xa9\xff\r\n", _AUTH
    )
    + b"\r\n",
    "150 headers": _get(
        b"/api/rooms/q/members", *(b"X-%d: y\r\n" % i for i in range(150)), _AUTH
    )
    + b"\r\n",
    # Request targets.
    "the absolute form": _get(b"http://x/api/rooms/q/members", _AUTH) + b"\r\n",
    "the asterisk form": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n" + _CLOSE + b"\r\n",
    "a percent-encoded slash in a room": _get(b"/api/rooms/a%2Fb/history", _AUTH)
    + b"\r\n",
    "a percent-encoded .. room": _get(b"/api/rooms/%2e%2e/x", _AUTH) + b"\r\n",
    "a NUL in a room": _get(b"/api/rooms/a%00/history", _AUTH) + b"\r\n",
    "a bad percent escape": _get(b"/api/rooms/a%zz/history", _AUTH) + b"\r\n",
    "non-ASCII in the path": _get(b"/api/rooms/\xc3\xa9/history", _AUTH) + b"\r\n",
    "a space in the target": _get(b"/api/rooms/q/members x", _AUTH) + b"\r\n",
    "/%61pi": _get(b"/%61pi/rooms/q/members", _AUTH) + b"\r\n",
    "/api%2frooms": _get(b"/api%2frooms", _AUTH) + b"\r\n",
    "a request line over 16 KB": _get(b"/api/rooms?" + b"a" * 17000, _AUTH) + b"\r\n",
    # Versions and methods.
    "HTTP/1.0": b"GET /api/rooms/q/members HTTP/1.0\r\n" + _AUTH + b"\r\n",
    "HTTP/1.0 keep-alive": b"GET /api/rooms/q/members HTTP/1.0\r\n"
    + _AUTH
    + b"Connection: keep-alive\r\n\r\n",
    "HTTP/0.9": b"GET /api/rooms/q/members\r\n\r\n",
    "HTTP/1.2": b"GET /api/rooms/q/members HTTP/1.2\r\n" + _AUTH + _CLOSE + b"\r\n",
    "lower-case version": b"GET /api/rooms/q/members http/1.1\r\n"
    + _AUTH
    + _CLOSE
    + b"\r\n",
    "lower-case method": b"get /api/rooms/q/members HTTP/1.1\r\n"
    + _AUTH
    + _CLOSE
    + b"\r\n",
    "HEAD": b"HEAD /api/rooms/q/members HTTP/1.1\r\n" + _AUTH + _CLOSE + b"\r\n",
    "OPTIONS": b"OPTIONS /api/rooms/q/members HTTP/1.1\r\n" + _AUTH + _CLOSE + b"\r\n",
    "Expect: 100-continue": _post(b"13", _AUTH, b"Expect: 100-continue\r\n"),
    "a GET with a body": _get(b"/api/rooms/q/members", _AUTH, b"Content-Length: 13\r\n")
    + b"\r\n"
    + _PUB,
    "Connection: CLOSE": b"GET /api/rooms/q/members HTTP/1.1\r\n"
    + _AUTH
    + b"Connection: CLOSE\r\n\r\n",
    # The key.
    "no key": _get(b"/api/rooms/q/members") + b"\r\n",
    "a wrong key": _get(b"/api/rooms/q/members", b"Authorization: Bearer nope\r\n")
    + b"\r\n",
    "bearer in lower case": _get(
        b"/api/rooms/q/members", b"authorization: bearer " + KEY.encode() + b"\r\n"
    )
    + b"\r\n",
    "Basic": _get(
        b"/api/rooms/q/members", b"Authorization: Basic " + KEY.encode() + b"\r\n"
    )
    + b"\r\n",
    "a 10 KB key": _get(
        b"/api/rooms/q/members", b"Authorization: Bearer " + b"k" * 10000 + b"\r\n"
    )
    + b"\r\n",
    "a non-ASCII key": _get(
        b"/api/rooms/q/members", b"Authorization: Bearer \xc3\xa9\r\n"
    )
    + b"\r\n",
    "the key twice, right last": _get(
        b"/api/rooms/q/members", b"Authorization: Bearer nope\r\n", _AUTH
    )
    + b"\r\n",
    "the key twice, right first": _get(
        b"/api/rooms/q/members", _AUTH, b"Authorization: Bearer nope\r\n"
    )
    + b"\r\n",
    # Pipelining.
    "a body followed by the next request": _post(b"13", _AUTH).replace(_CLOSE, b"")
    + _get(b"/api/rooms/q/members", _AUTH)
    + b"\r\n",
    "a short length smuggling a request": _post(b"0", _AUTH, body=b"").replace(
        _CLOSE, b""
    )
    + _get(b"/api/rooms/q/members", _AUTH)
    + b"\r\n",
    "then a page": b"GET /api/rooms/q/members HTTP/1.1\r\n"
    + _AUTH
    + b"\r\n"
    + b"GET /?x HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n"
    + _CLOSE
    + b"\r\n",
}


def _comparable(data: bytes) -> list[tuple[bytes, list[bytes], bytes]]:
    """
    Each answer in ``data``: its status line, its sorted header lines (but
    ``Date``, and the lengths of bodies that vary) and its body (but the
    offsets and uptimes, which vary from server to server).
    """
    answers = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            answers.append((b"(cut) " + data[:200], [], b""))
            break
        lines = head.split(b"\r\n")
        length = 0
        headers = []
        for line in lines[1:]:
            name = line.partition(b":")[0].lower()
            if name == b"content-length":
                length = int(line.partition(b":")[2])
            elif name != b"date":
                headers.append(line)
        body = re.sub(rb'("offset"|"uptime"): ?[0-9.]+', rb"\1", rest[:length])
        answers.append((lines[0], sorted(headers), body))
        data = rest[length:]
    return answers


class AllLogLines:
    """Every log event, formatted and with its fields: for the key's absence."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.lines.append(formatEvent(event) + repr(event))


#: A history answer of about 1 MB: 16 messages of 60,000 characters.
BIG_TEXT = "x" * 60000
BIG_MESSAGES = 16


class CountingPeer(Protocol):
    """
    A client that counts the answers it reads without keeping them (tens of
    megabytes would not fit a test's ``data +=``), and can stop reading.
    """

    OK = b"HTTP/1.1 200 OK\r\n"

    def __init__(self) -> None:
        self.received = 0
        self.answers = 0
        self._tail = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        joined = self._tail + data
        self.answers += joined.count(self.OK)
        # Keep what could be the start of a status line cut in two.
        self._tail = joined[-(len(self.OK) - 1) :]

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class HostileMixin(BystanderApiMixin):
    limits = Limits(rate_limit=0, handshake_timeout=5)

    @inlineCallbacks
    def counting_peer(self):
        endpoint = TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.api_port.getHost().port, timeout=5
        )
        if self.client_tls is not None:
            endpoint = wrapClientTLS(self.client_tls, endpoint)
        peer = yield endpoint.connect(Factory.forProtocol(CountingPeer))
        self.addCleanup(lambda: peer.lost.called or peer.transport.abortConnection())
        return peer

    @inlineCallbacks
    def fill_history(self, room: str):
        """``BIG_MESSAGES`` large messages in ``room``: a history of ~1 MB."""
        peer = yield self.counting_peer()
        body = json.dumps({"text": BIG_TEXT}).encode()
        publish = keep_alive("POST", f"/api/rooms/{room}/messages", body)
        peer.transport.write(
            publish * (BIG_MESSAGES - 1)
            + keep_alive(
                "POST", f"/api/rooms/{room}/messages", body, Connection="close"
            )
        )
        yield peer.lost
        self.assertEqual(self.factory.stats.api[(202, "ok")], BIG_MESSAGES)


class SameAsTwistedWebTests(HostileMixin, TestCase):
    limits = Limits(rate_limit=0, handshake_timeout=0.5)

    @inlineCallbacks
    def send_all(self, port: int, before: bytes = b""):
        """
        Every hostile request on its own connection, at once, after
        ``before``: the answers.
        """
        peers = {}
        for name, data in HOSTILE_REQUESTS.items():
            peer = yield connect_raw(port)
            self.addCleanup(
                lambda peer=peer: peer.lost.called or peer.transport.abortConnection()
            )
            peer.transport.write(before + data)
            peers[name] = peer
        for peer in peers.values():
            yield peer.lost  # each closed by the server (at most the 0.5 s deadline)
        return {name: peer.data for name, peer in peers.items()}

    def test_every_hostile_request_is_answered_as_twisted_web_does(self):
        return self.compare_with_twisted_web()

    def test_and_so_after_an_answer_on_a_kept_alive_connection(self):
        """The lean path's hand-over in mid-connection, not the doorway's."""
        return self.compare_with_twisted_web(
            b"GET /api/rooms/q/members HTTP/1.1\r\n" + _AUTH + b"\r\n"
        )

    @inlineCallbacks
    def compare_with_twisted_web(self, before: bytes = b""):
        logs = AllLogLines()
        globalLogPublisher.addObserver(logs)
        self.addCleanup(globalLogPublisher.removeObserver, logs)
        lean = yield self.send_all(self.port.getHost().port, before)
        yield self.assert_bystanders_chat()
        # twisted.web's path: the same site, but no request goes to the lean
        # path (as before it was written), on a server of its own.
        reference = WebChatFactory(reactor, limits=self.limits)
        site = make_site(reference, api=ServerApi(reference, KEY.encode(), 1000.0))
        site.api = None
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        web = yield self.send_all(port.getHost().port, before)
        for name in HOSTILE_REQUESTS:
            with self.subTest(name):
                self.assertTrue(lean[name].startswith(b"HTTP/1."), name)
                self.assertEqual(_comparable(lean[name]), _comparable(web[name]), name)
        self.assertFalse([line for line in logs.lines if KEY in line])
        yield self.assert_bystanders_chat()


class UnreadAnswersMixin(HostileMixin):
    @inlineCallbacks
    def test_a_client_that_does_not_read_its_answers_is_not_answered_ahead(self):
        """
        Pipelined requests from a client that reads none of the answers: the
        server stops answering (and reading) once the socket and a buffer's
        worth are full, rather than hold every answer in memory (~30 MB
        here; a history answer can be tens of MB).  Once the client reads,
        every answer arrives.
        """
        yield self.fill_history("big")
        peer = yield self.counting_peer()
        # One answer read first (over TLS: the handshake done), then none.
        peer.transport.write(keep_alive("GET", "/api/rooms"))
        while peer.answers < 1:
            yield deferLater(0.01)
        peer.transport.pauseProducing()
        count = 30
        get = keep_alive("GET", "/api/rooms/big/history")
        last = keep_alive("GET", "/api/rooms/big/history", Connection="close")
        peer.transport.write(get * (count - 1) + last)
        yield deferLater(0.5)
        answered = self.factory.stats.api[(200, "ok")] - 1
        # The kernel's buffers hold a few of the ~1 MB answers, not 30.
        self.assertGreater(answered, 0)
        self.assertLess(answered, count // 2)
        yield self.assert_bystanders_chat()
        peer.transport.resumeProducing()
        yield peer.lost
        self.assertEqual(peer.answers, 1 + count)
        self.assertEqual(self.factory.stats.api[(200, "ok")], 1 + count)
        yield self.assert_bystanders_chat()


class UnreadAnswersTests(UnreadAnswersMixin, TestCase):
    pass


class UnreadAnswersOwnPortTests(UnreadAnswersMixin, TestCase):
    own_port = True


class UnreadAnswersTlsTests(UnreadAnswersMixin, TestCase):
    """The same behind TLS (an ``ssl:`` --port), as test_apiwire's TlsTests."""

    tls = True
