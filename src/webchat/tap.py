"""``twistd webchat``: the only place the command line meets the code."""

from __future__ import annotations

import math
import os
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from webchat import __version__, limits
from webchat.access import AccessPolicy
from webchat.api import ServerApi, read_api_key
from webchat.auth import (
    AUTH_MODES,
    TokenVerifier,
    check_hmac_secret,
    load_public_key,
    read_key_file,
)
from webchat.chat import WebChatFactory
from webchat.history.sqlite import SQLiteHistory
from webchat.metrics import MetricsPage, make_registry
from webchat.redis import (
    DEFAULT_CHANNEL,
    RedisRelay,
    check_channel,
    check_node_id,
    parse_redis_url,
)
from webchat.service import ChatService, ListeningService
from webchat.web import (
    default_web_root,
    make_api_site,
    make_metrics_site,
    make_site,
)
from webchat.webhooks import (
    DEFAULT_EVENTS,
    EVENT_TYPES,
    AppEvents,
    WebhookSender,
    parse_event_types,
    treq_post,
)
from webchat.webhooks.sender import safe_url

#: Where the server listens when no --port is given.
DEFAULT_PORT = "tcp:8080"
#: The environment variable read for the Redis URL when --redis is absent:
#: unlike the command line, the environment is not shown by ps.
REDIS_URL_VARIABLE = "WEBCHAT_REDIS_URL"

log = Logger(namespace="webchat")


#: What --port and --metrics-port accept, for error messages.
ENDPOINT_EXAMPLES = "use 8080, tcp:8080:interface=127.0.0.1, ssl:..., unix:..."

#: The placeholder each option's value has in ``--help``.
PLACEHOLDERS = {
    "port": "ENDPOINT",
    "metrics-port": "ENDPOINT",
    "api-port": "ENDPOINT",
    "api-key-file": "FILE",
    "api-rate-limit": "N",
    "web-root": "DIR",
    "allowed-origin": "ORIGIN",
    "trust-proxy": "ADDR",
    "max-connections": "N",
    "max-connections-per-ip": "N",
    "max-rooms": "N",
    "max-message-size": "BYTES",
    "max-message-frames": "N",
    "rate-limit": "N",
    "rate-burst": "N",
    "frame-rate-limit": "N",
    "max-send-buffer": "BYTES",
    "ping-interval": "S",
    "ping-timeout": "S",
    "handshake-timeout": "S",
    "response-timeout": "S",
    "shutdown-grace": "S",
    "redis": "URL",
    "redis-password-file": "FILE",
    "redis-channel": "NAME",
    "node-id": "NAME",
    "presence-timeout": "S",
    "outage-buffer": "N",
    "history": "N",
    "history-ttl": "S",
    "history-db": "PATH",
    "webhook-url": "URL",
    "webhook-secret-file": "FILE",
    "webhook-timeout": "S",
    "webhook-offline-delay": "S",
    "webhook-events": "LIST",
    "webhook-queue": "N",
    "auth": "MODE",
    "jwt-secret-file": "FILE",
    "jwt-public-key-file": "FILE",
    "jwt-audience": "AUD",
    "jwt-issuer": "ISS",
}


def endpoint_description(value: str) -> str:
    """A bare number means TCP on that port; anything else is an endpoint string."""
    return f"tcp:{value}" if value.isdigit() else value


