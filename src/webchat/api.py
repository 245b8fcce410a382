"""The server API: how the app pushes into the chat and asks about it.

Off unless ``--api-key-file`` is given; then a ``Resource`` at ``/api`` on
the chat's port, or alone on ``--api-port``.  Every request carries
``Authorization: Bearer <key>`` (compared in constant time), is counted
against one token bucket (``--api-rate-limit``), and is answered in JSON;
a refusal is ``{"error": code, "detail": text}`` with its HTTP status,
logged once (never with the key) and counted.  docs/api.md lists the
routes::

    POST /api/rooms/{room}/messages      {"text", "from"?, "idempotency_key"?}
    GET  /api/rooms
    GET  /api/rooms/{room}/members
    GET  /api/rooms/{room}/history?since=&limit=
    POST /api/users/{user}/disconnect    {"reason"?}

Bodies are let in for ``POST /api/...`` only, with a ``Content-Length`` no
bigger than ``--max-message-size`` plus ``API_BODY_OVERHEAD``: the channel
(``webchat.web.ChatChannel``) refuses a bigger one from its headers, and a
body that never finishes meets the same deadline as any request.

Two HTTP parsers call the routes, through ``ServerApi.handle`` (an
``ApiCall`` in, an ``ApiAnswer`` or a Deferred of it out): the lean one of
``webchat.apiwire``, which reads API requests, and twisted.web's, through
``render``, for the few it hands on (and for a site built without it).  Nothing
here blocks: a message goes to its room (or to Redis) and the answer comes
when it is numbered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any, NamedTuple

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from webchat.auth import is_user_id
from webchat.chat import MAX_OFFSET
from webchat.codecs import message_event
from webchat.events import BadEvent, check_name
from webchat.history import SINCE
from webchat.limits import (
    API_BURST_SECONDS,
    API_IDEMPOTENCY_CLAIM,
    API_IDEMPOTENCY_MAX,
    API_IDEMPOTENCY_WINDOW,
    API_RATE_LIMIT,
    MAX_USER_CHARS,
)
from webchat.logtext import escape_for_log, escape_request_text
from webchat.ratelimit import TokenBucket
from webchat.rooms import ROOM_NAME

if TYPE_CHECKING:
    from webchat.chat import WebChatFactory
    from webchat.redis import RedisRelay

log = Logger(namespace="webchat")

#: What an ``idempotency_key`` may be: 1-128 printable ASCII characters.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")
#: The name a message from the app is shown with when it gives no ``from``.
SERVER_NAME = "server"
#: Longest ``reason`` of a disconnect, in characters (the close reason has
#: room for about 95 bytes of it anyway).
MAX_REASON_CHARS = 256
#: The marker an idempotency key holds while its message is on its way.
_PENDING = b"pending"


class ApiError(Exception):
    """A refusal: its HTTP status, error code and one-line detail."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        headers: dict[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


#: The headers of every answer (besides the refusal's own, e.g. Retry-After).
JSON_HEADERS = {b"Content-Type": b"application/json", b"Cache-Control": b"no-store"}


class ApiCall(NamedTuple):
    """
    One request as the API needs it, whichever HTTP parser read it: so
    twisted.web's ``Request`` and the lean path (``webchat.apiwire``) share
    one implementation of the routes.
    """

    #: ``GET``, ``POST``...
    method: bytes
    #: The path as sent, without the query (for the refusal's log line).
    path: bytes
    #: The path's segments after ``/api``, each percent-decoded.
    segments: list[bytes]
    #: The query, as ``urllib.parse.parse_qs(query, keep_blank_values=True)``.
    args: dict[bytes, list[bytes]]
    #: The last ``Authorization`` header, or None.
    authorization: bytes | None
    #: The body (empty without one).
    body: bytes
    #: The client's address (for the refusal's log line).
    peer: str


class ApiAnswer(NamedTuple):
    """An answer: status, headers (besides Date, Server...), JSON body."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes


def read_api_key(path: str) -> bytes:
    """The key in ``path``: its first line, stripped; ``ValueError`` if none."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    if not first:
        raise ValueError("the file is empty")
    return first.encode("utf-8")


