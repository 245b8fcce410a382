"""Signed identities: a JWT from the app -> an ``Identity``, or why not.

The app that owns the users signs a short-lived token (HS256 with a shared
secret, or RS256/ES256 with its private key) and the page passes it as
``?token=`` (browsers cannot set headers on a WebSocket).  This module only
checks tokens; ``webchat.admission`` decides what a handshake with one (or
without one) gets, by ``--auth``.

The algorithms are fixed by the keys the server was given, never by the
token: HS256 only with ``--jwt-secret-file``, RS256 or ES256 only with an
RSA or EC ``--jwt-public-key-file``.  So ``alg: none`` is never accepted,
and a token "signed" with HMAC over the public key PEM (the classic
HS/RS confusion) is not either.

Time is the caller's clock (the factory's reactor), not ``time.time``:
``exp`` and ``nbf`` are checked here with ``JWT_LEEWAY`` seconds of skew,
so expiry is testable with ``twisted.internet.task.Clock``.

A token is a bearer secret: nothing here puts it (or any part of it) in an
exception's text, which may reach a log line.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from webchat.events import BadEvent, check_name
from webchat.limits import JWT_LEEWAY, JWT_MAX_LENGTH, MAX_NAME_CHARS, MAX_USER_CHARS

#: ``--auth``: no tokens (the seed's anonymous chat), a token if given, or
#: a token for every connection.
AUTH_MODES = ("off", "optional", "required")

#: Rooms whose name starts with this are joined only with a token granting
#: them (a ``rooms`` pattern that itself starts with it), whatever ``--auth``.
PRIVATE_PREFIX = "private-"

#: Granted when a token has no ``rooms`` claim: every room but the private ones.
EVERY_PUBLIC_ROOM = ("*",)


def is_user_id(user: object) -> bool:
    """
    Whether ``user`` can be a user id: a string of 1-MAX_USER_CHARS
    printable characters (no control, format or separator character but
    the space), not all spaces, so it is safe in JSON events, logs and
    between nodes.
    """
    return (
        isinstance(user, str)
        and 0 < len(user) <= MAX_USER_CHARS
        and user.isprintable()
        and not user.isspace()
    )


def is_private(room: str) -> bool:
    """Whether ``room`` needs a token that grants it."""
    return room.startswith(PRIVATE_PREFIX)


@dataclass(frozen=True)
class Identity:
    """Who a connection is, as the app's signed token says."""

    #: The user's id (the ``sub`` claim): the same on every tab and node.
    user: str
    #: The display name (the ``name`` claim), if the token gives one.
    name: str | None
    #: Room names or fnmatch patterns (``team-*``) this user may join
    #: (the ``rooms`` claim; absent = every room that is not private).
    rooms: tuple[str, ...]
    #: When the token expires (``exp``, epoch seconds).
    expires: float

    @property
    def display_name(self) -> str:
        """
        The name others see: the claim ``name``, else the ``sub`` (cut to
        MAX_NAME_CHARS: a name is that long at most, here and between nodes).
        """
        return self.name or self.user.strip()[:MAX_NAME_CHARS].strip()

    def may_join(self, room: str) -> bool:
        """
        Whether the token grants ``room``.  A private room is granted only by
        a pattern that starts with ``private-`` itself, so ``*`` (or no
        ``rooms`` claim) never opens one by accident.
        """
        private = is_private(room)
        for pattern in self.rooms:
            if private and not is_private(pattern):
                continue
            if pattern == room or fnmatch.fnmatchcase(room, pattern):
                return True
        return False


