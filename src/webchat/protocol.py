"""Old import path of the chat's WebSocket classes, for bench/ until it moves.

The protocol now lives in ``webchat.connection`` and the factory in
``webchat.chat`` (issue #12); import from there.
"""

from webchat.chat import WebChatFactory
from webchat.connection import _OPEN, WebChatProtocol

__all__ = ["_OPEN", "WebChatFactory", "WebChatProtocol"]
