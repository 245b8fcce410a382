"""``twistd webchat``: the only place the command line meets the code."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from webchat import __version__, limits
from webchat.access import AccessPolicy
from webchat.metrics import make_registry
from webchat.protocol import WebChatFactory
from webchat.relay import (
    DEFAULT_CHANNEL,
    RedisRelay,
    check_channel,
    check_node_id,
    parse_redis_url,
)
from webchat.service import ChatService
from webchat.web import default_web_root, make_metrics_site, make_site

#: Where the server listens when no --port is given.
DEFAULT_PORT = "tcp:8080"

log = Logger(namespace="webchat")


def endpoint_description(value: str) -> str:
    """A bare number means TCP on that port; anything else is an endpoint string."""
    return f"tcp:{value}" if value.isdigit() else value


def _non_negative(kind: type) -> object:
    def coerce(value: str) -> float | int:
        number = kind(value)
        if number < 0:
            raise ValueError(f"must not be negative: {value}")
        return number

    coerce.coerceDoc = "Must be >= 0."  # type: ignore[attr-defined]
    return coerce


def _help(text: str):
    """Set an ``opt_`` method's help on one line (usage.Options prints it raw)."""

    def decorate(method):
        method.__doc__ = " ".join(text.split())
        return method

    return decorate


_int = _non_negative(int)
_float = _non_negative(float)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve a WebSocket chat and its page on one port.  Every text message "
        "a client sends is relayed as 'id N: text' to every other client.  "
        "Limits marked 0 = off can be turned off with 0."
    )

    optFlags = [
        ["quiet", "q", "Do not log a line for every relayed message."],
        ["no-metrics", None, "Do not serve /metrics at all."],
    ]
    optParameters = [
        [
            "metrics-port",
            None,
            None,
            "Serve /metrics (and /healthz) on this endpoint instead of on the "
            "chat's own port, e.g. tcp:9100:interface=127.0.0.1.",
        ],
        [
            "web-root",
            None,
            None,
            "Serve the static files in DIR instead of the shipped page.",
        ],
        [
            "max-connections",
            None,
            None,
            "Most WebSocket connections at once; more get HTTP 503. "
            f"[default: the open-file limit minus {limits.FD_RESERVE}]",
            _int,
        ],
        [
            "max-connections-per-ip",
            None,
            limits.MAX_CONNECTIONS_PER_IP,
            "Most connections from one client address; more get HTTP 429. 0 = off "
            "(behind a proxy every client shares its address: see --trust-proxy).",
            _int,
        ],
        [
            "max-message-size",
            None,
            limits.MAX_MESSAGE_SIZE,
            "Largest message or frame in bytes; bigger closes with 1009.",
            _int,
        ],
        [
            "max-message-frames",
            None,
            limits.MAX_MESSAGE_FRAMES,
            "Most frames one message may arrive in; more closes with 1009. 0 = off.",
            _int,
        ],
        [
            "rate-limit",
            None,
            limits.RATE_LIMIT,
            "Messages per second one connection may send on average; faster "
            "closes with 1008. 0 = off.",
            _float,
        ],
        [
            "rate-burst",
            None,
            limits.RATE_BURST,
            "Messages one connection may send in a burst above --rate-limit.",
            _int,
        ],
        [
            "frame-rate-limit",
            None,
            limits.FRAME_RATE_LIMIT,
            "Frames of any kind (text, continuation, ping, pong) per second one "
            f"connection may send, in bursts of {limits.FRAME_BURST_SECONDS:g} s' "
            "worth; faster closes with 1008. 0 = off.",
            _float,
        ],
        [
            "max-send-buffer",
            None,
            limits.MAX_SEND_BUFFER,
            "Unsent bytes queued for one client before it is closed as too slow "
            "(1008). 0 = off.",
            _int,
        ],
        [
            "ping-interval",
            None,
            limits.PING_INTERVAL,
            "Seconds of silence before the server pings a client. 0 = off.",
            _float,
        ],
        [
            "ping-timeout",
            None,
            limits.PING_TIMEOUT,
            "Seconds a pinged client has to answer before it is dropped.",
            _float,
        ],
        [
            "handshake-timeout",
            None,
            limits.HANDSHAKE_TIMEOUT,
            "Seconds from TCP accept to a complete request or WebSocket "
            "handshake; slower connections are closed. 0 = off.",
            _float,
        ],
        [
            "redis",
            None,
            None,
            "Share the chat with other webchat processes through Redis pub/sub: "
            "redis://[:password@]host:port/db, rediss://... (TLS) or "
            "unix:///path. Without it this process is the whole chat.",
        ],
        [
            "redis-channel",
            None,
            DEFAULT_CHANNEL,
            "The Redis channel (and key prefix) the nodes of one chat share.",
        ],
        [
            "node-id",
            None,
            None,
            "This node's name in relayed messages [default: host-pid-random].",
        ],
        [
            "shutdown-grace",
            None,
            limits.SHUTDOWN_GRACE,
            "Seconds shutdown waits for clients to answer close 1001.",
            _float,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []
        self["allowed-origin"] = []
        self["trust-proxy"] = []

    @_help(
        f"""Listen on this endpoint: a port number, or a Twisted endpoint string
        such as tcp:8080:interface=127.0.0.1, ssl:8443:privateKey=key.pem,
        unix:/run/webchat.sock or systemd:domain=INET6:index=0. Repeat to listen
        on several. [default: {DEFAULT_PORT}]"""
    )
    def opt_port(self, value: str) -> None:
        self["port"].append(endpoint_description(value))

    opt_p = opt_port

    @_help(
        """Also accept WebSockets from pages of this origin (scheme://host[:port]);
        '*' accepts any. Repeatable. By default only same-origin pages and
        clients sending no Origin (non-browsers) may connect; others get 403."""
    )
    def opt_allowed_origin(self, value: str) -> None:
        self["allowed-origin"].append(value)

    @_help(
        """Believe X-Forwarded-For and X-Forwarded-Proto from this peer address
        or network (e.g. 127.0.0.1, 10.0.0.0/8). Repeatable."""
    )
    def opt_trust_proxy(self, value: str) -> None:
        self["trust-proxy"].append(value)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"webchat {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if not self["port"]:
            self["port"] = [DEFAULT_PORT]
        if self["no-metrics"] and self["metrics-port"]:
            raise usage.UsageError("--no-metrics and --metrics-port contradict")
        if self["web-root"] is None:
            self["web-root"] = str(default_web_root())
        try:
            self["access"] = AccessPolicy.from_options(
                self["allowed-origin"], self["trust-proxy"]
            )
            if self["redis"]:
                parse_redis_url(self["redis"])
                check_channel(self["redis-channel"])
                if self["node-id"]:
                    check_node_id(self["node-id"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def limits(self) -> limits.Limits:
        """The limits these options ask for (max-connections left 0 if unset)."""
        return limits.Limits(
            max_message_size=self["max-message-size"],
            max_message_frames=self["max-message-frames"],
            rate_limit=self["rate-limit"],
            rate_burst=self["rate-burst"],
            frame_rate_limit=self["frame-rate-limit"],
            max_send_buffer=self["max-send-buffer"],
            ping_interval=self["ping-interval"],
            ping_timeout=self["ping-timeout"],
            handshake_timeout=self["handshake-timeout"],
            shutdown_grace=self["shutdown-grace"],
            max_connections=self["max-connections"] or 0,
            max_connections_per_ip=self["max-connections-per-ip"],
        )


def makeService(options: Options) -> IService:
    # Imported here, not at the top: both install the global reactor, which
    # must wait until twistd has chosen one (--reactor).
    from prometheus_client.twisted import MetricsResource
    from twisted.internet import reactor

    chosen = options.limits()
    if options["max-connections"] is None:
        open_files = limits.raise_open_file_limit()
        chosen = limits.Limits(
            **{**chosen.__dict__, "max_connections": limits.default_max_connections()}
        )
        log.info(
            "Open-file limit {files}: accepting up to {max} connections",
            files=open_files,
            max=chosen.max_connections,
        )
    factory = WebChatFactory(
        reactor, quiet=options["quiet"], limits=chosen, access=options["access"]
    )
    # The listeners are children of the chat service: it drains the chat
    # before they stop listening.
    top = ChatService(factory, handle_signals=True)
    if options["redis"]:
        link = RedisRelay(
            reactor,
            options["redis"],
            options["redis-channel"],
            options["node-id"],
            max_text_size=chosen.max_message_size,
            on_envelope=factory.deliver_remote,
        )
        factory.attach_link(link)
        # Before the listeners: it starts first, and stops after the drain.
        link.setServiceParent(top)
    metrics = None
    if not options["no-metrics"]:
        metrics = MetricsResource(make_registry(factory))
    if options["metrics-port"]:
        listen(
            reactor, top, options["metrics-port"], make_metrics_site(factory, metrics)
        )
        metrics = None  # not on the public port, then
    site = make_site(factory, options["web-root"], metrics)
    for description in options["port"]:
        listen(reactor, top, description, site)
    return top


def listen(reactor: Any, parent: MultiService, description: str, factory: Any) -> None:
    try:
        endpoint = serverFromString(reactor, description)
    except (IndexError, KeyError) as e:
        # Twisted's systemd parser fails with a bare IndexError/KeyError.
        raise usage.UsageError(
            f"{description}: no such socket was passed in by systemd "
            f"({e!r}); start webchat through webchat.socket"
        ) from None
    StreamServerEndpointService(endpoint, factory).setServiceParent(parent)
