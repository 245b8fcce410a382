"""
Publish a message into a room through webchat's HTTP API (urllib only).

From a shell:  python publish.py ROOM TEXT [IDEMPOTENCY_KEY]
  WEBCHAT_URL           the server, default http://127.0.0.1:8080
  WEBCHAT_API_KEY_FILE  the file given to --api-key-file
"""

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request


def publish_message(
    base_url: str,
    api_key: str,
    room: str,
    text: str,
    idempotency_key: str | None = None,
) -> dict:
    body = {"text": text}
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key  # a retry is not delivered twice
    path = f"/api/rooms/{urllib.parse.quote(room, safe='')}/messages"
    request = urllib.request.Request(
        base_url.rstrip("/") + path,
        data=json.dumps(body).encode("utf-8"),
        headers={
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)  # {"room": ..., "offset": ...}
    except urllib.error.HTTPError as e:
        # {"error": "...", "detail": "..."}; 429 comes with Retry-After.
        error = json.load(e)
        raise RuntimeError(f"{e.code} {error['error']}: {error['detail']}") from None


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python publish.py ROOM TEXT [IDEMPOTENCY_KEY]")
    with open(os.environ["WEBCHAT_API_KEY_FILE"], encoding="utf-8") as f:
        api_key = f.readline().strip()
    base_url = os.environ.get("WEBCHAT_URL") or "http://127.0.0.1:8080"
    key = sys.argv[3] if len(sys.argv) > 3 else None
    try:
        sent = publish_message(base_url, api_key, sys.argv[1], sys.argv[2], key)
    except (RuntimeError, OSError) as e:
        sys.exit(f"not published: {e}")
    print(json.dumps(sent))