class MemoryIdempotency:
    """
    Idempotency keys this node has seen, for ``API_IDEMPOTENCY_WINDOW``
    seconds, at most ``API_IDEMPOTENCY_MAX`` (the oldest go first).
    """

    def __init__(
        self,
        clock: Any,
        window: float = API_IDEMPOTENCY_WINDOW,
        most: int = API_IDEMPOTENCY_MAX,
    ) -> None:
        self._clock = clock
        self.window = window
        self.most = most
        #: key -> (expires at, the first answer or _PENDING), oldest first.
        self._keys: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def reserve(self, key: str) -> Deferred[bytes | None]:
        """None: the key is ours now; else what it holds (an answer or pending)."""
        now = self._clock.seconds()
        while self._keys:
            oldest, (expires, _) = next(iter(self._keys.items()))
            if expires > now and len(self._keys) < self.most:
                break
            del self._keys[oldest]
        held = self._keys.get(key)
        if held is not None:
            return succeed(held[1])
        self._keys[key] = (now + self.window, _PENDING)
        return succeed(None)

    def settle(self, key: str, answer: bytes) -> None:
        if key in self._keys:
            self._keys[key] = (self._keys[key][0], answer)

    def release(self, key: str) -> None:
        self._keys.pop(key, None)


class RedisIdempotency:
    """
    Idempotency keys shared by every node (--redis): ``SET NX EX`` claims a
    key for API_IDEMPOTENCY_CLAIM seconds, the answer replaces the claim for
    the window, a failure frees it.
    """

    def __init__(
        self,
        link: RedisRelay,
        window: float = API_IDEMPOTENCY_WINDOW,
        claim: float = API_IDEMPOTENCY_CLAIM,
    ) -> None:
        self._link = link
        self._prefix = f"webchat:{link.channel}:api:idem:".encode("ascii")
        self.window = math.ceil(window)
        self.claim = math.ceil(claim)

    def _key(self, key: str) -> bytes:
        return self._prefix + hashlib.sha256(key.encode("ascii")).hexdigest().encode()

    def reserve(self, key: str) -> Deferred[bytes | None]:
        name = self._key(key)
        d = self._link.command(b"SET", name, _PENDING, b"NX", b"EX", self.claim)

        def claimed(reply: Any) -> Deferred[bytes | None] | None:
            if reply is not None:
                return None  # OK: ours
            return self._link.command(b"GET", name).addCallback(
                lambda held: held if held is not None else _PENDING
            )

        return d.addCallback(claimed)

    def settle(self, key: str, answer: bytes) -> None:
        self._link.command(
            b"SET", self._key(key), answer, b"XX", b"EX", self.window
        ).addErrback(_ignore_failure)

    def release(self, key: str) -> None:
        self._link.command(b"DEL", self._key(key)).addErrback(_ignore_failure)


def _ignore_failure(failure: Failure) -> None:
    # Redis went away: the claim expires with its TTL.
    return None


