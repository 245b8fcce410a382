"""JSON events from clients: parsing them, and the names people choose.

A JSON client (``webchat.v1.json``, docs/protocol.md) sends one event per
text message.  What it sent is checked here, once, into a ``ClientEvent`` or
a ``BadEvent`` with the error code the client is told; what the chat then
does with it is ``webchat.chat``'s.  Nothing here touches a socket or a
clock, so every rule is tested with plain strings (tests/test_events.py).
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any, NamedTuple

from webchat.history import EPOCH, SINCE
from webchat.limits import MAX_NAME_CHARS

#: Longest ``ref`` a client may tag a message with (string form).
MAX_REF_CHARS = 64
#: Unicode categories no name may contain: controls, format characters
#: (bidi overrides, zero-width joiners), line and paragraph separators, and
#: lone surrogates (no UTF-8 for them).
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


class ClientEvent(NamedTuple):
    """A well-formed client event."""

    #: "message", "name", "typing", "resume" or "refresh".
    type: str
    #: The message's text, the name asked for, the epoch to resume in, or
    #: the fresh token; "" for typing.
    value: str = ""
    #: The client's tag for a message (string or integer), echoed in its ack.
    ref: str | int | None = None
    #: The last offset a ``resume`` has seen.
    since: int = 0


class BadEvent(Exception):  # noqa: N818 - it is the event, not an error of ours
    """A client event that cannot be acted on: the ``error`` event it earns."""

    def __init__(self, code: str, reason: str, ref: str | int | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.ref = ref


def check_name(raw: str) -> str:
    """
    The name ``raw`` asks for, trimmed; ``BadEvent("bad_name")`` if it is
    empty, longer than MAX_NAME_CHARS, or has a control, format (bidi) or
    separator character in it.
    """
    name = raw.strip()
    if not name or len(name) > MAX_NAME_CHARS:
        raise BadEvent("bad_name", f"a name is 1-{MAX_NAME_CHARS} characters")
    if any(unicodedata.category(char) in _BAD_CATEGORIES for char in name):
        raise BadEvent("bad_name", "a name may not have control characters")
    return name


def check_resume(since: str | None, epoch: str | None) -> tuple[int, str] | None:
    """
    The ``(since, epoch)`` a WebSocket URL's ``?since=&epoch=`` asks to
    resume from, None when it asks nothing, ``BadEvent("bad_resume")`` when
    either is missing or malformed (the connection still opens).
    """
    if since is None and epoch is None:
        return None
    if since is None or not SINCE.fullmatch(since):
        raise BadEvent("bad_resume", "since must be an offset (an integer >= 0)")
    if epoch is None or not EPOCH.fullmatch(epoch):
        raise BadEvent("bad_resume", "epoch must be 1-64 of A-Z a-z 0-9 _ -")
    return int(since), epoch


def _ref(event: dict[str, Any]) -> str | int | None:
    ref = event.get("ref")
    if ref is None:
        return None
    if isinstance(ref, bool) or not isinstance(ref, (str, int)):
        raise BadEvent("bad_event", "ref must be a string or an integer")
    if isinstance(ref, str) and len(ref) > MAX_REF_CHARS:
        raise BadEvent("bad_event", f"ref is at most {MAX_REF_CHARS} characters")
    return ref


def parse_event(payload: bytes) -> ClientEvent:
    """
    One client event from a text message's ``payload`` (valid UTF-8), or
    ``BadEvent`` with ``bad_json``, ``unknown_type`` or ``bad_event``.
    """
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError):
        raise BadEvent("bad_json", "not a JSON event") from None
    if not isinstance(event, dict):
        raise BadEvent("bad_json", "an event is a JSON object")
    kind = event.get("type")
    ref = None
    if kind == "message":
        ref = _ref(event)
        text = event.get("text")
        if not isinstance(text, str):
            raise BadEvent("bad_event", "a message needs a text string", ref)
        return ClientEvent("message", text, ref)
    if kind == "name":
        name = event.get("name")
        if not isinstance(name, str):
            raise BadEvent("bad_event", "a name event needs a name string")
        return ClientEvent("name", name)
    if kind == "typing":
        return ClientEvent("typing")
    if kind == "resume":
        since = event.get("since")
        epoch = event.get("epoch")
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise BadEvent("bad_event", "a resume needs since, an integer >= 0")
        if not isinstance(epoch, str) or not EPOCH.fullmatch(epoch):
            raise BadEvent("bad_event", "a resume needs an epoch string")
        return ClientEvent("resume", epoch, since=since)
    if kind == "refresh":
        token = event.get("token")
        if not isinstance(token, str) or not token:
            raise BadEvent("bad_event", "a refresh needs a token string")
        return ClientEvent("refresh", token)
    if not isinstance(kind, str):
        raise BadEvent("bad_event", "an event needs a type string")
    raise BadEvent("unknown_type", "unknown event type")