def check_endpoint(option: str, value: str) -> str:
    """
    The endpoint string ``value`` stands for, or a ``UsageError`` naming
    ``option`` and saying what is wrong.

    The endpoint is parsed here (without a reactor, so nothing listens yet):
    a typo must stop the server before it starts, in one line, not surface as
    a traceback from the reactor once twistd is running.
    """
    if value.lstrip("-").isdigit() and not 0 <= int(value) <= 65535:
        raise usage.UsageError(f"--{option}: port must be 0-65535, got {value}")
    description = endpoint_description(value)
    try:
        endpoint = serverFromString(None, description)
    except ValueError as e:
        if str(e).startswith("Unknown endpoint type"):
            kind = description.split(":", 1)[0]
            raise usage.UsageError(
                f"--{option}: unknown endpoint type {kind!r} ({ENDPOINT_EXAMPLES})"
            ) from None
        raise usage.UsageError(f"--{option}: {value}: {e}") from None
    except TypeError as e:
        # An unknown key=value: Twisted passes it on as a keyword argument.
        unknown = str(e).rpartition("argument ")[2] or str(e)
        hint = ENDPOINT_EXAMPLES
        if "::" in value or "=:" in value:
            # interface=::1 splits at every ':'; Twisted wants them escaped.
            hint = r"escape every ':' of an IPv6 address: tcp:8080:interface=\:\:1"
        raise usage.UsageError(
            f"--{option}: {value}: unknown parameter {unknown} ({hint})"
        ) from None
    except (IndexError, KeyError) as e:
        # Twisted's systemd parser fails with a bare IndexError/KeyError.
        raise usage.UsageError(
            f"--{option}: {value}: no such socket was passed in by systemd "
            f"({e!r}); start webchat through webchat.socket"
        ) from None
    except Exception as e:  # e.g. ssl: with a missing or unreadable key file
        raise usage.UsageError(f"--{option}: {value}: {e}") from None
    port = getattr(endpoint, "_port", 0)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise usage.UsageError(f"--{option}: port must be 0-65535, got {port}")
    return description


def _non_negative(kind: type) -> Callable[[str], float | int]:
    def coerce(value: str) -> float | int:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"expected a number >= 0, got {value!r}") from None
        if not math.isfinite(number):
            # float() takes "nan", "inf" and "1e309": an infinite rate turns
            # every budget into nan and closes every chat connection; a nan
            # timeout is a traceback from the reactor.
            raise ValueError(f"expected a finite number >= 0, got {value!r}")
        if number < 0:
            raise ValueError(f"must not be negative, got {value}")
        return number

    return coerce


