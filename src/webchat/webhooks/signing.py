"""Signing a webhook request, and checking one (what a receiver does).

The signature covers the timestamp and the body, ``"<timestamp>.<body>"``,
so a captured request cannot be replayed later with a fresh timestamp, and
a receiver that rejects timestamps older than
``WEBHOOK_SIGNATURE_TOLERANCE`` seconds cannot be fed an old one at all.
``v1=`` names the scheme, so a second one can be added beside it one day.
"""

from __future__ import annotations

import hashlib
import hmac

from webchat.limits import WEBHOOK_SIGNATURE_TOLERANCE

#: The request's headers (docs/webhooks.md).
EVENT_ID_HEADER = "Webchat-Event-Id"
TIMESTAMP_HEADER = "Webchat-Timestamp"
SIGNATURE_HEADER = "Webchat-Signature"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``v1=`` and the hex HMAC-SHA256 of ``"<timestamp>.<body>"`` under ``secret``."""
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def request_headers(
    secret: bytes, event_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Every header of one attempt: signed anew each time, with its own timestamp."""
    return {
        "Content-Type": "application/json",
        EVENT_ID_HEADER: event_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }


def verify(
    secret: bytes,
    timestamp: str,
    signature: str,
    body: bytes,
    now: float,
    tolerance: float = WEBHOOK_SIGNATURE_TOLERANCE,
) -> bool:
    """
    Whether a request is webchat's and fresh: what a receiver in Python does
    (the tests' receiver, and the example in docs/webhooks.md).  Compared in
    constant time; a timestamp further than ``tolerance`` from ``now`` is
    refused whatever its signature.
    """
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs(now - sent) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, sent, body), signature)
