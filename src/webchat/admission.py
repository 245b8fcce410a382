"""Admission: who an opening handshake is, and where it goes, or why not.

Every WebSocket handshake passes here once, before the ``101``: the
origin rule (``webchat.access``), the server's caps (draining, whole
server, per address), and the token (``--auth``, ``webchat.auth``).  The
answer is an ``Admitted`` — the address the connection is accounted to, the
room it joins, the codec it speaks and who it is — or ``ConnectionDeny``
with the HTTP status, after one warn line and one count (never with the
token in it).  Nothing here touches a socket, so every rule is
tested with a header dict (tests/test_admission.py).
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Container, Mapping
from typing import NamedTuple, NoReturn

from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from webchat.access import AccessPolicy, normalize_origin
from webchat.auth import Identity, TokenError, TokenVerifier, is_private
from webchat.codecs import JSON, JSON_SUBPROTOCOL, SEED, Codec
from webchat.limits import Limits
from webchat.logtext import escape_for_log, redact_query
from webchat.rooms import room_of_path

log = Logger(namespace="webchat")


class Admitted(NamedTuple):
    """What admission decided about one connection."""

    #: The address it is accounted to (see ``AccessPolicy.client_address``).
    address: str
    #: The room it joins when the handshake completes.
    room: str
    #: The wire format it is sent.
    codec: Codec
    #: Who its token says it is; None = anonymous (no token, or --auth off).
    identity: Identity | None = None


class Admission:
    """The rules one server admits handshakes by, and what they hold."""

    def __init__(
        self,
        access: AccessPolicy,
        limits: Limits,
        refused: Counter[str],
        auth: str = "off",
        verifier: TokenVerifier | None = None,
    ):
        if auth != "off" and verifier is None:
            raise ValueError(f"--auth {auth} needs a key to check tokens with")
        self.access = access
        self.limits = limits
        #: ``--auth``: off, optional or required (see ``webchat.auth``).
        self.auth = auth
        self.verifier = verifier
        #: Handshakes refused, by reason (shared with the metrics).
        self.refused = refused
        #: Admitted connections still open, by address (the per-address cap).
        self.per_address: Counter[str] = Counter()

    def client_address(self, peer: str, headers: Mapping[str, str]) -> str:
        """The address a connection from ``peer`` is accounted to."""
        return self.access.client_address(peer, headers.get("x-forwarded-for"))

    def admit(
        self,
        peer: str,
        headers: Mapping[str, str],
        *,
        tls: bool,
        draining: bool,
        connections: int,
        path: str = "/",
        rooms: Container[str] = (),
        rooms_open: int = 0,
        token: str | None = None,
    ) -> Admitted:
        """
        Admit a handshake from ``peer`` (the TCP peer's address) with
        ``headers`` (lower-case names), or raise ``ConnectionDeny``.

        ``tls``: whether it came over TLS; ``draining``: the server is
        shutting down; ``connections``: open TCP connections, this one too;
        ``path``: the raw request path, which names the room; ``rooms``:
        the rooms open now (``rooms_open`` of them); ``token``: the
        ``?token=`` it came with (read only when ``--auth`` is not off).
        An admitted connection holds a place against the per-address cap
        until ``release``.
        """
        address = self.client_address(peer, headers)
        access = self.access
        secure = tls
        if access.is_trusted_proxy(peer):
            proto = headers.get("x-forwarded-proto", "").strip().lower()
            secure = secure or proto in ("https", "wss")
        scheme = "https" if secure else "http"
        origin = headers.get("origin")
        limits = self.limits
        if draining:
            self._refuse(address, 503, "draining", "server is shutting down")
        if not access.origin_allowed(origin, headers.get("host"), scheme):
            shown = escape_for_log(origin or "")
            self._refuse(
                address,
                403,
                "origin",
                "origin not allowed",
                f"origin {shown} not allowed",
                # The one thing the operator needs to know next.
                hint=origin_hint(origin),
            )
        room = room_of_path(path)
        if room is None:
            self._refuse(
                address,
                400,
                "bad_room",
                "bad room name: 1-64 of A-Z a-z 0-9 . _ -",
                f"bad room name {escape_for_log(redact_query(path))}",
            )
        if limits.max_connections and connections > limits.max_connections:
            self._refuse(address, 503, "max_connections", "server is full")
        per_ip = limits.max_connections_per_ip
        if per_ip and self.per_address[address] >= per_ip:
            self._refuse(
                address,
                429,
                "max_connections_per_ip",
                "too many connections",
                f"already {per_ip} connection(s) from this address",
            )
        max_rooms = limits.max_rooms
        if max_rooms and room not in rooms and rooms_open >= max_rooms:
            self._refuse(
                address,
                503,
                "max_rooms",
                "too many rooms",
                f"room {room} would be one more than --max-rooms {max_rooms}",
            )
        identity = self._identity(address, room, token)
        self.per_address[address] += 1
        offered = headers.get("sec-websocket-protocol", "")
        wanted = {name.strip() for name in offered.split(",")}
        codec = JSON if JSON_SUBPROTOCOL in wanted else SEED
        return Admitted(address, room, codec, identity)

    def _identity(self, address: str, room: str, token: str | None) -> Identity | None:
        """
        Who a handshake for ``room`` with ``token`` is, or its refusal:
        401 for a missing or bad token, 403 for a room it does not grant.
        Last of the rules, as checking a signature costs the most.
        """
        if self.auth == "off":
            if is_private(room):
                self._refuse(
                    address,
                    403,
                    "private_room",
                    "private room needs a token",
                    f"room {room} is private and --auth is off",
                )
            return None
        if not token:
            if self.auth == "required":
                self._refuse(address, 401, "missing_token", "missing token")
            if is_private(room):
                self._refuse(
                    address,
                    403,
                    "room_not_granted",
                    "room not granted",
                    f"room {room} is private: no token",
                )
            return None
        assert self.verifier is not None
        try:
            identity = self.verifier.verify(token)
        except TokenError as e:
            self._refuse(address, 401, e.kind, e.reason, escape_for_log(e.detail))
        if not identity.may_join(room):
            self._refuse(
                address,
                403,
                "room_not_granted",
                "room not granted",
                f"room {room} not granted to user {escape_for_log(identity.user)}",
            )
        return identity

    def release(self, address: str) -> None:
        """An admitted connection from ``address`` is gone."""
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]

    def _refuse(
        self,
        address: str,
        status: int,
        kind: str,
        reason: str,
        detail: str = "",
        hint: str = "",
    ) -> NoReturn:
        """Count and log a refused handshake, then refuse it with ``status``."""
        self.refused[kind] += 1
        log.warn(
            "Refused connection from {peer}: {reason} (HTTP {status}{hint})",
            peer=escape_for_log(address),
            reason=detail or reason,
            status=status,
            hint=f"; {hint}" if hint else "",
        )
        raise ConnectionDeny(status, reason)


def origin_hint(origin: str | None) -> str:
    """
    The ``--allowed-origin`` that would admit ``origin``, ready to paste
    into a shell, or "" for an origin no option value could name.

    Built from the normalized origin, never the header as sent: the header
    is the client's text, and an operator may copy the hint into a shell.
    """
    if (origin or "").strip().lower() == "null":
        value = "null"
    else:
        normalized = normalize_origin(origin or "")
        if normalized is None:
            return ""
        # The default port is what a browser leaves out: so does the hint.
        for default in ("http://", ":80"), ("https://", ":443"):
            if normalized.startswith(default[0]) and normalized.endswith(default[1]):
                normalized = normalized.removesuffix(default[1])
        value = shlex.quote(normalized)
    return escape_for_log(f"start webchat with --allowed-origin {value} to allow it")
