"""The site: static files and the WebSocket upgrade, on one port.

The seed's client opens ``ws://host:port`` with no path, so an upgrade is
accepted on ``/`` as well as on ``/ws``; a plain GET on ``/`` still gets the
page.  The choice is made from the ``Upgrade`` header: by the ``Doorway`` for
a connection's first request (an upgrade then never touches twisted.web),
and by ``ChatRoot`` for any later request on a keep-alive connection.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from webchat.health import HealthResource
from webchat.logtext import escape_for_log
from webchat.protocol import WebChatFactory

log = Logger(namespace="webchat")

#: Paths polled by machines, left out of the access log.
QUIET_PATHS = frozenset({b"/healthz", b"/metrics"})

#: Paths on which a WebSocket upgrade is accepted.
WEBSOCKET_PATHS = (b"", b"ws")


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
    ) -> None:
        super().__init__()
        self._files = files
        self._websocket = websocket
        self._endpoints = endpoints or {}

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        at_end = not request.postpath
        if at_end and path in WEBSOCKET_PATHS:
            if wants_websocket(request):
                return self._websocket
            if path == b"ws":
                return _upgrade_required()
        endpoint = self._endpoints.get(path)
        if endpoint is not None and at_end:
            return endpoint
        return self._files.getChildWithDefault(path, request)

    def render(self, request: Request) -> bytes:
        # Only reached for a request with an empty path (e.g. "GET" with no
        # slash at all): treat it like "/".
        return self._files.render(request)


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


def _deadline_passed(site: ChatSite, transport: Any, heard: Callable[[], bool]) -> None:
    chat = site.chat
    peer = escape_for_log(str(getattr(transport.getPeer(), "host", None) or "unix"))
    timeout = chat.limits.handshake_timeout
    if heard():
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
_REQUEST_LINE = re.compile(rb"^GET (/|/ws)(\?[^ ]*)? HTTP/1\.1$")


def is_chat_upgrade(head: bytes) -> bool:
    """Is this request head a WebSocket upgrade on one of the chat's paths?"""
    request_line, _, _ = head.partition(b"\r\n")
    if _REQUEST_LINE.match(request_line) is None:
        return False
    return _UPGRADE_LINE.search(head.lower() + b"\r\n") is not None


class Doorway(Protocol):
    """
    The first protocol of every connection: reads the request head and hands
    the connection to the chat or to the web site.

    A WebSocket upgrade on ``/`` or ``/ws`` goes straight to the chat's
    Autobahn protocol, which parses the handshake itself; everything else
    (the page, ``/healthz``, ``/metrics``, garbage) goes to Twisted's HTTP
    channel.  Letting twisted.web parse an upgrade first would build a
    request object, headers and a channel that the WebSocket immediately
    throws away, and that is most of what a new chat connection costs.
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
        if end >= 0 and is_chat_upgrade(self._head[:end]):
            successor = self._site.chat.buildProtocol(self._address)
        else:
            successor = self._site.build_channel(self._address)
        self._hand_over(successor)

    def connectionLost(self, reason: Any = None) -> None:
        _cancel(self._deadline)

    def _hand_over(self, successor: Any) -> None:
        transport = self.transport
        # Where the reactor (or the TLS layer under it) will deliver from now on.
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = successor
        elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
            transport.protocol.wrappedProtocol = successor
        else:
            transport.protocol = successor
        successor.makeConnection(transport)
        head, self._head = self._head, b""
        successor.dataReceived(head)


class ChatChannel(HTTPChannel):
    """
    An HTTP connection whose every request must arrive complete within the
    handshake timeout of the connection opening (or of the previous
    response, on a keep-alive connection).
    """

    site: ChatSite
    _deadline: IDelayedCall | None = None
    #: Whether a byte of the request now awaited has arrived.
    _heard = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._deadline = start_deadline(self.factory, self.transport, self._was_heard)

    def _was_heard(self) -> bool:
        return self._heard

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        _cancel(self._deadline)
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        super().requestDone(request)
        if self.transport is not None and not self.transport.disconnecting:
            _cancel(self._deadline)
            self._heard = False
            self._deadline = start_deadline(
                self.factory, self.transport, self._was_heard
            )

    def connectionLost(self, reason: Any) -> None:
        _cancel(self._deadline)
        super().connectionLost(reason)


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


class ChatRequest(Request):
    """A request whose response carries the site's security headers."""

    def process(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.setHeader(name, value)
        super().process()


class ChatSite(Site):
    """The site, knowing the chat it serves (for its limits and counters)."""

    protocol = ChatChannel
    requestFactory = ChatRequest

    def __init__(self, resource: IResource, chat: WebChatFactory) -> None:
        # Nothing here takes form posts: never parse (and buffer) their bodies.
        super().__init__(resource, reactor=chat.reactor, parsePOSTFormSubmission=False)
        self.chat = chat
        self.displayTracebacks = False

    def buildProtocol(self, addr: Any) -> Doorway:
        return Doorway(self, addr)

    def build_channel(self, addr: Any) -> Any:
        """The HTTP channel for a connection that is not a chat upgrade."""
        return super().buildProtocol(addr)

    def log(self, request: Request) -> None:
        # Probes and scrapes every few seconds would drown the access log.
        if request.path not in QUIET_PATHS:
            super().log(request)


def make_site(
    factory: WebChatFactory,
    web_root: Path | str | None = None,
    metrics: IResource | None = None,
) -> ChatSite:
    """
    Build the site that serves the page, the chat and ``/healthz`` on one
    port, and ``/metrics`` too when given one.
    """
    root = Path(web_root) if web_root is not None else default_web_root()
    endpoints: dict[bytes, IResource] = {b"healthz": HealthResource(factory)}
    if metrics is not None:
        endpoints[b"metrics"] = metrics
    files = File(str(root))
    return ChatSite(ChatRoot(files, WebSocketResource(factory), endpoints), factory)


def make_metrics_site(factory: WebChatFactory, metrics: IResource) -> ChatSite:
    """A site with only ``/metrics`` and ``/healthz``, for ``--metrics-port``."""
    root = Resource()
    root.putChild(b"metrics", metrics)
    root.putChild(b"healthz", HealthResource(factory))
    return ChatSite(root, factory)
