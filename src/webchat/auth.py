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
from jwt.algorithms import Algorithm, get_default_algorithms

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


class _BoundKey(Algorithm):
    """
    One of PyJWT's algorithms with the server's key for it, prepared once.

    ``jwt.decode`` prepares the key it is given on every call, and for
    HMAC that means trying to read the secret as a PEM, SSH or DER public
    key and as JSON (so that a public key is never used as an HMAC secret):
    about a quarter of what checking a token cost.  Here that check runs
    once, when the server starts (``ValueError`` if the secret is such a
    key); PyJWT still picks this object by the token's ``alg`` among the
    allowed ones and calls ``verify`` with the signature it parsed.
    """

    def __init__(self, algorithm: Algorithm, key: Any) -> None:
        try:
            self._key = algorithm.prepare_key(key)
        except jwt.InvalidKeyError:
            raise ValueError(
                "a public key or certificate, not an HMAC secret"
            ) from None
        self._algorithm = algorithm
        check = getattr(algorithm, "check_key_length", None)
        #: PyJWT's warning about a short key, decided once (it warns per call).
        self._key_length_message = check(self._key) if check is not None else None

    def prepare_key(self, key: Any) -> Any:
        """The key prepared at start (the one PyJWT passes in is unused)."""
        return self._key

    def check_key_length(self, key: Any) -> str | None:
        """PyJWT's verdict on the key's length, as at start."""
        return self._key_length_message

    def verify(self, msg: bytes, key: Any, sig: bytes) -> bool:
        """Whether ``sig`` signs ``msg`` under the server's key."""
        return bool(self._algorithm.verify(msg, self._key, sig))

    def sign(self, msg: bytes, key: Any) -> bytes:
        """Never: the server only checks tokens; the app signs them."""
        raise NotImplementedError("webchat does not sign tokens")

    @staticmethod
    def to_jwk(key_obj: Any, as_dict: bool = False) -> Any:
        """Not needed: keys come from files, never as JWKs."""
        raise NotImplementedError("webchat reads no JWKs")

    @staticmethod
    def from_jwk(jwk: Any) -> Any:
        """Not needed: keys come from files, never as JWKs."""
        raise NotImplementedError("webchat reads no JWKs")


class TokenVerifier:
    """
    Checks tokens against the keys the server was given (``secret`` for
    HS256, ``public_key`` PEM for RS256 or ES256, or both), and ``audience``
    and ``issuer`` when given.

    Everything a handshake need not redo is done here, once: each key is
    prepared for its algorithm and bound to it (``_BoundKey``), on a
    ``jwt.PyJWS`` of our own that knows only those algorithms.  PyJWT still
    parses the token (once), checks its ``alg`` against them and verifies
    the signature; the claims are then checked here (the registered ones
    as ``jwt.decode`` checks them, on the server's clock).
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
        keys: dict[str, Any] = {}
        if secret is not None:
            keys["HS256"] = secret
        if public_key is not None:
            key = load_public_key(public_key)
            keys["RS256" if isinstance(key, RSAPublicKey) else "ES256"] = key
        known = get_default_algorithms()
        #: PyJWT's token parsing and signature checks, with our keys only.
        self._jws = jwt.PyJWS(algorithms=[])
        for name, key in keys.items():
            self._jws.register_algorithm(name, _BoundKey(known[name], key))
        self._algorithms = list(keys)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._clock = clock

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms a token may be signed with."""
        return tuple(self._algorithms)

    def verify(self, token: str) -> Identity:
        """The identity ``token`` proves, or ``TokenError``."""
        if len(token) > JWT_MAX_LENGTH:
            raise TokenError(
                "token_too_long",
                "token too long",
                f"token too long ({len(token)} characters, most {JWT_MAX_LENGTH})",
            )
        try:
            # The key argument is unused: each algorithm has its own.
            signed = self._jws.decode_complete(token, algorithms=self._algorithms)
            claims = json.loads(signed["payload"])
        except jwt.InvalidAlgorithmError:
            # Read again only now: a refusal says which algorithm it was.
            alg = _algorithm_of(token)
            shown = alg if alg in ("none", "HS256", "RS256", "ES256") else "another"
            raise _invalid(f"algorithm {shown} not accepted") from None
        except jwt.InvalidSignatureError:
            raise _invalid("bad signature") from None
        except (jwt.PyJWTError, ValueError, RecursionError):
            # RecursionError: JSON nested thousands deep, for json.loads.
            raise _invalid("malformed") from None
        if not isinstance(claims, dict):
            raise _invalid("malformed")
        self._check_registered_claims(claims)
        return self._identity(claims)

    def _check_registered_claims(self, claims: dict[str, Any]) -> None:
        """
        What ``jwt.decode`` would check with our options: ``exp`` and
        ``sub`` present, ``iss`` and ``aud`` when the server names them,
        ``jti`` a string if present (``exp`` and ``nbf`` are ``_identity``'s,
        on the server's clock).
        """
        for claim in ("exp", "sub"):
            if claims.get(claim) is None:
                raise _invalid(f"no {claim} claim")
        if self.issuer is not None:
            if "iss" not in claims:
                raise _invalid("no iss claim")
            if claims["iss"] != self.issuer:
                raise _invalid("wrong issuer")
        if self.audience is not None:
            granted = claims.get("aud")
            if not granted:
                raise _invalid("no aud claim")
            if isinstance(granted, str):
                granted = [granted]
            if (
                not isinstance(granted, list)
                or not all(isinstance(aud, str) for aud in granted)
                or self.audience not in granted
            ):
                raise _invalid("wrong audience")
        if not isinstance(claims.get("jti", ""), str):
            raise _invalid("malformed")

    def _identity(self, claims: dict[str, Any]) -> Identity:
        """The identity in verified ``claims``, if they are well formed and current."""
        user = claims.get("sub")
        if not is_user_id(user):
            raise _invalid(f"sub is not 1-{MAX_USER_CHARS} printable characters")
        exp = _number(claims.get("exp"))
        if exp is None:
            raise _invalid("exp is not a finite number")
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
                raise _invalid("nbf is not a finite number")
            if now + self.leeway < start:
                raise TokenError(
                    "token_not_yet_valid",
                    "token not yet valid",
                    f"token of user {user} not yet valid",
                )
        return Identity(user, name, rooms, exp)


def _algorithm_of(token: str) -> str | None:
    """
    The ``alg`` a refused token's header names, for the log line (PyJWT's
    error does not say): read only once PyJWT has refused the algorithm,
    so an accepted token's header is parsed once, by PyJWT.
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
    """
    A JSON number claim as a float (not a bool, not nan/inf), else None.
    A signed integer too big for a float (``10**400``) is None too: the
    app's mistake is an invalid token, not an ``OverflowError``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def check_hmac_secret(secret: bytes) -> None:
    """
    ``ValueError`` if ``secret`` is a public key or certificate (PEM, SSH,
    DER or a JWK), which PyJWT refuses as an HMAC secret: a server that
    would refuse every token must not start.
    """
    _BoundKey(get_default_algorithms()["HS256"], secret)


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