class TokenError(Exception):
    """
    Why a token was not accepted: ``kind`` (the refusal counter's label),
    ``reason`` (the one line the client is told) and ``detail`` (the log's,
    never with the token in it).
    """

    def __init__(self, kind: str, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.detail = detail or reason


def _invalid(detail: str) -> TokenError:
    return TokenError("invalid_token", "invalid token", f"invalid token: {detail}")


class TokenVerifier:
    """
    Checks tokens against the keys the server was given (``secret`` for
    HS256, ``public_key`` PEM for RS256 or ES256, or both), and ``audience``
    and ``issuer`` when given.
    """

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        public_key: bytes | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = JWT_LEEWAY,
        clock: Callable[[], float],
    ) -> None:
        if secret is None and public_key is None:
            raise ValueError("a token verifier needs a secret or a public key")
        #: The key for each algorithm a token may use.
        self._keys: dict[str, Any] = {}
        if secret is not None:
            self._keys["HS256"] = secret
        if public_key is not None:
            key = load_public_key(public_key)
            self._keys["RS256" if isinstance(key, RSAPublicKey) else "ES256"] = key
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._clock = clock

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms a token may be signed with."""
        return tuple(self._keys)

    def verify(self, token: str) -> Identity:
        """The identity ``token`` proves, or ``TokenError``."""
        if len(token) > JWT_MAX_LENGTH:
            raise TokenError(
                "token_too_long",
                "token too long",
                f"token too long ({len(token)} characters, most {JWT_MAX_LENGTH})",
            )
        alg = _algorithm_of(token)
        key = self._keys.get(alg) if alg is not None else None
        if key is None:
            shown = alg if alg in ("none", "HS256", "RS256", "ES256") else "another"
            raise _invalid(f"algorithm {shown} not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                # exp and nbf are checked below, on the server's own clock.
                options={
                    "require": ["exp", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": self.audience is not None,
                    "verify_iss": self.issuer is not None,
                },
            )
        except jwt.InvalidSignatureError:
            raise _invalid("bad signature") from None
        except jwt.InvalidAudienceError:
            raise _invalid("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise _invalid("wrong issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise _invalid(f"no {e.claim} claim") from None
        except (jwt.PyJWTError, RecursionError):
            # RecursionError: claims nested thousands deep, for json.loads.
            raise _invalid("malformed") from None
        return self._identity(claims)

    def _identity(self, claims: dict[str, Any]) -> Identity:
        """The identity in verified ``claims``, if they are well formed and current."""
        user = claims.get("sub")
        if not is_user_id(user):
            raise _invalid(f"sub is not 1-{MAX_USER_CHARS} printable characters")
        exp = _number(claims.get("exp"))
        if exp is None:
            raise _invalid("exp is not a number")
        name = claims.get("name")
        if name is not None:
            try:
                name = check_name(name if isinstance(name, str) else "")
            except BadEvent as e:
                raise _invalid(f"name claim: {e.reason}") from None
        rooms: tuple[str, ...] = EVERY_PUBLIC_ROOM
        if "rooms" in claims:
            granted = claims["rooms"]
            if not isinstance(granted, list) or not all(
                isinstance(room, str) for room in granted
            ):
                raise _invalid("rooms is not a list of strings")
            rooms = tuple(granted)
        now = self._clock()
        # The sub is safe to log once the signature is good (escaped there).
        if now >= exp + self.leeway:
            raise TokenError(
                "token_expired", "token expired", f"token of user {user} expired"
            )
        nbf = claims.get("nbf")
        if nbf is not None:
            start = _number(nbf)
            if start is None:
                raise _invalid("nbf is not a number")
            if now + self.leeway < start:
                raise TokenError(
                    "token_not_yet_valid",
                    "token not yet valid",
                    f"token of user {user} not yet valid",
                )
        return Identity(user, name, rooms, exp)


def _algorithm_of(token: str) -> str | None:
    """
    The ``alg`` a token's header names (unverified: it only picks the key,
    and PyJWT checks it again against that key's one algorithm).  Read
    here rather than with ``jwt.get_unverified_header``, which parses and
    checks the whole token a second time: a third of what checking one costs.
    """
    segment = token.partition(".")[0]
    try:
        header = json.loads(
            base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        )
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise _invalid("malformed") from None
    if not isinstance(header, dict):
        raise _invalid("malformed")
    alg = header.get("alg")
    return alg if isinstance(alg, str) else None


def _number(value: object) -> float | None:
    """A JSON number claim as a float (not a bool, not nan/inf), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def load_public_key(pem: bytes) -> RSAPublicKey | EllipticCurvePublicKey:
    """An RSA or EC public key from ``pem``, or ``ValueError`` saying why not."""
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM public key ({e})") from None
    if not isinstance(key, RSAPublicKey | EllipticCurvePublicKey):
        raise ValueError("not an RSA or EC public key (RS256 or ES256)")
    return key


def read_key_file(path: str) -> bytes:
    """
    The contents of a key file, or ``ValueError`` (without the contents)
    if it cannot be read or is empty.  A secret keeps its bytes as they are
    but for surrounding whitespace (the newline an editor adds).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or type(e).__name__}") from None
    data = data.strip()
    if not data:
        raise ValueError(f"{path}: the file is empty")
    return data
