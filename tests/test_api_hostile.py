"""The server API's lean HTTP path (webchat.apiwire) against a hostile client.

Real servers on real sockets, each attack with a bystander pair chatting
through it.  What a correct answer is comes from twisted.web's path (the
one every other request takes, and the one the API took before the lean
path): the same status, headers and closing behaviour, and memory that
stays bounded whatever the client sends or fails to read.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.support import deferLater
from tests.test_api import KEY, ApiMixin
from tests.test_apiwire import keep_alive
from webchat.api import ServerApi
from webchat.limits import Limits
from webchat.web import make_site

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


class HostileMixin(ApiMixin):
    limits = Limits(rate_limit=0, handshake_timeout=5)

    @inlineCallbacks
    def setUp(self):
        yield self.start_api()
        self.alice, self.bob = yield self.connect_many(2)
        self._said = 0

    @inlineCallbacks
    def assert_bystanders_chat(self):
        self._said += 1
        self.alice.send_text(f"still {self._said}")
        self.assertEqual((yield self.bob.received.get()), f"id 1: still {self._said}")
        self.assertIsNone(self.alice.closed_code)

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
    @inlineCallbacks
    def setUp(self):
        yield self.start_api(own_port=True)
        self.alice, self.bob = yield self.connect_many(2)
        self._said = 0


class UnreadAnswersTlsTests(UnreadAnswersMixin, TestCase):
    """The same behind TLS (an ``ssl:`` --port), as test_apiwire's TlsTests."""

    tls = True

    @inlineCallbacks
    def start_api(self, own_port: bool = False):
        yield self.start_server(limits=self.limits)
        self.api = ServerApi(self.factory, KEY.encode(), self.rate_limit)
        yield self.port.stopListening()
        self.port = yield self._tls_endpoint().listen(
            make_site(self.factory, api=self.api)
        )
        self.api_port = self.port
