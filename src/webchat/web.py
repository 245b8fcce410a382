"""The site: static files and the WebSocket upgrade, on one port.

The seed's client opens ``ws://host:port`` with no path, so an upgrade is
accepted on ``/`` as well as on ``/ws``; a plain GET on ``/`` still gets the
page.  The choice is made from the ``Upgrade`` header: by the ``Doorway`` for
a connection's first request (an upgrade then never touches twisted.web),
and by ``ChatRoot`` for any later request on a keep-alive connection.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.http import HTTPChannel, combinedLogFormatter
from twisted.web.pages import errorPage, notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.static import File

from webchat.access import canonical_address
from webchat.api import ServerApi
from webchat.chat import WebChatFactory
from webchat.flow import write_now
from webchat.health import HealthResource
from webchat.limits import (
    API_BODY_OVERHEAD,
    API_MAX_BODY,
    MAX_REQUESTS_PER_CONNECTION,
)
from webchat.logtext import escape_for_log, escape_request_text, redact_query
from webchat.rooms import ROOM_NAME

log = Logger(namespace="webchat")

#: Paths polled by machines, left out of the access log.
QUIET_PATHS = frozenset({b"/healthz", b"/metrics"})

#: Paths on which a WebSocket upgrade is accepted.
WEBSOCKET_PATHS = (b"", b"ws")

#: What every response says in ``Server:``: no library names or versions for a
#: scanner to match against vulnerability lists.
SERVER_NAME = b"webchat"


def default_web_root() -> Path:
    """
    Where the shipped page lives.

    An installed wheel carries it inside the package (``webchat/web``); an
    editable install or a source checkout has it at the top of the tree.
    """
    packaged = Path(__file__).resolve().parent / "web"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "web"


def wants_websocket(request: Request) -> bool:
    upgrade = request.getHeader(b"upgrade") or b""
    return upgrade.strip().lower() == b"websocket"


class ChatRoot(Resource):
    """
    Route upgrades on ``/`` and ``/ws`` to the chat, the operational endpoints
    (``/healthz``, ``/metrics``) to theirs, and everything else to files.
    """

    def __init__(
        self,
        files: File,
        websocket: WebSocketResource,
        endpoints: dict[bytes, IResource] | None = None,
        api: IResource | None = None,
    ) -> None:
        super().__init__()
        self._files = files
        self._websocket = websocket
        self._endpoints = endpoints or {}
        self._api = api

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        if path == b"api" and self._api is not None:
            return self._api  # the server API routes the rest itself
        at_end = not request.postpath
        in_room = path == b"ws" and len(request.postpath) == 1  # /ws/<room>
        if (at_end and path in WEBSOCKET_PATHS) or in_room:
            if wants_websocket(request):
                return self._websocket  # admission judges the room's name
            if path == b"ws":
                return _upgrade_required()
        if path == b"r" and len(request.postpath) == 1:
            # /r/<room>: the same page, which reads the room from its address.
            if not ROOM_NAME.fullmatch(request.postpath[0].decode("latin-1")):
                return _bad_room()
            request.postpath = []
            return self._files.getChildWithDefault(b"index.html", request)
        endpoint = self._endpoints.get(path)
        if endpoint is not None and at_end:
            return endpoint
        return self._files.getChildWithDefault(path, request)

    def render(self, request: Request) -> bytes:
        # Only reached for a request with an empty path (e.g. "GET" with no
        # slash at all): treat it like "/".
        return self._files.render(request)


class ChatFile(File):
    """
    The static files, minus two things a chat page never needs.

    Byte ranges are not offered: the page is a few kilobytes, and Twisted's
    multi-range producer could fail mid-response and leave the request (and
    its open file) hanging.  A ``Range`` header is ignored and the whole file
    sent with 200, which RFC 9110 allows.  And a path segment with a NUL byte
    (``/index.html%00.txt``) is simply not found, instead of an exception.
    """

    def getChild(self, path: bytes, request: Request) -> IResource:
        if b"\x00" in path:
            return notFound()
        return super().getChild(path, request)

    def render_GET(self, request: Request) -> Any:
        request.requestHeaders.removeHeader(b"range")
        return super().render_GET(request)

    render_HEAD = render_GET


class ChatWebSocketResource(WebSocketResource):
    """
    The chat, reached through twisted.web (an upgrade the doorway did not
    recognise: an encoded or absolute path, or a later request on a
    keep-alive connection).

    Autobahn's own resource hands the chat only the request it rebuilt, so
    WebSocket frames that arrived in the same packet as the request, still
    inside the HTTP channel's buffers, were lost.  This one passes them on,
    and refuses an HTTP/1.0 upgrade (RFC 6455 needs HTTP/1.1).
    """

    def render(self, request: Request) -> Any:
        channel = request.channel
        if channel.transport is None:
            return super().render(request)  # Autobahn's 426 for a gone channel
        if request.clientproto != b"HTTP/1.1":
            chat = self._factory
            chat.refused["http_version"] += 1
            log.warn(
                "Refused connection from {peer}: WebSocket over {version} (HTTP 426)",
                peer=_peer_of(request.transport),
                version=escape_request_text(request.clientproto.decode("latin-1")),
            )
            request.setResponseCode(426, b"Upgrade Required")
            request.setHeader(b"Upgrade", b"websocket")
            request.setHeader(b"Connection", b"close")
            return b"WebSocket needs HTTP/1.1\n"
        protocol = self._factory.buildProtocol(request.transport.getPeer())
        transport, channel.transport = channel.transport, None
        if isinstance(channel, ChatChannel):
            channel.hand_over()
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = protocol
        elif isinstance(transport.protocol, ProtocolWrapper):
            transport.protocol.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        protocol.makeConnection(transport)
        # The channel may have paused reading (as Autobahn's resource does).
        if hasattr(transport, "_networkProducer"):
            transport._networkProducer.resumeProducing()
        elif hasattr(transport, "resumeProducing"):
            transport.resumeProducing()
        head = [request.method + b" " + _canonical_uri(request) + b" HTTP/1.1\r\n"]
        for name, values in request.requestHeaders.getAllRawHeaders():
            head.append(name + b": " + b",".join(values) + b"\r\n")
        head.append(b"\r\n")
        # What followed the request: what the channel already buffered, now;
        # what its line parser still holds, once we return, through its
        # rawDataReceived, from now on the chat's.
        pending = b"".join(channel._dataBuffer)
        channel._dataBuffer = []
        protocol.dataReceived(b"".join(head) + pending)
        channel.rawDataReceived = protocol.dataReceived
        return NOT_DONE_YET


class LocalOnly(Resource):
    """
    ``/metrics`` on the public port, for loopback and trusted proxies only.

    It names the version and the process's memory, CPU and descriptors, and
    costs CPU to render: nothing for the whole internet.  A request relayed by
    a trusted proxy is judged by the client it names in ``X-Forwarded-For``.
    Anyone else gets 404, as if it were not there.
    """

    isLeaf = True

    def __init__(self, inner: IResource, chat: WebChatFactory) -> None:
        super().__init__()
        self._inner = inner
        self._chat = chat

    def render(self, request: Request) -> Any:
        access = self._chat.access
        peer = getattr(request.getClientAddress(), "host", None) or "unix"
        client = access.client_address(
            peer, (request.getHeader(b"x-forwarded-for") or b"").decode("latin-1")
        )
        if not (_is_loopback(client) or access.is_trusted_proxy(client)):
            return notFound().render(request)
        return self._inner.render(request)


def _is_loopback(address: str) -> bool:
    if address == "unix":
        return True  # a Unix socket is as local as it gets
    try:
        return ipaddress.ip_address(canonical_address(address)).is_loopback
    except ValueError:
        return False


def _canonical_uri(request: Request) -> bytes:
    """
    The request's target as the chat reads it: the path segments twisted.web
    routed by (decoded: ``/%77s`` is ``/ws``), each quoted again, so a room
    name with characters a name may not have (``/ws/a%20b``) is still refused
    by admission, and the query as it came.
    """
    segments = [
        quote(segment, safe=b"") for segment in request.prepath + request.postpath
    ]
    path = ("/" + "/".join(segments)).encode("ascii")
    _, mark, query = request.uri.partition(b"?")
    return path + mark + query


def _bad_room() -> IResource:
    return errorPage(400, "Bad Request", "bad room name: 1-64 of A-Z a-z 0-9 . _ -")


def _upgrade_required() -> IResource:
    return _UpgradeRequired()


class _UpgradeRequired(Resource):
    """
    ``426 Upgrade Required`` with ``Upgrade: websocket`` (RFC 9110 15.5.22).

    Not ``errorPage``: twisted.web knows no reason phrase for 426 and would
    send "426 Unknown Status".
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(426, b"Upgrade Required")
        request.setHeader(b"Upgrade", b"websocket")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"426 Upgrade Required: this address only speaks WebSocket.\n"