class ServerApi(Resource):
    """``/api``: authorises, rate-limits and routes one request (module doc)."""

    isLeaf = True

    def __init__(
        self,
        chat: WebChatFactory,
        key: bytes,
        rate_limit: float = API_RATE_LIMIT,
        idempotency: MemoryIdempotency | RedisIdempotency | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__()
        self._chat = chat
        clock = clock if clock is not None else chat.reactor
        self._key = key
        self._bucket: TokenBucket | None = None
        self._rate = rate_limit
        if rate_limit > 0:
            burst = max(int(rate_limit * API_BURST_SECONDS), 1)
            self._bucket = TokenBucket(rate_limit, burst, clock)
        if idempotency is None:
            if chat.link is not None:
                idempotency = RedisIdempotency(chat.link)
            else:
                idempotency = MemoryIdempotency(clock)
        self._idempotency = idempotency
        #: Answers by HTTP status and error code ("ok" for none): /metrics.
        self.answered: Counter[tuple[int, str]] = chat.stats.api

    # -- the request -------------------------------------------------------------

    def handle(self, call: ApiCall) -> ApiAnswer | Deferred[ApiAnswer]:
        """
        Answer one request, whichever HTTP parser read it (twisted.web's, in
        ``render``, or the lean one of ``webchat.apiwire``): the answer, or a
        Deferred of it when it waits for Redis.  Never fails: a failure is a
        500 answer (logged).
        """
        try:
            self._authorize(call.authorization)
            self._take_token()
            answer = self._route(call)
        except ApiError as e:
            return self._refuse(call, e)
        except Exception:
            log.failure("An error has occurred: the server API failed")
            return self._refuse(call, ApiError(500, "internal", "internal error"))
        if isinstance(answer, Deferred):
            if not answer.called or answer.paused:
                answer.addCallback(lambda result: self._answer(*result))
                return answer.addErrback(
                    lambda failure: self._refuse(call, _as_api_error(failure))
                )
            # Most answers are ready at once (no Redis): take them now,
            # without the bookkeeping of an answer that comes later.
            ready: list[Any] = []
            answer.addBoth(ready.append)  # consumed: a failure is handled here
            if isinstance(ready[0], Failure):
                return self._refuse(call, _as_api_error(ready[0]))
            answer = ready[0]
        return self._answer(*answer)

    def render(self, request: Request) -> Any:
        """The request as twisted.web read it: through ``handle``."""
        content = request.content
        call = ApiCall(
            method=request.method,
            path=request.path,
            segments=request.postpath,
            args=request.args,
            authorization=request.getHeader(b"authorization"),
            body=content.read() if content is not None else b"",
            peer=getattr(request.getClientAddress(), "host", None) or "unix",
        )
        answer = self.handle(call)
        if isinstance(answer, Deferred):
            return self._later(request, answer)
        return _apply(request, answer)

    def _later(self, request: Request, answer: Deferred[ApiAnswer]) -> Any:
        """Answer ``request`` when ``answer`` fires (Redis): NOT_DONE_YET now."""
        finished = [False]
        request.notifyFinish().addErrback(lambda _: finished.__setitem__(0, True))

        def send(ready: ApiAnswer) -> None:
            if not finished[0]:
                body = _apply(request, ready)
                # A length, not chunks: every answer is one small JSON object.
                request.setHeader(b"Content-Length", b"%d" % len(body))
                request.write(body)
                request.finish()

        answer.addCallback(send).addErrback(
            lambda failure: log.failure(
                "An error has occurred: answering an API request failed", failure
            )
        )
        return NOT_DONE_YET

    def _authorize(self, given: bytes | None) -> None:
        given = given or b""
        scheme, _, credentials = given.strip().partition(b" ")
        # The scheme is case-insensitive (RFC 9110 11.1); the key is not.
        bearer = scheme.lower() == b"bearer"
        if not (bearer and hmac.compare_digest(credentials.strip(), self._key)):
            reason = "missing API key" if not given else "wrong API key"
            raise ApiError(
                401,
                "unauthorized",
                reason,
                {b"WWW-Authenticate": b'Bearer realm="webchat"'},
            )

    def _take_token(self) -> None:
        if self._bucket is not None and not self._bucket.take():
            wait = max(1, math.ceil(1 / self._rate))
            raise ApiError(
                429,
                "rate_limited",
                f"over --api-rate-limit ({self._rate:g} requests/s)",
                {b"Retry-After": b"%d" % wait},
            )

    def _route(
        self, call: ApiCall
    ) -> tuple[int, dict[str, Any]] | Deferred[tuple[int, dict[str, Any]]]:
        parts = [p.decode("utf-8", "replace") for p in call.segments]
        if parts and parts[-1] == "":
            parts.pop()  # a trailing slash
        method = call.method
        if parts == ["rooms"]:
            _allow(method, b"GET")
            return 200, {"rooms": self._rooms()}
        if len(parts) == 3 and parts[0] == "rooms":
            room = _room(parts[1])
            if parts[2] == "messages":
                _allow(method, b"POST")
                return self._publish(room, _body(call.body))
            if parts[2] == "members":
                _allow(method, b"GET")
                return 200, {"room": room, "members": self._chat.members_of(room)}
            if parts[2] == "history":
                _allow(method, b"GET")
                return self._history(room, call.args)
        if len(parts) == 3 and parts[0] == "users" and parts[2] == "disconnect":
            _allow(method, b"POST")
            user = _user(call.segments[1])
            return self._disconnect(user, _body(call.body))
        raise ApiError(404, "not_found", "no such route (see docs/api.md)")

    # -- the routes ----------------------------------------------------------------

    def _rooms(self) -> list[dict[str, Any]]:
        counts = self._chat.room_counts()
        return [{"room": name, "members": counts[name]} for name in sorted(counts)]

    def _publish(
        self, room: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]] | Deferred[tuple[int, dict[str, Any]]]:
        text = body.get("text")
        if not isinstance(text, str):
            raise ApiError(400, "bad_text", "text: a string is required")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "bad_text", "text is not valid Unicode") from None
        most = self._chat.limits.max_text_bytes
        if most and len(data) > most:
            raise ApiError(413, "too_large", f"text is over {most} bytes (UTF-8)")
        sender = body.get("from", SERVER_NAME)
        if not isinstance(sender, str):
            raise ApiError(400, "bad_name", "from: a string")
        try:
            # The default needs no check (a character-by-character one).
            name = sender if sender == SERVER_NAME else check_name(sender)
        except BadEvent as e:
            raise ApiError(400, "bad_name", f"from: {e.reason}") from None
        key = body.get("idempotency_key")
        if key is not None and (
            not isinstance(key, str) or IDEMPOTENCY_KEY.fullmatch(key) is None
        ):
            raise ApiError(
                400, "bad_idempotency_key", "idempotency_key: 1-128 printable ASCII"
            )

        def publish() -> Deferred[tuple[int, dict[str, Any]]]:
            d = self._chat.server_message(room, data, name)
            return d.addCallback(lambda offset: (202, {"room": room, "offset": offset}))

        if key is None:
            return publish()
        store = self._idempotency

        def reserved(held: bytes | None) -> Any:
            if held == _PENDING:
                raise ApiError(
                    409, "in_progress", "a request with this key is under way"
                )
            if held is not None:
                return 202, json.loads(held)  # the first answer, nothing delivered
            d = maybeDeferred(publish)

            def settled(answer: tuple[int, dict[str, Any]]) -> Any:
                store.settle(key, _dumps(answer[1]))
                return answer

            def unsettled(failure: Failure) -> Failure:
                store.release(key)
                return failure

            return d.addCallbacks(settled, unsettled)

        return store.reserve(key).addCallback(reserved)

    def _history(
        self, room: str, args: dict[bytes, list[bytes]]
    ) -> Deferred[tuple[int, dict[str, Any]]]:
        store = self._chat.rooms.history
        most = store.limit if store is not None else 0
        since = _arg(args, b"since")
        limit = _arg(args, b"limit")
        after = int(since) if since is not None else None
        count = min(int(limit), most) if limit is not None else most
        if store is None or not count:
            return succeed((200, {"room": room, "epoch": None, "messages": []}))
        open_room = self._chat.rooms.get(room)
        if open_room is not None and open_room.opening is None:
            opened: Any = succeed((open_room.epoch, open_room.flushed))
        else:
            opened = maybeDeferred(store.open_room, room)
            if open_room is None:
                opened.addCallback(_closing, store, room)

        def read(epoch_offset: tuple[str, int]) -> Deferred[Any]:
            epoch, upto = epoch_offset
            first = after if after is not None else max(upto - count, 0)
            d = maybeDeferred(store.read, room, first, min(upto, MAX_OFFSET))
            return d.addCallback(
                lambda messages: (
                    200,
                    {
                        "room": room,
                        "epoch": epoch,
                        "messages": [message_event(m) for m in list(messages)[:count]],
                    },
                )
            )

        return opened.addCallback(read)

    def _disconnect(
        self, user: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]] | Deferred[tuple[int, dict[str, Any]]]:
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            raise ApiError(
                400, "bad_reason", f"reason: at most {MAX_REASON_CHARS} characters"
            )
        try:
            reason.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "bad_reason", "reason is not valid Unicode") from None
        link = self._chat.link
        if link is None:
            count = self._chat.disconnect_user(user, reason)
            return 200, {"user": user, "disconnected": count}
        if link.state != "up":
            # Not half of it: the app retries, and no node is left out.
            raise ApiError(503, "unavailable", "Redis is away; try again")
        # The other nodes first (one PUBLISH), then this one's: the answer
        # counts this node's connections only.
        d = link.disconnect_user(user, reason)
        return d.addCallback(
            lambda _: (
                200,
                {
                    "user": user,
                    "disconnected": self._chat.disconnect_user(user, reason),
                },
            )
        )

    # -- answers -------------------------------------------------------------------

    def _answer(self, status: int, body: dict[str, Any]) -> ApiAnswer:
        self.answered[(status, "ok")] += 1
        return ApiAnswer(status, JSON_HEADERS, _dumps(body) + b"\n")

    def _refuse(self, call: ApiCall, error: ApiError) -> ApiAnswer:
        self.answered[(error.status, error.code)] += 1
        log.warn(
            "Server API refused {method} {path} from {peer}: HTTP {status} "
            "{code} ({detail})",
            method=escape_request_text(call.method.decode("latin-1")),
            path=escape_request_text(call.path.decode("latin-1")),
            peer=escape_for_log(str(call.peer)),
            status=error.status,
            code=error.code,
            detail=escape_for_log(error.detail),
        )
        headers = {**error.headers, **JSON_HEADERS} if error.headers else JSON_HEADERS
        body = _dumps({"error": error.code, "detail": error.detail}) + b"\n"
        return ApiAnswer(error.status, headers, body)