def _naming(option: str, coerce: Callable[[str], Any]) -> Callable[[str], Any]:
    """``coerce``, with its complaint naming the option (usage.Options' does not)."""

    def named(value: str) -> Any:
        try:
            return coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{option}: {e}") from None

    return named


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
        "twistd's own options (--pidfile=, --logfile, -n) go before 'webchat'."
    )

    optFlags = [
        [
            "quiet",
            "q",
            "Do not log a line for every relayed message (nor an access-log "
            "line for every server API request).",
        ],
        ["no-metrics", None, "Do not serve /metrics at all."],
        [
            "history-for-text-clients",
            None,
            "Send seed-format clients the room's history too, as 'id N: text' "
            "lines, when they join.",
        ],
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
            "api-key-file",
            None,
            None,
            "Turn the server API on (/api/ on the chat's port, docs/api.md): "
            "requests must carry 'Authorization: Bearer <key>', the key being "
            "this file's first line.",
        ],
        [
            "api-port",
            None,
            None,
            "Serve the server API on this endpoint instead of on the chat's "
            "port, e.g. tcp:8081:interface=127.0.0.1 (needs --api-key-file).",
        ],
        [
            "api-rate-limit",
            None,
            limits.API_RATE_LIMIT,
            "Server API requests per second the key may make, in bursts of "
            f"{limits.API_BURST_SECONDS:g} s' worth; faster get HTTP 429. 0 = off.",
            _float,
        ],
        [
            "max-connections",
            None,
            None,
            "Most WebSocket connections at once; more get HTTP 503. 0 = no cap. "
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
            "max-rooms",
            None,
            limits.MAX_ROOMS,
            "Most rooms open at once (/ws/<room>); a join that would open one more "
            "gets HTTP 503. 0 = no cap.",
            _int,
        ],
        [
            "max-message-size",
            None,
            limits.MAX_MESSAGE_SIZE,
            "Largest message or frame in bytes; bigger closes with 1009. 0 = no limit.",
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
            "Messages one connection may send in a burst above --rate-limit "
            "(0 counts as 1).",
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
            "Seconds of silence before the server pings a client, and the most "
            "one message may take to arrive (else 1008). 0 = off.",
            _float,
        ],
        [
            "ping-timeout",
            None,
            limits.PING_TIMEOUT,
            "Seconds a pinged client has to answer before it is dropped (0 drops "
            "it at once: turn pings off with --ping-interval 0 instead).",
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
            "response-timeout",
            None,
            limits.RESPONSE_TIMEOUT,
            "Seconds a plain HTTP response (page, /healthz, /metrics) may take "
            "to be sent; a client that stops reading is cut off. 0 = off.",
            _float,
        ],
        [
            "redis",
            None,
            None,
            "Share the chat with other webchat processes through Redis pub/sub: "
            "redis://[:password@]host:port/db, rediss://... (TLS) or "
            "unix:///path. Without it this process is the whole chat. "
            f"[default: ${REDIS_URL_VARIABLE}, which keeps a password out of ps]",
        ],
        [
            "redis-password-file",
            None,
            None,
            "Read the Redis password from this file (one line; e.g. a systemd "
            "credential) instead of putting it in the URL.",
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
            "presence-timeout",
            None,
            limits.PRESENCE_TIMEOUT,
            "With --redis: seconds another node may go unheard before its "
            "members leave everywhere (each node beats every third of it; use "
            "the same on every node). 0 = never.",
            _float,
        ],
        [
            "outage-buffer",
            None,
            limits.OUTAGE_BUFFER,
            "With --redis: messages said here while Redis is away that are "
            "kept to reach the other nodes and the history once it is back "
            "(marked delayed); past it they reach only this node's clients.",
            _int,
        ],
        [
            "history",
            None,
            limits.HISTORY,
            "Messages each room remembers for members who join or reconnect "
            "(JSON clients get them on join; a reconnect gets what it missed). "
            "0 = none.",
            _int,
        ],
        [
            "history-ttl",
            None,
            limits.HISTORY_TTL,
            "Seconds a message is remembered; an emptied room keeps its history "
            "this long after its last message. 0 = no age limit.",
            _float,
        ],
        [
            "history-db",
            None,
            None,
            "Keep history in this SQLite file, so it survives a restart (one "
            "process only; not with --redis). Default: in memory.",
        ],
        [
            "webhook-url",
            None,
            None,
            "POST signed events (user.online, user.offline, room.vacated, "
            "message) to this http:// or https:// URL (docs/webhooks.md), "
            "which may not hold credentials (user:pass@). "
            "Needs --webhook-secret-file.",
        ],
        [
            "webhook-secret-file",
            None,
            None,
            "Read the secret that signs webhook requests (HMAC-SHA256) from "
            "this file: its first line.",
        ],
        [
            "webhook-timeout",
            None,
            limits.WEBHOOK_TIMEOUT,
            "Seconds one webhook request may take before it is retried "
            "(with backoff). 0 = no limit.",
            _float,
        ],
        [
            "webhook-offline-delay",
            None,
            limits.WEBHOOK_OFFLINE_DELAY,
            "Seconds a user's last connection must stay closed before "
            "user.offline is sent (a page reload sends nothing). 0 = at once.",
            _float,
        ],
        [
            "webhook-events",
            None,
            ",".join(DEFAULT_EVENTS),
            "The webhook events to send, comma-separated, from "
            f"{', '.join(EVENT_TYPES)} (message must be asked for).",
        ],
        [
            "webhook-queue",
            None,
            limits.WEBHOOK_QUEUE,
            "Webhook events waiting to be sent, at most; past it a new event "
            "evicts the oldest waiting room.vacated, then message, of lesser "
            "kind, else is dropped; counted.",
            _int,
        ],
        [
            "auth",
            None,
            "off",
            "Who may connect: 'off' (anyone, anonymous), 'optional' (a signed "
            "token in ?token= if given; private- rooms need one) or 'required' "
            "(a token for every connection, else HTTP 401).",
        ],
        [
            "jwt-secret-file",
            None,
            None,
            "Check HS256 tokens with the shared secret in this file (its "
            "whole contents, surrounding whitespace stripped; a public key or "
            "certificate there stops the server).",
        ],
        [
            "jwt-public-key-file",
            None,
            None,
            "Check RS256 or ES256 tokens with the RSA or EC public key in this "
            "PEM file.",
        ],
        [
            "jwt-audience",
            None,
            None,
            "Accept only tokens whose aud claim is this.",
        ],
        [
            "jwt-issuer",
            None,
            None,
            "Accept only tokens whose iss claim is this.",
        ],
        [
            "shutdown-grace",
            None,
            limits.SHUTDOWN_GRACE,
            "Seconds shutdown waits for clients to answer close 1001. 0 = do not wait.",
            _float,
        ],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        for name, dispatch in self._dispatch.items():
            if isinstance(dispatch, usage.CoerceParameter):
                dispatch.coerce = _naming(name, dispatch.coerce)
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
        self["port"].append(check_endpoint("port", value))

    opt_p = opt_port

    @_help(
        """Also accept WebSockets from pages of this origin (scheme://host[:port]);
        '*' accepts any, 'null' the null origin (sandboxed frames, file: pages).
        Repeatable. By default only same-origin pages and clients sending no
        Origin (non-browsers) may connect; others get 403."""
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

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse, and under twistd turn a mistake into one line and exit status 2.

        twistd answers a ``UsageError`` with the whole help and then a message
        that names neither the option nor the value; a user who mistyped one
        option wants to be told which, and how to write it.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:  # called directly (tests, other tools)
                raise
            print(f"webchat: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    def getSynopsis(self) -> str:
        return "Usage: twistd [options] webchat [options]"

    def getUsage(self, width: int | None = None) -> str:
        """
        Twisted's option listing, with a placeholder for every value
        (``--port=ENDPOINT``, not Twisted's bare ``--port=``).
        """
        shorts = {v: k for k, v in self.synonyms.items() if len(k) == 1}
        rows = []
        for long in self.longOpt:
            name = long.rstrip("=")
            doc = self.docs.get(name) or ""
            shown = name
            if long.endswith("="):
                default = self.defaults.get(name)
                if isinstance(default, float):
                    default = f"{default:g}"
                if default is not None:
                    doc = f"{doc} [default: {default}]"
                shown = f"{name}={PLACEHOLDERS.get(name, 'VALUE')}"
            # As a "flag", so Twisted adds no second "=" and no default of its own.
            rows.append(
                {
                    "long": shown,
                    "short": shorts.get(name),
                    "doc": doc,
                    "optType": "flag",
                }
            )
        width = width or int(os.environ.get("COLUMNS", "80"))
        text = "".join(usage.docMakeChunks(rows, width))
        about = "\n".join(textwrap.wrap(self.longdesc, width))
        return f"Options:\n{text}\n{about}\n"

    def postOptions(self) -> None:
        if not self["port"]:
            self["port"] = [DEFAULT_PORT]
        if self["no-metrics"] and self["metrics-port"]:
            raise usage.UsageError("--no-metrics and --metrics-port contradict")
        if self["metrics-port"]:
            self["metrics-port"] = check_endpoint("metrics-port", self["metrics-port"])
        self["api-key"] = None
        if self["api-key-file"]:
            try:
                self["api-key"] = read_api_key(self["api-key-file"])
            except (OSError, UnicodeDecodeError, ValueError) as e:
                reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
                raise usage.UsageError(
                    f"--api-key-file {self['api-key-file']}: {reason}"
                ) from None
        if self["api-port"]:
            if not self["api-key-file"]:
                raise usage.UsageError("--api-port needs --api-key-file")
            self["api-port"] = check_endpoint("api-port", self["api-port"])
        if self["web-root"] is None:
            self["web-root"] = str(default_web_root())
        else:
            check_web_root(self["web-root"])
        if not self["redis"]:
            self["redis"] = self._environ.get(REDIS_URL_VARIABLE) or None
        if self["history-db"] and self["redis"]:
            raise usage.UsageError(
                "--history-db is for one process; with --redis history lives in Redis"
            )
        self["redis-password"] = None
        if self["redis-password-file"]:
            self["redis-password"] = read_password(self["redis-password-file"])
            if not self["redis"]:
                raise usage.UsageError(
                    f"--redis-password-file needs --redis or ${REDIS_URL_VARIABLE}"
                )
        self.check_webhooks()
        self._check_auth()
        try:
            self["access"] = AccessPolicy.from_options(
                self["allowed-origin"], self["trust-proxy"]
            )
            if self["redis"]:
                address = parse_redis_url(self["redis"])
                if self["redis-password"] is not None and address.password:
                    raise ValueError(
                        f"{address.display}: a password both in the URL and in "
                        "--redis-password-file"
                    )
                check_channel(self["redis-channel"])
                if self["node-id"]:
                    check_node_id(self["node-id"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def check_webhooks(self) -> None:
        """--webhook-*: a URL that can be posted to, its secret, the event types."""
        try:
            self["webhook-events"] = parse_event_types(self["webhook-events"])
        except ValueError as e:
            raise usage.UsageError(f"--webhook-events: {e}") from None
        url = self["webhook-url"]
        self["webhook-secret"] = None
        if not url:
            if self["webhook-secret-file"]:
                raise usage.UsageError("--webhook-secret-file needs --webhook-url")
            return
        expected = "expected http://host[:port]/path or https://host[:port]/path"
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises for a port out of range or not a number
        except ValueError:
            raise usage.UsageError(
                f"--webhook-url: {safe_url(url)}: not a valid URL ({expected})"
            ) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise usage.UsageError(f"--webhook-url: {safe_url(url)}: {expected}")
        if "@" in parts.netloc:
            # It would never reach the receiver (treq takes no userinfo) and
            # would end up in log lines: the requests are signed instead.
            raise usage.UsageError(
                f"--webhook-url: {safe_url(url)}: no credentials in the URL "
                "(user:pass@); requests are signed with --webhook-secret-file"
            )
        if not self["webhook-secret-file"]:
            raise usage.UsageError(
                "--webhook-url needs --webhook-secret-file (requests are signed)"
            )
        self["webhook-secret"] = read_password(
            self["webhook-secret-file"], "webhook-secret-file"
        ).encode("utf-8")

    def _check_auth(self) -> None:
        """
        Read the token keys now: a missing, unreadable or empty key file
        (or --auth without a key) must stop the server before it starts,
        not refuse every connection once it runs.
        """
        mode = self["auth"]
        if mode not in AUTH_MODES:
            raise usage.UsageError(
                f"--auth: expected one of {', '.join(AUTH_MODES)}, got {mode!r}"
            )
        self["jwt-secret"] = self["jwt-public-key"] = None
        if self["jwt-secret-file"]:
            path = self["jwt-secret-file"]
            try:
                secret = read_key_file(path)
                check_hmac_secret(secret)
            except ValueError as e:
                shown = str(e) if str(e).startswith(path) else f"{path}: {e}"
                raise usage.UsageError(f"--jwt-secret-file {shown}") from None
            self["jwt-secret"] = secret
        if self["jwt-public-key-file"]:
            path = self["jwt-public-key-file"]
            try:
                pem = read_key_file(path)
                load_public_key(pem)
            except ValueError as e:
                shown = str(e) if str(e).startswith(path) else f"{path}: {e}"
                raise usage.UsageError(f"--jwt-public-key-file {shown}") from None
            self["jwt-public-key"] = pem
        keyed = self["jwt-secret"] is not None or self["jwt-public-key"] is not None
        if mode != "off" and not keyed:
            raise usage.UsageError(
                f"--auth {mode} needs --jwt-secret-file or --jwt-public-key-file"
            )
        if mode == "off" and (keyed or self["jwt-audience"] or self["jwt-issuer"]):
            raise usage.UsageError(
                "the --jwt-* options need --auth optional or --auth required"
            )

    def verifier(self, clock: Callable[[], float]) -> TokenVerifier | None:
        """What checks tokens on ``clock`` (the reactor's), or None with --auth off."""
        if self["auth"] == "off":
            return None
        return TokenVerifier(
            secret=self["jwt-secret"],
            public_key=self["jwt-public-key"],
            audience=self["jwt-audience"],
            issuer=self["jwt-issuer"],
            clock=clock,
        )

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
            response_timeout=self["response-timeout"],
            shutdown_grace=self["shutdown-grace"],
            max_connections=self["max-connections"] or 0,
            max_connections_per_ip=self["max-connections-per-ip"],
            max_rooms=self["max-rooms"],
            history=self["history"],
            history_ttl=self["history-ttl"],
        )


def read_password(path: str, option: str = "redis-password-file") -> str:
    """The first line of ``path``; a usage error (never echoing it) otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise usage.UsageError(f"--{option} {path}: {reason}") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise usage.UsageError(f"--{option} {path}: the file is empty")
    return password


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    The service tree ``options`` ask for: the chat, its listeners, the relay.

    twistd passes no reactor, and the global one is used: the one twistd
    installed (``--reactor``) by then.  A test passes a fake one (a
    ``MemoryReactorClock``), so it can build and start several trees in one
    process and drive their time.
    """
    if reactor is None:
        # Imported here, not at the top: it installs the global reactor, which
        # must wait until twistd has chosen one (--reactor).
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
    history = None
    if options["history-db"]:
        history = SQLiteHistory(
            reactor,
            options["history-db"],
            limit=chosen.history,
            ttl=chosen.history_ttl,
        )
    factory = WebChatFactory(
        reactor,
        quiet=options["quiet"],
        limits=chosen,
        access=options["access"],
        history=history,
        history_for_text_clients=options["history-for-text-clients"],
        auth=options["auth"],
        verifier=options.verifier(reactor.seconds),
    )
    # The listeners are children of the chat service: it drains the chat
    # before they stop listening.
    top = ChatService(factory, handle_signals=True)
    if history is not None:
        # Before the listeners: the database is open before anyone joins,
        # and the last turns are written after the drain.
        history.setServiceParent(top)
    link = None
    if options["redis"]:
        link = RedisRelay(
            reactor,
            options["redis"],
            options["redis-channel"],
            options["node-id"],
            max_text_size=chosen.max_message_size,
            on_envelope=factory.deliver_remote,
            password=options["redis-password"],
            presence_timeout=options["presence-timeout"],
            outage_buffer=options["outage-buffer"],
        )
        # Redis numbers and keeps every room's messages: the same offsets
        # and history on every node.
        link.keep_history(chosen.history, chosen.history_ttl)
        factory.attach_link(link)
        # Before the listeners: it starts first, and stops after the drain.
        link.setServiceParent(top)
    if options["webhook-url"]:
        # After the link: it stops first, settling the offline checks
        # through Redis while the link is still up, then drains its sender.
        webhooks(reactor, options, factory, chosen, link).setServiceParent(top)
    metrics = None
    if not options["no-metrics"]:
        metrics = MetricsPage(make_registry(factory))
    if options["metrics-port"]:
        listen(
            reactor,
            top,
            options["metrics-port"],
            make_metrics_site(factory, metrics),
            option="metrics-port",
        )
        metrics = None  # not on the public port, then
    api = None
    if options["api-key"] is not None:
        # After attach_link: with --redis, idempotency keys live in Redis.
        api = ServerApi(factory, options["api-key"], options["api-rate-limit"])
        log.info(
            "Server API on {where}",
            where=f"--api-port {options['api-port']}"
            if options["api-port"]
            else "/api/ of --port",
        )
    if options["api-port"]:
        listen(
            reactor, top, options["api-port"], make_api_site(factory, api), "api-port"
        )
        api = None  # not on the chat's port, then
    site = make_site(factory, options["web-root"], metrics, api)
    for description in options["port"]:
        listen(reactor, top, description, site)
    return top


def webhooks(
    reactor: Any,
    options: Options,
    factory: WebChatFactory,
    chosen: limits.Limits,
    link: RedisRelay | None,
) -> AppEvents:
    """
    The webhook events and their sender (--webhook-url), told of by
    ``factory``; with ``link`` (--redis), counted in Redis, so each event is
    sent by one node, and dead nodes reaped every third of
    --presence-timeout.
    """
    tally = None
    reap_interval = 0.0
    if link is not None:
        from webchat.webhooks.redis_tally import RedisTally

        tally = RedisTally(link)
        reap_interval = options["presence-timeout"] / 3
    sender = WebhookSender(
        reactor,
        options["webhook-url"],
        options["webhook-secret"],
        treq_post(reactor),
        queue_size=options["webhook-queue"],
        timeout=options["webhook-timeout"],
        drain_grace=chosen.shutdown_grace,
    )
    events = AppEvents(
        reactor,
        sender,
        options["webhook-events"],
        offline_delay=options["webhook-offline-delay"],
        tally=tally,
        reap_interval=reap_interval,
    )
    factory.app_events = events
    return events


def check_web_root(web_root: str) -> None:
    """A ``--web-root`` without a page would serve nothing but 404s: refuse it now."""
    root = Path(web_root)
    if not root.is_dir():
        raise usage.UsageError(f"--web-root: {web_root}: no such directory")
    if not (root / "index.html").is_file():
        raise usage.UsageError(f"--web-root: {web_root}: has no index.html")


def with_backlog(description: str) -> str:
    """
    ``description`` with ``backlog=`` (``limits.LISTEN_BACKLOG``) added when it
    is a TCP or TLS endpoint that does not choose its own: a reconnect storm
    must not meet Twisted's default of 50.
    """
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "ssl") or "backlog=" in description:
        return description
    return f"{description}:backlog={limits.LISTEN_BACKLOG}"


def resume_tls_sessions(endpoint: Any) -> None:
    """
    Let TLS clients of an ``ssl:`` endpoint resume their sessions.

    Twisted's ``ssl:`` parser turns the session cache off (and session
    tickets with it), so every reconnect of a page pays a full handshake:
    the one costly step of TLS.  With the server's cache on, a client that
    comes back within the session's lifetime (OpenSSL's default, 300 s)
    resumes: TLS 1.2 by session id, TLS 1.3 by the ticket OpenSSL issues
    for a cached session.  OpenSSL's cache holds at most 20,480 sessions.
    Renegotiation stays refused: OpenSSL 3 refuses a client's unless told
    otherwise, and ``OP_NO_RENEGOTIATION`` refuses every kind.
    """
    options = getattr(endpoint, "_sslContextFactory", None)
    if options is None or not hasattr(options, "getContext"):
        return
    from OpenSSL import SSL

    context = options.getContext()  # cached: every connection of the port uses it
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_options(SSL.OP_NO_RENEGOTIATION)


def listen(
    reactor: Any,
    parent: MultiService,
    description: str,
    factory: Any,
    option: str = "port",
) -> None:
    """Listen on ``description`` (given as ``--option``) once the service starts."""
    # Already parsed once by the options (check_endpoint): this cannot fail now.
    endpoint = serverFromString(reactor, with_backlog(description))
    resume_tls_sessions(endpoint)
    service = ListeningService(reactor, endpoint, factory, f"--{option} {description}")
    service.setServiceParent(parent)
