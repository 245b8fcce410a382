"""
Check that a webhook request comes from webchat, and is fresh.

In your endpoint:  webhook_valid(secret, request_body_bytes,
                       headers["Webchat-Timestamp"], headers["Webchat-Signature"])
From a shell:      python verify_webhook.py TIMESTAMP SIGNATURE < body.json
  WEBCHAT_WEBHOOK_SECRET_FILE  the file given to --webhook-secret-file
"""

import hashlib
import hmac
import json
import os
import sys
import time

MAX_AGE = 300  # seconds: older (or later) requests are replays


def webhook_valid(
    secret: str,
    body: bytes,
    timestamp: str,
    signature_header: str,
    now: float | None = None,
) -> bool:
    if not timestamp.isdigit() or abs((now or time.time()) - int(timestamp)) > MAX_AGE:
        return False
    signed = timestamp.encode("ascii") + b"." + body
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    expected = f"v1={digest}"
    # Several signatures, comma-separated, while a secret is being rotated.
    return any(
        hmac.compare_digest(expected, signature.strip())
        for signature in signature_header.split(",")
    )


if __name__ == "__main__":
    with open(os.environ["WEBCHAT_WEBHOOK_SECRET_FILE"], encoding="utf-8") as f:
        secret = f.readline().strip()
    body = sys.stdin.buffer.read()
    timestamp, signature = [*sys.argv[1:], "", ""][:2]
    if not webhook_valid(secret, body, timestamp, signature):
        sys.exit("rejected")
    event = json.loads(body)
    # At least once: the same event may come again; keep event["id"] to skip repeats.
    print(event["type"], event["id"])