def _closing(opened: tuple[str, int], store: Any, room: str) -> tuple[str, int]:
    # Opened only to be read: let it be idle again (its history stays).
    store.room_closed(room)
    return opened


def _as_api_error(failure: Failure) -> ApiError:
    """The refusal for what went wrong: Redis away is 503, a bug 500 (logged)."""
    error = failure.value
    if isinstance(error, ApiError):
        return error
    # txredisapi's ConnectionError is its own class, not the builtin.
    if isinstance(error, ConnectionError) or type(error).__name__ == "ConnectionError":
        return ApiError(503, "unavailable", "Redis is away; try again")
    log.failure("An error has occurred: the server API failed", failure)
    return ApiError(500, "internal", "internal error")


def _allow(method: bytes, allowed: bytes) -> None:
    if method != allowed:
        raise ApiError(
            405,
            "method_not_allowed",
            f"use {allowed.decode()}",
            {b"Allow": allowed},
        )


def _room(name: str) -> str:
    if ROOM_NAME.fullmatch(name) is None:
        raise ApiError(400, "bad_room", "room: 1-64 of A-Z a-z 0-9 . _ -")
    return name


def _user(segment: bytes) -> str:
    """
    The user on the path (already percent-decoded by twisted.web), as
    admission accepts a ``sub`` (``auth.is_user_id``): ``a%20b`` is ``a b``.
    Decoded strictly: a replacement character would name another user.
    """
    try:
        user = segment.decode("utf-8")
    except UnicodeDecodeError:
        user = ""
    if not is_user_id(user):
        raise ApiError(
            400,
            "bad_user",
            f"user: 1-{MAX_USER_CHARS} printable characters, not all spaces",
        )
    return user


def _arg(args: dict[bytes, list[bytes]], name: bytes) -> str | None:
    values = args.get(name)
    if not values:
        return None
    value = values[0].decode("latin-1")
    if SINCE.fullmatch(value) is None:
        raise ApiError(400, "bad_query", f"{name.decode()}: a whole number >= 0")
    return value


def _body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "bad_json", "the body is not UTF-8") from None
    except ValueError as e:
        raise ApiError(400, "bad_json", f"the body is not JSON: {e}") from None
    except RecursionError:
        # json.loads recurses per level: "[" * 60000 fits the body cap.
        raise ApiError(400, "bad_json", "the body is nested too deep") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return body


_dumps_str = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _dumps(value: Any) -> bytes:
    return _dumps_str(value).encode("utf-8")


def _apply(request: Request, answer: ApiAnswer) -> bytes:
    """Put ``answer``'s status and headers on a twisted.web request: its body."""
    request.setResponseCode(answer.status)
    for name, value in answer.headers.items():
        request.setHeader(name, value)
    return answer.body
