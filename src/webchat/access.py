"""Who may open a chat connection: origin policy and the client's real address.

Browsers attach their cookies to a WebSocket opened by *any* page, so without
an origin check every web site a visitor opens can join the chat as them
(cross-site WebSocket hijacking).  Non-browser clients send no ``Origin`` and
are let in: they carry no victim's cookies.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: What browsers send as ``Origin`` from ``file:`` pages and sandboxed
#: frames; allowed only by ``*`` or by naming it (``--allowed-origin null``).
NULL_ORIGIN = "null"

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_origin(origin: str) -> str | None:
    """``scheme://host:port`` in lower case with the port spelled out, or None."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return f"{scheme}://{parts.hostname.lower()}:{port or _DEFAULT_PORTS[scheme]}"


def _split_host(host: str, scheme: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(f"//{host.strip()}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def canonical_address(address: str) -> str:
    """
    An IP address as one spelling: IPv4-mapped IPv6 (``::ffff:1.2.3.4``, how
    IPv4 clients arrive on a dual-stack socket) becomes plain IPv4.

    Called for every new connection, so the common case is a string test,
    not a parse.
    """
    if address[:7].lower() == "::ffff:" and "." in address:
        return address[7:]
    return address


def _plain(ip: Address) -> Address:
    """A parsed address with IPv4-mapped IPv6 turned into IPv4."""
    return getattr(ip, "ipv4_mapped", None) or ip


def _parse_network(text: str) -> Network:
    return ipaddress.ip_network(text.strip(), strict=False)


@dataclass(frozen=True)
class AccessPolicy:
    """
    ``allowed_origins``: origins let in besides the server's own (``*`` = any).
    ``trusted_proxies``: peers whose ``X-Forwarded-For`` / ``-Proto`` we believe.
    """

    allowed_origins: frozenset[str] = frozenset()
    trusted_proxies: tuple[Network, ...] = field(default=())

    @classmethod
    def from_options(
        cls, origins: Iterable[str] = (), proxies: Iterable[str] = ()
    ) -> AccessPolicy:
        normalized = set()
        for origin in origins:
            if origin.strip().lower() in ("*", NULL_ORIGIN):
                normalized.add(origin.strip().lower())
                continue
            value = normalize_origin(origin)
            if value is None:
                raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
            normalized.add(value)
        return cls(frozenset(normalized), tuple(_parse_network(p) for p in proxies))

    def is_trusted_proxy(self, address: str) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            ip = _plain(ipaddress.ip_address(address))
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """
        The address a connection is accounted to.

        ``X-Forwarded-For`` is believed only when the peer is a trusted proxy,
        and then read from the right: the first hop that is not itself a
        trusted proxy is the client (anything left of it could be forged).
        """
        if not forwarded_for or not self.is_trusted_proxy(peer):
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.is_trusted_proxy(hop):
                try:
                    return str(_plain(ipaddress.ip_address(hop)))
                except ValueError:
                    return peer  # garbage in the header: account to the proxy
        return hops[0] if hops else peer

    def origin_allowed(self, origin: str | None, host: str | None, scheme: str) -> bool:
        """
        Same-origin (the ``Origin`` names the scheme, host and port this request
        reached), no ``Origin`` at all, or an origin the operator allowed.
        """
        if origin is None:
            return True
        if "*" in self.allowed_origins:
            return True
        if origin.strip().lower() == NULL_ORIGIN:
            return NULL_ORIGIN in self.allowed_origins
        normalized = normalize_origin(origin)
        if normalized is None:
            return False
        if normalized in self.allowed_origins:
            return True
        if host is None:
            return False
        target = _split_host(host, scheme)
        return (
            target is not None and normalized == f"{scheme}://{target[0]}:{target[1]}"
        )