def start_deadline(
    site: ChatSite, transport: Any, heard: Callable[[], bool] = lambda: True
) -> IDelayedCall | None:
    """
    Give the connection on ``transport`` the handshake timeout to deliver a
    complete request (slowloris defence).

    Twisted's own timeout is an *idle* timeout: a client that dribbles one
    header byte every few seconds never trips it and holds a file descriptor
    forever.  This one runs from the start of the wait, whatever arrives.
    ``heard`` says whether any byte of the awaited request has arrived.
    """
    timeout = site.chat.limits.handshake_timeout
    if timeout <= 0:
        return None
    return site.reactor.callLater(timeout, _deadline_passed, site, transport, heard)


def _response_deadline_passed(site: ChatSite, transport: Any) -> None:
    # A client that asks for a file and then stops reading (or a response
    # that stalls inside twisted.web) would otherwise hold the connection and
    # the open file forever: the idle timeout is off while a response is
    # produced.
    chat = site.chat
    chat.dropped["response_timeout"] += 1
    log.warn(
        "Aborted response to {peer}: not sent within {timeout:g} s",
        peer=_peer_of(transport),
        timeout=chat.limits.response_timeout,
    )
    # Aborting stops the response's producer, which closes its file.
    transport.abortConnection()


def _peer_of(transport: Any) -> str:
    peer = transport.getPeer()
    return escape_for_log(str(getattr(peer, "host", None) or "unix"))


