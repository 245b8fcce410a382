"""The site: static files and the WebSocket upgrade, on one port.

The seed's client opens ``ws://host:port`` with no path, so an upgrade is
accepted on ``/`` as well as on ``/ws``; a plain GET on ``/`` still gets the
page.  The choice is made per request from the ``Upgrade`` header, before
any static file is looked at.
"""

from __future__ import annotations

from pathlib import Path

from autobahn.twisted.resource import WebSocketResource
from twisted.web.pages import errorPage
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from webchat.protocol import WebChatFactory

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
    """Route upgrades on ``/`` and ``/ws`` to the chat, everything else to files."""

    def __init__(self, files: File, websocket: WebSocketResource) -> None:
        super().__init__()
        self._files = files
        self._websocket = websocket

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        at_end = not request.postpath
        if at_end and path in WEBSOCKET_PATHS:
            if wants_websocket(request):
                return self._websocket
            if path == b"ws":
                return _upgrade_required()
        return self._files.getChildWithDefault(path, request)

    def render(self, request: Request) -> bytes:
        # Only reached for a request with an empty path (e.g. "GET" with no
        # slash at all): treat it like "/".
        return self._files.render(request)


def _upgrade_required() -> IResource:
    page = errorPage(426, "Upgrade Required", "This address only speaks WebSocket.")
    return _WithHeader(page, b"Upgrade", b"websocket")


class _WithHeader(Resource):
    isLeaf = True

    def __init__(self, inner: IResource, name: bytes, value: bytes) -> None:
        super().__init__()
        self._inner = inner
        self._name = name
        self._value = value

    def render(self, request: Request) -> bytes:
        request.setHeader(self._name, self._value)
        return self._inner.render(request)


def make_site(factory: WebChatFactory, web_root: Path | str | None = None) -> Site:
    """Build the ``Site`` that serves the page and the chat on one port."""
    root = Path(web_root) if web_root is not None else default_web_root()
    files = File(str(root))
    site = Site(ChatRoot(files, WebSocketResource(factory)))
    site.displayTracebacks = False
    return site
