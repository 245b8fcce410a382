"""``twistd webchat``: the only place the command line meets the code."""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from webchat import __version__
from webchat.protocol import WebChatFactory
from webchat.service import ChatService
from webchat.web import default_web_root, make_site

#: Where the server listens when no --port is given.
DEFAULT_PORT = "tcp:8080"


def endpoint_description(value: str) -> str:
    """A bare number means TCP on that port; anything else is an endpoint string."""
    return f"tcp:{value}" if value.isdigit() else value


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve a WebSocket chat and its page on one port.  Every text message "
        "a client sends is relayed as 'id N: text' to every other client."
    )

    optFlags = [
        ["quiet", "q", "Do not log a line for every relayed message."],
    ]
    optParameters = [
        [
            "web-root",
            None,
            None,
            "Serve the static files in DIR instead of the shipped page.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []

    def opt_port(self, value: str) -> None:
        self["port"].append(endpoint_description(value))

    opt_port.__doc__ = (
        "Listen on this endpoint: a port number, or a Twisted endpoint string"
        " such as tcp:8080:interface=127.0.0.1, ssl:8443:privateKey=key.pem,"
        " unix:/run/webchat.sock or systemd:domain=INET:index=0."
        f" Repeat to listen on several. [default: {DEFAULT_PORT}]"
    )

    opt_p = opt_port

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"webchat {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if not self["port"]:
            self["port"] = [DEFAULT_PORT]
        if self["web-root"] is None:
            self["web-root"] = str(default_web_root())


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    top = MultiService()
    factory = WebChatFactory(reactor, quiet=options["quiet"])
    ChatService(factory, handle_signals=True).setServiceParent(top)
    site = make_site(factory, options["web-root"])
    for description in options["port"]:
        endpoint = serverFromString(reactor, description)
        StreamServerEndpointService(endpoint, site).setServiceParent(top)
    return top
