"""Where the chat lives in Redis: the ``--redis`` URL and the channel name.

Nothing here connects; ``RedisAddress.endpoint()`` only builds the Twisted
client endpoint that ``link.py`` connects through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint

from webchat.logtext import escape_for_log

#: The pub/sub channel (and the middle of the id keys' names) by default.
DEFAULT_CHANNEL = "webchat"

_CHANNEL = re.compile(r"[A-Za-z0-9._:-]{1,100}")


@dataclass(frozen=True)
class RedisAddress:
    """A parsed ``--redis`` URL.  Its repr and ``display`` never show the password."""

    tls: bool
    #: TCP host (None for a unix socket) and port.
    host: str | None
    port: int
    #: The unix socket's path (None for TCP).
    path: str | None
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: rediss only: a PEM file of CA certificates to trust instead of the system's.
    ca_certs: str | None = None

    @property
    def display(self) -> str:
        """The URL without its password, for log lines."""
        user = f"{self.username}@" if self.username else ""
        if self.path is not None:
            query = f"?db={self.db}" if self.db else ""
            return f"unix://{user}{self.path}{query}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{user}{host}:{self.port}/{self.db}"

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        """A client endpoint that reaches this Redis without blocking the reactor."""
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        assert self.host is not None
        endpoint: IStreamClientEndpoint
        if isIPAddress(self.host):
            endpoint = TCP4ClientEndpoint(reactor, self.host, self.port, timeout)
        elif isIPv6Address(self.host):
            endpoint = TCP6ClientEndpoint(reactor, self.host, self.port, timeout)
        else:  # a name: resolved off the reactor thread, every address tried
            endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout)
        if self.tls:
            endpoint = wrapClientTLS(self._tls_options(), endpoint)
        return endpoint

    def _tls_options(self) -> Any:
        # Imported here: pyOpenSSL is only needed by those who use rediss://.
        from twisted.internet.ssl import (
            Certificate,
            optionsForClientTLS,
            trustRootFromCertificates,
        )

        trust = None
        if self.ca_certs is not None:
            pem = Path(self.ca_certs).read_bytes()
            end = b"-----END CERTIFICATE-----"
            blocks = [block + end for block in pem.split(end) if b"-----BEGIN" in block]
            if not blocks:
                raise ValueError(f"no PEM certificate in {self.ca_certs}")
            trust = trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])
        assert self.host is not None
        return optionsForClientTLS(self.host, trustRoot=trust)


_SCHEMES = ("redis", "rediss", "unix", "redis+unix")


def _without_password(url: str) -> str:
    """``url`` with whatever sits between ``user:`` and ``@`` starred out."""
    return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)


def parse_redis_url(url: str) -> RedisAddress:
    """
    Read ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS,
    optionally ``?ssl_ca_certs=/path/ca.pem``) or
    ``unix://[[user]:password@]/path/to/redis.sock[?db=N]`` (``redis+unix://``
    too; ``?password=`` also works there).  Raise ``ValueError`` with a message
    fit for the command line otherwise; it never repeats the password.
    """
    shown = _without_password(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"invalid Redis URL {shown}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"invalid Redis URL {shown}: use redis://host:port/db, "
            "rediss://host:port/db (TLS) or unix:///path/to/redis.sock"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    for key, values in query.items():
        if len(values) > 1:
            raise ValueError(f"invalid Redis URL {shown}: {key} given twice")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None

    if scheme in ("unix", "redis+unix"):
        _only(query, {"db", "password"}, shown)
        if parts.hostname or port is not None:
            raise ValueError(
                f"invalid Redis URL {shown}: a unix socket URL has no host; "
                "write unix:///absolute/path/to/redis.sock"
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(
                f"invalid Redis URL {shown}: the socket path must be absolute "
                "(unix:///path/to/redis.sock)"
            )
        if "password" in query:
            if password is not None:
                raise ValueError(f"invalid Redis URL {shown}: two passwords")
            password = query["password"][0]
        db = _db(query.get("db", ["0"])[0], shown)
        return RedisAddress(False, None, 6379, path, db, username, password)

    tls = scheme == "rediss"
    _only(query, {"ssl_ca_certs"} if tls else set(), shown)
    if not parts.hostname:
        raise ValueError(f"invalid Redis URL {shown}: no host")
    path = parts.path
    db = _db(path[1:], shown) if path not in ("", "/") else 0
    ca_certs = query.get("ssl_ca_certs", [None])[0]
    return RedisAddress(
        tls,
        parts.hostname,
        6379 if port is None else port,
        None,
        db,
        username,
        password,
        ca_certs,
    )


def _only(query: dict[str, list[str]], allowed: set[str], shown: str) -> None:
    unknown = sorted(set(query) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ValueError(
            f"invalid Redis URL {shown}: unknown parameter {unknown[0]!r} "
            f"(known here: {known})"
        )


def _db(text: str, shown: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(
            f"invalid Redis URL {shown}: the database must be a number "
            "(redis://host:6379/0)"
        )
    return int(text)


def check_channel(channel: str) -> str:
    """A channel name: 1-100 characters of ``A-Z a-z 0-9 . _ : -``."""
    if _CHANNEL.fullmatch(channel) is None:
        raise ValueError(
            f"invalid Redis channel {escape_for_log(channel)!r}: use 1-100 of "
            "A-Z a-z 0-9 . _ : -"
        )
    return channel
