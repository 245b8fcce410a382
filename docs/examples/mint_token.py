"""
Mint a webchat token (an HS256 JWT) with PyJWT.

In your app:   token = chat_token(secret, user_id, display_name, ["lobby", "team-*"])
From a shell:  python mint_token.py SECRET_FILE USER [NAME [ROOM,ROOM...]]
               (WEBCHAT_TOKEN_TTL: seconds until it expires, default 3600)
"""

import os
import sys
import time

import jwt  # pip install PyJWT


def chat_token(
    secret: str,
    user: str,
    name: str | None = None,
    rooms: list[str] | None = None,
    ttl: int = 3600,
) -> str:
    now = int(time.time())
    claims: dict = {"sub": user, "iat": now, "exp": now + ttl}
    if name is not None:
        claims["name"] = name
    if rooms is not None:
        claims["rooms"] = rooms
    return jwt.encode(claims, secret, algorithm="HS256")


def read_secret(path: str) -> str:
    """The secret file without surrounding whitespace, as webchat reads it."""
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python mint_token.py SECRET_FILE USER [NAME [ROOM,ROOM...]]")
    name = sys.argv[3] if len(sys.argv) > 3 else None
    rooms = [r for r in sys.argv[4].split(",") if r] if len(sys.argv) > 4 else None
    ttl = int(os.environ.get("WEBCHAT_TOKEN_TTL") or 3600)
    print(chat_token(read_secret(sys.argv[1]), sys.argv[2], name, rooms, ttl))
