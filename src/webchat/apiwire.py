"""The server API's lean HTTP/1.1 path: framing for ``/api/`` and nothing else.

twisted.web's ``HTTPChannel`` and ``Request`` were about 40% of a publish's
CPU (docs/benchmarks.md, issue #15): a request object, header objects,
producers, resource traversal, all for an answer that is one small JSON
object.  ``ApiWire`` reads an API request itself (request line, headers, a
``Content-Length`` body), hands it to ``ServerApi.handle`` (the one
implementation of the routes, shared with twisted.web's path) and writes
the answer in one ``send()``.

It takes the ordinary requests only: ``GET`` or ``POST`` on ``/api`` or
``/api/...`` (origin form), HTTP/1.0 or 1.1, header names that are tokens,
no control characters, no ``Transfer-Encoding`` or ``Expect``, at most one
``Content-Length``, a body on a ``POST`` only and within the API's cap.
Anything else (a request it does not take, a head over ``MAX_HEAD``, a
chunked or oversized body, a non-API request on a kept-alive connection)
is handed, with every byte not yet answered, to twisted.web's channel
(``ChatChannel``) for the rest of the connection, which answers it as it
always did (413, 411, 431, 400, 404...): one place for every refusal.

Kept the same as on twisted.web's path: the request deadline
(``--handshake-timeout``, from the connection's start or the previous
answer, to a complete request and body) and the response deadline
(``--response-timeout``), on the same lazily moved timer; at most
``MAX_REQUESTS_PER_CONNECTION`` requests, then ``Connection: close``; a
close after ``Connection: close`` or an HTTP/1.0 request; pipelined
requests answered in order (an answer that waits for Redis holds the
ones behind it), and none answered or read while the transport holds a
buffer's worth the client has not read (back-pressure: memory stays
bounded however many answers it pipelined for); the access-log line
(none with ``--quiet``; ``token=`` redacted, the API key never in it);
``Server``, ``Date`` and the security headers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http import RESPONSES, datetimeToString, parse_qs

from webchat.api import ApiAnswer, ApiCall
from webchat.flow import write_now
from webchat.limits import MAX_REQUESTS_PER_CONNECTION
from webchat.web import (
    MAX_HEAD,
    SECURITY_HEADERS,
    SERVER_NAME,
    RequestDeadlines,
    _peer_of,
    switch_protocol,
)

if TYPE_CHECKING:
    from webchat.api import ServerApi
    from webchat.web import ChatSite

log = Logger(namespace="webchat")

#: The request lines taken here: the rest go to twisted.web.
_REQUEST_LINE = re.compile(
    rb"(GET|POST) (/api(?:/[\x21-\x3e\x40-\x7e]*)?)(\?[\x21-\x7e]*)? (HTTP/1\.[01])"
)
#: A header name (RFC 9110 5.1: a token).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Bytes no line of a head may have: control characters but tab (a CR or
#: LF inside a line is one that was not part of a CRLF).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_LENGTH = re.compile(rb"[0-9]{1,15}")
#: Headers whose requests twisted.web answers (a chunked body's 411, a
#: ``100 Continue``): rare for an API client, not worth a second parser.
_HANDED_HEADERS = frozenset({b"transfer-encoding", b"expect"})
#: More header lines than an API client ever sends: twisted.web judges.
_MOST_HEADERS = 100
#: Answers held back to go out in one write, at most (Twisted's own
#: ``bufferSize``): past it they are written before the next request is
#: read, so that a client that does not read them pauses this connection
#: (``pauseProducing``) before another is answered.
_FLUSH_AT = 65536

#: Sent with every answer, after the status line and any ``Connection``.
_FIXED_HEADERS = b"".join(
    name + b": " + value + b"\r\n" for name, value in SECURITY_HEADERS.items()
) + (b"Server: " + SERVER_NAME + b"\r\n")


def _network_of(transport: Any) -> Any:
    """
    What reads the socket: the TCP transport, under TLS too (the TLS layer
    is not a producer itself).
    """
    lower = getattr(transport, "transport", None)
    if lower is not None and not hasattr(transport, "pauseProducing"):
        return lower
    return transport


def _segments(path: bytes) -> list[bytes]:
    """The path's segments after ``/api``, percent-decoded as twisted.web does."""
    segments = path[1:].split(b"/")[1:]
    if b"%" in path:
        return [unquote_to_bytes(segment) for segment in segments]
    return segments


class _Request:
    """
    What the access log's formatter reads of a request (twisted.web's
    ``combinedLogFormatter``, through ``ChatSite.log``): the same line as
    twisted.web's path writes.
    """

    def __init__(
        self,
        method: bytes,
        uri: bytes,
        path: bytes,
        clientproto: bytes,
        headers: dict[bytes, bytes],
        client: Any,
    ) -> None:
        self.method = method
        self.uri = uri
        self.path = path
        self.clientproto = clientproto
        self._headers = headers
        self._client = client
        self.code = 0
        self.sentLength = 0

    def getHeader(self, name: bytes) -> bytes | None:
        return self._headers.get(name.lower())

    def getClientAddress(self) -> Any:
        return self._client