def _deadline_passed(site: ChatSite, transport: Any, heard: Callable[[], bool]) -> None:
    chat = site.chat
    peer = _peer_of(transport)
    timeout = chat.limits.handshake_timeout
    if isinstance(transport, TLSMemoryBIOProtocol) and not transport._handshakeDone:
        # Over TLS a browser's spare connection has finished its TLS
        # handshake; one that has not is stalling, not idle.
        chat.dropped["handshake_timeout"] += 1
        log.warn(
            "Closed connection from {peer}: no complete TLS handshake within"
            " {timeout:g} s",
            peer=peer,
            timeout=timeout,
        )
    elif heard():
        chat.dropped["handshake_timeout"] += 1
        log.warn(
            "Closed connection from {peer}: no complete request within {timeout:g} s",
            peer=peer,
            timeout=timeout,
        )
    else:
        # Browsers open spare connections ahead of need and keep idle ones
        # alive; closing one that never asked for anything is routine.
        chat.dropped["idle_preconnect"] += 1
        log.debug(
            "Closed idle connection from {peer}: no request within {timeout:g} s",
            peer=peer,
            timeout=timeout,
        )
    transport.abortConnection()


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


#: The most header bytes the doorway reads before it lets the HTTP parser
#: answer (Twisted's limit is the same; it says 400).
MAX_HEAD = 16384

_UPGRADE_LINE = re.compile(rb"\r\nupgrade:[ \t]*websocket[ \t]*\r\n")
_REQUEST_LINE = re.compile(rb"^GET (/|/ws|/ws/[^ ?]*)(\?[^ ]*)? HTTP/1\.1$")


def is_chat_upgrade(head: bytes) -> bool:
    """Is this request head a WebSocket upgrade on one of the chat's paths?"""
    request_line, _, _ = head.partition(b"\r\n")
    if _REQUEST_LINE.match(request_line) is None:
        return False
    return _UPGRADE_LINE.search(head.lower() + b"\r\n") is not None


#: How a request for the server API starts (ApiWire judges the rest).
_API_REQUEST = (b"GET /api", b"POST /api")


def switch_protocol(transport: Any, successor: Any) -> None:
    """Have ``transport`` (or the TLS layer under it) deliver to ``successor``."""
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = successor
    elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
        transport.protocol.wrappedProtocol = successor
    else:
        transport.protocol = successor