class ApiWire(RequestDeadlines, Protocol):
    """One connection's API requests, parsed and answered here (module doc)."""

    def __init__(self, site: ChatSite, api: ServerApi, address: Any) -> None:
        self.factory = site
        self._api = api
        self._address = address
        #: Bytes read and not yet answered (or handed on).
        self._buffer = b""
        #: Requests read on this connection so far.
        self._requests_read = 0
        #: An answer is awaited (Redis): the requests behind it wait.
        self._waiting = False
        self._paused = False
        #: The transport holds more unsent than it wants (a client that
        #: does not read its answers): nothing more is read or answered.
        self._blocked = False
        #: Closing, gone or handed to twisted.web: nothing more is read here.
        self._done = False
        #: The client's address (asked once: it does not change).
        self._client: Any = None
        #: The Date header's value, and the second it is for.
        self._date_second = -1
        self._date = b""

    def connectionMade(self) -> None:
        # Told when the client stops reading its answers (pauseProducing):
        # otherwise every answer it pipelined for would wait in memory.
        self.transport.registerProducer(self, True)
        self._arm("request", self.factory.chat.limits.handshake_timeout)

    def connectionLost(self, reason: Any = None) -> None:
        self._done = True
        self._disarm()

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return  # pipelined behind a closing answer: never parsed
        self._heard = True
        self._buffer += data
        if self._waiting:
            most = MAX_HEAD + (self.factory.api_max_body or 0)
            if len(self._buffer) > most and not self._paused:
                # Enough waiting; read more once the answer is out.
                self._paused = True
                _network_of(self.transport).pauseProducing()
            return
        self._serve()

    # -- the transport's signals (IPushProducer) ------------------------------------

    def pauseProducing(self) -> None:
        """The transport's buffer is full: stop reading and answering."""
        if not self._blocked:
            self._blocked = True
            if not self._paused:
                _network_of(self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        """The client has read its answers: read and answer on."""
        if not self._blocked:
            return
        self._blocked = False
        if self._done:
            return
        if not self._paused:
            _network_of(self.transport).resumeProducing()
        if not self._waiting:
            self._serve()

    def stopProducing(self) -> None:
        self._done = True

    # -- reading -----------------------------------------------------------------

    def _serve(self) -> None:
        """Answer every complete request in the buffer, in order."""
        out: list[bytes] = []
        pending = 0  # bytes in out
        transport = self.transport
        while not (
            self._done or self._waiting or self._blocked or transport.disconnecting
        ):
            if pending >= _FLUSH_AT:
                write_now(transport, b"".join(out))  # may pause this
                out.clear()
                pending = 0
                continue
            buffer = self._buffer
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._hand_to_web(out)  # its 431 or 400
                break
            answered = len(out)
            taken = self._read_request(buffer, end, out) if end <= MAX_HEAD else None
            if taken is None:
                self._hand_to_web(out)
                break
            if not taken:
                break  # the body is still on its way
            if len(out) > answered:
                pending += len(out[-1])
        if not out:
            return
        if self._done:
            self._write_last(out)
        else:
            write_now(transport, b"".join(out))

    def _read_request(self, buffer: bytes, end: int, out: list[bytes]) -> bool | None:
        """
        Answer the request whose head ends at ``end`` if it is one taken
        here and complete: True; False if its body is still on its way
        (nothing consumed); None if it is not one for this parser.
        """
        lines = buffer[:end].split(b"\r\n")
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None or len(lines) > _MOST_HEADERS:
            return None
        method, path, query, version = match.groups()
        headers: dict[bytes, bytes] = {}
        connection: bytes | None = None
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or _TOKEN.fullmatch(name) is None:
                return None
            if _CONTROL.search(value) is not None:
                return None
            name = name.lower()
            if name in _HANDED_HEADERS:
                return None
            value = value.strip(b" \t")
            if name == b"content-length" and name in headers:
                return None
            if name == b"connection" and connection is None:
                connection = value  # twisted.web reads the first one
            headers[name] = value
        length = 0
        given = headers.get(b"content-length")
        if given is not None:
            if _LENGTH.fullmatch(given) is None:
                return None
            length = int(given)
            if length:
                cap = self.factory.api_body_cap(method, path)
                if cap is None or length > cap:
                    return None  # twisted.web's 405, 413 from the headers
        total = end + 4 + length
        if len(buffer) < total:
            return False
        body = buffer[end + 4 : total]
        self._buffer = buffer[total:]
        self._heard = bool(self._buffer)
        self._answer(method, path, query, version, headers, connection, body, out)
        return True

    def _answer(
        self,
        method: bytes,
        path: bytes,
        query: bytes | None,
        version: bytes,
        headers: dict[bytes, bytes],
        connection: bytes | None,
        body: bytes,
        out: list[bytes],
    ) -> None:
        site = self.factory
        limits = site.chat.limits
        self._requests_read += 1
        # As twisted.web's checkPersistence (and ChatChannel's request cap).
        persistent = version == b"HTTP/1.1" and not (
            connection is not None and b"close" in connection.lower().split(b" ")
        )
        closing = b"" if persistent or version != b"HTTP/1.1" else b"close"
        if persistent and self._requests_read >= MAX_REQUESTS_PER_CONNECTION:
            persistent, closing = False, b"close"
            site.chat.dropped["request_limit"] += 1
            log.info(
                "Closing connection from {peer} after its {limit}th request",
                peer=_peer_of(self.transport),
                limit=MAX_REQUESTS_PER_CONNECTION,
            )
        client = self._client
        if client is None:
            client = self._client = self.transport.getPeer()
        record = _Request(
            method,
            path + query if query else path,
            path,
            version,
            headers,
            client,
        )
        call = ApiCall(
            method=method,
            path=path,
            segments=_segments(path),
            args=parse_qs(query[1:], 1) if query else {},
            authorization=headers.get(b"authorization"),
            body=body,
            peer=getattr(client, "host", None) or "unix",
        )
        answer = self._api.handle(call)
        if isinstance(answer, Deferred):
            # Only an answer that waits needs the response deadline: one
            # ready now is written now (as twisted.web's would be, into the
            # transport), and the next request's deadline follows it.
            self._arm("response", limits.response_timeout)
            self._waiting = True
            answer.addCallback(self._answered, record, persistent, closing)
            answer.addErrback(
                lambda failure: log.failure(
                    "An error has occurred: answering an API request failed", failure
                )
            )
            return
        out.append(self._response(answer, record, closing))
        self._after(persistent)

    def _answered(
        self, answer: ApiAnswer, record: _Request, persistent: bool, closing: bytes
    ) -> None:
        """An answer that waited (Redis) is ready: send it, read on."""
        self._waiting = False
        if self._done:
            return  # the client went away meanwhile
        out = [self._response(answer, record, closing)]
        self._after(persistent)
        if self._paused and not self._done:
            self._paused = False
            if not self._blocked:
                _network_of(self.transport).resumeProducing()
        if not self._done:
            write_now(self.transport, b"".join(out))
            self._serve()
        else:
            self._write_last(out)

    def _after(self, persistent: bool) -> None:
        """After an answer: wait for the next request, or close."""
        if persistent:
            self._arm("request", self.factory.chat.limits.handshake_timeout)
            return
        self._done = True
        self._disarm()
        self._buffer = b""  # whatever was pipelined behind it: never answered

    def _write_last(self, out: list[bytes]) -> None:
        """The last answers of a connection that closes after them."""
        if self.transport is not None and not self.transport.disconnecting:
            write_now(self.transport, b"".join(out))
            # With a producer registered, TLS never shuts down and TCP never
            # closes while the producer is paused.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    # -- writing -----------------------------------------------------------------

    def _response(self, answer: ApiAnswer, record: _Request, closing: bytes) -> bytes:
        status, headers, body = answer
        second = int(self.factory.reactor.seconds())
        if second != self._date_second:
            self._date_second, self._date = second, datetimeToString(second)
        parts = [
            record.clientproto,
            b" %d " % status,
            RESPONSES.get(status, b"Unknown Status"),
            b"\r\n",
        ]
        if closing:
            parts.append(b"Connection: close\r\n")
        parts += (_FIXED_HEADERS, b"Date: ", self._date, b"\r\n")
        for name, value in headers.items():
            parts += (name, b": ", value, b"\r\n")
        parts += (b"Content-Length: %d\r\n\r\n" % len(body), body)
        record.code = status
        record.sentLength = len(body)
        self.factory.log(record)
        return b"".join(parts)

    # -- handing on ----------------------------------------------------------------

    def _hand_to_web(self, out: list[bytes]) -> None:
        """
        The rest of the connection goes to twisted.web's channel, with every
        byte not yet answered, its request count and its request deadline.
        """
        if out:
            write_now(self.transport, b"".join(out))
            out.clear()
        self._done = True
        self.transport.unregisterProducer()  # the channel registers itself
        site = self.factory
        expires_at, heard, phase = self._expires_at, self._heard, self._phase
        self._disarm()
        channel = site.build_channel(self._address)
        switch_protocol(self.transport, channel)
        channel.makeConnection(self.transport)
        channel._requests_read = self._requests_read
        if phase == "request":
            channel.continue_request_deadline(expires_at, heard)
        data, self._buffer = self._buffer, b""
        channel.dataReceived(data)