class Doorway(Protocol):
    """
    The first protocol of every connection: reads the request head and hands
    the connection to the chat or to the web site.

    A WebSocket upgrade on ``/`` or ``/ws`` goes straight to the chat's
    Autobahn protocol, which parses the handshake itself; a server API
    request to ``ApiWire`` (``webchat.apiwire``), which does the same for
    the API; everything else (the page, ``/healthz``, ``/metrics``,
    garbage) goes to Twisted's HTTP channel.  Letting twisted.web parse an
    upgrade first would build a request object, headers and a channel that
    the WebSocket immediately throws away, and that is most of what a new
    chat connection costs.
    """

    def __init__(self, site: ChatSite, address: Any) -> None:
        self._site = site
        self._address = address
        self._head = b""
        self._deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._deadline = start_deadline(
            self._site, self.transport, lambda: bool(self._head)
        )

    def dataReceived(self, data: bytes) -> None:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 and len(self._head) <= MAX_HEAD:
            return
        _cancel(self._deadline)
        # A head over the limit goes to the HTTP channel, which refuses it
        # (431 for a long line, 400 for too many), whether it arrived in one
        # read or in many.
        site = self._site
        if 0 <= end <= MAX_HEAD and is_chat_upgrade(self._head[:end]):
            successor = site.chat.buildProtocol(self._address)
        elif site.api is not None and self._head.startswith(_API_REQUEST):
            successor = site.build_api_wire(self._address)  # its own parser
        else:
            successor = site.build_channel(self._address)
        self._hand_over(successor)

    def connectionLost(self, reason: Any = None) -> None:
        _cancel(self._deadline)

    def _hand_over(self, successor: Any) -> None:
        transport = self.transport
        switch_protocol(transport, successor)
        successor.makeConnection(transport)
        head, self._head = self._head, b""
        successor.dataReceived(head)


class RequestDeadlines:
    """
    The request and response deadlines of an HTTP connection, on one timer
    moved lazily (ChatChannel's docstring says why), for twisted.web's
    channel and for the server API's lean one (``webchat.apiwire``) alike.

    Needs ``self.factory`` (the ChatSite) and ``self.transport``.
    """

    factory: ChatSite
    transport: Any
    #: The one timer: due at or before the current deadline.
    _deadline: IDelayedCall | None = None
    #: The deadline the connection is under now: "request" (a complete
    #: request is awaited), "response" (one is being answered) or None.
    _phase: str | None = None
    #: When the current deadline falls, on the reactor's clock.
    _expires_at = 0.0
    #: Whether a byte of the request now awaited has arrived.
    _heard = False

    def _arm(self, phase: str, timeout: float) -> None:
        """Put the connection under ``phase``'s deadline, ``timeout`` from now."""
        if timeout <= 0:
            self._phase = None  # off: a timer still pending finds nothing to do
            return
        clock = self.factory.reactor
        self._phase = phase
        self._expires_at = clock.seconds() + timeout
        timer = self._deadline
        if timer is not None and timer.active():
            if timer.getTime() <= self._expires_at:
                return  # it fires in time and looks again then
            timer.cancel()
        self._set_timer(timeout)

    def _set_timer(self, delay: float) -> None:
        # Never further off than the shorter of the two timeouts, so that
        # switching to the other deadline never has to move it sooner.
        limits = self.factory.chat.limits
        shortest = min(
            t for t in (limits.handshake_timeout, limits.response_timeout) if t > 0
        )
        self._deadline = self.factory.reactor.callLater(
            min(delay, shortest), self._timer_fired
        )

    def _disarm(self) -> None:
        self._phase = None
        _cancel(self._deadline)
        self._deadline = None

    def _timer_fired(self) -> None:
        self._deadline = None
        if self._phase is None or self.transport is None:
            return
        left = self._expires_at - self.factory.reactor.seconds()
        if left > 0:
            # The deadline moved on since the timer was set: wait the rest.
            self._set_timer(left)
            return
        phase, self._phase = self._phase, None
        if phase == "response":
            _response_deadline_passed(self.factory, self.transport)
        else:
            _deadline_passed(self.factory, self.transport, self._was_heard)

    def _was_heard(self) -> bool:
        return self._heard

    def continue_request_deadline(self, expires_at: float, heard: bool) -> None:
        """
        Take over another protocol's request deadline (the lean API path
        handing a connection to twisted.web): the client gets no new time.
        """
        if self.factory.chat.limits.handshake_timeout <= 0:
            return
        self._disarm()
        self._phase = "request"
        self._heard = heard
        self._expires_at = expires_at
        self._set_timer(max(expires_at - self.factory.reactor.seconds(), 0.0))


class ChatChannel(RequestDeadlines, HTTPChannel):
    """
    An HTTP connection whose every request must arrive complete within the
    handshake timeout of the connection opening (or of the previous
    response, on a keep-alive connection), and whose every response must be
    sent within the response timeout of its request.

    The site serves GET and HEAD only, so a request that announces a body is
    refused from its headers, before a byte of the body is read (Twisted
    would otherwise spool a large one to a temporary file first).

    At most MAX_REQUESTS_PER_CONNECTION requests are answered on one
    connection, and none that was pipelined behind a response to a client
    already gone: Twisted would answer every pipelined request, synchronously,
    in the turn that read them.

    The two deadlines share one timer, moved lazily: a keep-alive
    connection answering request after request only notes when its current
    deadline falls (no reactor timer made or cancelled per request, which
    showed in the server API's profile), and the timer, when it fires before
    that, sets itself again for the rest (it is set no further off than the
    shorter of the two timeouts, so that the other deadline never has to
    move it sooner).
    Twisted's own idle timer is left off while the request deadline is on.
    """

    site: ChatSite
    _refused = False
    #: Requests read on this connection so far.
    _requests_read = 0

    def connectionMade(self) -> None:
        if self.factory.chat.limits.handshake_timeout > 0:
            # Twisted's idle timeout is then redundant: the request deadline
            # is stricter whenever it would run (between responses), and it
            # costs a timer made and cancelled per request.
            self.timeOut = None
        super().connectionMade()
        self._arm("request", self.factory.chat.limits.handshake_timeout)

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        # length: 0 without a body, None for chunked, else the Content-Length.
        if self.length != 0:
            cap = self.factory.api_body_cap(self._command, self._path)
            if cap is None:
                self._refuse_body()
                return
            if self.length is None or self.length > cap:
                self._refuse_api_body(cap)
                return
        super().allHeadersReceived()

    def _refuse_api_body(self, cap: int) -> None:
        """
        A server API body without a length (chunked), or over the cap: refused
        from the headers, in JSON like every API answer, never read.
        """
        if self.length is None:
            status, code = b"411 Length Required", "length_required"
            detail = "send a Content-Length"
        else:
            status, code = b"413 Content Too Large", "too_large"
            detail = f"the body is over {cap} bytes"
        self._refused = True
        self.factory.chat.dropped["request_body"] += 1
        self.factory.chat.stats.api[(int(status[:3]), code)] += 1
        log.warn(
            "Server API refused {method} from {peer}: {detail} (HTTP {status})",
            peer=_peer_of(self.transport),
            method=escape_request_text(self._command.decode("latin-1")),
            detail=detail,
            status=status[:3].decode(),
        )
        body = b'{"error":"%s","detail":"%s"}\n' % (code.encode(), detail.encode())
        self._answer_and_close(status, b"Content-Type: application/json\r\n", body=body)

    def _refuse_body(self) -> None:
        method = self._command
        status = b"413 Content Too Large"
        if method not in (b"GET", b"HEAD"):
            status = b"405 Method Not Allowed"
        self._refused = True
        self.factory.chat.dropped["request_body"] += 1
        log.warn(
            "Refused request from {peer}: {method} with a body (HTTP {status})",
            peer=_peer_of(self.transport),
            method=escape_request_text(method.decode("latin-1")),
            status=status[:3].decode(),
        )
        self._answer_and_close(status, b"Allow: GET, HEAD\r\n")

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        # Called once per request, from its headers; False makes Twisted say
        # "Connection: close" (below), close after the response and drop
        # everything pipelined behind it unparsed.
        persistent = super().checkPersistence(request, version)
        self._requests_read += 1
        if persistent and self._requests_read >= MAX_REQUESTS_PER_CONNECTION:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            self.factory.chat.dropped["request_limit"] += 1
            log.info(
                "Closing connection from {peer} after its {limit}th request",
                peer=_peer_of(self.transport),
                limit=MAX_REQUESTS_PER_CONNECTION,
            )
            return False
        return persistent

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # the body of a refused request: never read into anything
        super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted would just hang up; say why, once.
        self._refused = True
        self.factory.chat.dropped["header_too_large"] += 1
        log.warn(
            "Refused request from {peer}: a header line over {limit} bytes (HTTP 431)",
            peer=_peer_of(self.transport),
            limit=self.MAX_LENGTH,
        )
        self._answer_and_close(b"431 Request Header Fields Too Large")

    def _answer_and_close(
        self, status: bytes, headers: bytes = b"", body: bytes = b""
    ) -> None:
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\nServer: " + SERVER_NAME
            + b"\r\nContent-Length: %d\r\nConnection: close\r\n" % len(body)
            + headers + b"\r\n" + body
        )  # fmt: skip
        self.transport.loseConnection()
        # Whatever else arrives is dropped unread.
        self.dataReceived = self.lineReceived = _ignore  # type: ignore[method-assign]

    def allContentReceived(self) -> None:
        # Before processing: a response finished at once restarts the
        # request deadline (requestDone) in place of this one.
        self._arm("response", self.factory.chat.limits.response_timeout)
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        self._send_head()  # a response with no body (HEAD, 204, 304)
        if self.transport is not None and self.transport.disconnecting:
            # Closing (aborted, or the client hung up): what it pipelined
            # behind this request is never parsed, let alone answered.
            self._dataBuffer = []
            self.persistent = False
            self.dataReceived = self.lineReceived = _ignore  # type: ignore[method-assign]
        super().requestDone(request)
        if self.transport is not None and not self.transport.disconnecting:
            self._heard = False
            self._arm("request", self.factory.chat.limits.handshake_timeout)

    #: A response's status line and headers, kept to go out with its first
    #: body bytes (or alone when the request is done): one send, not two.
    _head: bytes | None = None

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Any
    ) -> None:
        # Request.write hands us a Headers whose names and values twisted.web
        # has already checked (no CR or LF).
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        self._head = b"".join(head)

    def write(self, data: bytes) -> None:
        head, self._head = self._head, None
        write_now(self.transport, head + data if head is not None else data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.write(b"".join(iovec))

    def _send_head(self) -> None:
        if self._head is not None and self.transport is not None:
            self.write(b"")

    def hand_over(self) -> None:
        """The chat takes the connection over: its deadlines are the chat's now."""
        self._disarm()

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        super().connectionLost(reason)


def _ignore(*args: Any) -> None:
    return None


#: Sent with every page and file.  The page never needs anything but its own
#: origin; if a message were ever parsed as HTML no script could run, and no
#: other site may frame the chat (clickjacking).
SECURITY_HEADERS = {
    b"Content-Security-Policy": (
        b"default-src 'self'; script-src 'self'; style-src 'self'; "
        b"img-src 'self' data:; connect-src 'self'; object-src 'none'; "
        b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
}


def origin_form(target: bytes) -> bytes:
    """``http://host/ws`` becomes ``/ws``; a target that is a path is kept."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return target
    _, slash, path = rest.partition(b"/")
    return (slash + path) or b"/"


class ChatRequest(Request):
    """A request whose response carries the site's security headers."""

    def process(self) -> None:
        # The absolute form (``GET http://host/ws``), which HTTP/1.1 servers
        # must accept: routed by its path, as if it were ``GET /ws``.
        self.path = origin_form(self.path)
        for name, value in SECURITY_HEADERS.items():
            self.setHeader(name, value)
        super().process()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            # twisted.web names itself and its version in process().
            self.setHeader(b"Server", SERVER_NAME)
            if self.responseHeaders.hasHeader(b"accept-ranges"):
                self.setHeader(b"Accept-Ranges", b"none")  # see ChatFile
        super().write(data)


class ChatSite(Site):
    """The site, knowing the chat it serves (for its limits and counters)."""

    protocol = ChatChannel
    requestFactory = ChatRequest

    def __init__(
        self,
        resource: IResource,
        chat: WebChatFactory,
        *,
        api_max_body: int | None = None,
        serves_chat: bool = True,
        api: ServerApi | None = None,
    ) -> None:
        # Nothing here takes form posts: never parse (and buffer) their bodies.
        super().__init__(
            resource,
            reactor=chat.reactor,
            parsePOSTFormSubmission=False,
            logFormatter=redacted_access_log,
        )
        self.chat = chat
        self.displayTracebacks = False
        #: The most body bytes a POST to /api/ may have; None: no API here.
        self.api_max_body = api_max_body
        #: Whether a WebSocket upgrade here goes to the chat (not on the
        #: --api-port site, which is the API and nothing else).
        self.serves_chat = serves_chat
        #: The server API, whose requests the lean path (webchat.apiwire)
        #: reads itself; None: twisted.web reads every request here.
        self.api = api

    def api_body_cap(self, method: bytes, path: bytes) -> int | None:
        """The body a request may have: a POST to the server API only."""
        if self.api_max_body is None or method != b"POST":
            return None
        path = origin_form(path)
        if path == b"/api" or path.startswith(b"/api/"):
            return self.api_max_body
        return None

    def buildProtocol(self, addr: Any) -> Any:
        if not self.serves_chat:
            if self.api is not None:
                return self.build_api_wire(addr)
            return self.build_channel(addr)
        return Doorway(self, addr)

    def build_api_wire(self, addr: Any) -> Any:
        """The lean HTTP/1.1 protocol for a connection asking the server API."""
        # Imported here: apiwire builds on this module.
        from webchat.apiwire import ApiWire

        assert self.api is not None
        return ApiWire(self, self.api, addr)

    def build_channel(self, addr: Any) -> Any:
        """The HTTP channel for a connection that is not a chat upgrade."""
        return super().buildProtocol(addr)

    def log(self, request: Request) -> None:
        # Probes and scrapes every few seconds would drown the access log;
        # so would the app's publishing with --quiet (a line per message).
        if request.path in QUIET_PATHS:
            return
        if self.chat.quiet and self.api_max_body is not None:
            path = request.path
            if path == b"/api" or path.startswith(b"/api/"):
                return
        super().log(request)


def redacted_access_log(timestamp: str, request: Request) -> str:
    """
    The access log's line (Twisted's combined format) with every ``token=``
    value redacted, in the request target and the Referer alike: a page
    opened with ``?token=`` sends its address as the Referer of its files.
    """
    return redact_query(combinedLogFormatter(timestamp, request))


def make_site(
    factory: WebChatFactory,
    web_root: Path | str | None = None,
    metrics: IResource | None = None,
    api: IResource | None = None,
) -> ChatSite:
    """
    Build the site that serves the page, the chat and ``/healthz`` on one
    port, ``/metrics`` too when given one, and the server API at ``/api``
    when given it.
    """
    root = Path(web_root) if web_root is not None else default_web_root()
    endpoints: dict[bytes, IResource] = {b"healthz": HealthResource(factory)}
    if metrics is not None:
        endpoints[b"metrics"] = LocalOnly(metrics, factory)
    files = ChatFile(str(root))
    chat_root = ChatRoot(files, ChatWebSocketResource(factory), endpoints, api)
    return ChatSite(
        chat_root,
        factory,
        api_max_body=api_max_body(factory) if api is not None else None,
        api=api if isinstance(api, ServerApi) else None,
    )


def api_max_body(factory: WebChatFactory) -> int:
    """The largest server API request body: a whole message and its JSON."""
    size = factory.limits.max_message_size
    return size + API_BODY_OVERHEAD if size else API_MAX_BODY


def make_api_site(factory: WebChatFactory, api: IResource) -> ChatSite:
    """A site with only the server API at ``/api``, for ``--api-port``."""
    root = Resource()
    root.putChild(b"api", api)
    return ChatSite(
        root,
        factory,
        api_max_body=api_max_body(factory),
        serves_chat=False,
        api=api if isinstance(api, ServerApi) else None,
    )


def make_metrics_site(factory: WebChatFactory, metrics: IResource) -> ChatSite:
    """A site with only ``/metrics`` and ``/healthz``, for ``--metrics-port``."""
    root = Resource()
    root.putChild(b"metrics", metrics)
    root.putChild(b"healthz", HealthResource(factory))
    return ChatSite(root, factory)
